"""Answer a question about a video with a local checkpoint, decoding with Sparse-to-Dense.

    python -m std_ext generate --model DIR --video FRAMES --question TEXT [--compare]

--model is a local `transformers` checkpoint directory of a video LLM that
std_ext.generate supports (any model whose text decoder runs full causal attention through
transformers' attention interface: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, ...).
It is loaded with transformers' Auto classes (AutoModelForImageTextToText, else
AutoModelForCausalLM, else the class its config names); a model std_ext cannot decode
exactly is refused, naming the feature, before its weights are loaded.

--video is a video file (.mp4 .avi .mkv .webm .mov; decoded by transformers'
load_video with PyAV: pip install av), a folder of images (needs Pillow) or an .npy array
[T, H, W, 3] / [T, 3, H, W]; --num-frames frames are sampled uniformly. A folder or an
array has no frame rate: give it with --fps (Qwen2.5-VL and Qwen3-VL place frames in
time; their processors assume 24 fps otherwise).

The prompt is the checkpoint's chat template with one video and the question, plus the
generation prompt, and the checkpoint's own processor (AutoProcessor) turns it and the
frames into model inputs; every input it returns (mm_token_type_ids,
second_per_grid_ts, ...) goes to the model. Where that processor cannot load (Qwen-VL
video processors need torchvision), Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints fall
back to std_ext's built-in pure-torch copy of their processors (resize, rescale,
normalize, patchify; the placeholder tokens, Qwen3-VL's frame timestamps, Qwen2.5-VL's
second_per_grid_ts and mm_token_type_ids), with the parameters of the checkpoint's own
preprocessor config and the tokenizer from AutoTokenizer. The output says which path
was used; --preprocess chooses one.

Decoding is greedy (do_sample=False); the checkpoint's other generation settings
(eos_token_id, repetition_penalty, ...) apply as in transformers' generate, and one
std_ext does not reproduce is refused by name. Prints the answer and the decode statistics. --compare also decodes
with vanilla (dense, one token per step) decoding and reports the decode speedup and
whether the new tokens are identical. Exit codes: 0 success, 1 --compare found
different outputs, 2 bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._cli import CliError, default_dtype, gamma_choice, int_at_least, resolve_device
from .frames import FrameLoadError, VideoFrames, is_video_file, load_frames
from .generate import GenerationOutput, GenerationStats
from .selection import POLICIES

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedTokenizerBase

__all__ = [
    "CliError",
    "BuiltinFamily",
    "PromptInputs",
    "QwenVideoParams",
    "add_arguments",
    "builtin_family",
    "builtin_prompt",
    "prepare_prompt",
    "qwen2_vl_resized_size",
    "qwen3_vl_resized_size",
    "qwen_video_inputs",
    "run",
]

PROG = "python -m std_ext generate"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
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
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the docstring's layout in --help
    parser.add_argument("--model", required=True, metavar="DIR", help="local transformers checkpoint directory")
    parser.add_argument("--video", required=True, metavar="FRAMES",
                        help="video file, folder of images, or .npy array [T,H,W,3] or [T,3,H,W]")
    parser.add_argument("--question", required=True, metavar="TEXT", help="the question about the video")
    parser.add_argument("--compare", action="store_true",
                        help="also decode with vanilla decoding; report the speedup and whether outputs match")
    parser.add_argument("--num-frames", type=int_at_least(0), default=32, metavar="N",
                        help="at most N frames, sampled uniformly; 0 = all (default: 32)")
    parser.add_argument("--fps", type=_positive_float, default=None, metavar="RATE",
                        help="frame rate of a folder of images or an .npy array (a video file has its own)")
    parser.add_argument("--gamma", type=gamma_choice, default=9,
                        help="draft tokens per round, or 'auto' to choose each round's from measured step "
                             "times and draft agreement (default: 9)")
    parser.add_argument("--budget", type=int_at_least(0), default=1024,
                        help="kept prompt positions per KV head (default: 1024)")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=128, metavar="N",
                        help="tokens to generate at most (default: 128)")
    parser.add_argument("--selection", choices=sorted(POLICIES), default="question",
                        help="keep-set selection policy (default: question)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available and std_ext has CUDA kernels, else cpu")
    parser.add_argument("--dtype", choices=("auto", *_DTYPES), default="auto",
                        help="model dtype; auto: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--preprocess", choices=("auto", "processor", "builtin"), default="auto",
                        help="model inputs: the checkpoint's processor, std_ext's built-in Qwen-VL "
                             "preprocessing, or auto (the processor where it loads, else built-in) (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


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
    prompt = prepare_prompt(model_dir, config, video, args.question, args.preprocess)
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


@dataclass
class PromptInputs:
    """The prompt of one question about one video, ready for ``std_ext.generate``.

    Attributes
    ----------
    input_ids : long ``[1, T]``, the video placeholder already expanded to one id per visual token
    model_inputs : every other input the processor returned (``attention_mask``,
        ``mm_token_type_ids``, ``pixel_values_videos``, ``video_grid_thw``, ...), on the CPU
    visual_tokens : how many of the ``T`` prompt tokens are visual placeholders
    source : which preprocessing made them, in words
    tokenizer : decodes the answer
    """

    input_ids: torch.Tensor
    model_inputs: dict
    visual_tokens: int
    source: str
    tokenizer: PreTrainedTokenizerBase

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def prepare_prompt(model_dir: Path, config: PreTrainedConfig, video: VideoFrames, question: str,
                   preprocess: str = "auto") -> PromptInputs:
    """Prompt and model inputs through the checkpoint's processor, or std_ext's built-in copy of it.

    Parameters
    ----------
    video : the sampled frames and their metadata
    preprocess : "auto" (the processor where it loads, else built-in), "processor" or "builtin"
    """
    reason = ""
    if preprocess != "builtin":
        processor, reason = _load_processor(model_dir)
        if processor is not None:
            return _processor_prompt(processor, model_dir, config, video, question)
        if preprocess == "processor":
            raise CliError("--model", _no_processor_message(model_dir, reason))
    family, unserved = _builtin_family(model_dir, config)
    if family is None:
        if preprocess == "builtin":
            raise CliError("--preprocess", f"{model_dir}: {unserved}")
        raise CliError("--model", f"{_no_processor_message(model_dir, reason)}, and {unserved}")
    _log(f"model inputs: std_ext's built-in {family.processor} preprocessing"
         + (f" (the checkpoint's processor is unavailable: {reason})" if reason else ""))
    prompt = builtin_prompt(model_dir, config, video, question, family)
    if reason:
        prompt.source += f"; the checkpoint's processor is unavailable: {reason}"
    return prompt


def _load_processor(model_dir: Path):
    """``(processor, "")`` when the checkpoint's processor loads with a video processor, else ``(None, why)``."""
    import transformers

    try:
        processor = transformers.AutoProcessor.from_pretrained(model_dir)
    except Exception as error:  # noqa: BLE001 - any failure of the optional processor means: not available
        return None, _processor_failure(error)
    if getattr(processor, "video_processor", None) is None:
        return None, f"{type(processor).__name__} has no video processor"
    return processor, ""


