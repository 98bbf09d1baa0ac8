"""Tiny random models of every full-attention model family std_ext decodes, with the
prompts their processors would build, plus the models it must refuse.

The companion of ``tiny_models.py`` (whose sizes, token ids, weight initialisation and
text-config fields are imported, not copied): the same toy text decoder inside each
family's own architecture -- its vision tower, projector, placeholder layout and RoPE
(1-D, or M-RoPE formed by the model's ``get_rope_index``)::

    hidden 64, 2 decoder layers, 4 query heads, 2 KV heads, head_dim 16, vocab 256

Every model is float32, on CPU, in eval mode, ``attn_implementation="sdpa"`` (the refused
Gemma2 and GPT-OSS, which have no SDPA path, are eager), weights redrawn from
``normal(0, INIT_STD)`` with a generator seeded by ``seed`` (norms 1 / 0), so a model
depends only on ``(family, seed)``: config overrides that keep the parameter shapes (a
sliding window, a soft-cap) keep every weight.

Row layouts (each family's ``_*_ROWS`` table; row 0 is the single prompt)::

    qwen2_5_vl        video 4x4x8 grid (0.5 s/grid) | image 8x8 | video 2x4x8 (1.0 s/grid)
    qwen3_vl(_moe)    video with "<t seconds>" per frame | image | video   (MoE: from row 1)
    glm4v             videos of 4, 2, 3 temporal patches, each frame with its second
    glm4v_moe         images of three sizes (GLM cannot batch images with videos)
    internvl          3-frame video | 2-tile image | 2-frame video
    llava_next_video  3-frame videos (48 tokens)
    llava             1 | 2 | 1 images (36 tokens each)
    video_llava       4-frame video | image | 4-frame video
    idefics3          1x2 crops + global (part-masked) | global only | 2x2 crops + global
    mistral3          images of 32x48, 48x48, 24x32 pixels (padded in a batch)

Token ids: tiny_models' layout (248 vision_start, 249 vision_end, 250 video, 251 image,
252 bos, 253 eos, 255 pad), and below it the ids some families need besides
(``232 .. 247``, see ``FAMILY_TOKENS``). Text is drawn from ``0 .. FAMILY_TEXT_VOCAB - 1``
(232), and the LM-head rows of every id from 232 up are zeroed: greedy decoding never
emits a special token, so ``generate`` always runs ``max_new_tokens`` steps.

Prompts (:func:`make_prompts`) are built as each family's processor builds them from its
chat template: the family's start / end tokens around each image or video, one
placeholder per feature the vision tower yields (checked against the model's own
feature extractor), the text the processor writes between frames (Qwen3-VL's
``<t seconds>``, GLM's integer seconds, InternVL's ``FrameN:``, Idefics3's
``<row_i_col_j>`` tile tags, Pixtral's ``[IMG_BREAK]`` rows), and every extra input
the processor returns (``mm_token_type_ids``, Qwen2.5-VL's ``second_per_grid_ts``,
Idefics3's ``pixel_attention_mask``, Pixtral's ``image_sizes`` ...). Text a processor
writes ("<0.5 seconds>", "Frame2: ") is tokenised by a toy character tokenizer
(:func:`toy_tokenize`), so different timestamps are different tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers

from tiny_models import (
    build_tiny_model,
    BOS_ID,
    HIDDEN,
    IMAGE_ID,
    INIT_STD,
    INTERMEDIATE,
    N_HEADS,
    N_LAYERS,
    PAD_ID,
    QWEN_MERGE,
    QWEN_PATCH,
    QWEN_PATCH_DIM,
    QWEN_TEMPORAL_PATCH,
    VIDEO_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
    _text_config_kwargs,
)

__all__ = [
    "FAMILIES",
    "TEXT_FAMILIES",
    "VL_FAMILIES",
    "REFUSED",
    "REFUSED_CLASSES",
    "FAMILY_TEXT_VOCAB",
    "FAMILY_TOKENS",
    "MyQwen2",
    "make_family_model",
    "make_refused_model",
    "make_prompts",
    "make_gemma3_prompt",
    "batch_prompts",
    "placeholder_mask",
    "toy_tokenize",
]

FAMILY_TEXT_VOCAB = 232  # random text (and toy-tokenised text) is drawn from [0, 232)

# Ids a family needs besides tiny_models' vision_start / vision_end / video / image.
FAMILY_TOKENS = {
    "video_start": 247,  # GLM <|begin_of_video|>
    "video_end": 246,  # GLM <|end_of_video|>
    "fake_image": 245,  # Idefics3 <fake_token_around_image>
    "global_image": 244,  # Idefics3 <global-img>
    "image_break": 243,  # Pixtral [IMG_BREAK]
    "image_end": 242,  # Pixtral [IMG_END]
    "boi": 241,  # Gemma3 <start_of_image>
    "eoi": 240,  # Gemma3 <end_of_image>
    # Idefics3 <row_{r}_col_{c}> for r, c in 1..2: 236 .. 239
}
_ROW_COL_BASE = 236
_RESERVED_IDS = tuple(range(FAMILY_TEXT_VOCAB, VOCAB_SIZE))

TEXT_FAMILIES = ("qwen3", "mistral", "my_qwen2")
VL_FAMILIES = (
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "glm4v",
    "glm4v_moe",
    "internvl",
    "llava_next_video",
    "llava",
    "video_llava",
    "idefics3",
    "mistral3",
)
FAMILIES = TEXT_FAMILIES + VL_FAMILIES

# Models std_ext must refuse (DESIGN.md §5), each for the feature that makes it inexact:
# attention logit soft-capping, attention sinks, a bidirectional image mask, recurrent-state
# layers (Gated DeltaNet twice, short convolutions). A release may lack some classes.
REFUSED_CLASSES = {
    "gemma2": "Gemma2ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_5": "Qwen3_5ForCausalLM",
    "lfm2": "Lfm2ForCausalLM",
}
REFUSED = tuple(REFUSED_CLASSES)

_QUESTION_LEN = (8, 12)  # random question after the visual span, inclusive bounds


class MyQwen2(transformers.Qwen2ForCausalLM):
    """A user's subclass: supported by what it is, whatever its name."""


