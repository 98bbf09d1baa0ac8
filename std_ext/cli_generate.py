"""Answer a question about a video with a local checkpoint, decoding with Sparse-to-Dense.

    python -m std_ext generate --model DIR --video FRAMES --question TEXT [--compare]

--model is a local `transformers` checkpoint directory of a supported video LLM
(Qwen2VLForConditionalGeneration or LlavaOnevisionForConditionalGeneration). --video is
a folder of images, an .npy array [T, H, W, 3] / [T, 3, H, W] (uint8, or float in
[0, 1] / [0, 255]), or a video file when a decoder package (av, decord, opencv-python
or torchvision) is installed; --num-frames frames are sampled uniformly.

The prompt is the checkpoint's chat template with one video and the question, plus the
generation prompt. The video is preprocessed by the checkpoint's own processor
(AutoProcessor; the exact Hugging Face numerics) when it loads and works, which for
Qwen2-VL and LLaVA-OneVision needs Pillow and torchvision. Otherwise Qwen2-VL falls
back to std_ext's built-in pure-torch preprocessing (the same steps: resize so each
side is a multiple of patch_size * merge_size within min/max pixels, rescale,
normalize, patchify), with the parameters of the checkpoint's preprocessor config and
the tokenizer from AutoTokenizer; LLaVA-OneVision has no fallback. The output says
which path was used.

Prints the answer and the decode statistics. --compare also decodes with vanilla
(dense, one token per step) decoding and reports the decode speedup and whether the
new tokens are identical. Exit codes: 0 success, 1 --compare found different outputs,
2 bad arguments or inputs.
"""

from __future__ import annotations

import argparse
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
from .frames import FrameLoadError, load_frames
from .generate import GenerationOutput, GenerationStats
from .models import SUPPORTED_MODELS
from .selection import POLICIES

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedTokenizerBase

__all__ = [
    "CliError",
    "Qwen2VLVideoParams",
    "PromptInputs",
    "add_arguments",
    "run",
    "qwen2_vl_resized_size",
    "qwen2_vl_video_inputs",
]

PROG = "python -m std_ext generate"
VIDEO_MODELS = ("Qwen2VLForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
_MODEL_TYPES = {"qwen2_vl": VIDEO_MODELS[0], "llava_onevision": VIDEO_MODELS[1]}
_QWEN2_VL = VIDEO_MODELS[0]
# Qwen2-VL's own prompt format, used when a checkpoint's tokenizer carries no chat template.
_QWEN2_VL_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{question}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
_VIDEO_TOKEN = "<|video_pad|>"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# =========================================================================== arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``generate`` options to ``parser`` (a subcommand parser or a fresh one)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the docstring's layout in --help
    parser.add_argument("--model", required=True, metavar="DIR", help="local transformers checkpoint directory")
    parser.add_argument("--video", required=True, metavar="FRAMES",
                        help="folder of images, .npy array [T,H,W,3] or [T,3,H,W], or a video file")
    parser.add_argument("--question", required=True, metavar="TEXT", help="the question about the video")
    parser.add_argument("--compare", action="store_true",
                        help="also decode with vanilla decoding; report the speedup and whether outputs match")
    parser.add_argument("--num-frames", type=int_at_least(0), default=32, metavar="N",
                        help="at most N frames, sampled uniformly; 0 = all (default: 32)")
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
                        help="video preprocessing: the checkpoint's processor, std_ext's built-in Qwen2-VL "
                             "preprocessing, or auto (the processor, else built-in) (default: auto)")
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
    architecture = _architecture(config, model_dir)
    device = resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    try:
        frames = load_frames(args.video, args.num_frames)
    except FrameLoadError as error:
        raise CliError("--video", str(error)) from None
    # Inputs are checked before the (slow) model load, so bad input fails fast.
    prompt = prepare_prompt(model_dir, config, architecture, frames, args.question, args.preprocess)
    _log(f"loading {architecture} from {model_dir} on {device} ({str(dtype).removeprefix('torch.')})")
    model = _load_model(model_dir, architecture, device, dtype)
    std = _generate(model, prompt, args, "std", device, dtype)
    _print_answer(prompt, _new_tokens(std, prompt))
    print(_format_run(std.stats, prompt, frames, args))
    if not args.compare:
        return 0
    vanilla = _generate(model, prompt, args, "vanilla", device, dtype)
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


