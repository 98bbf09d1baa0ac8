"""Tiny saved Qwen-VL checkpoints and video files for the ``std_ext generate`` tests, built offline.

Each checkpoint is what ``from_pretrained`` / ``AutoProcessor`` read from a real one, at
toy size:

* a fixed-seed random model of the family (the text decoder of ``tiny_models``: hidden
  64, 2 layers, 4 query / 2 KV heads, vocab 256; a 1-2 block vision tower with 2x2-pixel
  patches, 2 frames per temporal patch, 2x2 merge), saved with ``save_pretrained``;
* a character-level tokenizer made with the ``tokenizers`` library, whose special tokens
  sit at the ids the model uses (``<|vision_start|>`` 248, ``<|vision_end|>`` 249,
  ``<|video_pad|>`` 250, ``<|image_pad|>`` 251, ``<|im_start|>`` 252, ``<|im_end|>`` 253
  = eos, ``<|endoftext|>`` 255 = pad), with a Qwen-VL chat template;
* the preprocessing parameters, in the layout of each family's era: Qwen2-VL one legacy
  ``preprocessor_config.json``; Qwen2.5-VL ``preprocessor_config.json`` plus
  ``video_preprocessor_config.json``; Qwen3-VL one nested ``processor_config.json``.

The random models' special-token logits are 0, far below the best text logit, so
greedy decoding never stops early: every run generates ``max_new_tokens`` tokens.

:func:`processor_outputs` runs transformers' own processor class of a family on the
same text, with a stand-in video processor that returns given pixels: the text side
(placeholders, timestamps, ``mm_token_type_ids``, ``second_per_grid_ts``) is then
transformers' code even where its video processors cannot load (no torchvision).
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

import tiny_models as tm

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
VIDEO_PROCESSORS = {"qwen2_vl": "Qwen2VLVideoProcessor", "qwen2_5_vl": "Qwen2VLVideoProcessor",
                    "qwen3_vl": "Qwen3VLVideoProcessor"}
PATCH, TEMPORAL, MERGE = 2, 2, 2
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
# Pixel bounds (size.shortest_edge / longest_edge): per frame for Qwen2-VL's video
# processor, per video (frames x area) for Qwen3-VL's.
SIZES = {
    "qwen2_vl": {"shortest_edge": 16, "longest_edge": 1024},
    "qwen2_5_vl": {"shortest_edge": 16, "longest_edge": 1024},
    "qwen3_vl": {"shortest_edge": 64, "longest_edge": 4 * 1024},
}

# Text vocabulary: printable ASCII and newline, then CJK characters up to TEXT_VOCAB, so
# every id decodes to exactly one distinct character.
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
CHARS += [chr(0x4E00 + i) for i in range(tm.TEXT_VOCAB - len(CHARS))]
SPECIALS = {
    "<|vision_start|>": tm.VISION_START_ID,
    "<|vision_end|>": tm.VISION_END_ID,
    "<|video_pad|>": tm.VIDEO_ID,
    "<|image_pad|>": tm.IMAGE_ID,
    "<|im_start|>": tm.BOS_ID,
    "<|im_end|>": tm.EOS_ID,
    "<|unused|>": 254,
    "<|endoftext|>": tm.PAD_ID,
}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def text_ids(text: str) -> list[int]:
    """Ids of plain text under the tiny tokenizer: one per character."""
    return [CHARS.index(c) for c in text]


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The character-level tokenizer (Qwen's input names: no token_type_ids)."""
    vocab = {c: i for i, c in enumerate(CHARS)} | SPECIALS
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|unused|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()  # characters join without spaces
    core.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|unused|>",
        chat_template=CHAT_TEMPLATE, model_input_names=["input_ids", "attention_mask"],
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
    model.get_output_embeddings().weight[tm.TEXT_VOCAB:] = 0.0  # specials never win: no early eos
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id, gen.do_sample = tm.BOS_ID, tm.EOS_ID, tm.PAD_ID, False
    return model.eval()


# --------------------------------------------------------------------------- checkpoints


def video_params(family: str) -> dict:
    """The video processor's parameters as the checkpoint stores them."""
    return {
        "video_processor_type": VIDEO_PROCESSORS[family], "processor_class": PROCESSORS[family],
        "size": SIZES[family], "patch_size": PATCH, "temporal_patch_size": TEMPORAL, "merge_size": MERGE,
        "image_mean": MEAN, "image_std": STD, "resample": 3, "do_sample_frames": False,
        "cap_pixels_per_frame": False,
    }


def _image_params(family: str) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": PROCESSORS[family],
        "size": SIZES["qwen2_vl"], "patch_size": PATCH, "temporal_patch_size": TEMPORAL, "merge_size": MERGE,
        "image_mean": MEAN, "image_std": STD,
    }


def save_checkpoint(family: str, path: Path, seed: int = 0) -> Path:
    """Save ``family``'s tiny model, tokenizer and preprocessing parameters into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    make_model(family, seed).save_pretrained(path)
    tokenizer().save_pretrained(path)
    if family == "qwen2_vl":
        # the legacy layout: one file for images and videos, the video processor inferred
        # from image_processor_type
        legacy = {**_image_params(family), "min_pixels": SIZES[family]["shortest_edge"],
                  "max_pixels": SIZES[family]["longest_edge"]}
        legacy.pop("size")
        (path / "preprocessor_config.json").write_text(json.dumps(legacy))
    elif family == "qwen2_5_vl":
        (path / "preprocessor_config.json").write_text(json.dumps(_image_params(family)))
        (path / "video_preprocessor_config.json").write_text(json.dumps(video_params(family)))
    else:
        nested = {"processor_class": PROCESSORS[family], "image_processor": _image_params(family),
                  "video_processor": video_params(family)}
        (path / "processor_config.json").write_text(json.dumps(nested))
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


# --------------------------------------------------------------------------- transformers' processors


def processor_outputs(family: str, tok, text: str, frames: np.ndarray, metadata: dict,
                      pixel_values: torch.Tensor, grid: list[int]) -> dict:
    """transformers' own processor of ``family`` on ``text`` and one video, pixels given.

    The processor class is built with its real ``__init__`` (placeholder tokens from the
    tokenizer), except that ``ProcessorMixin``'s class checks are skipped: without
    torchvision no video processor class can be built, so a stand-in returns
    ``pixel_values`` / ``grid`` and the metadata, as a video processor does.
    """
    cls = getattr(transformers, PROCESSORS[family])

    class StandInVideoProcessor:
        temporal_patch_size, merge_size = TEMPORAL, MERGE

        def __call__(self, videos, **kwargs):
            from transformers.feature_extraction_utils import BatchFeature
            from transformers.video_utils import make_batched_metadata, make_batched_videos

            out = BatchFeature({"pixel_values_videos": pixel_values, "video_grid_thw": torch.tensor([grid])})
            if kwargs.get("return_metadata"):
                out["video_metadata"] = make_batched_metadata(make_batched_videos(videos), kwargs["video_metadata"])
            return out

    def bare_init(self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, **kwargs):
        self.image_processor, self.tokenizer, self.video_processor = image_processor, tokenizer, video_processor
        self.chat_template = chat_template

    with mock.patch.object(transformers.ProcessorMixin, "__init__", bare_init):
        processor = cls(image_processor=None, tokenizer=tok, video_processor=StandInVideoProcessor())
    batch = processor(text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                      return_tensors="pt")
    return dict(batch)
