"""Tiny saved checkpoints with their real processors, and video files, for the ``std_ext
generate`` tests, all built offline.

Each checkpoint directory is what ``from_pretrained`` and ``AutoProcessor`` read from a
real one, at toy size:

* a fixed-seed random model of the family, saved with ``save_pretrained``: the Qwen-VL
  models below (hidden 64, 2 layers, 4 query / 2 KV heads, vocab 256; a 1-2 block vision
  tower with 2x2-pixel patches, 2 frames per temporal patch, 2x2 merge), LLaVA-OneVision
  from ``tiny_models``, the other families from ``tiny_families``;
* the family's own ``transformers`` processor class with its own image and video
  processor classes at small sizes (frames resized to what the toy vision tower takes),
  saved with ``save_pretrained``;
* a character-level tokenizer made with the ``tokenizers`` library: ids 0..231 are one
  character each, and the family's special tokens (placeholders, image / video start
  and end, ``<|im_start|>`` 252, ``<|im_end|>`` 253 = eos, ``<|endoftext|>`` 255 = pad) sit at
  the ids its model uses, with a chat template that writes the family's video placeholder.

Ids from 232 up have a zero LM-head row in every model, far below the best text logit,
so greedy decoding never stops early and every answer decodes to characters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

import tiny_families as tf
import tiny_models as tm

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video", "internvl", "glm4v")
PATCH, TEMPORAL, MERGE = 2, 2, 2
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
# Pixel bounds (size.shortest_edge / longest_edge): per frame for Qwen2-VL's and GLM's video
# processors, per video (frames x area) for Qwen3-VL's.
QWEN2_SIZE = {"shortest_edge": 16, "longest_edge": 1024}
QWEN3_SIZE = {"shortest_edge": 64, "longest_edge": 4 * 1024}

TEXT_VOCAB = tf.FAMILY_TEXT_VOCAB  # 232: ids below are characters, ids from here up special
# printable ASCII and newline, then CJK characters: every id decodes to one distinct character
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
CHARS += [chr(0x4E00 + i) for i in range(TEXT_VOCAB - len(CHARS))]
CHAT = {"<|im_start|>": tm.BOS_ID, "<|im_end|>": tm.EOS_ID, "<|endoftext|>": tm.PAD_ID}


def chat_template(video: str) -> str:
    """A chat template that writes ``video`` for a video part and the text of a text part."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'video' %}" + video + "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def text_ids(text: str) -> list[int]:
    """Ids of plain text under the tiny tokenizer: one per character."""
    return [CHARS.index(c) for c in text]


def tokenizer(specials: dict[str, int], template: str, extra: dict | None = None) -> transformers.PreTrainedTokenizerFast:
    """The character-level tokenizer with ``specials`` (token -> id; ids >= 232) and every other
    id from 232 up a reserved special token; ``extra`` names special tokens as attributes
    (InternVL's processor reads ``tokenizer.context_image_token``, ...)."""
    vocab = {c: i for i, c in enumerate(CHARS)}
    names = {i: token for token, i in {**CHAT, **specials}.items()}
    vocab |= {names.get(i, f"<|reserved_{i}|>"): i for i in range(TEXT_VOCAB, tm.VOCAB_SIZE)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|reserved_254|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()  # characters join without spaces
    core.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in list(vocab)[TEXT_VOCAB:]])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|reserved_254|>",
        chat_template=template, model_input_names=["input_ids", "attention_mask"], extra_special_tokens=extra or {},
    )


# --------------------------------------------------------------------------- models


def _text_config(**extra) -> dict:
    return dict(
        vocab_size=tm.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=tm.BOS_ID, eos_token_id=tm.EOS_ID, pad_token_id=tm.PAD_ID,
        **extra,
    )


def _mrope(section: list[int], **extra) -> dict:
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, **extra}


_IDS = dict(image_token_id=tm.IMAGE_ID, video_token_id=tm.VIDEO_ID, vision_start_token_id=tm.VISION_START_ID,
            vision_end_token_id=tm.VISION_END_ID, tie_word_embeddings=False)
_VISION = dict(in_channels=3, patch_size=PATCH, temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE)


