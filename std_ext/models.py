"""Model adapters: run a ``transformers`` model's own forward with std_ext's attention.

Nothing of the model is copied. std_ext registers an attention function named
``"std_ext"`` with ``transformers.AttentionInterface`` and, while it decodes, sets the
*text decoder's* config to use it (a vision tower keeps its own attention). The
decode-step state travels to every attention call through the forward's keyword
arguments (``std_ext_step=...``).

A model is supported by what it is, not by its name (DESIGN.md §7): a text decoder
whose layers run their attention through ``transformers``' attention interface with
full causal attention. :meth:`ModelAdapter.for_model` reads that off the model — its
config, its attention modules, its forward's inputs — and refuses, before any work and
naming the feature, what the engine cannot reproduce exactly: sliding-window attention
shorter than the generation, attention logit soft-capping, attention sinks,
bidirectional masks over image tokens, layers that keep a recurrent state instead of a
KV cache, and keys and values of different head sizes. M-RoPE is recognized by the
model's own ``get_rope_index``, which forms the prefill positions with every input it
takes; decode positions are cache position + the rope delta it returns.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .attention import ATTENTION_NAME, register_attention

# Layer types whose attention is causal self-attention over a KV cache; a window may
# still limit it (checked against the generation's length).
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")

# Module-level helpers with which a family builds bidirectional masks over image tokens
# (Gemma 3 / 4); their presence next to a model class marks the family.
_BIDIRECTIONAL_MASK_HELPERS = ("create_masks_for_vision_model", "get_block_sequence_ids_for_mask")

_WHAT_TO_DO = "decode this model with transformers' own generate instead"


class UnsupportedModelError(ValueError):
    """A model, or a feature of it, that std_ext cannot decode exactly; raised before any work."""


@dataclass
class ModelAdapter:
    """What the decode engine needs to know about one model.

    Attributes
    ----------
    model : the ``transformers`` model (``*ForCausalLM`` / ``*ForConditionalGeneration``)
    decoder : its text decoder (the module whose config the attention layers read)
    num_layers, num_kv_heads, head_dim : the geometry the attention layers hold (per rank)
    visual_token_ids : video and image placeholder ids (empty for text-only models)
    rope_index : the model's own ``get_rope_index`` (M-RoPE), or None (1-D RoPE)
    sliding_window : the smallest attention window of any layer, None if every layer is full
    forward_inputs : names of the inputs the model's forward takes explicitly
    """

    model: torch.nn.Module
    decoder: torch.nn.Module
    num_layers: int
    num_kv_heads: int
    head_dim: int
    visual_token_ids: tuple[int, ...]
    rope_index: Callable | None
    sliding_window: int | None
    forward_inputs: frozenset[str]

    @property
    def uses_mrope(self) -> bool:
        return self.rope_index is not None

    @property
    def name(self) -> str:
        return type(self.model).__name__

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> ModelAdapter:
        """Recognize ``model`` by what it is, or raise :class:`UnsupportedModelError` naming why."""
        name = type(model).__name__
        decoder = _find_decoder(model)
        config = decoder.config
        layers = list(decoder.layers)
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(layers))
        stateful = sorted({kind for kind in layer_types if kind not in _ATTENTION_LAYER_TYPES})
        if stateful:
            _refuse(name, f"layers that keep a recurrent state instead of a KV cache ({', '.join(stateful)} layers)",
                    "the draft and the verify pass roll back a KV cache by its length, which a recurrent state "
                    "cannot do")
        attentions = [_attention_module(layer) for layer in layers]
        if any(attention is None for attention in attentions):
            missing = [i for i, attention in enumerate(attentions) if attention is None]
            _refuse(name, f"layers that keep a recurrent state instead of a KV cache (layers {missing[:4]} have no "
                          "self-attention module)", "only attention layers can be decoded from a static KV cache")
        if not getattr(type(model), "_supports_attention_backend", False):
            _refuse(name, "attention outside transformers' attention interface",
                    "std_ext replaces the attention through that interface")
        _check_attention_features(name, model, config, attentions)
        head_dim = _head_dim(attentions[0], config)
        return cls(
            model=model,
            decoder=decoder,
            num_layers=len(layers),
            num_kv_heads=_kv_heads(attentions[0], config, head_dim),
            head_dim=head_dim,
            visual_token_ids=_visual_token_ids(model.config),
            rope_index=_find_rope_index(model),
            sliding_window=_smallest_window(attentions, layer_types, config),
            forward_inputs=_explicit_parameters(model.forward),
        )

    def check_length(self, total: int) -> None:
        """Refuse a generation of ``total`` positions (prompt + new tokens) that a window would cut."""
        if self.sliding_window is not None and self.sliding_window < total:
            _refuse(self.name, f"sliding-window attention (a {self.sliding_window}-token window, shorter than the "
                               f"prompt plus max_new_tokens = {total} positions)",
                    "std_ext attends to every cached position; shorten the prompt or max_new_tokens below the window")

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
        M-RoPE) exactly as ``transformers``' ``generate`` forms them — for M-RoPE, the model's
        own ``get_rope_index`` with every prefill input it takes — and rope_delta int64 ``[B]``
        such that a decoded token at cache position ``p`` has RoPE position ``p + rope_delta``.
        """
        text_positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # [B, T]
        batch = input_ids.shape[0]
        zero = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        if self.rope_index is None:
            return text_positions, zero
        if model_inputs.get("image_grid_thw") is None and model_inputs.get("video_grid_thw") is None:
            return text_positions[None].expand(3, -1, -1), zero  # a text-only prompt: generate does the same
        position_ids, deltas = self.rope_index(input_ids, **self.rope_index_inputs(attention_mask, model_inputs))
        return position_ids, deltas.reshape(batch).to(torch.long)

    def rope_index_inputs(self, attention_mask: torch.Tensor, model_inputs: dict) -> dict:
        """The prefill inputs ``get_rope_index`` receives, as ``generate`` hands them over."""
        parameters = inspect.signature(self.rope_index).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        inputs = {key: value for key, value in model_inputs.items() if takes_any or key in parameters}
        inputs["attention_mask"] = attention_mask
        return inputs

    def check_rope_inputs(self, model_inputs: dict) -> None:
        """M-RoPE needs the token types the processor returns to place visual tokens in 3-D."""
        if self.rope_index is None:
            return
        has_grid = model_inputs.get("image_grid_thw") is not None or model_inputs.get("video_grid_thw") is not None
        takes_types = "mm_token_type_ids" in inspect.signature(self.rope_index).parameters
        if has_grid and takes_types and model_inputs.get("mm_token_type_ids") is None:
            raise ValueError(
                f"std_ext.generate: mm_token_type_ids: {self.name} places visual tokens in M-RoPE's 3-D positions "
                "from mm_token_type_ids, which is missing; pass every output of the model's processor "
                "(processor(...) returns it), as generate needs it too"
            )

    def decode_positions(self, cache_positions: torch.Tensor, rope_delta: torch.Tensor) -> torch.Tensor:
        """RoPE positions of decode-step tokens: ``[B, Q]`` (``[3, B, Q]`` for M-RoPE)."""
        positions = cache_positions + rope_delta[:, None]
        return positions[None].expand(3, -1, -1) if self.uses_mrope else positions


