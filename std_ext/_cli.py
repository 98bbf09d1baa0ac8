"""Argument types, errors and device choice shared by the ``std_ext`` commands (:mod:`std_ext.demo`, :mod:`std_ext.cli_generate`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low``, else a message argparse prints with the option's name."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {number}")
        return number

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


def gamma_choice(value: str) -> int | str:
    """An argparse ``type`` for ``--gamma``: an integer >= 1, or ``auto`` (γ chosen per round)."""
    if value == "auto":
        return value
    try:
        return int_at_least(1)(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {value!r}") from None


gamma_choice.__name__ = "integer >= 1 or 'auto'"


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