# ---- configs ---------------------------------------------------------------------------


def _text(**extra) -> dict:
    """tiny_models' text decoder fields, plus ``extra`` (family-specific spellings)."""
    fields = _text_config_kwargs()
    fields.update(extra)
    return fields


def _mrope(section: list[int], **extra) -> dict:
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, **extra}


# Qwen / GLM vision towers take tiny_models' Qwen2-VL patching: 2x2-pixel patches, 2 frames
# per temporal patch, 2x2 patches merged into one LLM token, 24 values per patch.
TOKENS_PER_SECOND = 4  # Qwen2.5-VL's temporal RoPE step per second (its default)

# CLIP / SigLIP / InternViT / Idefics3 towers see 32x32 frames in 4x4-pixel patches.
IMAGE_SIDE, VIT_PATCH = 32, 4
VIT_GRID = IMAGE_SIDE // VIT_PATCH  # 8x8 patches per frame
LLAVA_IMAGE_SIDE = 24  # LLaVA: 6x6 = 36 image tokens
VIDEO_LLAVA_SIDE = 16  # Video-LLaVA: 4x4 patches (+ CLS per video frame)
PIXTRAL_PATCH, PIXTRAL_MERGE = 4, 2  # one [IMG] per 8x8 pixels
_INTERNVL_TOKENS = (VIT_GRID // 2) ** 2  # 16 tokens per 32x32 tile after the 0.5 pixel shuffle
GEMMA3_TOKENS = 16  # SigLIP's 8x8 patches average-pooled to 4x4
SINK_STD = 2.0  # GPT-OSS sink logits: on the scale of these peaked attention logits


def _clip(side: int, **extra) -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=side, patch_size=VIT_PATCH, projection_dim=32, **extra,
    )


def _qwen25_vision() -> dict:
    return dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
        patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL_PATCH, spatial_merge_size=QWEN_MERGE,
        # windows of 2x2 merged tokens (8 pixels); block 1 attends over the whole frame
        window_size=QWEN_PATCH * QWEN_MERGE * 2, fullatt_block_indexes=[1],
        tokens_per_second=TOKENS_PER_SECOND, out_hidden_size=HIDDEN, initializer_range=INIT_STD,
    )


def _qwen3_vision() -> dict:
    return dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
        patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL_PATCH, spatial_merge_size=QWEN_MERGE,
        out_hidden_size=HIDDEN, num_position_embeddings=16, deepstack_visual_indexes=[0],
        initializer_range=INIT_STD,
    )


def _glm_vision() -> dict:
    return dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, image_size=16,
        patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL_PATCH, spatial_merge_size=QWEN_MERGE,
        out_hidden_size=HIDDEN, initializer_range=INIT_STD,
    )