def _architecture(config: PreTrainedConfig, model_dir: Path) -> str:
    """The supported video-LLM class named by ``config.architectures`` (or its model_type)."""
    named = list(getattr(config, "architectures", None) or [])
    found = next((name for name in named if name in SUPPORTED_MODELS), None) or _MODEL_TYPES.get(config.model_type)
    described = ", ".join(named) or f"model_type {config.model_type!r}"
    if found is None:
        raise CliError("--model", f"{model_dir}: {described} is not supported; std_ext supports "
                                  f"{', '.join(SUPPORTED_MODELS)}")
    if found not in VIDEO_MODELS:
        raise CliError("--model", f"{model_dir}: {found} is a text-only model; generate needs a video LLM "
                                  f"({', '.join(VIDEO_MODELS)})")
    return found


def _resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return default_dtype(device)
    return _DTYPES[choice]


def _load_model(model_dir: Path, architecture: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    cls = getattr(transformers, architecture)
    try:
        model = cls.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as error:
        raise CliError("--model", f"{model_dir}: cannot load the {architecture} weights "
                                  f"({_first_line(error)})") from None
    return model.to(device).eval()


# =========================================================================== prompt and video inputs


@dataclass
class PromptInputs:
    """The prompt of one question about one video, ready for ``std_ext.generate``.

    Attributes
    ----------
    input_ids : long ``[1, T]``, the video placeholder already expanded to one id per visual token
    model_inputs : the other model inputs (``pixel_values_videos``, ``video_grid_thw``, ...), on the CPU
    visual_tokens : how many of the ``T`` prompt tokens are video placeholders
    source : which preprocessing made them, in words
    tokenizer : decodes the answer
    """

    input_ids: torch.Tensor
    model_inputs: dict[str, torch.Tensor]
    visual_tokens: int
    source: str
    tokenizer: PreTrainedTokenizerBase

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def prepare_prompt(model_dir: Path, config: PreTrainedConfig, architecture: str, frames: np.ndarray, question: str,
                   preprocess: str = "auto") -> PromptInputs:
    """Prompt and video inputs through the checkpoint's processor or the built-in Qwen2-VL path.

    Parameters
    ----------
    frames : uint8 ``[T, H, W, 3]``
    preprocess : "auto" (processor, else built-in), "processor" or "builtin"
    """
    video_id = int(config.video_token_id)
    reason = ""
    if preprocess in ("auto", "processor"):
        try:
            return _processor_prompt(model_dir, frames, question, video_id)
        except Exception as error:  # noqa: BLE001 - any failure of the optional HF path means: fall back
            reason = _processor_failure(error)
            if preprocess == "processor" or architecture != _QWEN2_VL:
                raise CliError("--model", _no_processor_message(model_dir, architecture, reason)) from None
    if architecture != _QWEN2_VL:
        raise CliError("--preprocess", f"the built-in preprocessing supports {_QWEN2_VL} only, not {architecture}")
    _log("video inputs: std_ext's built-in Qwen2-VL preprocessing"
         + (f" (the checkpoint's processor is unavailable: {reason})" if reason else ""))
    return _builtin_qwen2_vl_prompt(model_dir, config, frames, question, reason)


def _processor_failure(error: BaseException) -> str:
    """Why the processor path failed, in one short line (transformers' messages run long)."""
    text = str(error)
    missing = re.search(r"Missing optional dependencies: ([^.]+)", text)
    if missing:
        return f"it needs {missing.group(1).strip()} (not installed)"
    return _first_line(error, 160)


def _no_processor_message(model_dir: Path, architecture: str, reason: str) -> str:
    lowered = reason.lower()
    advice = ("install them (pip install pillow torchvision)" if "torchvision" in lowered or "pillow" in lowered
              else "check the checkpoint's processor files")
    fallback = "" if architecture == _QWEN2_VL else f"; {architecture} has no built-in fallback"
    return f"{model_dir}: the checkpoint's processor cannot prepare the video ({reason}); {advice}{fallback}"


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]


