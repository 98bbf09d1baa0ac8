"""Tiny, fixed-seed, randomly initialised ``transformers`` models for decode-engine tests.

Builds four model classes that std_ext's decoding targets -- two text-only decoders
(Qwen2, Llama) and two video LLMs (Qwen2-VL, LLaVA-OneVision) -- at toy size, plus
left-padded input batches in exactly the form their ``forward`` / ``generate`` accept.
Nothing is downloaded: no checkpoints, no tokenizers, no processors. Visual inputs are
built directly as tensors.

Every model is float32, on CPU, in eval mode, with ``attn_implementation="sdpa"``, and
shares one text-decoder shape::

    hidden 64, 2 decoder layers, 4 query heads, 2 KV heads (GQA, group 2), head_dim 16,
    MLP 128, vocab 256

Weights are redrawn after construction from ``normal(0, INIT_STD)`` (``INIT_STD = 0.2``,
ten times the usual 0.02) with every norm reset to weight 1 / bias 0, from a generator
seeded with ``seed``, so a model depends only on ``(kind, seed)`` and building one leaves
the global RNG untouched. The large std spreads the logits (greedy decoding is rarely a
near-tie) and makes attention peaked rather than near-uniform, so the output depends
clearly on *which* visual tokens the model attends to.

Token ids (the top of the 256-entry vocabulary is reserved; text is drawn from
``0 .. TEXT_VOCAB - 1``)::

    248 vision_start  249 vision_end  250 video  251 image
    252 bos           253 eos         254 (unused)  255 pad

The LM-head rows of all reserved ids are zeroed, so their logit is exactly 0 while the
best text logit is several units above it: greedy decoding never emits a special token,
in particular never ``eos``, and ``generate`` always runs ``max_new_tokens`` steps. A
test that wants an early stop can pass ``eos_token_id=<some text id>`` to ``generate``.

Visual tokens per video (``make_inputs(..., n_visual=N)``):

* ``qwen2_vl``: exactly ``N``. The video grid is ``(t, 2a, 2b)`` patches of 2x2 pixels
  (frames are ``2t``, temporal patch 2, spatial merge 2) with ``t * a * b == N``.
* ``llava_onevision``: ``4 * frames + 1`` -- each 16x16 frame gives 4x4 SigLIP patches,
  bilinearly pooled to 2x2, and one ``image_newline`` token closes the video;
  ``frames = max(1, round((N - 1) / 4))``, so ``N = 64`` gives 16 frames, 65 tokens.
"""

from __future__ import annotations

import math

import torch
import transformers
from torch import nn

__all__ = [
    "KINDS",
    "TEXT_KINDS",
    "VL_KINDS",
    "INIT_STD",
    "VOCAB_SIZE",
    "TEXT_VOCAB",
    "VISION_START_ID",
    "VISION_END_ID",
    "VIDEO_ID",
    "IMAGE_ID",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "make_model",
    "make_inputs",
    "visual_token_ids",
]

KINDS = ("qwen2", "llama", "qwen2_vl", "llava_onevision")
TEXT_KINDS = ("qwen2", "llama")
VL_KINDS = ("qwen2_vl", "llava_onevision")

INIT_STD = 0.2

# ---- vocabulary ------------------------------------------------------------------------
VOCAB_SIZE = 256
TEXT_VOCAB = 248  # random text tokens are drawn from [0, TEXT_VOCAB)
VISION_START_ID = 248
VISION_END_ID = 249
VIDEO_ID = 250
IMAGE_ID = 251
BOS_ID = 252
EOS_ID = 253
PAD_ID = 255
_SPECIAL_IDS = tuple(range(TEXT_VOCAB, VOCAB_SIZE))

# ---- text decoder (shared by all kinds) ------------------------------------------------
HIDDEN = 64
INTERMEDIATE = 128
N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
HEAD_DIM = HIDDEN // N_HEADS  # 16
MAX_POSITIONS = 4096

# ---- Qwen2-VL vision tower ---------------------------------------------------------------
QWEN_PATCH = 2  # pixels per patch side
QWEN_TEMPORAL_PATCH = 2  # frames per patch
QWEN_MERGE = 2  # 2x2 patches -> 1 LLM token
QWEN_CHANNELS = 3
QWEN_PATCH_DIM = QWEN_CHANNELS * QWEN_TEMPORAL_PATCH * QWEN_PATCH * QWEN_PATCH  # 24

