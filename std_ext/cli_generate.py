"""Answer a question about a video with a local checkpoint, decoding with Sparse-to-Dense.

    python -m std_ext generate --model DIR --video FRAMES --question TEXT [--compare]

--model is a local transformers checkpoint directory of a video LLM that
std_ext.generate supports (a text decoder with full causal attention through
transformers' attention interface: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision,
LLaVA-NeXT-Video, InternVL3, GLM-4.1V, ...), with its processor and tokenizer files.
It is loaded with transformers' Auto classes; a model std_ext cannot decode exactly is
refused, naming the feature, before its weights are loaded.

--video is a video file (.mp4 .avi .mkv .webm .mov, decoded by transformers'
load_video with PyAV), a folder of images or an .npy array [T, H, W, 3]; --num-frames
frames are sampled uniformly. A folder or an array has no frame rate: give it with
--fps (processors that place frames in time assume their own default otherwise).

The prompt is the checkpoint's chat template with one video and the question, and the
checkpoint's own processor (AutoProcessor; its video processors need torchvision) turns
it and the frames into every model input. Decoding is greedy; the checkpoint's other
generation settings apply as in transformers' generate, and one std_ext does not
reproduce is refused by name. Prints the answer and the decode statistics; --compare
also decodes with vanilla (dense) decoding and says which was faster and whether the
new tokens are identical.

Exit codes: 0 success, 1 --compare found different outputs, 2 bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ._cli import (CliError, HelpFormatter, add_draft_weights_option, budget_choice, default_dtype, draft_weights_of,
                   gamma_choice, int_at_least, resolve_device, speed_sentence)
from .frames import FrameLoadError, VideoFrames, is_video_file, load_frames
from .generate import GenerationOutput, GenerationStats
from .selection import POLICIES

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedTokenizerBase

__all__ = ["CliError", "PromptInputs", "add_arguments", "load_processor", "prepare_prompt", "run"]

PROG = "python -m std_ext generate"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config attributes naming a visual placeholder token: a model without any takes no video.
_PLACEHOLDER_ATTRS = ("video_token_id", "video_token_index", "image_token_id", "image_token_index")


# =========================================================================== arguments


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0 < number < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


_positive_float.__name__ = "positive number"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``generate`` options to ``parser`` (a subcommand parser or a fresh one)."""
    parser.formatter_class = HelpFormatter
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="local transformers checkpoint directory, with its processor files (required)")
    parser.add_argument("--video", required=True, metavar="FRAMES",
                        help="video file, folder of images, or .npy array [T,H,W,3] or [T,3,H,W] (required)")
    parser.add_argument("--question", required=True, metavar="TEXT", help="the question about the video (required)")
    parser.add_argument("--compare", action="store_true",
                        help="also decode with vanilla decoding; say which was faster and whether the outputs "
                             "match (default: off)")
    parser.add_argument("--num-frames", type=int_at_least(0), default=32, metavar="N",
                        help="at most N frames, sampled uniformly; 0 = all (default: %(default)s)")
    parser.add_argument("--fps", type=_positive_float, default=None, metavar="RATE",
                        help="frame rate of a folder of images or an .npy array (default: a video file's own; "
                             "unknown for the others)")
    parser.add_argument("--gamma", type=gamma_choice, default=9, metavar="G",
                        help="draft tokens per round, or 'auto' to choose each round's from measured step "
                             "times and draft agreement (default: %(default)s)")
    parser.add_argument("--budget", type=budget_choice, default=1024, metavar="K",
                        help="kept prompt positions per KV head, or 'auto' for the largest keep set the cost "
                             "model says pays (default: %(default)s)")
    parser.add_argument("--selection", choices=sorted(POLICIES), default="question", metavar="POLICY",
                        help=f"how the keep set is chosen: {', '.join(sorted(POLICIES))} (default: %(default)s)")
    add_draft_weights_option(parser)
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=128, metavar="N",
                        help="tokens to generate at most (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", metavar="DEVICE",
                        help="auto, cpu or cuda; auto: cuda when available and std_ext has CUDA kernels, else "
                             "cpu (default: %(default)s)")
    parser.add_argument("--dtype", choices=("auto", *_DTYPES), default="auto", metavar="DTYPE",
                        help=f"model dtype: auto, {', '.join(_DTYPES)}; auto: bfloat16 on cuda, float32 on cpu "
                             "(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")


