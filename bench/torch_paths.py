"""The best pure-PyTorch path for each ``torch.ops.std`` op: the baselines of the benchmarks.

One function per op, named like the op with the suffix ``_torch``, with the same arguments and
the same output (shape, dtype, layout) as the ``std_ext`` wrapper, computing in the inputs' dtype
the way a PyTorch user would without our kernels:

- ``attention_scores_torch``: one grouped matmul per sequence (the G query heads of a KV head are
  stacked as rows, so K is never expanded), causal mask from ``q_pos``, softmax in float32, mean.
- ``topk_indices_torch``: ``masked_fill`` + ``torch.topk`` + ``sort``, ``-1`` padding.
- ``dense_attention_torch``: ``scaled_dot_product_attention`` over the cache slice ``[:kv_len]``
  with ``enable_gqa=True`` and a bottom-right causal mask when ``Qn > 1`` (loop over the batch,
  since ``kv_len`` is ragged).
- ``sparse_attention_torch``: gather of the keep set + tail rows (one ``index_select`` over the
  cache seen as a [rows, D] matrix; ``torch.gather`` when the strides do not allow that view, it is
  ~5x slower on CPU), then SDPA with the tail's causal mask.

These are benchmark baselines, not references: the tests compare the ops against float64
references. Differences from the op contract in corner cases the benchmarks do not hit are noted
per function (tie order and NaN ranking in ``topk_indices_torch``).
Integer tensors are read on the host (``.tolist()``), as a PyTorch implementation of ragged
lengths would; on CPU this costs nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch import Tensor

__all__ = ["attention_scores_torch", "topk_indices_torch", "sparse_attention_torch", "dense_attention_torch"]


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def attention_scores_torch(q: Tensor, k_cache: Tensor, q_pos: Tensor, scale: Optional[float] = None) -> Tensor:
    """q [B,T,H_q,D], k_cache [B,H_kv,S,D], q_pos int32 [B,T] -> float32 [B,H_kv,S]."""
    scale = _scale(q, scale)
    batch, _, hq, d = q.shape
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    out = torch.zeros(batch, hkv, cap, dtype=torch.float32, device=k_cache.device)
    for b, pos in enumerate(q_pos.tolist()):
        valid = [t for t, p in enumerate(pos) if p >= 0]
        if not valid:
            continue
        n = len(valid)
        qpos = torch.tensor([pos[t] for t in valid], device=q.device)
        length = max(pos[t] for t in valid) + 1  # keys past every query's position score 0
        qb = q[b] if n == q.shape[1] else q[b, valid]  # [n, H_q, D]
        # [n, H_q, D] -> [H_kv, G*n, D]: the group's heads become rows of one matmul per KV head.
        qg = qb.permute(1, 0, 2).reshape(hkv, group * n, d)
        logits = torch.matmul(qg, k_cache[b, :, :length].transpose(-1, -2))  # [H_kv, G*n, L], q's dtype
        logits = logits.view(hkv, group, n, length).float().mul_(scale)
        future = torch.arange(length, device=q.device)[None, :] > qpos[:, None]  # [n, L]
        probs = logits.masked_fill_(future, float("-inf")).softmax(dim=-1)
        out[b, :, :length] = probs.sum(dim=(1, 2)).div_(n * group)
    return out


def topk_indices_torch(scores: Tensor, candidates: Tensor, k: int) -> Tensor:
    """scores float32 [B,H,S], candidates bool [B,S] -> int32 [B,H,k], ascending, -1 padded.

    Unlike the op, tie order among equal scores is whatever ``torch.topk`` gives, NaN ranks above
    every number, and a candidate scoring -inf is not told apart from a non-candidate.
    """
    batch, heads, cap = scores.shape
    if k > cap or k < 0:
        raise RuntimeError(f"topk_indices_torch: k = {k} must be in [0, {cap}]")
    masked = scores.masked_fill(~candidates[:, None, :], float("-inf"))
    idx = torch.topk(masked, k, dim=-1, largest=True, sorted=False).indices  # [B, H, k] int64
    n_cand = candidates.sum(dim=-1)  # [B]
    if bool((n_cand < k).any()):
        # Which selected entries are real candidates: the n_cand best ones of each row.
        vals = masked.gather(-1, idx)
        order = torch.argsort(vals, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(k, device=idx.device).expand_as(order))
        idx = idx.masked_fill(rank >= n_cand[:, None, None], cap)
        idx = torch.sort(idx, dim=-1).values
        return idx.masked_fill_(idx == cap, -1).to(torch.int32)
    return torch.sort(idx, dim=-1).values.to(torch.int32)


def _bottom_right_causal(qn: int, length: int, device) -> Tensor:
    """bool [qn, length]: query i (at position length-qn+i) sees keys 0..length-qn+i."""
    return torch.arange(length, device=device)[None, :] <= torch.arange(length - qn, length, device=device)[:, None]


def dense_attention_torch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor, scale: Optional[float] = None
) -> Tensor:
    """q [B,Qn,H_q,D], caches [B,H_kv,S,D], kv_len int32 [B] -> [B,Qn,H_q,D] contiguous."""
    scale = _scale(q, scale)
    batch, qn, hq, d = q.shape
    qt = q.transpose(1, 2)  # [B, H_q, Qn, D] (a view; HF's own layout)
    lens = kv_len.tolist()
    if batch == 1 or len(set(lens)) == 1:  # uniform length: one SDPA call for the whole batch
        length = lens[0]
        mask = _verify_mask(qn, length, q.device)
        o = F.scaled_dot_product_attention(qt, k_cache[:, :, :length], v_cache[:, :, :length],
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        return o.transpose(1, 2).contiguous()
    out = torch.empty(batch, qn, hq, d, dtype=q.dtype, device=q.device)
    for b, length in enumerate(lens):
        mask = _verify_mask(qn, length, q.device)
        o = F.scaled_dot_product_attention(qt[b:b + 1], k_cache[b:b + 1, :, :length], v_cache[b:b + 1, :, :length],
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        out[b] = o[0].transpose(0, 1)
    return out


def _verify_mask(qn: int, length: int, device: torch.device):
    """The bottom-right causal mask of Qn queries ending at position length - 1 (None for Qn = 1).

    On CUDA as a ``causal_lower_right`` bias, which SDPA runs on its flash kernel with GQA
    (a boolean mask would push it to a slower kernel); on CPU as a boolean mask (the same
    math kernel either way).
    """
    if qn == 1:
        return None
    if device.type == "cuda":
        return causal_lower_right(qn, length)
    return _bottom_right_causal(qn, length, device)


def _gather_rows(cache: Tensor, rows: Tensor) -> Tensor:
    """cache [H, S, D] (last dim contiguous), rows int64 [H, M] -> [H, M, D] = cache[h, rows[h, m]].

    When the head stride is a multiple of the position stride (contiguous caches and slices of
    bigger buffers), the cache is seen as one [rows, D] matrix and read with a single
    ``index_select``, which on CPU is ~5x faster than ``torch.gather`` (measured with torch 2.13
    on 8K contexts). Otherwise, ``torch.gather`` with the index expanded over D.
    """
    heads, cap, d = cache.shape
    sh, sp = cache.stride(0), cache.stride(1)
    m = rows.shape[1]
    if heads > 0 and cap > 0 and sp >= d and sh % sp == 0:
        step = sh // sp
        flat = torch.as_strided(cache, ((heads - 1) * step + cap, d), (sp, 1))
        offsets = torch.arange(0, heads * step, step, device=rows.device)[:, None]
        return flat.index_select(0, (rows + offsets).view(-1)).view(heads, m, d)
    return torch.gather(cache, 1, rows[:, :, None].expand(-1, -1, d))


def sparse_attention_torch(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    indices: Tensor,
    tail_start: Tensor,
    kv_len: Tensor,
    scale: Optional[float] = None,
) -> Tensor:
    """q [B,Qn,H_q,D], caches [B,H_kv,S,D], indices int32 [B,H_kv,N], tail_start/kv_len int32 [B]
    -> [B,Qn,H_q,D] contiguous. Query i attends to the valid keep set + tail_start..its position."""
    scale = _scale(q, scale)
    batch, qn, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    dev = q.device
    qt = q.transpose(1, 2)
    out = torch.empty(batch, qn, hq, d, dtype=q.dtype, device=dev)
    for b, (ts, length) in enumerate(zip(tail_start.tolist(), kv_len.tolist())):
        keep = indices[b].long()  # [H_kv, N]
        n = keep.shape[1]
        padded = keep < 0
        has_pad = n > 0 and bool(padded[:, -1].any())  # -1 padding is trailing only
        if has_pad:
            keep = keep.clamp(min=0)
        tail = torch.arange(ts, length, device=dev)
        rows = torch.cat([keep, tail.expand(hkv, -1)], dim=1)  # [H_kv, M] positions to read
        kb = _gather_rows(k_cache[b], rows)[None]  # [1, H_kv, M, D]
        vb = _gather_rows(v_cache[b], rows)[None]
        mask = None
        if qn > 1 and tail.numel() > 0:
            # tail key ts+j is seen by query i iff ts+j <= length-qn+i
            tail_mask = tail[None, :] <= torch.arange(length - qn, length, device=dev)[:, None]  # [Qn, T]
            mask = torch.cat([torch.ones(qn, n, dtype=torch.bool, device=dev), tail_mask], dim=1)  # [Qn, M]
        if has_pad:
            keep_ok = torch.cat([~padded, torch.ones(hkv, tail.numel(), dtype=torch.bool, device=dev)], dim=1)  # [H_kv, M]
            keep_ok = keep_ok.repeat_interleave(group, dim=0)[:, None, :]  # [H_q, 1, M]
            mask = keep_ok if mask is None else keep_ok & mask[None]
        if mask is not None and mask.dim() == 2:
            mask = mask[None]
        if mask is not None and not bool(mask.any(dim=-1).all()):
            # Rows that see nothing: SDPA would give NaN, the op gives zeros.
            empty = ~mask.any(dim=-1, keepdim=True)  # [H or 1, Qn, 1]
            mask = mask | empty
            o = F.scaled_dot_product_attention(qt[b:b + 1], kb, vb, attn_mask=mask, scale=scale, enable_gqa=True)
            o = o.masked_fill(empty[None], 0)
        elif rows.shape[1] == 0:
            o = torch.zeros(1, hq, qn, d, dtype=q.dtype, device=dev)
        else:
            o = F.scaled_dot_product_attention(qt[b:b + 1], kb, vb, attn_mask=mask, scale=scale, enable_gqa=True)
        out[b] = o[0].transpose(0, 1)
    return out