# ---- LLaVA-OneVision vision tower (SigLIP) ------------------------------------------------
LLAVA_IMAGE = 16  # frame side in pixels
LLAVA_PATCH = 4  # -> 4x4 patches per frame, pooled to 2x2 LLM tokens
LLAVA_CHANNELS = 3
LLAVA_TOKENS_PER_FRAME = math.ceil(LLAVA_IMAGE // LLAVA_PATCH / 2) ** 2  # 4

# Length of the random "question" that follows the visual span (inclusive bounds).
_QUESTION_LEN = (8, 12)


def _text_config_kwargs() -> dict:
    """Fields shared by every text decoder config (spellings valid in transformers 5.x)."""
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def _make_config(kind: str) -> transformers.PreTrainedConfig:
    if kind == "qwen2":
        return transformers.Qwen2Config(**_text_config_kwargs())
    if kind == "llama":
        return transformers.LlamaConfig(**_text_config_kwargs())
    if kind == "qwen2_vl":
        text = _text_config_kwargs()
        # M-RoPE splits head_dim / 2 = 8 rotary frequencies into (temporal, height,
        # width) sections, in Qwen2-VL's 2:3:3 proportion (16/24/24 at head_dim 128).
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision = dict(
            depth=1,
            embed_dim=32,
            hidden_size=HIDDEN,  # the patch merger projects straight into the text width
            mlp_ratio=2,
            num_heads=2,  # vision head_dim 16 (axial 2D RoPE needs a multiple of 4)
            in_channels=QWEN_CHANNELS,
            patch_size=QWEN_PATCH,
            temporal_patch_size=QWEN_TEMPORAL_PATCH,
            spatial_merge_size=QWEN_MERGE,
            initializer_range=INIT_STD,
        )
        return transformers.Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
            tie_word_embeddings=False,
        )
    if kind == "llava_onevision":
        text = transformers.Qwen2Config(**_text_config_kwargs())
        vision = transformers.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_channels=LLAVA_CHANNELS,
            image_size=LLAVA_IMAGE,
            patch_size=LLAVA_PATCH,
            vision_use_head=False,
        )
        return transformers.LlavaOnevisionConfig(
            text_config=text,
            vision_config=vision,
            image_token_index=IMAGE_ID,  # the old spelling; image_token_id is an alias
            video_token_index=VIDEO_ID,
            vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


_MODEL_CLASSES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("RMSNorm")


@torch.no_grad()
def _reinit_(model: nn.Module, seed: int, std: float) -> None:
    """Redraw every parameter from normal(0, std); norms get weight 1 and bias 0."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        norm = _is_norm(module)
        for name, param in sorted(module.named_parameters(recurse=False)):
            if norm:
                param.fill_(1.0 if name == "weight" else 0.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def build_tiny_model(cls: type, config, seed: int, *, init_std: float = INIT_STD, attn: str = "sdpa",
                     silent_ids=_SPECIAL_IDS) -> transformers.PreTrainedModel:
    """``cls`` built from ``config`` the way every tiny model is: fp32, CPU, eval, weights from
    :func:`_reinit_`, ``silent_ids`` never emitted, a greedy generation config with this
    module's bos/eos/pad ids; the global torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation=attn, dtype=torch.float32)
    model = model.to(device="cpu", dtype=torch.float32)
    _reinit_(model, seed, init_std)
    with torch.no_grad():
        # Silent ids get logit exactly 0, far below the best text logit: greedy decoding
        # never emits them (no eos, so generate always runs max_new_tokens steps).
        model.get_output_embeddings().weight[list(silent_ids)] = 0.0
        # Keep the pad embedding at zero, as nn.Embedding(padding_idx=PAD_ID) initialises it.
        model.get_input_embeddings().weight[PAD_ID] = 0.0
    model.eval()

    gen_cfg = model.generation_config
    gen_cfg.bos_token_id, gen_cfg.eos_token_id, gen_cfg.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    gen_cfg.do_sample = False
    for attr in ("temperature", "top_p", "top_k"):  # no sampling knobs next to do_sample=False
        if getattr(gen_cfg, attr, None) is not None:
            setattr(gen_cfg, attr, None)
    return model


def make_model(kind: str, seed: int = 0, *, init_std: float = INIT_STD) -> transformers.PreTrainedModel:
    """Build the tiny model of ``kind`` (one of ``KINDS``): fp32, CPU, eval, SDPA attention.

    The weights depend only on ``(kind, seed, init_std)``; the global torch RNG is left as
    it was. See the module docstring for the sizes and the token-id layout.
    """
    config = _make_config(kind)
    model = build_tiny_model(getattr(transformers, _MODEL_CLASSES[kind]), config, seed, init_std=init_std,
                             silent_ids=_SPECIAL_IDS)
    if getattr(model.config, "pad_token_id", None) is None:
        try:
            model.config.pad_token_id = PAD_ID
        except (AttributeError, TypeError, ValueError):  # strict composite configs may refuse it
            pass
    return model


def visual_token_ids(model: transformers.PreTrainedModel) -> tuple[int, ...]:
    """The config's ``(video_token_id, image_token_id)``; ``()`` for a text-only model."""
    config = model.config
    ids = []
    for attr in ("video_token_id", "image_token_id", "video_token_index", "image_token_index"):
        value = getattr(config, attr, None)
        if value is not None and value not in ids:
            ids.append(int(value))
    return tuple(ids)


def _kind_of(model: transformers.PreTrainedModel) -> str:
    for kind, cls_name in _MODEL_CLASSES.items():
        if type(model).__name__ == cls_name:
            return kind
    raise ValueError(f"not a tiny_models model: {type(model).__name__}")


def _qwen_grid(n_visual: int, modality: str) -> tuple[int, int, int]:
    """A (t, h, w) patch grid with exactly n_visual LLM tokens: t * (h / 2) * (w / 2)."""
    t = 1
    if modality == "video":
        t = next(f for f in (4, 2, 1) if n_visual % f == 0)
    m = n_visual // t
    a = max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)
    return t, QWEN_MERGE * a, QWEN_MERGE * (m // a)


def _qwen_visual(n_visual: int, modality: str, batch: int, gen: torch.Generator):
    """Random per-row pixels for Qwen2-VL in the processor's flattened-patch layout."""
    t, h, w = _qwen_grid(n_visual, modality)
    patches = t * h * w  # per video (or image)
    # pixel_values[_videos]: [batch * t*h*w, C * temporal_patch * patch * patch] = [B*t*h*w, 24]
    pixels = torch.randn(batch * patches, QWEN_PATCH_DIM, generator=gen)
    # one (t, h, w) row per video / image: [B, 3]
    grid = torch.tensor([[t, h, w]], dtype=torch.long).repeat(batch, 1)
    n_tokens = patches // QWEN_MERGE**2
    if modality == "video":
        return {"pixel_values_videos": pixels, "video_grid_thw": grid}, n_tokens, VIDEO_ID
    return {"pixel_values": pixels, "image_grid_thw": grid}, n_tokens, IMAGE_ID


def _llava_visual(n_visual: int, modality: str, batch: int, gen: torch.Generator):
    """Random per-row videos for LLaVA-OneVision: [B, frames, C, H, W]."""
    if modality != "video":
        raise ValueError("llava_onevision inputs support modality='video' only")
    frames = max(1, round((n_visual - 1) / LLAVA_TOKENS_PER_FRAME))
    # pixel_values_videos: [B, frames, C, H, W] = [B, frames, 3, 16, 16]
    pixels = torch.randn(batch, frames, LLAVA_CHANNELS, LLAVA_IMAGE, LLAVA_IMAGE, generator=gen)
    n_tokens = frames * LLAVA_TOKENS_PER_FRAME + 1  # + one image_newline per video
    return {"pixel_values_videos": pixels}, n_tokens, VIDEO_ID


@torch.no_grad()
def _count_visual_features(model, kind: str, visual: dict) -> int:
    """Number of LLM tokens the vision tower produces for ``visual`` (all rows together)."""
    inner = model.model
    if kind == "qwen2_vl":
        if "pixel_values_videos" in visual:
            out = inner.get_video_features(visual["pixel_values_videos"], visual["video_grid_thw"], return_dict=True)
        else:
            out = inner.get_image_features(visual["pixel_values"], visual["image_grid_thw"], return_dict=True)
        return sum(f.shape[0] for f in out.pooler_output)
    pixels = visual["pixel_values_videos"]  # [B, frames, C, H, W]
    out = inner.get_video_features(pixels, return_dict=True)
    batch, n_features = out.pooler_output.shape[:2]  # [B, tokens, hidden]
    if n_features == pixels.shape[1] * LLAVA_TOKENS_PER_FRAME:
        # Older 5.x releases (e.g. 5.17) append the closing image_newline in forward().
        n_features += 1
    return batch * n_features


def make_inputs(
    model: transformers.PreTrainedModel,
    kind: str,
    prompt_lengths: list[int] | None = None,
    *,
    n_visual: int = 64,
    modality: str = "video",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A left-padded, ragged batch of prompts for ``model`` of ``kind``.

    Row ``b`` is ``[pad ...] + prefix text + visual span + question``; the question is
    8-12 random text tokens, and text ids are drawn from ``[0, TEXT_VOCAB)`` so they never
    hit a special id.

    * Text-only kinds: row ``b`` has exactly ``prompt_lengths[b]`` tokens and its "visual
      span" is ``min(n_visual, room)`` more random text.
    * VL kinds: the visual span is the video (or image) placeholder id repeated once per
      visual feature the vision tower yields (see the module docstring; checked against
      the model's own feature extractor), and each row has its own random pixels. Rows
      are made ragged through the prefix length, ``prompt_lengths[b] - span - question``.
      Where that would be < 1, every row is lengthened by the same amount so the shortest
      prefix is 1 token: row lengths are then ``prompt_lengths[b] + shift``, still ragged.

    Returns ``input_ids`` [B, T] and ``attention_mask`` [B, T] (long, 0 on the left
    padding), plus for ``qwen2_vl`` ``pixel_values_videos`` [B*t*h*w, 24] and
    ``video_grid_thw`` [B, 3] (``pixel_values`` / ``image_grid_thw`` for
    ``modality="image"``) and ``mm_token_type_ids`` [B, T] (0 text, 1 image, 2 video),
    and for ``llava_onevision`` ``pixel_values_videos`` [B, frames, 3, 16, 16]. Pass it as
    ``model(**inputs)`` or ``model.generate(**inputs, ...)``. ``prompt_lengths`` defaults
    to ``[100]``; the same ``seed`` gives the same batch.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if _kind_of(model) != kind:
        raise ValueError(f"model is a {_kind_of(model)!r} model, not {kind!r}")
    if modality not in ("video", "image"):
        raise ValueError(f"modality must be 'video' or 'image', got {modality!r}")
    if n_visual < 1:
        raise ValueError(f"n_visual must be >= 1, got {n_visual}")
    prompt_lengths = [100] if prompt_lengths is None else list(prompt_lengths)
    if not prompt_lengths or min(prompt_lengths) < 1:
        raise ValueError(f"prompt_lengths must be a non-empty list of positive ints, got {prompt_lengths}")
    batch = len(prompt_lengths)
    gen = torch.Generator().manual_seed(seed)

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, TEXT_VOCAB, (n,), generator=gen, dtype=torch.long)

    visual: dict[str, torch.Tensor] = {}
    if kind in VL_KINDS:
        build = _qwen_visual if kind == "qwen2_vl" else _llava_visual
        visual, span, visual_id = build(n_visual, modality, batch, gen)
        produced = _count_visual_features(model, kind, visual)
        if produced != batch * span:
            raise AssertionError(f"{kind}: vision tower yields {produced} features, expected {batch} x {span}")
        visual_type = 2 if visual_id == VIDEO_ID else 1

    q_lens = torch.randint(_QUESTION_LEN[0], _QUESTION_LEN[1] + 1, (batch,), generator=gen).tolist()
    if kind in VL_KINDS:
        # Every VL row needs >= 1 prefix token + span + question; rows too short for that
        # are all lengthened by the same amount, so their differences (raggedness) stay.
        shift = max(0, max(span + q + 1 - length for length, q in zip(prompt_lengths, q_lens)))

    rows, types = [], []  # per row: token ids [L_b] and mm token types [L_b]
    for length, q_len in zip(prompt_lengths, q_lens):
        if kind in VL_KINDS:
            prefix_len = length + shift - span - q_len
            span_ids = torch.full((span,), visual_id, dtype=torch.long)
            span_type = visual_type
        else:
            q_len = min(q_len, length)
            span = min(n_visual, length - q_len)
            prefix_len = length - q_len - span
            span_ids = text(span)
            span_type = 0
        rows.append(torch.cat([text(prefix_len), span_ids, text(q_len)]))
        types.append(torch.tensor([0] * prefix_len + [span_type] * span + [0] * q_len, dtype=torch.long))

    T = max(len(r) for r in rows)
    input_ids = torch.full((batch, T), PAD_ID, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros(batch, T, dtype=torch.long)  # [B, T]
    mm_token_type_ids = torch.zeros(batch, T, dtype=torch.long)  # [B, T]
    for b, (row, ty) in enumerate(zip(rows, types)):
        input_ids[b, T - len(row) :] = row
        attention_mask[b, T - len(row) :] = 1
        mm_token_type_ids[b, T - len(row) :] = ty

    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if kind in VL_KINDS:
        inputs.update(visual)
    if kind == "qwen2_vl":
        inputs["mm_token_type_ids"] = mm_token_type_ids
    return inputs