def _processor_prompt(model_dir: Path, frames: np.ndarray, question: str, video_id: int) -> PromptInputs:
    """The real-user path: the checkpoint's own ``AutoProcessor`` (needs Pillow and torchvision)."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    if getattr(processor, "video_processor", None) is None:
        raise ValueError(f"{type(processor).__name__} has no video processor")
    text = processor.apply_chat_template(_messages(question), tokenize=False, add_generation_prompt=True)
    # Frames were already sampled by load_frames: the processor must keep every one.
    batch = processor(text=[text], videos=[frames], return_tensors="pt", do_sample_frames=False)
    inputs = {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}
    input_ids = inputs.pop("input_ids")
    inputs.pop("attention_mask", None)
    visual = int((input_ids == video_id).sum())
    if visual == 0:
        raise ValueError("its prompt holds no video tokens")
    return PromptInputs(input_ids=input_ids, model_inputs=inputs, visual_tokens=visual,
                        source=f"the checkpoint's processor ({type(processor).__name__})",
                        tokenizer=processor.tokenizer)


def _builtin_qwen2_vl_prompt(model_dir: Path, config: PreTrainedConfig, frames: np.ndarray, question: str,
                             reason: str) -> PromptInputs:
    """Qwen2-VL without Pillow / torchvision: AutoTokenizer plus :func:`qwen2_vl_video_inputs`."""
    params, params_file = Qwen2VLVideoParams.from_checkpoint(model_dir, config.vision_config)
    try:
        video = qwen2_vl_video_inputs(frames, params)
    except ValueError as error:
        raise CliError("--video", str(error)) from None
    tokenizer = _load_tokenizer(model_dir, int(config.video_token_id))
    visual = int(video["video_grid_thw"].prod()) // params.merge_size**2
    input_ids = _expand_video_token(_chat_ids(tokenizer, question), int(config.video_token_id), visual, model_dir)
    source = f"std_ext's built-in Qwen2-VL preprocessing ({params_file})"
    if reason:
        source += f"; the checkpoint's processor is unavailable: {reason}"
    return PromptInputs(input_ids=input_ids, model_inputs=video, visual_tokens=visual, source=source,
                        tokenizer=tokenizer)


def _load_tokenizer(model_dir: Path, video_id: int) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer; it must spell Qwen2-VL's video placeholder as ``video_id``."""
    import transformers

    # Without tokenizer files AutoTokenizer quietly builds an empty tokenizer: refuse first.
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise CliError("--model", f"{model_dir}: cannot load the tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:  # noqa: BLE001 - tokenizer loading fails in many ways; all mean "no tokenizer"
        raise CliError("--model", f"{model_dir}: cannot load the tokenizer ({_first_line(error)})") from None
    found = tokenizer.convert_tokens_to_ids(_VIDEO_TOKEN)
    if found != video_id:
        raise CliError("--model", f"{model_dir}: the tokenizer maps {_VIDEO_TOKEN} to {found}, but the model's "
                                  f"video_token_id is {video_id}")
    return tokenizer


def _chat_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """Token ids of the chat prompt (one video placeholder, the question, the generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(_messages(question), tokenize=False, add_generation_prompt=True)
    else:
        text = _QWEN2_VL_PROMPT.format(question=question)
    # The chat text already holds every special token; the tokenizer must not add more.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _expand_video_token(ids: list[int], video_id: int, count: int, model_dir: Path) -> torch.Tensor:
    """long ``[1, T]``: ``ids`` with its single video placeholder repeated ``count`` times."""
    where = [i for i, token in enumerate(ids) if token == video_id]
    if len(where) != 1:
        raise CliError("--model", f"{model_dir}: the chat prompt holds {len(where)} video placeholders "
                                  f"(token id {video_id}, <|video_pad|>); expected exactly 1 - check the "
                                  "tokenizer's chat template and special tokens")
    at = where[0]
    return torch.tensor([ids[:at] + [video_id] * count + ids[at + 1:]], dtype=torch.long)


# =========================================================================== built-in Qwen2-VL preprocessing

# Qwen2-VL video processor defaults, used for keys a checkpoint's config leaves out.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PARAM_FILES = ("processor_config.json", "video_preprocessor_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class Qwen2VLVideoParams:
    """What Qwen2-VL's video preprocessing needs (the keys of its preprocessor config).

    ``min_pixels`` / ``max_pixels`` bound a resized frame's area (``size.shortest_edge`` /
    ``size.longest_edge`` in newer configs). With ``cap_pixels_per_frame`` the per-frame
    bound also shrinks with the frame count, to keep the whole video near
    ``0.9 * max_video_tokens`` tokens.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    image_mean: tuple[float, ...] = _CLIP_MEAN
    image_std: tuple[float, ...] = _CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000

    @classmethod
    def from_dict(cls, values: dict) -> Qwen2VLVideoParams:
        """From a preprocessor-config dict; unknown keys are ignored, missing ones take the defaults."""
        size = values.get("size") or {}
        min_pixels = values.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or cls.min_pixels
        max_pixels = values.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or cls.max_pixels
        fields = {name: values[name] for name in cls.__dataclass_fields__ if values.get(name) is not None}
        fields.update(min_pixels=int(min_pixels), max_pixels=int(max_pixels))
        for name in ("image_mean", "image_std"):
            if name in fields:
                value = fields[name]
                fields[name] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
        return cls(**fields)

    @classmethod
    def from_checkpoint(cls, model_dir: Path, vision_config: PreTrainedConfig) -> tuple[Qwen2VLVideoParams, str]:
        """The checkpoint's video preprocessing parameters and the file they came from.

        Looks where ``transformers`` does: ``processor_config.json``'s ``video_processor``
        entry, then ``video_preprocessor_config.json``, then ``preprocessor_config.json``.
        The patch sizes must agree with the vision tower's config.
        """
        values, name = _read_param_file(model_dir)
        params = cls.from_dict(values)
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