def _refuse(name: str, feature: str, why: str) -> None:
    raise UnsupportedModelError(
        f"std_ext.generate: model: {name} uses {feature}, which std_ext cannot reproduce exactly ({why}); "
        f"{_WHAT_TO_DO}"
    )


def _find_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding ``layers`` whose attention reads ``decoder.config``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    while not hasattr(decoder, "layers") and hasattr(decoder, "get_decoder") and decoder.get_decoder() is not decoder:
        decoder = decoder.get_decoder()
    if not hasattr(decoder, "layers") or not hasattr(decoder, "config"):
        raise UnsupportedModelError(
            f"std_ext.generate: model: cannot find the text decoder layers of {type(model).__name__} "
            "(a module with .layers and .config, reached through get_decoder()); std_ext decodes transformers "
            f"decoder models whose attention goes through the attention interface; {_WHAT_TO_DO}"
        )
    return decoder


def _attention_module(layer: torch.nn.Module) -> torch.nn.Module | None:
    """A decoder layer's self-attention: the module that knows its ``layer_idx`` and projects keys."""
    for attr in ("self_attn", "attention", "attn"):
        module = getattr(layer, attr, None)
        if isinstance(module, torch.nn.Module) and hasattr(module, "layer_idx"):
            return module
    return None


def _check_attention_features(name: str, model: torch.nn.Module, config, attentions: list) -> None:
    """Refuse the attention variants std_ext's kernels do not compute."""
    first = attentions[0]
    softcap = getattr(config, "attn_logit_softcapping", None)
    softcap = softcap if softcap is not None else getattr(first, "attn_logit_softcapping", None)
    if softcap is not None:
        _refuse(name, f"attention logit soft-capping (attn_logit_softcapping={softcap})",
                "std_ext's kernels take a plain softmax of the scores")
    if any(getattr(attention, "sinks", None) is not None for attention in attentions):
        _refuse(name, "attention sinks (a learned per-head logit in every softmax)",
                "std_ext's kernels normalize over the cached keys only")
    if any(getattr(attention, "is_causal", True) is False for attention in attentions) or getattr(
            config, "use_bidirectional_attention", False):
        _refuse(name, "bidirectional attention in its decoder", "std_ext decodes with causal attention only")
    if _builds_bidirectional_image_masks(model):
        _refuse(name, "bidirectional (prefix) attention masks over image tokens",
                "std_ext's prefill and decode attention are causal over every token")
    qk, v = getattr(first, "qk_head_dim", None), getattr(first, "v_head_dim", None)
    if qk is not None and v is not None and qk != v:
        _refuse(name, f"keys and values of different head sizes ({qk} and {v}: multi-head latent attention)",
                "std_ext's cache and kernels hold one head_dim for both")


