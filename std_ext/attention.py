"""The attention function std_ext registers with ``transformers``.

Every decoder layer of a model running under :meth:`ModelAdapter.std_attention`
calls :func:`std_ext_attention` with its post-RoPE query/key/value and the
:class:`ForwardStep` of the current forward pass. The function stores the new K/V
in the static cache (store first, then attend: DESIGN.md §2) and attends with one of
three modes:

* ``"prefill"``: the prompt attends to itself with SDPA (the cache holds nothing else
  yet), causal, left padding masked out;
* ``"dense"``: ``dense_attention`` over the whole cache (plain decoding, Qn = 1, and
  the verify pass, Qn = γ+1);
* ``"sparse"``: ``sparse_attention`` over the layer's keep set and the dense tail
  (the draft).

It may also keep a copy of some query rows per layer (observation queries at
prefill, verify queries for the ``"refresh"`` policy) for keep-set selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import ops
from .cache import StaticCache

ATTENTION_NAME = "std_ext"


@dataclass
class ForwardStep:
    """State of one model forward, shared by all its layers.

    Attributes
    ----------
    mode : "prefill" | "dense" | "sparse"
    cache : the static cache (and, for "sparse", its keep sets)
    slots : int64 ``[B, Q]``, cache position of each input token (``capacity`` = discard)
    kv_len : int32 ``[B]``, valid cache length once this forward's K/V are stored
    prefill_real : bool ``[B, Q]``, the non-padding tokens of a left-padded prefill; None = no padding
    capture_rows : int64 ``[B, R]``, input rows whose queries are kept per layer, or None
    capture_pos : int64 ``[B, R]``, cache positions of those rows (set by the engine)
    captured : filled per layer with the kept queries ``[B, R, H_q, D]``
    scale : the softmax scale the layers use (recorded by the first call)
    """

    mode: str
    cache: StaticCache
    slots: torch.Tensor
    kv_len: torch.Tensor
    prefill_real: torch.Tensor | None = None
    capture_rows: torch.Tensor | None = None
    capture_pos: torch.Tensor | None = None
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    scale: float | None = None


def std_ext_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H_q, Q, D]
    key: torch.Tensor,  # [B, H_kv, Q, D]
    value: torch.Tensor,  # [B, H_kv, Q, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    std_ext_step: ForwardStep | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``transformers`` attention interface entry point; returns ``([B, Q, H_q, D], None)``."""
    step = std_ext_step
    if step is None:
        raise RuntimeError(
            "std_ext attention was called without std_ext_step: the 'std_ext' attention implementation "
            "only works inside std_ext.generate."
        )
    _refuse_unreproduced_kwargs(module, kwargs, step)
    layer = module.layer_idx
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    step.scale = scale
    step.cache.write(layer, key, value, step.slots)
    q = query.transpose(1, 2)  # [B, Q, H_q, D], last dim contiguous: no copy
    if step.capture_rows is not None:
        rows = step.capture_rows[:, :, None, None].expand(-1, -1, q.shape[2], q.shape[3])
        step.captured[layer] = q.gather(1, rows)  # [B, R, H_q, D]

    if step.mode == "prefill":
        return _prefill_attention(query, key, value, step.prefill_real, scale), None
    k_cache, v_cache = step.cache.layer(layer)
    if step.mode == "dense":
        return ops.dense_attention(q, k_cache, v_cache, step.kv_len, scale), None
    keep = step.cache.keep
    return ops.sparse_attention(q, k_cache, v_cache, keep.indices[layer], keep.tail_start, step.kv_len, scale), None


def _refuse_unreproduced_kwargs(module: torch.nn.Module, kwargs: dict, step: ForwardStep) -> None:
    """A backstop for what :class:`~std_ext.models.ModelAdapter` refuses up front: a layer that
    asks for an attention variant std_ext does not compute fails here, never silently."""
    name = type(module).__name__
    window = kwargs.get("sliding_window")
    if window is not None and int(window) < step.cache.span:
        raise ValueError(f"std_ext attention: {name} asks for sliding-window attention ({window} tokens, shorter than "
                         f"the {step.cache.span} positions of this generation); std_ext attends to every position")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"std_ext attention: {name} asks for attention logit soft-capping, which std_ext does not "
                         "compute")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"std_ext attention: {name} asks for attention sinks (s_aux), which std_ext does not compute")


PREFILL_QUERY_CHUNK = 1024


def _prefill_attention(
    query: torch.Tensor,  # [B, H_q, T, D]
    key: torch.Tensor,  # [B, H_kv, T, D]
    value: torch.Tensor,
    real: torch.Tensor | None,  # bool [B, T] or None
    scale: float,
) -> torch.Tensor:
    """Causal self-attention of the prompt with PyTorch's SDPA, as ``transformers`` runs it.

    A left-padded batch needs a mask; it is built per chunk of queries so that its size
    stays ``B x chunk x T`` rather than ``B x T x T``. A padding query sees itself, so no
    row is fully masked (SDPA would return NaN there); its output is never used.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    width = query.shape[2]
    if real is None:
        return sdpa(query, key, value, is_causal=width > 1, scale=scale).transpose(1, 2)  # [B, T, H_q, D]
    out = torch.empty_like(query)
    for start in range(0, width, PREFILL_QUERY_CHUNK):
        stop = min(width, start + PREFILL_QUERY_CHUNK)
        rows = torch.arange(start, stop, device=query.device)[:, None]  # [C, 1]
        columns = torch.arange(stop, device=query.device)[None, :]  # [1, stop]
        mask = ((columns <= rows) & real[:, None, None, :stop]) | (columns == rows)  # [B, 1, C, stop]
        out[:, :, start:stop] = sdpa(query[:, :, start:stop], key[:, :, :stop], value[:, :, :stop], attn_mask=mask, scale=scale)
    return out.transpose(1, 2)  # [B, T, H_q, D]


def register_attention() -> None:
    """Make ``"std_ext"`` a valid ``attn_implementation`` for ``transformers`` models."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, std_ext_attention)
