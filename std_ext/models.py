"""Model adapters: run a ``transformers`` model's own forward with std_ext's attention.

Nothing of the model is copied. std_ext registers an attention function named
``"std_ext"`` with ``transformers.AttentionInterface`` and, while it decodes, sets the
*text decoder's* config to use it (a vision tower keeps its own attention). The
decode-step state travels to every attention call through the forward's keyword
arguments (``std_ext_step=...``). What differs between model families is small and
lives here: where the decoder is, which token ids are visual, and how positions
(1-D RoPE or Qwen2-VL's 3-D M-RoPE) are formed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .attention import ATTENTION_NAME, register_attention

SUPPORTED_MODELS = (
    "Qwen2ForCausalLM",
    "LlamaForCausalLM",
    "Qwen2VLForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
)

_MROPE_MODELS = ("Qwen2VLForConditionalGeneration",)


@dataclass
class ModelAdapter:
    """What the decode engine needs to know about one supported model.

    Attributes
    ----------
    model : the ``transformers`` model (``*ForCausalLM`` / ``*ForConditionalGeneration``)
    decoder : its text decoder (the module whose config the attention layers read)
    visual_token_ids : video and image placeholder ids (empty for text-only models)
    """

    model: torch.nn.Module
    decoder: torch.nn.Module
    num_layers: int
    num_kv_heads: int
    head_dim: int
    visual_token_ids: tuple[int, ...]
    uses_mrope: bool

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> ModelAdapter:
        name = type(model).__name__
        if name not in SUPPORTED_MODELS:
            raise TypeError(
                f"std_ext.generate: model: {name} is not supported; supported models are "
                f"{', '.join(SUPPORTED_MODELS)} (and subclasses with the same forward)."
            )
        decoder = _find_decoder(model)
        config = decoder.config
        layer_types = getattr(config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(
                f"std_ext.generate: model: {name} has non-full attention layers ({sorted(set(layer_types))}); "
                "std_ext decodes with full causal attention only (turn off use_sliding_window)."
            )
        num_q_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q_heads
        top_config = model.config
        visual_ids = tuple(
            int(token_id)
            for attr in ("video_token_id", "image_token_id")
            if (token_id := getattr(top_config, attr, None)) is not None
        )
        return cls(
            model=model,
            decoder=decoder,
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_q_heads,
            head_dim=head_dim,
            visual_token_ids=visual_ids,
            uses_mrope=name in _MROPE_MODELS,
        )

    @contextlib.contextmanager
    def std_attention(self) -> Iterator[None]:
        """Route the text decoder's attention through std_ext for the duration of the block."""
        register_attention()
        config = self.decoder.config
        previous = config._attn_implementation
        config._attn_implementation = ATTENTION_NAME
        try:
            yield
        finally:
            config._attn_implementation = previous

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """bool ``[B, T]``: which prompt tokens are visual placeholders (video or image)."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.visual_token_ids:
            mask |= input_ids == token_id
        return mask

    def prefill_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, model_inputs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE positions of the (left-padded) prompt and the per-sequence offset for decoding.

        Returns ``(position_ids, rope_delta)``: position_ids ``[B, T]`` (or ``[3, B, T]`` for
        M-RoPE) exactly as ``transformers``' ``generate`` forms them, and rope_delta int64
        ``[B]`` such that a decoded token at cache position ``p`` has RoPE position
        ``p + rope_delta``.
        """
        text_positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # [B, T]
        batch = input_ids.shape[0]
        zero = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        if not self.uses_mrope:
            return text_positions, zero
        image_grid = model_inputs.get("image_grid_thw")
        video_grid = model_inputs.get("video_grid_thw")
        if image_grid is None and video_grid is None:
            return text_positions[None].expand(3, -1, -1), zero
        token_types = model_inputs.get("mm_token_type_ids")
        if token_types is None:
            token_types = self._token_types(input_ids)
        position_ids, deltas = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=token_types,
            image_grid_thw=image_grid,
            video_grid_thw=video_grid,
            attention_mask=attention_mask,
        )
        return position_ids, deltas.reshape(batch).to(torch.long)

    def decode_positions(self, cache_positions: torch.Tensor, rope_delta: torch.Tensor) -> torch.Tensor:
        """RoPE positions of decode-step tokens: ``[B, Q]`` (``[3, B, Q]`` for M-RoPE)."""
        positions = cache_positions + rope_delta[:, None]
        return positions[None].expand(3, -1, -1) if self.uses_mrope else positions

    def _token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        config = self.model.config
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        if (image_id := getattr(config, "image_token_id", None)) is not None:
            types[input_ids == image_id] = 1
        if (video_id := getattr(config, "video_token_id", None)) is not None:
            types[input_ids == video_id] = 2
        return types


def _find_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding ``layers`` whose attention reads ``decoder.config``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    while not hasattr(decoder, "layers") and hasattr(decoder, "get_decoder") and decoder.get_decoder() is not decoder:
        decoder = decoder.get_decoder()
    if not hasattr(decoder, "layers"):
        raise TypeError(f"std_ext.generate: model: cannot find the text decoder layers of {type(model).__name__}")
    return decoder