_QWEN_VL_IDS = dict(
    image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
    vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
)
_GLM_IDS = dict(
    image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
    image_start_token_id=VISION_START_ID, image_end_token_id=VISION_END_ID,
    video_start_token_id=FAMILY_TOKENS["video_start"], video_end_token_id=FAMILY_TOKENS["video_end"],
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_GLM_MOE = dict(
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
    first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=HIDDEN // N_HEADS,
)


def _family_config(family: str, overrides: dict) -> tuple[str, transformers.PreTrainedConfig]:
    """``(class name, config)`` of ``family``; ``overrides`` (text families only) go to its config."""
    T = transformers
    if overrides and family not in TEXT_FAMILIES:
        raise ValueError(f"config overrides are for the text families {TEXT_FAMILIES}, not {family!r}")
    if family == "qwen3":
        return "Qwen3ForCausalLM", T.Qwen3Config(**_text(head_dim=HIDDEN // N_HEADS, **overrides))
    if family == "mistral":
        # Mistral-7B-v0.3 style: no sliding window (v0.1's 4096 is a separate test).
        return "MistralForCausalLM", T.MistralConfig(**_text(**{"sliding_window": None, **overrides}))
    if family == "my_qwen2":
        return "MyQwen2", T.Qwen2Config(**_text(**overrides))
    if family == "qwen2_5_vl":
        config = T.Qwen2_5_VLConfig(
            text_config=_text(rope_parameters=_mrope([2, 3, 3])), vision_config=_qwen25_vision(),
            tie_word_embeddings=False, **_QWEN_VL_IDS,
        )
        return "Qwen2_5_VLForConditionalGeneration", config
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        moe = family == "qwen3_vl_moe"
        text = _text(head_dim=HIDDEN // N_HEADS, rope_parameters=_mrope([4, 2, 2], mrope_interleaved=True),
                     **(_MOE if moe else {}))
        cls = T.Qwen3VLMoeConfig if moe else T.Qwen3VLConfig
        config = cls(text_config=text, vision_config=_qwen3_vision(), tie_word_embeddings=False, **_QWEN_VL_IDS)
        name = "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
        return name, config
    if family in ("glm4v", "glm4v_moe"):
        moe = family == "glm4v_moe"
        # GLM rotates half of each head (partial_rotary_factor 0.5): 4 frequencies, 2:1:1.
        text = _text(rope_parameters=_mrope([2, 1, 1], partial_rotary_factor=0.5), **(_GLM_MOE if moe else {}))
        cls = T.Glm4vMoeConfig if moe else T.Glm4vConfig
        config = cls(text_config=text, vision_config=_glm_vision(), tie_word_embeddings=False, **_GLM_IDS)
        return ("Glm4vMoeForConditionalGeneration" if moe else "Glm4vForConditionalGeneration"), config
    if family == "internvl":
        vision = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=[IMAGE_SIDE, IMAGE_SIDE], patch_size=[VIT_PATCH, VIT_PATCH], initializer_range=INIT_STD,
        )
        config = T.InternVLConfig(
            vision_config=vision, text_config=dict(model_type="qwen2", **_text()), image_token_id=IMAGE_ID,
            image_seq_length=_INTERNVL_TOKENS, downsample_ratio=0.5, tie_word_embeddings=False,
        )
        return "InternVLForConditionalGeneration", config
    if family == "llava_next_video":
        config = T.LlavaNextVideoConfig(
            vision_config=_clip(IMAGE_SIDE), text_config=T.LlamaConfig(**_text()),
            image_token_index=IMAGE_ID, video_token_index=VIDEO_ID, image_grid_pinpoints=[[IMAGE_SIDE, IMAGE_SIDE]],
            spatial_pool_stride=2, tie_word_embeddings=False,
        )
        return "LlavaNextVideoForConditionalGeneration", config
    if family == "llava":
        config = T.LlavaConfig(
            vision_config=_clip(LLAVA_IMAGE_SIDE), text_config=T.LlamaConfig(**_text()),
            image_token_index=IMAGE_ID, image_seq_length=(LLAVA_IMAGE_SIDE // VIT_PATCH) ** 2,
            tie_word_embeddings=False,
        )
        return "LlavaForConditionalGeneration", config
    if family == "video_llava":
        config = T.VideoLlavaConfig(
            vision_config=_clip(VIDEO_LLAVA_SIDE), text_config=T.LlamaConfig(**_text()),
            image_token_index=IMAGE_ID, video_token_index=VIDEO_ID, tie_word_embeddings=False,
        )
        return "VideoLlavaForConditionalGeneration", config
    if family == "idefics3":
        vision = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=IMAGE_SIDE, patch_size=VIT_PATCH, initializer_range=INIT_STD,
        )
        config = T.Idefics3Config(
            vision_config=vision, text_config=T.LlamaConfig(**_text()), image_token_id=IMAGE_ID, scale_factor=2,
            tie_word_embeddings=False,
        )
        return "Idefics3ForConditionalGeneration", config
    if family == "mistral3":
        vision = T.PixtralVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
            image_size=64, patch_size=PIXTRAL_PATCH,
        )
        config = T.Mistral3Config(
            vision_config=vision, text_config=T.MistralConfig(**_text(sliding_window=None)),
            image_token_index=IMAGE_ID, spatial_merge_size=PIXTRAL_MERGE, vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
        return "Mistral3ForConditionalGeneration", config
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _refused_config(name: str, overrides: dict) -> tuple[str, transformers.PreTrainedConfig, str]:
    """``(class name, config, attn_implementation)`` of a model std_ext must refuse."""
    T = transformers
    full = ["full_attention"] * N_LAYERS
    if name == "gemma2":
        # Full attention everywhere, so soft-capping is the only inexact feature.
        fields = _text(head_dim=HIDDEN // N_HEADS, layer_types=full, attn_logit_softcapping=50.0,
                       final_logit_softcapping=None, query_pre_attn_scalar=HIDDEN // N_HEADS)
        fields.update(overrides)
        return "Gemma2ForCausalLM", T.Gemma2Config(**fields), "eager"  # Gemma2 has no SDPA path
    if name == "gpt_oss":
        # GPT-OSS builds a sliding mask whatever its layers are, so it keeps its 128-token window
        # (unused: every layer is full attention, and the prompts are shorter).
        fields = _text(head_dim=HIDDEN // N_HEADS, layer_types=full, num_local_experts=4, num_experts_per_tok=2)
        fields.update(overrides)
        return "GptOssForCausalLM", T.GptOssConfig(**fields), "eager"  # sinks: no SDPA path
    if name == "gemma3":
        text = _text(head_dim=HIDDEN // N_HEADS, layer_types=full, query_pre_attn_scalar=HIDDEN // N_HEADS,
                     final_logit_softcapping=None, attn_logit_softcapping=None)
        text.update(overrides)
        vision = T.SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=IMAGE_SIDE, patch_size=VIT_PATCH, vision_use_head=False,
        )
        config = T.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_TOKENS, image_token_index=IMAGE_ID,
            boi_token_index=FAMILY_TOKENS["boi"], eoi_token_index=FAMILY_TOKENS["eoi"], tie_word_embeddings=False,
        )
        return "Gemma3ForConditionalGeneration", config, "sdpa"
    if name == "qwen3_next":
        fields = _text(head_dim=HIDDEN // N_HEADS, layer_types=["linear_attention", "full_attention"],
                       linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16, linear_conv_kernel_dim=4, **_MOE, shared_expert_intermediate_size=32)
        fields.update(overrides)
        return "Qwen3NextForCausalLM", T.Qwen3NextConfig(**fields), "sdpa"
    if name == "qwen3_5":
        fields = _text(head_dim=HIDDEN // N_HEADS, layer_types=["linear_attention", "full_attention"],
                       linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16, linear_conv_kernel_dim=4)
        fields.update(overrides)
        return "Qwen3_5ForCausalLM", T.Qwen3_5TextConfig(**fields), "sdpa"
    if name == "lfm2":
        fields = _text(layer_types=["conv", "full_attention"], conv_L_cache=3, block_ff_dim=INTERMEDIATE)
        fields.update(overrides)
        return "Lfm2ForCausalLM", T.Lfm2Config(**fields), "sdpa"
    raise ValueError(f"unknown refused model {name!r}; expected one of {REFUSED}")


# ---- models ----------------------------------------------------------------------------


def _build(cls: type, config, seed: int, attn: str, init_std: float) -> transformers.PreTrainedModel:
    return build_tiny_model(cls, config, seed, init_std=init_std, attn=attn, silent_ids=_RESERVED_IDS)


def _model_class(name: str) -> type:
    return MyQwen2 if name == "MyQwen2" else getattr(transformers, name)


def make_family_model(
    family: str, seed: int = 0, *, init_std: float = INIT_STD, **overrides
) -> transformers.PreTrainedModel:
    """The tiny model of ``family`` (one of ``FAMILIES``): fp32, CPU, eval, SDPA attention.

    ``overrides`` (text families only) change config fields, e.g. ``sliding_window=16``;
    the weights depend only on ``(family, seed, init_std)`` while the parameter shapes
    stay the same, so two overrides of one seed share every weight.
    """
    name, config = _family_config(family, overrides)
    return _build(_model_class(name), config, seed, "sdpa", init_std)


def make_refused_model(name: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny model std_ext must refuse (one of ``REFUSED``); ``overrides`` go to its (text) config.

    Every layer is full attention except the recurrent ones of qwen3_next / qwen3_5 / lfm2
    (``[recurrent, full_attention]``), so the feature named in ``REFUSED_CLASSES`` is the
    only obstacle. GPT-OSS has no SDPA path and Gemma2 none in this release: both eager.
    """
    cls_name, config, attn = _refused_config(name, overrides)
    assert cls_name == REFUSED_CLASSES[name]
    model = _build(getattr(transformers, cls_name), config, seed, attn, INIT_STD)
    if name == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                # at INIT_STD a sink would change nothing a test could see
                layer.self_attn.sinks.mul_(SINK_STD / INIT_STD)
    return model


# ---- prompts -----------------------------------------------------------------------------


def toy_tokenize(text: str) -> list[int]:
    """A deterministic stand-in for a tokenizer: one text id per character."""
    return [(ord(c) * 31 + 7) % FAMILY_TEXT_VOCAB for c in text]


@dataclass
class _Visual:
    """One row's visual part: its tokens (placeholders and the text around them), their
    ``mm_token_type_ids`` (0 text, 1 image, 2 video), and the pixel inputs of that row."""

    tokens: list[int] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    pixels: dict = field(default_factory=dict)

    def text(self, ids: list[int]) -> None:
        self.tokens += ids
        self.types += [0] * len(ids)

    def span(self, token: int, n: int, kind: int) -> None:
        self.tokens += [token] * n
        self.types += [kind] * n


def _qwen_pixels(gen, t: int, h: int, w: int) -> torch.Tensor:
    """Flattened patches, the processor's layout: ``[t*h*w, 24]``."""
    return torch.randn(t * h * w, QWEN_PATCH_DIM, generator=gen)


# Row variants: what the b-th prompt of a family shows (sizes differ, so rows are ragged).
# Qwen-style grids are (t, h, w) in patches; an image has t = 1.
_QWEN_ROWS = (("video", (4, 4, 8)), ("image", (1, 8, 8)), ("video", (2, 4, 8)))
_QWEN25_SECONDS = (0.5, None, 1.0)  # second_per_grid_ts of each row's video (fps 4 and 2)
_QWEN3_FPS = 2.0  # frames sampled at 2 fps; the processor averages each temporal patch's two timestamps


def _visual_qwen2_5_vl(family: str, gen, b: int) -> _Visual:
    modality, (t, h, w) = _QWEN_ROWS[b % 3]
    vis = _Visual()
    vis.text([VISION_START_ID])
    n = t * h * w // QWEN_MERGE**2
    if modality == "video":
        vis.span(VIDEO_ID, n, 2)
        vis.pixels = {
            "pixel_values_videos": _qwen_pixels(gen, t, h, w),
            "video_grid_thw": torch.tensor([[t, h, w]]),
            "second_per_grid_ts": torch.tensor([_QWEN25_SECONDS[b % 3]]),
        }
    else:
        vis.span(IMAGE_ID, n, 1)
        vis.pixels = {"pixel_values": _qwen_pixels(gen, t, h, w), "image_grid_thw": torch.tensor([[t, h, w]])}
    vis.text([VISION_END_ID])
    return vis


def _visual_qwen3_vl(family: str, gen, b: int) -> _Visual:
    # The MoE variants start one row later, so their single prompt is an image.
    modality, (t, h, w) = _QWEN_ROWS[(b + family.endswith("_moe")) % 3]
    vis = _Visual()
    vis.text([VISION_START_ID])  # the chat template's own pair wraps the processor's expansion
    if modality == "video":
        per_frame = h * w // QWEN_MERGE**2
        for frame in range(t):
            # the processor stamps a temporal patch with the mean time of its two frames
            seconds = (2 * frame / _QWEN3_FPS + (2 * frame + 1) / _QWEN3_FPS) / 2
            vis.text(toy_tokenize(f"<{seconds:.1f} seconds>") + [VISION_START_ID])
            vis.span(VIDEO_ID, per_frame, 2)
            vis.text([VISION_END_ID])
        vis.pixels = {"pixel_values_videos": _qwen_pixels(gen, t, h, w), "video_grid_thw": torch.tensor([[t, h, w]])}
    else:
        vis.span(IMAGE_ID, t * h * w // QWEN_MERGE**2, 1)
        vis.pixels = {"pixel_values": _qwen_pixels(gen, t, h, w), "image_grid_thw": torch.tensor([[t, h, w]])}
    vis.text([VISION_END_ID])
    return vis


_GLM_FPS = 1.0  # frames sampled at 1 fps: temporal patch k starts at second 2k


# GLM marks video frames with the image token, so its forward cannot tell them from images
# in one batch: GLM-4.1V rows show videos, GLM-4.5V rows images.
_GLM_ROWS = {"glm4v": (("video", (4, 4, 8)), ("video", (2, 8, 8)), ("video", (3, 4, 4))),
             "glm4v_moe": (("image", (1, 8, 8)), ("image", (1, 8, 12)), ("image", (1, 4, 12)))}


def _visual_glm4v(family: str, gen, b: int) -> _Visual:
    modality, (t, h, w) = _GLM_ROWS[family][b % 3]
    vis = _Visual()
    per_frame = h * w // QWEN_MERGE**2
    if modality == "video":
        # GLM marks every frame with the *image* token; mm_token_type_ids says which are video
        vis.text([FAMILY_TOKENS["video_start"]])
        for frame in range(t):
            vis.text([VISION_START_ID])
            vis.span(IMAGE_ID, per_frame, 2)
            vis.text([VISION_END_ID] + toy_tokenize(str(int(2 * frame / _GLM_FPS))))
        vis.text([FAMILY_TOKENS["video_end"]])
        vis.pixels = {"pixel_values_videos": _qwen_pixels(gen, t, h, w), "video_grid_thw": torch.tensor([[t, h, w]])}
    else:
        vis.text([VISION_START_ID])
        vis.span(IMAGE_ID, t * per_frame, 1)
        vis.text([VISION_END_ID])
        vis.pixels = {"pixel_values": _qwen_pixels(gen, t, h, w), "image_grid_thw": torch.tensor([[t, h, w]])}
    return vis


# InternVL: a video is its frames, each a 32x32 tile; an image is its tiles (crops + thumbnail).
_INTERNVL_ROWS = (("video", 3), ("image", 2), ("video", 2))


def _visual_internvl(family: str, gen, b: int) -> _Visual:
    modality, n = _INTERNVL_ROWS[b % 3]
    vis = _Visual()
    if modality == "video":
        for frame in range(n):
            vis.text(toy_tokenize(("\n" if frame else "") + f"Frame{frame + 1}: ") + [VISION_START_ID])
            vis.span(IMAGE_ID, _INTERNVL_TOKENS, 1)
            vis.text([VISION_END_ID])
    else:
        vis.text([VISION_START_ID])
        vis.span(IMAGE_ID, _INTERNVL_TOKENS * n, 1)
        vis.text([VISION_END_ID])
    vis.pixels = {"pixel_values": torch.randn(n, 3, IMAGE_SIDE, IMAGE_SIDE, generator=gen)}
    return vis


LLAVA_NEXT_VIDEO_FRAMES = 3  # the video processor samples a fixed number of frames: rows stack


def _visual_llava_next_video(family: str, gen, b: int) -> _Visual:
    vis = _Visual()
    # the processor: (H/p * W/p) // 4 tokens per frame (2x2 average pooling), CLS dropped
    vis.span(VIDEO_ID, VIT_GRID * VIT_GRID // 4 * LLAVA_NEXT_VIDEO_FRAMES, 2)
    vis.text(toy_tokenize("\n"))
    vis.pixels = {"pixel_values_videos": torch.randn(
        1, LLAVA_NEXT_VIDEO_FRAMES, 3, IMAGE_SIDE, IMAGE_SIDE, generator=gen)}
    return vis


_LLAVA_IMAGES = (1, 2, 1)


def _visual_llava(family: str, gen, b: int) -> _Visual:
    n = _LLAVA_IMAGES[b % 3]
    vis = _Visual()
    for _ in range(n):
        vis.span(IMAGE_ID, (LLAVA_IMAGE_SIDE // VIT_PATCH) ** 2, 1)
        vis.text(toy_tokenize("\n"))
    vis.pixels = {"pixel_values": torch.randn(n, 3, LLAVA_IMAGE_SIDE, LLAVA_IMAGE_SIDE, generator=gen)}
    return vis


_VIDEO_LLAVA_ROWS = ("video", "image", "video")
VIDEO_LLAVA_FRAMES = 4


def _visual_video_llava(family: str, gen, b: int) -> _Visual:
    vis = _Visual()
    patches = (VIDEO_LLAVA_SIDE // VIT_PATCH) ** 2
    if _VIDEO_LLAVA_ROWS[b % 3] == "video":
        vis.span(VIDEO_ID, (patches + 1) * VIDEO_LLAVA_FRAMES, 2)  # each frame keeps its CLS token
        vis.pixels = {"pixel_values_videos": torch.randn(
            1, VIDEO_LLAVA_FRAMES, 3, VIDEO_LLAVA_SIDE, VIDEO_LLAVA_SIDE, generator=gen)}
    else:
        vis.span(IMAGE_ID, patches, 1)  # "default" feature selection drops an image's CLS
        vis.pixels = {"pixel_values_images": torch.randn(1, 3, VIDEO_LLAVA_SIDE, VIDEO_LLAVA_SIDE, generator=gen)}
    vis.text(toy_tokenize("\n"))
    return vis


_IDEFICS3_SPLITS = ((1, 2), (0, 0), (2, 2))  # (rows, cols) of crops; (0, 0): the global image alone
_IDEFICS3_TOKENS = (VIT_GRID // 2) ** 2  # 16 per tile after the scale-2 pixel shuffle


def _visual_idefics3(family: str, gen, b: int) -> _Visual:
    rows, cols = _IDEFICS3_SPLITS[b % 3]
    vis = _Visual()
    fake, glob = FAMILY_TOKENS["fake_image"], FAMILY_TOKENS["global_image"]
    for r in range(rows):
        for c in range(cols):
            vis.text([fake, _ROW_COL_BASE + 2 * r + c])
            vis.span(IMAGE_ID, _IDEFICS3_TOKENS, 1)
        vis.text(toy_tokenize("\n"))
    vis.text((toy_tokenize("\n") if rows else []) + [fake, glob])
    vis.span(IMAGE_ID, _IDEFICS3_TOKENS, 1)
    vis.text([fake])
    tiles = rows * cols + 1
    pixels = torch.randn(1, tiles, 3, IMAGE_SIDE, IMAGE_SIDE, generator=gen)  # [1, tiles, 3, 32, 32]
    mask = torch.ones(1, tiles, IMAGE_SIDE, IMAGE_SIDE, dtype=torch.bool)  # [1, tiles, 32, 32]
    if cols > rows:
        # The global image keeps the picture's aspect ratio: a wide one fills the top rows of
        # its tile, and the processor zero-pads the rest and masks it out.
        real = IMAGE_SIDE * rows // cols
        pixels[0, -1, :, real:] = 0.0
        mask[0, -1, real:] = False
    vis.pixels = {"pixel_values": pixels, "pixel_attention_mask": mask}
    return vis


_PIXTRAL_SIZES = ((32, 48), (48, 48), (24, 32))  # (height, width) in pixels


def _visual_mistral3(family: str, gen, b: int) -> _Visual:
    height, width = _PIXTRAL_SIZES[b % 3]
    step = PIXTRAL_PATCH * PIXTRAL_MERGE
    vis = _Visual()
    for r in range(height // step):
        vis.span(IMAGE_ID, width // step, 1)
        last = r == height // step - 1
        vis.text([FAMILY_TOKENS["image_end" if last else "image_break"]])
    vis.pixels = {
        "pixel_values": torch.randn(1, 3, height, width, generator=gen),  # padded to the batch's largest
        "image_sizes": torch.tensor([[height, width]]),
    }
    return vis


_VISUAL_BUILDERS: dict[str, Callable] = {
    "qwen2_5_vl": _visual_qwen2_5_vl,
    "qwen3_vl": _visual_qwen3_vl,
    "qwen3_vl_moe": _visual_qwen3_vl,
    "glm4v": _visual_glm4v,
    "glm4v_moe": _visual_glm4v,
    "internvl": _visual_internvl,
    "llava_next_video": _visual_llava_next_video,
    "llava": _visual_llava,
    "video_llava": _visual_video_llava,
    "idefics3": _visual_idefics3,
    "mistral3": _visual_mistral3,
}
# Families whose processor returns mm_token_type_ids.
_TYPED = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe")
# Families whose tokenizer starts a prompt with BOS (Llama / Mistral tokenizers).
_WITH_BOS = ("mistral", "llava_next_video", "llava", "video_llava", "idefics3", "mistral3")


@torch.no_grad()
def _count_features(model, family: str, pixels: dict) -> int:
    """LLM tokens the model's own vision tower yields for one row's ``pixels``."""
    m = model.model
    if family in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe"):
        total = 0
        if "pixel_values" in pixels:
            out = m.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"], return_dict=True)
            total += sum(f.shape[0] for f in out.pooler_output)
        if "pixel_values_videos" in pixels:
            out = m.get_video_features(pixels["pixel_values_videos"], pixels["video_grid_thw"], return_dict=True)
            total += sum(f.shape[0] for f in out.pooler_output)
        return total
    if family == "internvl":
        out = m.get_image_features(pixels["pixel_values"], vision_feature_layer=-1,
                                   vision_feature_select_strategy="default", return_dict=True)
        return out.pooler_output.shape[0] * out.pooler_output.shape[1]
    if family == "llava_next_video":
        out = m.get_video_features(pixels["pixel_values_videos"], vision_feature_layer=-2,
                                   vision_feature_select_strategy="default", return_dict=True)
        return out.pooler_output.shape[0] * out.pooler_output.shape[1]
    if family == "llava":
        out = m.get_image_features(pixels["pixel_values"], vision_feature_layer=-2,
                                   vision_feature_select_strategy="default", return_dict=True)
        feats = out.pooler_output
        return sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[0] * feats.shape[1]
    if family == "video_llava":
        if "pixel_values_videos" in pixels:
            out = m.get_video_features(pixels["pixel_values_videos"], vision_feature_layer=-2, return_dict=True)
        else:
            out = m.get_image_features(pixels["pixel_values_images"], vision_feature_layer=-2,
                                       vision_feature_select_strategy="default", return_dict=True)
        return out.pooler_output.shape[0] * out.pooler_output.shape[1]
    if family == "idefics3":
        out = m.get_image_features(pixels["pixel_values"], pixels["pixel_attention_mask"], return_dict=True)
        return sum(f.shape[0] for f in out.pooler_output)
    if family == "mistral3":
        out = m.get_image_features(pixels["pixel_values"], pixels["image_sizes"], vision_feature_layer=-1,
                                   return_dict=True)
        return sum(f.shape[0] for f in out.pooler_output)
    raise ValueError(family)


def make_prompts(model, family: str, n_rows: int = 1, *, seed: int = 0) -> list[dict]:
    """``n_rows`` prompts for ``model`` of ``family``, each a batch of one, unpadded.

    Row ``b`` is ``[bos] + prefix text + visual part + question`` (8-12 random tokens).
    VL rows show different visuals (a video, an image, another video of another size;
    see the ``_*_ROWS`` tables), so rows differ in length and in visual layout; each
    row's prefix is sized so that its non-placeholder tokens number ``M + 4 + 3 b``, ``M``
    the most any row's visual part and question bring. Rows with close non-placeholder
    counts let one ``budget`` keep part of every row's placeholders. Text families'
    "visual part" is 40 more random text tokens, the prefix ``4 + 6 b``.

    Each row: ``input_ids`` and ``attention_mask`` long ``[1, L]``, ``mm_token_type_ids``
    ``[1, L]`` where the processor returns it, and the row's pixel inputs in the model's
    layout (``pixel_values_videos`` ``[t*h*w, 24]`` + ``video_grid_thw`` ``[1, 3]`` for the
    Qwen/GLM families, ``pixel_values`` ``[1, tiles, 3, 32, 32]`` + ``pixel_attention_mask``
    for Idefics3, ...). :func:`batch_prompts` left-pads them into one batch.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    gen = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(0, FAMILY_TEXT_VOCAB, (n,), generator=gen).tolist()

    parts = []  # per row: (visual part, question, non-placeholder tokens besides the prefix)
    for b in range(n_rows):
        if family in TEXT_FAMILIES:
            vis = _Visual()
            vis.text(text(40))
            placeholders = 0
        else:
            vis = _VISUAL_BUILDERS[family](family, gen, b)
            produced = _count_features(model, family, vis.pixels)
            # GLM's video frames use the image token: the processor's types tell them apart
            placeholders = sum(1 for t in vis.types if t) if family in _TYPED else sum(
                1 for t in vis.tokens if t in (IMAGE_ID, VIDEO_ID))
            if produced != placeholders:
                raise AssertionError(f"{family} row {b}: vision tower yields {produced} features, "
                                     f"the prompt has {placeholders} placeholders")
        question = text(int(torch.randint(_QUESTION_LEN[0], _QUESTION_LEN[1] + 1, (1,), generator=gen)))
        bos = [BOS_ID] if family in _WITH_BOS else []
        parts.append((vis, question, bos, len(bos) + len(vis.tokens) - placeholders + len(question)))

    most = max(p[3] for p in parts)
    rows = []
    for b, (vis, question, bos, fixed) in enumerate(parts):
        prefix = 4 + 6 * b if family in TEXT_FAMILIES else most - fixed + 4 + 3 * b
        head = bos + text(prefix)
        tokens = head + vis.tokens + question
        types = [0] * len(head) + vis.types + [0] * len(question)
        row = {"input_ids": torch.tensor([tokens]), "attention_mask": torch.ones(1, len(tokens), dtype=torch.long)}
        if family in _TYPED:
            row["mm_token_type_ids"] = torch.tensor([types])
        row.update(vis.pixels)
        rows.append(row)
    return rows


def _pad_to(x: torch.Tensor, dims: dict[int, int], value=0) -> torch.Tensor:
    """``x`` zero-padded at the end of each dim ``d`` to size ``dims[d]``."""
    pad = []
    for d in reversed(range(x.dim())):
        pad += [0, dims.get(d, x.shape[d]) - x.shape[d]]
    return F.pad(x, pad, value=value)


def batch_prompts(rows: list[dict]) -> dict:
    """Left-pad :func:`make_prompts` rows into one batch, as the processor does.

    Text inputs ``[B, T]`` (``pad`` / 0 on the left); per-visual inputs are concatenated
    in row order (flattened patches, grids, ``second_per_grid_ts``, InternVL tiles,
    image sizes); Idefics3's ``pixel_values`` ``[B, max tiles, 3, H, W]`` are padded with
    all-zero tiles (the model drops them) and a False ``pixel_attention_mask``; Pixtral's
    ``pixel_values`` ``[B, 3, max H, max W]`` with zeros past each ``image_sizes``.
    """
    width = max(r["input_ids"].shape[1] for r in rows)
    batch: dict = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        values = [r[key] for r in rows if key in r]
        if key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            fill = PAD_ID if key == "input_ids" else 0
            batch[key] = torch.stack([F.pad(v[0], (width - v.shape[1], 0), value=fill) for v in values])
        elif key in ("pixel_attention_mask",) or (key == "pixel_values" and values[0].dim() == 5):
            tiles = max(v.shape[1] for v in values)
            batch[key] = torch.cat([_pad_to(v, {1: tiles}) for v in values])
        elif key == "pixel_values" and "image_sizes" in rows[0]:
            h = max(v.shape[2] for v in values)
            w = max(v.shape[3] for v in values)
            batch[key] = torch.cat([_pad_to(v, {2: h, 3: w}) for v in values])
        else:
            batch[key] = torch.cat(values)
    return batch


def placeholder_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """bool, like ``input_ids``: the model's image / video placeholder tokens."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for attr in ("image_token_id", "video_token_id", "image_token_index", "video_token_index"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int):
            mask |= input_ids == value
    return mask


def make_gemma3_prompt(seed: int = 0) -> dict:
    """A Gemma3 image prompt as its processor builds it (batch of one).

    ``[bos] + text + "\\n\\n<start_of_image>" + 16 image tokens + "<end_of_image>\\n\\n" +
    question``; ``token_type_ids`` long ``[1, L]`` is 1 on the image tokens (what makes
    Gemma3 attend bidirectionally among them), ``pixel_values`` ``[1, 3, 32, 32]``.
    """
    gen = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(0, FAMILY_TEXT_VOCAB, (n,), generator=gen).tolist()

    ids = ([BOS_ID] + text(6) + toy_tokenize("\n\n") + [FAMILY_TOKENS["boi"]] + [IMAGE_ID] * GEMMA3_TOKENS
           + [FAMILY_TOKENS["eoi"]] + toy_tokenize("\n\n") + text(10))
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "token_type_ids": (input_ids == IMAGE_ID).long(),
        "pixel_values": torch.randn(1, 3, IMAGE_SIDE, IMAGE_SIDE, generator=gen),
    }