# =========================================================================== run


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code (0 ok, 1 --compare mismatch, 2 bad input)."""
    try:
        return _run(args)
    except CliError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise CliError("--question", "the question is empty")
    model_dir = _check_model_dir(args.model)
    config = _load_config(model_dir)
    _check_takes_video(config, model_dir)
    device = resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    if args.fps is not None and is_video_file(args.video):
        raise CliError("--fps", f"{args.video} is a video file, which carries its own frame rate; --fps is for a "
                                "folder of images or an .npy array")
    try:
        video = load_frames(args.video, args.num_frames, args.fps)
    except FrameLoadError as error:
        raise CliError("--video", str(error)) from None
    if video.fps is None:
        _log("the frame rate is unknown (a folder or an array without --fps); processors that place frames in "
             "time assume their own default (Qwen2.5-VL, Qwen3-VL: 24 fps)")
    # Everything that can be checked without the weights is checked before the (slow) load.
    model_class = _model_class(config, model_dir)
    _check_supported(model_class, config, model_dir)
    prompt = prepare_prompt(model_dir, config, video, args.question)
    _log(f"loading {model_class.__name__} from {model_dir} on {device} ({str(dtype).removeprefix('torch.')})")
    model = _load_model(model_class, model_dir, device, dtype)
    std = _generate(model, prompt, args, "std", device, dtype, model_dir)
    _print_answer(prompt, _new_tokens(std, prompt))
    print(_format_run(std.stats, prompt, video, args))
    if not args.compare:
        return 0
    vanilla = _generate(model, prompt, args, "vanilla", device, dtype, model_dir)
    return _compare(std, vanilla, prompt)


def _print_answer(prompt: PromptInputs, token_ids: list[int], title: str = "Answer:") -> None:
    print(title)
    print(prompt.decode(token_ids))
    print()


def _compare(std: GenerationOutput, vanilla: GenerationOutput, prompt: PromptInputs) -> int:
    """Print the vanilla run and the comparison; 0 when the new tokens are identical, else 1."""
    std_ids, vanilla_ids = _new_tokens(std, prompt), _new_tokens(vanilla, prompt)
    print()
    print(_format_phases(vanilla.stats, "Vanilla decoding"))
    print()
    print(_format_compare(std.stats, vanilla.stats, std_ids, vanilla_ids))
    if std_ids == vanilla_ids:
        return 0
    print()
    _print_answer(prompt, vanilla_ids, "Vanilla answer:")
    return 1


def _log(message: str) -> None:
    print(f"std_ext generate: {message}", file=sys.stderr, flush=True)


# =========================================================================== model


def _check_model_dir(path: str) -> Path:
    model_dir = Path(path)
    if not model_dir.exists():
        raise CliError("--model", f"{model_dir}: no such directory")
    if not model_dir.is_dir():
        raise CliError("--model", f"{model_dir}: not a directory; give a local transformers checkpoint directory")
    if not (model_dir / "config.json").is_file():
        raise CliError("--model", f"{model_dir}: not a transformers checkpoint (no config.json)")
    return model_dir


def _load_config(model_dir: Path) -> PreTrainedConfig:
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as error:
        raise CliError("--model", f"{model_dir}: not a transformers checkpoint this transformers "
                                  f"{transformers.__version__} can read ({_first_line(error)})") from None


def _described(config: PreTrainedConfig) -> str:
    return ", ".join(getattr(config, "architectures", None) or []) or f"model_type {config.model_type!r}"


def _placeholder_ids(config: PreTrainedConfig) -> tuple[int, ...]:
    """The video and image placeholder token ids the config names."""
    ids: list[int] = []
    for attr in _PLACEHOLDER_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return tuple(ids)


def _check_takes_video(config: PreTrainedConfig, model_dir: Path) -> None:
    """A model whose config names no visual placeholder token takes no video (a text-only LLM)."""
    if not _placeholder_ids(config):
        raise CliError("--model", f"{model_dir}: {_described(config)} is a text-only model (its config names no "
                                  "video or image placeholder token); generate needs a video LLM")


def _model_class(config: PreTrainedConfig, model_dir: Path) -> type:
    """The class ``transformers`` loads the checkpoint with: AutoModelForImageTextToText's, else
    AutoModelForCausalLM's, else the class the config's ``architectures`` names."""
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping in (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING):
        try:
            return mapping[type(config)]
        except KeyError:
            continue
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    raise CliError("--model", f"{model_dir}: transformers {transformers.__version__} has no model class for "
                              f"{_described(config)} (neither AutoModelForImageTextToText nor AutoModelForCausalLM "
                              "knows its config, and no class its config names exists)")


def _unsupported_message(model_dir: Path, error: Exception) -> CliError:
    # The engine's message names itself and its argument; on the command line the argument is --model.
    message = re.sub(r"^std_ext\.generate: (model: )?", "", str(error))
    return CliError("--model", f"{model_dir}: {message}")


def _check_supported(cls: type, config: PreTrainedConfig, model_dir: Path) -> None:
    """Refuse, before the weights load, a model std_ext cannot decode exactly.

    ``ModelAdapter.for_model`` reads what it needs (layers, attention modules, config,
    forward) off a weightless copy on the meta device. Where such a copy cannot be built,
    the same check runs on the loaded model inside ``std_ext.generate``.
    """
    from .models import ModelAdapter, UnsupportedModelError

    try:
        with torch.device("meta"):
            skeleton = cls._from_config(copy.deepcopy(config))  # _from_config writes into the config it gets
    except Exception:  # noqa: BLE001 - any failure only defers the check to the loaded model
        return
    try:
        ModelAdapter.for_model(skeleton)
    except UnsupportedModelError as error:
        raise _unsupported_message(model_dir, error) from None


def _resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return default_dtype(device)
    return _DTYPES[choice]


def _load_model(cls: type, model_dir: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    try:
        model = cls.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as error:
        raise CliError("--model", f"{model_dir}: cannot load the {cls.__name__} weights "
                                  f"({_first_line(error)})") from None
    return model.to(device).eval()


# =========================================================================== prompt and model inputs

# Where a checkpoint keeps its processor: AutoProcessor reads these, and a broken one is named.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                    "chat_template.json", "chat_template.jinja", "tokenizer_config.json", "tokenizer.json")


@dataclass
class PromptInputs:
    """The prompt of one question about one video, as the checkpoint's processor made it.

    Attributes
    ----------
    input_ids : long ``[1, T]``, the video placeholder already expanded to one id per visual token
    model_inputs : every other input the processor returned (``attention_mask``,
        ``mm_token_type_ids``, ``pixel_values_videos``, ``video_grid_thw``, ...), on the CPU
    visual_tokens : how many of the ``T`` prompt tokens are visual placeholders
    source : the processor, in words
    tokenizer : decodes the answer
    """

    input_ids: torch.Tensor
    model_inputs: dict
    visual_tokens: int
    source: str
    tokenizer: PreTrainedTokenizerBase

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def prepare_prompt(model_dir: Path, config: PreTrainedConfig, video: VideoFrames, question: str) -> PromptInputs:
    """Prompt and model inputs from the checkpoint's own processor (``AutoProcessor``).

    The chat template renders one video and the question plus the generation prompt; the
    processor expands the video placeholder and returns every model input (pixels, grids,
    timestamps, ``mm_token_type_ids``, ...). ``video`` is already sampled: the processor
    keeps every frame, placed in time by the frames' metadata.
    """
    processor = load_processor(model_dir)
    name = type(processor).__name__
    # A processor saved without a chat template renders with its tokenizer's.
    template = None
    if not getattr(processor, "chat_template", None):
        template = getattr(processor.tokenizer, "chat_template", None)
        if not template:
            raise CliError("--model", f"{model_dir}: the checkpoint has no chat template (chat_template.jinja, "
                                      "chat_template.json or the tokenizer's), which its processor needs")
    try:
        text = processor.apply_chat_template(_messages(question), chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as error:  # noqa: BLE001 - jinja and transformers raise many types
        raise CliError("--model", f"{model_dir}: {name} cannot render the chat prompt ({_first_line(error)})") from None
    try:
        batch = processor(text=[text], videos=[video.frames], video_metadata=[video.metadata()],
                          do_sample_frames=False, return_tensors="pt")
    except Exception as error:  # noqa: BLE001 - the processor's own checks raise many types
        raise CliError("--video", f"{name} cannot prepare this video ({_first_line(error)})") from None
    inputs = {key: value for key, value in batch.items() if key != "video_metadata"}
    input_ids = inputs.pop("input_ids")
    visual = _count_placeholders(input_ids, config)
    if visual == 0:
        raise CliError("--model", f"{model_dir}: {name}'s prompt holds none of the model's video or image "
                                  f"placeholder tokens (ids {', '.join(map(str, _placeholder_ids(config)))}); "
                                  "the tokenizer and the model's config disagree")
    return PromptInputs(input_ids=input_ids, model_inputs=inputs, visual_tokens=visual,
                        source=f"the checkpoint's processor ({name})", tokenizer=processor.tokenizer)


def load_processor(model_dir: Path):
    """The checkpoint's ``AutoProcessor``, with a video processor; else one :class:`CliError`
    naming the missing package or the file that does not load."""
    import transformers

    _require("torchvision", "transformers' video processors")
    files = [name for name in _PROCESSOR_FILES if (model_dir / name).is_file()]
    # Without these, AutoProcessor quietly falls back to a bare tokenizer or an empty one.
    if not any(name in files for name in _PROCESSOR_FILES[:3]):
        raise CliError("--model", f"{model_dir}: no processor files ({', '.join(_PROCESSOR_FILES[:3])}); "
                                  "copy them from the checkpoint's original repository")
    if not any(name.startswith("tokenizer") for name in files) and not (model_dir / "tokenizer.model").is_file():
        raise CliError("--model", f"{model_dir}: no tokenizer files (tokenizer.json, tokenizer_config.json or "
                                  "tokenizer.model); the processor needs its tokenizer")
    for name in files:
        if name.endswith(".json"):
            try:
                json.loads((model_dir / name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as error:
                raise CliError("--model", f"{model_dir / name}: not readable JSON ({_first_line(error)})") from None
    try:
        processor = transformers.AutoProcessor.from_pretrained(model_dir)
    except Exception as error:  # noqa: BLE001 - processor loading fails in many ways; each is named below
        missing = re.search(r"requires the (\w+) library but it was not found|"
                            r"Missing optional dependencies: ([\w, ]+)", str(error))
        if missing:
            package = missing.group(1) or missing.group(2).strip()
            raise CliError("--model", f"{model_dir}: its processor needs {package}, which is not installed: "
                                      f"pip install {package}") from None
        raise CliError("--model", f"{model_dir}: cannot load the processor from {', '.join(files)} "
                                  f"({_first_line(error)})") from None
    if getattr(processor, "video_processor", None) is None:
        raise CliError("--model", f"{model_dir}: {type(processor).__name__} has no video processor, so the model "
                                  "takes no video through it")
    return processor


def _require(package: str, what: str) -> None:
    try:
        importlib.import_module(package)
    except ImportError as error:
        raise CliError("", f"{what} need {package}, which does not import ({_first_line(error, 120)}): "
                           f"pip install {package} (the release built for your torch; CI pairs torch 2.14.1 "
                           "with torchvision 0.29.1)") from None


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]


def _count_placeholders(input_ids: torch.Tensor, config: PreTrainedConfig) -> int:
    return int(sum(int((input_ids == token_id).sum()) for token_id in _placeholder_ids(config)))


# =========================================================================== generation and report


def _generate(model: torch.nn.Module, prompt: PromptInputs, args: argparse.Namespace, mode: str,
              device: torch.device, dtype: torch.dtype, model_dir: Path) -> GenerationOutput:
    import std_ext

    _log(f"decoding ({mode})")
    inputs = {key: _to_model(key, value, device, dtype) for key, value in prompt.model_inputs.items()}
    try:
        return std_ext.generate(
            model, prompt.input_ids.to(device), mode=mode, gamma=args.gamma, budget=args.budget,
            max_new_tokens=args.max_new_tokens, selection=args.selection, progress=not args.no_progress,
            do_sample=False, draft_weights=draft_weights_of(args) if mode == "std" else None, **inputs,
        )
    except std_ext.UnsupportedModelError as error:
        raise _unsupported_message(model_dir, error) from None
    except ValueError as error:
        raise CliError("", str(error)) from None
    except TypeError as error:
        if not str(error).startswith("std_ext.generate"):
            raise
        hint = (f"; here, edit {model_dir / 'generation_config.json'}" if "is not implemented" in str(error) else "")
        raise CliError("--model", f"{model_dir}: {error}{hint}") from None


def _to_model(key: str, value, device: torch.device, dtype: torch.dtype):
    """Each input on the model's device; pixels also in the model's dtype.

    Only pixels are cast: a vision tower casts them to its dtype itself, while values such
    as ``second_per_grid_ts`` must reach the model as the processor made them.
    """
    if not isinstance(value, torch.Tensor):
        return value
    if key.startswith("pixel_values") and value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device)


def _new_tokens(output: GenerationOutput, prompt: PromptInputs) -> list[int]:
    start = prompt.input_ids.shape[1]
    return output.sequences[0, start:start + output.stats.new_tokens[0]].tolist()


def _decode_rate(stats: GenerationStats) -> float | None:
    """Decode tokens per second; the first new token comes from prefill, so it is left out."""
    tokens = stats.new_tokens[0] - 1
    return tokens / stats.decode_s if tokens > 0 and stats.decode_s > 0 else None


def _format_frames(video: VideoFrames) -> str:
    t, h, w = video.frames.shape[:3]
    rate = f"{video.fps:g} fps" if video.fps else "frame rate unknown"
    return f"{t} x {h}x{w} of {video.total_frames} ({video.kind}, {rate})"


def _format_run(stats: GenerationStats, prompt: PromptInputs, video: VideoFrames, args: argparse.Namespace) -> str:
    lines = [
        f"Sparse-to-Dense decoding (gamma={args.gamma}, budget={args.budget}, selection={args.selection}, "
        f"draft weights={args.draft_weights}):",
        f"  model inputs     {prompt.source}",
        f"  frames           {_format_frames(video)}",
        f"  prompt tokens    {prompt.input_ids.shape[1]}",
        f"  visual tokens    {prompt.visual_tokens}",
        f"  keep size        {stats.keep_size:.1f} positions per KV head",
        f"  new tokens       {stats.new_tokens[0]}",
        f"  rounds           {stats.rounds}",
        f"  mean accepted    {stats.mean_accepted:.2f} / {stats.gamma}",
    ]
    if stats.gamma_auto:
        lines.append(f"  gamma per round  {' '.join(map(str, stats.gammas))}")
    return "\n".join(lines + _phase_lines(stats))


def _format_phases(stats: GenerationStats, title: str) -> str:
    return "\n".join([f"{title}:", f"  new tokens       {stats.new_tokens[0]}"] + _phase_lines(stats))


def _phase_lines(stats: GenerationStats) -> list[str]:
    rate = _decode_rate(stats)
    return [
        f"  prefill          {stats.prefill_s:.3f} s",
        f"  selection        {stats.selection_s:.3f} s",
        f"  draft            {stats.draft_s:.3f} s",
        f"  verify           {stats.verify_s:.3f} s",
        f"  decode           {'n/a' if rate is None else f'{rate:.2f}'} tokens/s "
        f"({max(stats.new_tokens[0] - 1, 0)} tokens in {stats.decode_s:.3f} s)",
    ]


def _format_compare(std: GenerationStats, vanilla: GenerationStats, std_ids: list[int],
                    vanilla_ids: list[int]) -> str:
    std_rate, vanilla_rate = _decode_rate(std), _decode_rate(vanilla)
    speed = "n/a (no decoding step to time)"
    if std_rate and vanilla_rate:
        speed = speed_sentence(std_rate, vanilla_rate)
    lines = ["Comparison with vanilla decoding:", f"  decode speed     {speed}"]
    if std_ids == vanilla_ids:
        lines.append(f"  outputs          identical ({len(std_ids)} new tokens)")
        return "\n".join(lines)
    first = next((i for i, (a, b) in enumerate(zip(std_ids, vanilla_ids)) if a != b),
                 min(len(std_ids), len(vanilla_ids)))
    lines += [
        f"  outputs          DIFFERENT (first difference at new token {first})",
        "  (verify and vanilla steps sum in different orders; in low precision that can flip a",
        "  near-tie between the top two logits, anything else is a bug: DESIGN.md section 5)",
    ]
    return "\n".join(lines)


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
