"""Typed wrappers and fake (meta) kernels for the ``torch.ops.std`` operators.

The operators are defined in C++ (``csrc/registration.cpp``); each has a CPU kernel
(``csrc/cpu/<op>_kernel.cpp``) and, in CUDA builds, a CUDA kernel
(``csrc/cuda/<op>_kernel.cu``). The fake kernels below give ``torch.compile`` the
output shapes and repeat the C++ argument checks (rank, shape, dtype, device), so a
bad call fails the same way whether it runs eagerly or is traced.

Conventions (``../shared/DESIGN.md`` §2-3): ``B`` batch, ``Qn`` queries per sequence,
``H_q`` query heads, ``H_kv`` KV heads (``H_q % H_kv == 0``), ``S`` cache capacity,
``D`` head_dim. Query ``i`` of sequence ``b`` sits at position ``kv_len[b] - Qn + i``.
Float tensors may have any strides except the last dim, which must be contiguous.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["attention_scores", "topk_indices", "sparse_attention", "dense_attention", "decode_split_plan"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def attention_scores(q: Tensor, k_cache: Tensor, q_pos: Tensor, scale: Optional[float] = None) -> Tensor:
    """How much the observation queries attend to each cached key (the prefill score).

    Parameters
    ----------
    q : Tensor, [B, T, H_q, D], float32 / float16 / bfloat16
        Observation queries (e.g. the question's tokens after the last visual token).
    k_cache : Tensor, [B, H_kv, S, D], same dtype and device as ``q``
    q_pos : Tensor, int32 [B, T]
        Absolute position of each query; it sees keys ``0 .. q_pos[b, t]``. ``-1`` marks padding.
    scale : float, optional
        Softmax scale; defaults to ``D ** -0.5``.

    Returns
    -------
    Tensor, float32 [B, H_kv, S]
        ``out[b, h, s]`` = softmax probability of key ``s``, averaged over the valid queries
        and the ``H_q / H_kv`` query heads of KV head ``h``. Keys no query sees score 0.
    """
    return torch.ops.std.attention_scores(q, k_cache, q_pos, _scale(q, scale))


def topk_indices(scores: Tensor, candidates: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` highest scores among candidate positions, per head.

    Parameters
    ----------
    scores : Tensor, float32 [B, H, S]
    candidates : Tensor, bool [B, S]
        Positions eligible for selection (e.g. the visual tokens).
    k : int, 0 <= k <= S

    Returns
    -------
    Tensor, int32 [B, H, k]
        Selected positions in ascending order, then ``-1`` padding when a row has fewer
        than ``k`` candidates. Equal scores go to the lower position; NaN ranks lowest.
    """
    return torch.ops.std.topk_indices(scores, candidates, k)


def sparse_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    indices: Tensor,
    tail_start: Tensor,
    kv_len: Tensor,
    scale: Optional[float] = None,
) -> Tensor:
    """Decode attention over a keep set plus the dense tail (the draft step).

    Parameters
    ----------
    q : Tensor, [B, Qn, H_q, D], float32 / float16 / bfloat16
    k_cache, v_cache : Tensor, [B, H_kv, S, D], same dtype and device as ``q``
    indices : Tensor, int32 [B, H_kv, N]
        Keep set per KV head: absolute positions, strictly ascending, all below
        ``tail_start[b]``, ``-1`` padding at the end. Attended by every query.
    tail_start : Tensor, int32 [B]
        First position of the dense tail (the generated tokens), ``0 <= tail_start <= kv_len``.
    kv_len : Tensor, int32 [B]
        Valid cache length per sequence, including the queries' own K/V (``Qn <= kv_len <= S``).
    scale : float, optional
        Softmax scale; defaults to ``D ** -0.5``.

    Returns
    -------
    Tensor, [B, Qn, H_q, D], dtype of ``q``
        Query ``i`` attends to the keep set and to positions ``tail_start[b] .. kv_len[b] - Qn + i``.
        A query with nothing to attend to gets zeros.
    """
    return torch.ops.std.sparse_attention(q, k_cache, v_cache, indices, tail_start, kv_len, _scale(q, scale))


