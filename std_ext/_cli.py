"""Argument types, errors and device choice shared by the ``std_ext`` commands (:mod:`std_ext.demo`, :mod:`std_ext.cli_generate`)."""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Callable

import torch


def int_at_least(low: int, auto: bool = False) -> Callable[[str], int | str]:
    """An argparse ``type``: an integer ``>= low`` (or, with ``auto``, the word ``auto``: chosen by
    std_ext.generate), else a message argparse prints with the option's name."""
    alternative = " or 'auto'" if auto else ""

    def parse(value: str) -> int | str:
        if auto and value == "auto":
            return value
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer{alternative}, got {value!r}") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{alternative}, got {number}")
        return number

    parse.__name__ = f"integer >= {low}{alternative}"  # argparse names the type in some messages
    return parse


# --gamma: drafts per round; --budget: kept positions per KV head
gamma_choice, budget_choice = int_at_least(1, auto=True), int_at_least(0, auto=True)


def add_draft_weights_option(parser: argparse.ArgumentParser, default: str | None = "model",
                             shown_default: str = "%(default)s") -> None:
    """``--draft-weights``: the precision of the draft's copy of the weights (std_ext.generate's draft_weights).

    ``default=None`` leaves the choice to the command (``shown_default`` then says what it is)."""
    from .draft_weights import PRECISIONS

    parser.add_argument("--draft-weights", choices=("model", *PRECISIONS), default=default, metavar="PREC",
                        help=f"weights the draft steps run: 'model' (the model's own) or a weight-only copy in "
                             f"{', '.join(PRECISIONS)}; the verify always runs the model's own weights, so the "
                             f"output is the same (default: {shown_default})")


def draft_weights_of(args: argparse.Namespace, default: str | None = None) -> str | None:
    """``std_ext.generate``'s ``draft_weights`` for ``--draft-weights`` (``'model'`` -> None; unset -> ``default``)."""
    if args.draft_weights is None:
        return default
    return None if args.draft_weights == "model" else args.draft_weights


def speed_sentence(std_rate: float, vanilla_rate: float) -> str:
    """Which mode decoded faster, in words, and by how much (rates in tokens per second)."""
    rates = f"{std_rate:.1f} vs {vanilla_rate:.1f} tokens/s"
    ratio = std_rate / vanilla_rate
    if f"{ratio:.2f}" == "1.00":
        return f"StD and vanilla decoded equally fast ({rates})"
    if ratio > 1:
        return f"StD decoded {ratio:.2f}\u00d7 faster than vanilla ({rates})"
    return f"StD was {1 / ratio:.2f}\u00d7 slower than vanilla ({rates})"


def plain(text: str) -> str:
    """Docstring markup as a terminal shows it: ``code`` and :role:`target` become plain words."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "").replace("`", "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` in plain words that fit the terminal: markup dropped, each paragraph of a
    description re-wrapped to the width (indented lines, such as usage examples, kept as written)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs: list[tuple[str, list[str]]] = []  # (indent, words of its lines); ("", []) = a blank line
        for line in plain(text).splitlines():
            margin = line[:len(line) - len(line.lstrip())]
            bullet = line.lstrip().startswith(("* ", "- "))
            if not line.strip():
                paragraphs.append(("", []))
            elif paragraphs and paragraphs[-1][1] and not bullet and (
                    paragraphs[-1][0] == margin or  # a bullet's continuation lines are indented under its text
                    paragraphs[-1][1][0].startswith(("* ", "- ")) and len(margin) > len(paragraphs[-1][0])):
                paragraphs[-1][1].append(line.strip())
            else:
                paragraphs.append((margin, [line.strip()]))
        blocks = []
        for margin, lines in paragraphs:
            if not lines:
                blocks.append("")
                continue
            hanging = "  " if lines[0].startswith(("* ", "- ")) else ""
            blocks.append(textwrap.fill(" ".join(lines), width, initial_indent=indent + margin,
                                        subsequent_indent=indent + margin + hanging, break_on_hyphens=False))
        return "\n".join(blocks)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return super()._split_lines(plain(text), width)


class CliError(Exception):
    """A bad argument or input: reported as ``ARGUMENT: message`` with exit code 2, no traceback."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}" if argument else message)


def resolve_device(choice: str) -> torch.device:
    """``--device``: ``auto`` is cuda when a GPU is present and std_ext has CUDA kernels, else cpu;
    ``cuda`` without both is a :class:`CliError`."""
    import std_ext

    has_cuda, has_kernels = torch.cuda.is_available(), std_ext.cuda_kernels_built()
    if choice == "cuda" and not (has_cuda and has_kernels):
        reason = ("torch sees no CUDA device" if not has_cuda else
                  "this build of std_ext has no CUDA kernels (rebuild with STD_EXT_CUDA=1 pip install "
                  "--no-build-isolation .)")
        raise CliError("--device cuda", f"{reason}; use --device cpu")
    if choice == "auto":
        choice = "cuda" if has_cuda and has_kernels else "cpu"
        if has_cuda and not has_kernels:
            print("std_ext: a CUDA device is present but std_ext was built without CUDA kernels; running on the CPU",
                  file=sys.stderr)
    return torch.device(choice)


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU (what video LLMs are served in), float32 on the CPU (fast there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