def _read_param_file(model_dir: Path) -> tuple[dict, str]:
    for name in _PARAM_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CliError("--model", f"{path}: not readable JSON ({error})") from None
        if name == "processor_config.json":
            if not isinstance(values.get("video_processor"), dict):
                continue  # not the nested v5 layout: the separate files hold the parameters
            values = values["video_processor"]
        return values, name
    raise CliError("--model", f"{model_dir}: no video preprocessing parameters "
                              f"({', '.join(_PARAM_FILES[1:])}); the checkpoint is incomplete")


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


def qwen2_vl_video_inputs(frames: np.ndarray | torch.Tensor, params: Qwen2VLVideoParams) -> dict[str, torch.Tensor]:
    """Qwen2-VL's video inputs from uint8 RGB frames, in pure torch (CPU).

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
    factor = params.patch_size * params.merge_size
    video = _resize(video, params, factor)
    pixels = _rescale_normalize(video, params)
    patches, grid = _patchify(pixels, params.patch_size, params.temporal_patch_size, params.merge_size)
    return {"pixel_values_videos": patches, "video_grid_thw": torch.tensor([grid], dtype=torch.long)}


def _resize(video: torch.Tensor, params: Qwen2VLVideoParams, factor: int) -> torch.Tensor:
    """uint8 ``[T, 3, H', W']``, both sides multiples of ``factor`` (bicubic, antialiased)."""
    height, width = video.shape[-2:]
    if not params.do_resize:
        if height % factor or width % factor:
            raise ValueError(f"frames of {height}x{width} pixels: the checkpoint turns resizing off (do_resize) "
                             f"but both sides must be multiples of {factor}")
        return video
    max_pixels = params.max_pixels
    if params.cap_pixels_per_frame:
        # An even share of the whole video's pixel budget, but not far below min_pixels.
        video_pixels = int(params.max_video_tokens * factor * factor * 0.9)
        share = video_pixels * params.temporal_patch_size // video.shape[0]
        max_pixels = max(min(max_pixels, share), int(params.min_pixels * 1.05))
    size = qwen2_vl_resized_size(height, width, factor, params.min_pixels, max_pixels)
    if size == (height, width):
        return video  # a same-size bicubic resample is the identity
    # torch resamples uint8 natively on the CPU (rounded and saturated), as transformers'
    # torchvision path does there.
    return torch.nn.functional.interpolate(video.contiguous(), size=size, mode="bicubic", align_corners=False,
                                           antialias=True)


def _rescale_normalize(video: torch.Tensor, params: Qwen2VLVideoParams) -> torch.Tensor:
    """float32 pixels: ``(x - mean/r) / (std/r)`` for uint8 ``x`` and rescale factor ``r``.

    Rescaling is folded into the normalization (one subtraction and one division per
    value, in float32), the same arithmetic as transformers' fused path.
    """
    pixels = video.to(torch.float32)
    if params.do_normalize:
        mean = torch.tensor(params.image_mean, dtype=torch.float32)
        std = torch.tensor(params.image_std, dtype=torch.float32)
        if params.do_rescale:
            mean, std = mean * (1.0 / params.rescale_factor), std * (1.0 / params.rescale_factor)
        return (pixels - mean[:, None, None]) / std[:, None, None]
    return pixels * params.rescale_factor if params.do_rescale else pixels


def _patchify(pixels: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, list[int]]:
    """Flatten ``[T, C, H, W]`` into Qwen2-VL's patch rows ``[t*h*w, C*temporal*patch*patch]``.

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