def _processor_failure(error: BaseException) -> str:
    """Why the processor failed to load, in one short line (transformers' messages run long)."""
    text = str(error)
    missing = re.search(r"requires the (\w+) library but it was not found", text)
    if missing:
        return f"it needs {missing.group(1)} (not installed)"
    missing = re.search(r"Missing optional dependencies: ([^.]+)", text)
    if missing:
        return f"it needs {missing.group(1).strip()} (not installed)"
    return _first_line(error, 160)


def _no_processor_message(model_dir: Path, reason: str) -> str:
    lowered = reason.lower()
    advice = ("install Pillow and a torchvision built for your torch (pip install pillow torchvision)"
              if "torchvision" in lowered or "pillow" in lowered else "check the checkpoint's processor files")
    return f"{model_dir}: the checkpoint's processor cannot load ({reason}); {advice}"


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]


def _processor_prompt(processor, model_dir: Path, config: PreTrainedConfig, video: VideoFrames,
                      question: str) -> PromptInputs:
    """The real-user path: the checkpoint's own ``AutoProcessor``."""
    name = type(processor).__name__
    # A processor saved without a chat template renders with its tokenizer's, as the fallback does.
    template = None
    if not getattr(processor, "chat_template", None):
        template = getattr(processor.tokenizer, "chat_template", None)
    try:
        text = processor.apply_chat_template(_messages(question), chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as error:  # noqa: BLE001 - jinja and transformers raise many types
        raise CliError("--model", f"{model_dir}: {name} cannot render the chat prompt ({_first_line(error)})") from None
    try:
        # The frames are sampled already (load_frames): the processor keeps every one, and
        # their metadata places them in time as a processor-loaded video would be.
        batch = processor(text=[text], videos=[video.frames], video_metadata=[video.metadata()],
                          do_sample_frames=False, return_tensors="pt")
    except Exception as error:  # noqa: BLE001 - the processor's own checks raise many types
        raise CliError("--video", f"{name} cannot prepare this video ({_first_line(error)})") from None
    inputs = {key: value for key, value in batch.items() if key != "video_metadata"}
    input_ids = inputs.pop("input_ids")
    visual = _count_placeholders(input_ids, config)
    if visual == 0:
        raise CliError("--model", f"{model_dir}: {name}'s prompt holds no video or image placeholder tokens")
    return PromptInputs(input_ids=input_ids, model_inputs=inputs, visual_tokens=visual,
                        source=f"the checkpoint's processor ({name})", tokenizer=processor.tokenizer)


def _count_placeholders(input_ids: torch.Tensor, config: PreTrainedConfig) -> int:
    return int(sum(int((input_ids == token_id).sum()) for token_id in _placeholder_ids(config)))


# =========================================================================== built-in Qwen-VL preprocessing
#
# A pure-torch copy of what transformers' Qwen-VL processors compute, for machines where
# they cannot load (their video processors need torchvision). Each family differs only in
# the two tables below: how its video processor sizes frames, and what its processor
# writes into the prompt. A comparison test checks every output against the real
# processors wherever torchvision imports.

# Video processor -> its class defaults (transformers 5.x), for keys a checkpoint's config leaves out.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_VIDEO_PROCESSOR_DEFAULTS = {
    # Qwen2VLVideoProcessor: each frame's area within [min_pixels, max_pixels]
    "Qwen2VLVideoProcessor": dict(patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=128 * 28 * 28,
                                  max_pixels=28 * 28 * 768, image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
                                  max_video_tokens=128000),
    # Qwen3VLVideoProcessor: the whole video's volume (frames x area) within [min_pixels, max_pixels]
    "Qwen3VLVideoProcessor": dict(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=128 * 32 * 32,
                                  max_pixels=32 * 32 * 768, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                                  max_video_tokens=768),
}
# Processor -> what it adds: Qwen2-VL only expands the placeholder; Qwen2.5-VL also returns
# second_per_grid_ts; Qwen3-VL writes each temporal patch's timestamp before its own
# vision-start ... vision-end block.
_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor")
# model_type -> (processor, video processor) transformers picks where the checkpoint's files name none.
_MODEL_TYPES = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "qwen3_vl_moe": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}
_PARAM_FILES = ("processor_config.json", "video_preprocessor_config.json", "preprocessor_config.json")
_BICUBIC = 3  # PIL's resample code; the only one the Qwen-VL processors use