def dense_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor, scale: Optional[float] = None
) -> Tensor:
    """Causal attention of ``Qn`` new queries over the whole cache (decode: Qn = 1; verify: Qn = γ+1).

    Parameters
    ----------
    q : Tensor, [B, Qn, H_q, D], float32 / float16 / bfloat16
    k_cache, v_cache : Tensor, [B, H_kv, S, D], same dtype and device as ``q``
    kv_len : Tensor, int32 [B]
        Valid cache length per sequence, including the queries' own K/V (``Qn <= kv_len <= S``).
    scale : float, optional
        Softmax scale; defaults to ``D ** -0.5``.

    Returns
    -------
    Tensor, [B, Qn, H_q, D], dtype of ``q``
        Query ``i`` attends to positions ``0 .. kv_len[b] - Qn + i``.
    """
    return torch.ops.std.dense_attention(q, k_cache, v_cache, kv_len, _scale(q, scale))


def decode_split_plan(
    batch: int,
    kv_heads: int,
    q_len: int,
    group: int,
    capacity: int,
    num_indices: int,
    tail_len: int,
    sm_count: int,
    blocks_per_sm: int,
    launched_blocks_per_sm: int = 0,
    splits_per_block: int = 0,
) -> tuple[Tensor, Tensor]:
    """Introspection: how the CUDA decode kernels cut a position list (not an attention op).

    Runs, on the host, the planner the CUDA ``dense_attention`` / ``sparse_attention`` glue
    runs (``csrc/kernels/decode_plan.h``). A list holds ``num_indices`` keep-set entries
    (0 for dense attention), padding up to ``tail_offset`` (``num_indices`` rounded up to a
    tile), then ``tail_len`` tail positions (dense: ``kv_len``). Tiles of 64 entries go
    round-robin to the splits; each split takes its tiles in ascending order and the merge
    combines the splits. ``sm_count`` and ``blocks_per_sm`` are the device's (the CUDA glue
    reads the latter from the occupancy API). ``launched_blocks_per_sm`` is the occupancy of
    the kernel variant the plan launches (0: ``blocks_per_sm``); where it holds fewer blocks
    than the splits assume, each block takes several splits in turn so that the grid stays
    one wave. ``splits_per_block`` > 0 forces that count (as ``STD_EXT_DECODE_SPLITS_PER_BLOCK``
    does on the GPU). Eager only (no fake kernel).

    Returns
    -------
    tiles : Tensor, int32 [num_tiles, 4]
        Per tile, in the order the kernel's blocks take them (block by block; within a block
        split by split, each split's tiles in order): ``(split, order, first entry, end entry)``.
    plan : Tensor, int32 [8]
        ``(num_splits, tail_offset, tile entries, layout (1 rows, 2 keys), warps per block, row groups,
        splits per block, split blocks)``.
    """
    return torch.ops.std.decode_split_plan(batch, kv_heads, q_len, group, capacity, num_indices, tail_len,
                                           sm_count, blocks_per_sm, launched_blocks_per_sm, splits_per_block)


# --- fake kernels: shapes for torch.compile, plus the C++ argument checks ---------


def _check(op: str, cond: bool, message: str) -> None:
    torch._check(cond, lambda: f"std::{op}: {message}")


def _check_rank(op: str, name: str, t: Tensor, rank: int, layout: str) -> None:
    _check(op, t.dim() == rank, f"{name} must have {rank} dims {layout}, got shape {tuple(t.shape)}")