def _config(family: str) -> transformers.PreTrainedConfig:
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, **_VISION)
        return transformers.Qwen2VLConfig(text_config=_text_config(rope_parameters=_mrope([2, 3, 3])),
                                          vision_config=vision, **_IDS)
    if family == "qwen2_5_vl":
        # windows of 2x2 merged tokens; block 1 attends over the whole frame; 4 temporal
        # RoPE steps per second of video, so second_per_grid_ts shapes the positions
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=8,
                      fullatt_block_indexes=[1], tokens_per_second=4, out_hidden_size=64, **_VISION)
        return transformers.Qwen2_5_VLConfig(text_config=_text_config(rope_parameters=_mrope([2, 3, 3])),
                                             vision_config=vision, **_IDS)
    if family == "qwen3_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=16, deepstack_visual_indexes=[0], **_VISION)
        text = _text_config(head_dim=16, rope_parameters=_mrope([4, 2, 2], mrope_interleaved=True))
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **_IDS)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


@torch.no_grad()
def make_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """The tiny random model of ``family``: fp32, CPU, eval; depends only on ``(family, seed)``.

    Weights are drawn from normal(0, 0.2) (norms 1 / 0), as tiny_models draws them, so
    logits are spread and greedy decoding is rarely a near-tie.
    """
    config = _config(family)
    model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        for name, param in sorted(module.named_parameters(recurse=False)):
            if norm:
                param.fill_(1.0 if name == "weight" else 0.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * tm.INIT_STD)
    model.get_output_embeddings().weight[TEXT_VOCAB:] = 0.0  # specials never win: no early eos
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id, gen.do_sample = tm.BOS_ID, tm.EOS_ID, tm.PAD_ID, False
    return model.eval()


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Family:
    """How one family's checkpoint is made: its model, and its processor around a tokenizer."""

    model: Callable[[], transformers.PreTrainedModel]
    processor: Callable[[], transformers.ProcessorMixin]


_QWEN = {"<|vision_start|>": tm.VISION_START_ID, "<|vision_end|>": tm.VISION_END_ID, "<|video_pad|>": tm.VIDEO_ID,
         "<|image_pad|>": tm.IMAGE_ID}
_QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
_QWEN_PATCHING = dict(patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE, image_mean=MEAN, image_std=STD)
_LLAVA = {"<image>": tm.IMAGE_ID, "<video>": tm.VIDEO_ID}


def _qwen_processor(family: str) -> transformers.ProcessorMixin:
    cls = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
           "qwen3_vl": transformers.Qwen3VLProcessor}[family]
    video_cls, size = ((transformers.Qwen3VLVideoProcessor, QWEN3_SIZE) if family == "qwen3_vl"
                       else (transformers.Qwen2VLVideoProcessor, QWEN2_SIZE))
    return cls(image_processor=transformers.Qwen2VLImageProcessor(size=QWEN2_SIZE, **_QWEN_PATCHING),
               video_processor=video_cls(size=size, do_sample_frames=False, **_QWEN_PATCHING),
               tokenizer=tokenizer(_QWEN, chat_template(_QWEN_VIDEO)), chat_template=chat_template(_QWEN_VIDEO))


def _llava_onevision_processor() -> transformers.ProcessorMixin:
    side = {"height": tm.LLAVA_IMAGE, "width": tm.LLAVA_IMAGE}
    return transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(
            size=side, image_grid_pinpoints=[[tm.LLAVA_IMAGE, tm.LLAVA_IMAGE]]),
        video_processor=transformers.LlavaOnevisionVideoProcessor(size=side, do_sample_frames=False),
        tokenizer=tokenizer(_LLAVA, chat_template("<video>")), chat_template=chat_template("<video>"),
        num_image_tokens=(tm.LLAVA_IMAGE // tm.LLAVA_PATCH) ** 2, vision_feature_select_strategy="full",
    )