@dataclass(frozen=True)
class BuiltinFamily:
    """Which transformers processor the built-in preprocessing reproduces for a checkpoint.

    ``processor`` (Qwen2VLProcessor, Qwen2_5_VLProcessor or Qwen3VLProcessor) decides the
    prompt's placeholders; ``video_processor`` (Qwen2VLVideoProcessor or
    Qwen3VLVideoProcessor) the pixels.
    """

    processor: str
    video_processor: str


def builtin_family(model_dir: Path, config: PreTrainedConfig) -> BuiltinFamily:
    """The processor classes ``AutoProcessor`` would pick for the checkpoint, if the built-in path serves them.

    The names come from where transformers reads them -- ``processor_class`` in the
    processor, preprocessor or tokenizer config; ``video_processor_type`` (or the
    matching ``image_processor_type``) in the video preprocessing parameters -- and
    otherwise from the model type. Raises :class:`CliError` naming what is not served.
    """
    family, unserved = _builtin_family(model_dir, config)
    if family is None:
        raise CliError("--model", f"{model_dir}: {unserved}")
    return family


def _builtin_family(model_dir: Path, config: PreTrainedConfig) -> tuple[BuiltinFamily | None, str]:
    """``(family, "")``, or ``(None, why the built-in preprocessing does not serve the checkpoint)``."""
    files = {name: _read_json(model_dir / name) for name in (*_PARAM_FILES, "tokenizer_config.json")}
    params, _ = _video_params_dict(model_dir, required=False)
    defaults = _MODEL_TYPES.get(config.model_type, (None, None))
    processor = next((values["processor_class"] for values in
                      (files["processor_config.json"], files["preprocessor_config.json"],
                       files["video_preprocessor_config.json"], files["tokenizer_config.json"])
                      if isinstance(values.get("processor_class"), str)), defaults[0])
    video_processor = params.get("video_processor_type")
    if not isinstance(video_processor, str):
        inferred = str(params.get("image_processor_type", "")).replace("ImageProcessor", "VideoProcessor")
        video_processor = inferred if inferred in _VIDEO_PROCESSOR_DEFAULTS else defaults[1]
    served = (f"it serves {', '.join(_PROCESSORS)} with {' or '.join(_VIDEO_PROCESSOR_DEFAULTS)} "
              "(Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")
    if processor not in _PROCESSORS or video_processor not in _VIDEO_PROCESSOR_DEFAULTS:
        uses = f"{processor or 'an unknown processor'} with {video_processor or 'an unknown video processor'}"
        return None, (f"std_ext's built-in preprocessing does not reproduce {uses} ({_described(config)}); "
                      f"{served}")
    return BuiltinFamily(processor=processor, video_processor=video_processor), ""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CliError("--model", f"{path}: not readable JSON ({error})") from None
    return values if isinstance(values, dict) else {}