def _check_same_device(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    _check(
        op,
        t.device == ref.device,
        f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must be on the same device",
    )


def _check_int_tensor(op: str, name: str, t: Tensor, ref: Tensor, shape: Sequence[int], layout: str) -> None:
    _check(op, t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}")
    _check_same_device(op, name, t, "k_cache", ref)
    _check_rank(op, name, t, len(shape), layout)
    _check(op, tuple(t.shape) == tuple(shape), f"{name} must have shape {layout} = {list(shape)}, got {tuple(t.shape)}")


def _check_last_dim_contiguous(op: str, name: str, t: Tensor) -> None:
    _check(op, t.shape[-1] <= 1 or t.stride(-1) == 1, f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def _check_query_and_caches(op: str, q: Tensor, k_cache: Tensor, v_cache: Optional[Tensor]) -> None:
    _check_rank(op, "q", q, 4, "[B, Qn, H_q, D]")
    _check_rank(op, "k_cache", k_cache, 4, "[B, H_kv, S, D]")
    _check(op, k_cache.dtype in _FLOAT_DTYPES, f"k_cache must be float32, float16 or bfloat16, got {k_cache.dtype}")
    _check(op, q.dtype == k_cache.dtype, f"q ({q.dtype}) must have the same dtype as k_cache ({k_cache.dtype})")
    _check_same_device(op, "q", q, "k_cache", k_cache)
    _check_last_dim_contiguous(op, "q", q)
    _check_last_dim_contiguous(op, "k_cache", k_cache)
    if v_cache is not None:
        _check(op, v_cache.dtype == k_cache.dtype, f"v_cache ({v_cache.dtype}) must have the same dtype as k_cache ({k_cache.dtype})")
        _check_same_device(op, "v_cache", v_cache, "k_cache", k_cache)
        _check(op, v_cache.shape == k_cache.shape, f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}")
        _check_last_dim_contiguous(op, "v_cache", v_cache)
    _check(op, q.shape[0] == k_cache.shape[0], f"q.size(0) must equal k_cache.size(0), the batch ({k_cache.shape[0]}), got shape {tuple(q.shape)}")
    _check(op, q.shape[3] == k_cache.shape[3], f"q.size(3) must equal k_cache.size(3), the head_dim ({k_cache.shape[3]}), got shape {tuple(q.shape)}")
    _check(
        op,
        k_cache.shape[1] > 0 and q.shape[2] % k_cache.shape[1] == 0,
        f"q has {q.shape[2]} heads, which must be a multiple of k_cache's {k_cache.shape[1]} KV heads",
    )


@torch.library.register_fake("std::attention_scores")
def _attention_scores_fake(q: Tensor, k_cache: Tensor, q_pos: Tensor, scale: float) -> Tensor:
    op = "attention_scores"
    _check_query_and_caches(op, q, k_cache, None)
    _check_int_tensor(op, "q_pos", q_pos, k_cache, (q.shape[0], q.shape[1]), "[B, T]")
    batch, kv_heads, capacity, _ = k_cache.shape
    return k_cache.new_empty((batch, kv_heads, capacity), dtype=torch.float32)


@torch.library.register_fake("std::topk_indices")
def _topk_indices_fake(scores: Tensor, candidates: Tensor, k: int) -> Tensor:
    op = "topk_indices"
    _check_rank(op, "scores", scores, 3, "[B, H, S]")
    _check(op, scores.dtype == torch.float32, f"scores must be float32, got {scores.dtype}")
    _check_last_dim_contiguous(op, "scores", scores)
    _check(op, candidates.dtype == torch.bool, f"candidates must be bool, got {candidates.dtype}")
    _check_same_device(op, "candidates", candidates, "scores", scores)
    _check_rank(op, "candidates", candidates, 2, "[B, S]")
    batch, heads, length = scores.shape
    _check(
        op,
        tuple(candidates.shape) == (batch, length),
        f"candidates must have shape [B, S] = [{batch}, {length}] to match scores, got {tuple(candidates.shape)}",
    )
    _check(op, 0 <= k <= length, f"k = {k} must be in [0, S] where S = scores.size(2) = {length}")
    return scores.new_empty((batch, heads, k), dtype=torch.int32)


@torch.library.register_fake("std::sparse_attention")
def _sparse_attention_fake(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, indices: Tensor, tail_start: Tensor, kv_len: Tensor, scale: float
) -> Tensor:
    op = "sparse_attention"
    _check_query_and_caches(op, q, k_cache, v_cache)
    _check_rank(op, "indices", indices, 3, "[B, H_kv, N]")
    batch, kv_heads = k_cache.shape[:2]
    _check_int_tensor(op, "indices", indices, k_cache, (batch, kv_heads, indices.shape[2]), "[B, H_kv, N]")
    _check_int_tensor(op, "tail_start", tail_start, k_cache, (batch,), "[B]")
    _check_int_tensor(op, "kv_len", kv_len, k_cache, (batch,), "[B]")
    return q.new_empty(q.shape)


@torch.library.register_fake("std::dense_attention")
def _dense_attention_fake(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor, scale: float) -> Tensor:
    op = "dense_attention"
    _check_query_and_caches(op, q, k_cache, v_cache)
    _check_int_tensor(op, "kv_len", kv_len, k_cache, (k_cache.shape[0],), "[B]")
    return q.new_empty(q.shape)