# =========================================================================== generation and report


def _generate(model: torch.nn.Module, prompt: PromptInputs, args: argparse.Namespace, mode: str,
              device: torch.device, dtype: torch.dtype) -> GenerationOutput:
    import std_ext

    _log(f"decoding ({mode})")
    inputs = {key: _to_model(value, device, dtype) for key, value in prompt.model_inputs.items()}
    try:
        return std_ext.generate(
            model, prompt.input_ids.to(device), mode=mode, gamma=args.gamma, budget=args.budget,
            max_new_tokens=args.max_new_tokens, selection=args.selection, progress=not args.no_progress, **inputs,
        )
    except ValueError as error:
        raise CliError("", str(error)) from None


def _to_model(value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)


def _new_tokens(output: GenerationOutput, prompt: PromptInputs) -> list[int]:
    start = prompt.input_ids.shape[1]
    return output.sequences[0, start:start + output.stats.new_tokens[0]].tolist()


def _decode_rate(stats: GenerationStats) -> float | None:
    """Decode tokens per second; the first new token comes from prefill, so it is left out."""
    tokens = stats.new_tokens[0] - 1
    return tokens / stats.decode_s if tokens > 0 and stats.decode_s > 0 else None


def _format_run(stats: GenerationStats, prompt: PromptInputs, frames: np.ndarray, args: argparse.Namespace) -> str:
    t, h, w = frames.shape[:3]
    lines = [
        f"Sparse-to-Dense decoding (gamma={args.gamma}, budget={args.budget}, selection={args.selection}):",
        f"  video inputs     {prompt.source}",
        f"  frames           {t} x {h}x{w}",
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