def _video_params_dict(model_dir: Path, required: bool = True) -> tuple[dict, str]:
    """The video processor's parameters and their file, where transformers looks:
    ``processor_config.json``'s ``video_processor`` entry, then
    ``video_preprocessor_config.json``, then ``preprocessor_config.json``."""
    for name in _PARAM_FILES:
        values = _read_json(model_dir / name)
        if name == "processor_config.json":
            values = values.get("video_processor")  # the nested v5 layout, else the separate files
        if isinstance(values, dict) and (model_dir / name).is_file():
            return values, name
    if required:
        raise CliError("--model", f"{model_dir}: no video preprocessing parameters "
                                  f"({', '.join(_PARAM_FILES[1:])}); the checkpoint is incomplete")
    return {}, ""


@dataclass(frozen=True)
class QwenVideoParams:
    """What a Qwen-VL video processor needs, with the meaning its class gives each key.

    ``min_pixels`` / ``max_pixels`` are the config's ``size.shortest_edge`` /
    ``size.longest_edge`` (Qwen2-VL's top-level ``min_pixels`` / ``max_pixels`` override
    them): the bounds of one frame's area for Qwen2VLVideoProcessor, of the whole video's
    volume (frames x area) for Qwen3VLVideoProcessor. ``cap_pixels_per_frame`` tightens
    them with the frame count as each class does (``max_video_tokens`` is its budget).
    """

    video_processor: str = "Qwen2VLVideoProcessor"
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 28 * 28 * 768
    image_mean: tuple[float, ...] = _CLIP_MEAN
    image_std: tuple[float, ...] = _CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000

    @classmethod
    def from_dict(cls, values: dict, video_processor: str = "Qwen2VLVideoProcessor") -> QwenVideoParams:
        """From a preprocessor-config dict, the class defaults of ``video_processor`` filling the rest.

        Raises ``ValueError`` for a setting the built-in path does not reproduce (a
        resampling filter other than bicubic, a size without both bounds).
        """
        if video_processor not in _VIDEO_PROCESSOR_DEFAULTS:
            raise ValueError(f"unknown video processor {video_processor!r}; expected one of "
                             f"{', '.join(_VIDEO_PROCESSOR_DEFAULTS)}")
        defaults = _VIDEO_PROCESSOR_DEFAULTS[video_processor]
        resample = values.get("resample")
        if resample is not None and resample != _BICUBIC:
            raise ValueError(f"resample {resample!r}: the built-in preprocessing resamples bicubic ({_BICUBIC}) only")
        size = values.get("size")
        size = dict(size) if isinstance(size, dict) else {"shortest_edge": defaults["min_pixels"],
                                                          "longest_edge": defaults["max_pixels"]}
        if video_processor == "Qwen2VLVideoProcessor":  # its __init__ lets these override size
            for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
                if values.get(key) is not None:
                    size[edge] = values[key]
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise ValueError(f"size {size} needs both shortest_edge and longest_edge (pixel bounds)")
        fields = {**defaults, **{name: values[name] for name in cls.__dataclass_fields__
                                 if name not in ("video_processor", "min_pixels", "max_pixels")
                                 and values.get(name) is not None}}
        fields.update(video_processor=video_processor, min_pixels=int(size["shortest_edge"]),
                      max_pixels=int(size["longest_edge"]))
        for name in ("image_mean", "image_std"):
            value = fields[name]
            fields[name] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
        return cls(**fields)

    @classmethod
    def from_checkpoint(cls, model_dir: Path, vision_config, video_processor: str) -> tuple[QwenVideoParams, str]:
        """The checkpoint's video preprocessing parameters and the file they came from.

        The patch sizes must agree with the vision tower's config.
        """
        values, name = _video_params_dict(model_dir)
        try:
            params = cls.from_dict(values, video_processor)
        except ValueError as error:
            raise CliError("--model", f"{model_dir / name}: {error}") from None
        expected = {
            "patch_size": getattr(vision_config, "patch_size", params.patch_size),
            "temporal_patch_size": getattr(vision_config, "temporal_patch_size", params.temporal_patch_size),
            "merge_size": getattr(vision_config, "spatial_merge_size", params.merge_size),
        }
        for key, want in expected.items():
            if getattr(params, key) != want:
                raise CliError("--model", f"{model_dir}: {name} has {key} {getattr(params, key)} but the vision "
                                          f"tower's config has {want}")
        return params, name