def _llava_next_video_processor() -> transformers.ProcessorMixin:
    crop = {"height": tf.IMAGE_SIDE, "width": tf.IMAGE_SIDE}
    return transformers.LlavaNextVideoProcessor(
        image_processor=transformers.LlavaNextImageProcessor(
            size={"shortest_edge": tf.IMAGE_SIDE}, crop_size=crop, image_grid_pinpoints=[[tf.IMAGE_SIDE] * 2]),
        video_processor=transformers.LlavaNextVideoVideoProcessor(
            size={"shortest_edge": tf.IMAGE_SIDE}, crop_size=crop, do_sample_frames=False),
        tokenizer=tokenizer(_LLAVA, chat_template("<video>")), chat_template=chat_template("<video>"),
        patch_size=tf.VIT_PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def _internvl_processor() -> transformers.ProcessorMixin:
    specials = {"<IMG_CONTEXT>": tm.IMAGE_ID, "<img>": tm.VISION_START_ID, "</img>": tm.VISION_END_ID,
                "<video>": tm.VIDEO_ID}
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    side = {"height": tf.IMAGE_SIDE, "width": tf.IMAGE_SIDE}
    return transformers.InternVLProcessor(
        image_processor=transformers.GotOcr2ImageProcessor(size=side, crop_to_patches=False),
        video_processor=transformers.InternVLVideoProcessor(size=side, do_sample_frames=False),
        tokenizer=tokenizer(specials, chat_template("<video>"), named), chat_template=chat_template("<video>"),
        image_seq_length=tf._INTERNVL_TOKENS,
    )


def _glm4v_processor() -> transformers.ProcessorMixin:
    specials = {"<|image|>": tm.IMAGE_ID, "<|video|>": tm.VIDEO_ID, "<|begin_of_image|>": tm.VISION_START_ID,
                "<|end_of_image|>": tm.VISION_END_ID, "<|begin_of_video|>": tf.FAMILY_TOKENS["video_start"],
                "<|end_of_video|>": tf.FAMILY_TOKENS["video_end"]}
    video = chat_template("<|begin_of_video|><|video|><|end_of_video|>")
    patching = dict(patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE, size=QWEN3_SIZE)
    return transformers.Glm4vProcessor(
        image_processor=transformers.Glm4vImageProcessor(**patching),
        video_processor=transformers.Glm4vVideoProcessor(**patching, max_image_size={"longest_edge": 4096},
                                                         do_sample_frames=False),
        tokenizer=tokenizer(specials, video), chat_template=video,
    )


FAMILY = {
    "qwen2_vl": Family(lambda: make_model("qwen2_vl"), lambda: _qwen_processor("qwen2_vl")),
    "qwen2_5_vl": Family(lambda: make_model("qwen2_5_vl"), lambda: _qwen_processor("qwen2_5_vl")),
    "qwen3_vl": Family(lambda: make_model("qwen3_vl"), lambda: _qwen_processor("qwen3_vl")),
    "llava_onevision": Family(lambda: _silenced(tm.make_model("llava_onevision")), _llava_onevision_processor),
    "llava_next_video": Family(lambda: tf.make_family_model("llava_next_video"), _llava_next_video_processor),
    "internvl": Family(lambda: tf.make_family_model("internvl"), _internvl_processor),
    "glm4v": Family(lambda: tf.make_family_model("glm4v"), _glm4v_processor),
}


@torch.no_grad()
def _silenced(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """Ids from 232 up never win (tiny_models silences only its own specials, 248 up)."""
    model.get_output_embeddings().weight[TEXT_VOCAB:] = 0.0
    return model


def save_checkpoint(family: str, path: Path) -> Path:
    """Save ``family``'s tiny model and its processor (tokenizer included) into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    FAMILY[family].model().save_pretrained(path)
    FAMILY[family].processor().save_pretrained(path)
    return path


def write_video(path: Path, frames: np.ndarray, fps: int = 8, codec: str = "mpeg4") -> Path:
    """Encode uint8 ``[T, H, W, 3]`` frames into a video file with PyAV.

    ``mpeg4`` is lossy (the decoded frames differ from ``frames``); ``png`` (in .mov) and
    ``ffv1`` (in .mkv) are lossless.
    """
    import av

    pixel_format = {"png": "rgb24", "ffv1": "bgr0"}.get(codec, "yuv420p")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pixel_format
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)
    return path


def smooth_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 ``[count, height, width, 3]``: moving gradients plus a little noise (compress well, differ per frame)."""
    rng = np.random.default_rng(seed)
    t = np.arange(count)[:, None, None, None]
    y = np.arange(height)[None, :, None, None]
    x = np.arange(width)[None, None, :, None]
    channel = np.arange(3)[None, None, None, :]
    base = 128 + 90 * np.sin(0.3 * x + 0.2 * y + 0.5 * t + 2.0 * channel)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