def _builds_bidirectional_image_masks(model: torch.nn.Module) -> bool:
    """Whether the model lets image tokens attend to each other both ways (Gemma 3, PaliGemma).

    Recognized by the family's mask helpers next to any class of the model, or, for a
    multimodal model, a forward that takes ``token_type_ids`` (the prefix marker).
    """
    classes = {cls for module in (model, getattr(model, "model", None)) if module is not None
               for cls in type(module).__mro__}
    for cls in classes:
        namespace = vars(sys.modules.get(cls.__module__, object()))
        if any(helper in namespace for helper in _BIDIRECTIONAL_MASK_HELPERS):
            return True
    multimodal = bool(_visual_token_ids(model.config))
    return multimodal and "token_type_ids" in _explicit_parameters(model.forward)


def _head_dim(attention: torch.nn.Module, config) -> int:
    head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
    return int(head_dim or config.hidden_size // config.num_attention_heads)


def _kv_heads(attention: torch.nn.Module, config, head_dim: int) -> int:
    """KV heads the layer holds: its key projection's rows where it has one — on a tensor-
    parallel rank the local shard's, so each rank counts its own heads — else the config's."""
    weight = getattr(getattr(attention, "k_proj", None), "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        local = weight.to_local() if hasattr(weight, "to_local") else weight  # a DTensor: this rank's rows
        rows, total = local.shape[0], weight.shape[0]
        if rows % head_dim == 0:
            mesh = getattr(weight, "device_mesh", None)
            if mesh is not None and rows != total and (total // head_dim) % mesh.size():
                raise UnsupportedModelError(
                    f"std_ext.generate: model: its {total // head_dim} KV heads do not divide evenly over the "
                    f"tensor-parallel ranks (this rank holds {rows // head_dim}); use a TP size that divides "
                    "the KV-head count")
            return rows // head_dim
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def _smallest_window(attentions: list, layer_types: list[str], config) -> int | None:
    """The narrowest attention window of any layer (None: every layer attends to all keys).

    A layer that records its own ``sliding_window`` decides (Qwen2-style per-layer types);
    otherwise a sliding or chunked layer type takes the config's window or chunk, and a
    config-wide ``sliding_window`` (Mistral-style) applies to every layer.
    """
    windows = []
    for attention, kind in zip(attentions, layer_types):
        if hasattr(attention, "sliding_window"):
            window = attention.sliding_window
        elif kind == "chunked_attention":
            window = getattr(config, "attention_chunk_size", None)
        else:
            window = getattr(config, "sliding_window", None)
        if window is not None:
            windows.append(int(window))
    return min(windows) if windows else None


def _visual_token_ids(config) -> tuple[int, ...]:
    ids: list[int] = []
    for attr in ("video_token_id", "image_token_id", "video_token_index", "image_token_index"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return tuple(ids)


def _find_rope_index(model: torch.nn.Module) -> Callable | None:
    """The model's own M-RoPE position builder, wherever the family keeps it."""
    for module in (model, getattr(model, "model", None)):
        rope_index = getattr(module, "get_rope_index", None)
        if callable(rope_index):
            return rope_index
    return None


def _explicit_parameters(function: Callable) -> frozenset[str]:
    parameters = inspect.signature(function).parameters.values()
    return frozenset(p.name for p in parameters
                     if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))