def qwen2_vl_resized_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target frame size: both sides multiples of ``factor``, area in ``[min_pixels, max_pixels]``.

    Each side is rounded to the nearest multiple of ``factor``; if the area then exceeds
    ``max_pixels`` (or falls below ``min_pixels``) both sides are scaled by the same factor
    and rounded down (up) to multiples of ``factor``, keeping the aspect ratio close.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frames of {height}x{width} pixels: the aspect ratio must be at most 200")
    new_h, new_w = round(height / factor) * factor, round(width / factor) * factor
    if new_h * new_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / shrink / factor) * factor)
        new_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_h, new_w = math.ceil(height * grow / factor) * factor, math.ceil(width * grow / factor) * factor
    if new_h < factor or new_w < factor:
        raise ValueError(f"frames of {height}x{width} pixels are too small for patches of {factor} pixels")
    return new_h, new_w


def qwen3_vl_resized_size(frames: int, height: int, width: int, temporal: int, factor: int, min_pixels: int,
                          max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's target frame size: sides multiples of ``factor``, the video's volume in ``[min_pixels, max_pixels]``.

    As Qwen2-VL's rule, but the bounds apply to ``frames`` (rounded to a multiple of
    ``temporal``) times the area, and a side shorter than ``factor`` is first scaled up
    (both sides, truncated) until it is not. A video needs at least ``temporal`` frames.
    """
    if frames < temporal:
        raise ValueError(f"{frames} frame(s): Qwen3-VL's video processor needs at least {temporal} (its temporal "
                         "patch size); use more frames")
    if height < factor or width < factor:
        grow = max(factor / height, factor / width)
        height, width = int(height * grow), int(width * grow)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frames of {height}x{width} pixels: the aspect ratio must be at most 200")
    new_h, new_w = round(height / factor) * factor, round(width / factor) * factor
    volume_frames = round(frames / temporal) * temporal
    if volume_frames * new_h * new_w > max_pixels:
        shrink = math.sqrt(frames * height * width / max_pixels)
        new_h = max(factor, math.floor(height / shrink / factor) * factor)
        new_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif volume_frames * new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (frames * height * width))
        new_h, new_w = math.ceil(height * grow / factor) * factor, math.ceil(width * grow / factor) * factor
    return new_h, new_w


def qwen_video_inputs(frames: np.ndarray | torch.Tensor, params: QwenVideoParams) -> dict[str, torch.Tensor]:
    """A Qwen-VL video processor's outputs from uint8 RGB frames, in pure torch (CPU).

    Parameters
    ----------
    frames : uint8 ``[T, H, W, 3]``
    params : the checkpoint's preprocessing parameters

    Returns
    -------
    dict
        ``pixel_values_videos`` float32 ``[t*h*w, 3 * tp * p * p]`` and ``video_grid_thw``
        long ``[1, 3]`` = ``[[t, h, w]]``, where ``p`` is the patch size, ``tp`` the temporal
        patch size, ``t = ceil(T / tp)`` and ``h, w`` the resized frame's sides in patches.
        The video yields ``t * h * w / merge_size**2`` LLM tokens.
    """
    video = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    if video.dtype != torch.uint8 or video.dim() != 4 or video.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {video.dtype} {list(video.shape)}")
    video = video.permute(0, 3, 1, 2)  # [T, 3, H, W]
    video = _resize(video, params, params.patch_size * params.merge_size)
    pixels = _rescale_normalize(video, params)
    patches, grid = _patchify(pixels, params.patch_size, params.temporal_patch_size, params.merge_size)
    return {"pixel_values_videos": patches, "video_grid_thw": torch.tensor([grid], dtype=torch.long)}


def _target_size(video: torch.Tensor, params: QwenVideoParams, factor: int) -> tuple[int, int]:
    """Each video processor's ``resize``: its pixel bounds, its cap, its rounding rule."""
    frames, (height, width) = video.shape[0], video.shape[-2:]
    temporal = params.temporal_patch_size
    if params.video_processor == "Qwen3VLVideoProcessor":
        max_pixels = params.max_pixels
        if params.cap_pixels_per_frame:
            # each frame at most max_video_tokens patches, or an even share of the budget
            per_frame = max(min(params.max_video_tokens * factor * factor, params.max_pixels // frames),
                            int(params.min_pixels * 1.05))
            max_pixels = per_frame * frames
        return qwen3_vl_resized_size(frames, height, width, temporal, factor, params.min_pixels, max_pixels)
    max_pixels = params.max_pixels
    if params.cap_pixels_per_frame:
        # an even share of the whole video's pixel budget, but not far below min_pixels
        video_pixels = int(params.max_video_tokens * factor * factor * 0.9)
        max_pixels = max(min(max_pixels, video_pixels * temporal // frames), int(params.min_pixels * 1.05))
    return qwen2_vl_resized_size(height, width, factor, params.min_pixels, max_pixels)


def _resize(video: torch.Tensor, params: QwenVideoParams, factor: int) -> torch.Tensor:
    """uint8 ``[T, 3, H', W']``, both sides multiples of ``factor`` (bicubic, antialiased)."""
    height, width = video.shape[-2:]
    if not params.do_resize:
        if height % factor or width % factor:
            raise ValueError(f"frames of {height}x{width} pixels: the checkpoint turns resizing off (do_resize) "
                             f"but both sides must be multiples of {factor}")
        if params.video_processor == "Qwen3VLVideoProcessor" and video.shape[0] < params.temporal_patch_size:
            raise ValueError(f"{video.shape[0]} frame(s): Qwen3-VL needs at least {params.temporal_patch_size}")
        return video
    size = _target_size(video, params, factor)
    if size == (height, width):
        return video  # torchvision returns a same-size image untouched
    # torch resamples uint8 natively on the CPU (rounded and saturated), which is what
    # torchvision's resize, and so transformers' processors, do there.
    return torch.nn.functional.interpolate(video.contiguous(), size=size, mode="bicubic", align_corners=False,
                                           antialias=True)


def _rescale_normalize(video: torch.Tensor, params: QwenVideoParams) -> torch.Tensor:
    """Pixels as the processors compute them: ``(x - mean/r) / (std/r)`` for uint8 ``x`` and rescale factor ``r``.

    Rescaling is folded into the normalization (one subtraction and one division per
    value, in float32), the same arithmetic as transformers' fused path; without
    normalization, ``x * r``; with neither, the uint8 values themselves, as there.
    """
    if params.do_normalize:
        mean = torch.tensor(params.image_mean, dtype=torch.float32)
        std = torch.tensor(params.image_std, dtype=torch.float32)
        if params.do_rescale:
            mean, std = mean * (1.0 / params.rescale_factor), std * (1.0 / params.rescale_factor)
        return (video.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
    return video * params.rescale_factor if params.do_rescale else video


def _patchify(pixels: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, list[int]]:
    """Flatten ``[T, C, H, W]`` into Qwen-VL's patch rows ``[t*h*w, C*temporal*patch*patch]``.

    Rows run over (time, merge-block row, merge-block column, row in block, column in
    block), so each ``merge x merge`` group of patches that becomes one LLM token is
    contiguous; a row's values run over (channel, frame in the temporal patch, pixel
    row, pixel column), the order of the vision tower's Conv3d weights. The last frame
    is repeated until ``T`` is a multiple of ``temporal``.
    """
    frames, channels, height, width = pixels.shape
    if pad := -frames % temporal:
        pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
    grid_t, grid_h, grid_w = pixels.shape[0] // temporal, height // patch, width // patch
    blocks = pixels.reshape(grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    # axes: 0 t, 1 frame-in-patch, 2 channel, 3 block row, 4 row-in-block, 5 pixel row,
    #       6 block column, 7 column-in-block, 8 pixel column
    rows = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = rows.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch).contiguous()
    return flat, [grid_t, grid_h, grid_w]


@dataclass(frozen=True)
class _Placeholders:
    """The prompt's special tokens as the Qwen-VL processors spell them (the tokenizer may override)."""

    video: str
    video_id: int
    image_id: int
    vision_start: str
    vision_end: str

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> _Placeholders:
        def token(name: str, default: str) -> str:
            return getattr(tokenizer, name) if hasattr(tokenizer, name) else default

        def token_id(name: str, text: str) -> int:
            return getattr(tokenizer, f"{name}_id", None) or tokenizer.convert_tokens_to_ids(text)

        video, image = token("video_token", "<|video_pad|>"), token("image_token", "<|image_pad|>")
        return cls(video=video, video_id=token_id("video_token", video), image_id=token_id("image_token", image),
                   vision_start=token("vision_start_token", "<|vision_start|>"),
                   vision_end=token("vision_end_token", "<|vision_end|>"))


def builtin_prompt(model_dir: Path, config: PreTrainedConfig, video: VideoFrames, question: str,
                   family: BuiltinFamily | None = None) -> PromptInputs:
    """What ``family``'s processor returns for the chat prompt and ``video``, without loading it.

    The outputs are the processor's, key for key: ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids`` (0 text, 1 image, 2 video), ``pixel_values_videos``,
    ``video_grid_thw``, and for Qwen2.5-VL ``second_per_grid_ts``.
    """
    family = family or builtin_family(model_dir, config)
    params, params_file = QwenVideoParams.from_checkpoint(model_dir, config.vision_config, family.video_processor)
    try:
        pixels = qwen_video_inputs(video.frames, params)
    except ValueError as error:
        raise CliError("--video", str(error)) from None
    tokenizer = _load_tokenizer(model_dir)
    marks = _Placeholders.of(tokenizer)
    if marks.video_id != int(config.video_token_id):
        raise CliError("--model", f"{model_dir}: the tokenizer maps {marks.video} to {marks.video_id}, but the "
                                  f"model's video_token_id is {config.video_token_id}")
    text = _chat_text(model_dir, tokenizer, question)
    if text.count(marks.video) != 1:
        raise CliError("--model", f"{model_dir}: the chat prompt holds {text.count(marks.video)} video placeholders "
                                  f"({marks.video}); expected exactly 1 - check the chat template")
    metadata = video.metadata()
    grid = pixels["video_grid_thw"][0].tolist()
    text = text.replace(marks.video, _video_replacement(family, grid, metadata, params, marks), 1)
    # Qwen3-VL's processor asks its tokenizer for no token_type_ids; the others take its defaults.
    text_kwargs = {"return_token_type_ids": False} if family.processor == "Qwen3VLProcessor" else {}
    encoded = tokenizer([text], return_tensors="pt", **text_kwargs)
    input_ids = encoded["input_ids"].to(torch.long)
    visual = int((input_ids == marks.video_id).sum())
    expected = grid[0] * grid[1] * grid[2] // params.merge_size**2
    if visual != expected:
        raise CliError("--model", f"{model_dir}: the tokenizer splits the prompt into {visual} {marks.video} "
                                  f"tokens, expected {expected}; {marks.video} must be a single special token")
    inputs = {key: value for key, value in encoded.items() if key != "input_ids"}
    types = torch.zeros_like(input_ids)
    types[input_ids == marks.image_id] = 1
    types[input_ids == marks.video_id] = 2
    inputs["mm_token_type_ids"] = types
    inputs.update(pixels)
    if family.processor == "Qwen2_5_VLProcessor":
        from transformers.video_utils import VideoMetadata

        # seconds per temporal patch at the rate the frames were sampled (transformers' own
        # sampled_fps: 24 when the source rate is unknown)
        sampled_fps = VideoMetadata(**metadata).sampled_fps
        inputs["second_per_grid_ts"] = torch.tensor([params.temporal_patch_size / sampled_fps])
    source = f"std_ext's built-in {family.processor} preprocessing ({params_file})"
    return PromptInputs(input_ids=input_ids, model_inputs=inputs, visual_tokens=visual, source=source,
                        tokenizer=tokenizer)


def _video_replacement(family: BuiltinFamily, grid: list[int], metadata: dict, params: QwenVideoParams,
                       marks: _Placeholders) -> str:
    """The text the processor puts in place of the prompt's single video placeholder."""
    per_frame = grid[1] * grid[2] // params.merge_size**2
    if family.processor != "Qwen3VLProcessor":
        return marks.video * (grid[0] * per_frame)
    # Qwen3-VL: each temporal patch gets "<t seconds>" then its own vision block; t is the
    # mean time of the patch's first and last frame (the last frame repeated to fill it).
    fps = metadata["fps"] or 24  # the processor's assumption when the rate is unknown
    indices = list(metadata["frames_indices"])
    indices += [indices[-1]] * (-len(indices) % params.temporal_patch_size)
    times = [index / fps for index in indices]
    step = params.temporal_patch_size
    stamps = [(times[i] + times[i + step - 1]) / 2 for i in range(0, len(times), step)]
    return "".join(f"<{stamps[t]:.1f} seconds>{marks.vision_start}{marks.video * per_frame}{marks.vision_end}"
                   for t in range(grid[0]))


def _load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    import transformers

    # Without tokenizer files AutoTokenizer quietly builds an empty tokenizer: refuse first.
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise CliError("--model", f"{model_dir}: cannot load the tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:  # noqa: BLE001 - tokenizer loading fails in many ways; all mean "no tokenizer"
        raise CliError("--model", f"{model_dir}: cannot load the tokenizer ({_first_line(error)})") from None


def _chat_template(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> str:
    """The template the processor renders with: ``processor_config.json``'s, ``chat_template.json``'s,
    ``chat_template.jinja``, else the tokenizer's own."""
    template = _read_json(model_dir / "processor_config.json").get("chat_template")
    template = template or _read_json(model_dir / "chat_template.json").get("chat_template")
    if not template and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    template = template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise CliError("--model", f"{model_dir}: the checkpoint has no chat template (chat_template.jinja, "
                                  "chat_template.json or the tokenizer's), which its processor would need too")
    return template


def _chat_text(model_dir: Path, tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The chat prompt (one video placeholder, the question, the generation prompt) as text."""
    try:
        return tokenizer.apply_chat_template(_messages(question), chat_template=_chat_template(model_dir, tokenizer),
                                             tokenize=False, add_generation_prompt=True)
    except CliError:
        raise
    except Exception as error:  # noqa: BLE001 - jinja raises many types
        raise CliError("--model", f"{model_dir}: cannot render the chat template ({_first_line(error)})") from None


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
            do_sample=False, **inputs,
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
        f"Sparse-to-Dense decoding (gamma={args.gamma}, budget={args.budget}, selection={args.selection}):",
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
    speedup = "n/a"
    if std_rate and vanilla_rate:
        speedup = f"{std_rate / vanilla_rate:.2f}x ({std_rate:.2f} vs {vanilla_rate:.2f} tokens/s)"
    lines = ["Comparison with vanilla decoding:", f"  decode speedup   {speedup}"]
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
