"""Float64 reference implementations of the four ``torch.ops.std`` operators.

Used only by the tests. Each function follows the API spec literally, with plain
per-(batch, head, query) Python loops and float64 math, and reads only the cache
entries the spec says are attended (so garbage / poisoned slots never influence it).
Same argument order as the ops; ``scale`` is required.

Return values: attention ops -> float64 ``[B, Qn, Hq, D]``; ``attention_scores_ref``
-> float64 ``[B, Hkv, S]``; ``topk_indices_ref`` -> int32 ``[B, H, k]``. All on CPU.
"""

import math

import torch

__all__ = [
    "attention_scores_ref",
    "topk_indices_ref",
    "sparse_attention_ref",
    "dense_attention_ref",
]


def _cpu64(t):
    return t.detach().to("cpu", torch.float64)


def _ints(t):
    return t.detach().to("cpu").tolist()


def _attend(q_heads, keys, values, scale):
    """softmax(scale * q . k) @ v for the query heads q_heads [G, D] over keys/values [L, D].

    An empty attended set (L == 0) gives all-zero rows.
    """
    if keys.shape[0] == 0:
        return torch.zeros_like(q_heads)
    logits = scale * (q_heads @ keys.T)  # [G, L]
    probs = torch.softmax(logits, dim=-1)
    return probs @ values  # [G, D]


def attention_scores_ref(q, k_cache, q_pos, scale):
    """q [B,T,Hq,D], k_cache [B,Hkv,S,D], q_pos int [B,T] -> float64 [B,Hkv,S]."""
    B, T, Hq, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    G = Hq // Hkv
    q64, k64, pos = _cpu64(q), _cpu64(k_cache), _ints(q_pos)
    out = torch.zeros(B, Hkv, S, dtype=torch.float64)
    for b in range(B):
        valid = [(t, p) for t, p in enumerate(pos[b]) if p >= 0]
        if not valid:
            continue
        for h in range(Hkv):
            acc = torch.zeros(S, dtype=torch.float64)
            for t, p in valid:
                for j in range(h * G, (h + 1) * G):
                    logits = scale * (k64[b, h, : p + 1] @ q64[b, t, j])  # keys 0..p
                    acc[: p + 1] += torch.softmax(logits, dim=0)
            out[b, h] = acc / (len(valid) * G)
    return out


def topk_indices_ref(scores, candidates, k):
    """scores float32 [B,H,S], candidates bool [B,S] -> int32 [B,H,k].

    Rank order: larger score first; equal scores -> lower position first; NaN below
    every number (NaNs among themselves by position). Keep the first k, sort the kept
    positions ascending, pad with -1.
    """
    B, H, S = scores.shape
    vals = scores.detach().to("cpu", torch.float64).tolist()
    cand = candidates.detach().to("cpu").tolist()
    out = torch.full((B, H, k), -1, dtype=torch.int32)
    for b in range(B):
        positions = [s for s in range(S) if cand[b][s]]
        for h in range(H):
            row = vals[b][h]

            def rank_key(s):
                x = row[s]
                if math.isnan(x):
                    return (1, 0.0, s)
                return (0, -x, s)

            chosen = sorted(sorted(positions, key=rank_key)[:k])
            if chosen:
                out[b, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def sparse_attention_ref(q, k_cache, v_cache, indices, tail_start, kv_len, scale):
    """Query i of sequence b (position p = kv_len[b] - Qn + i) attends to the valid
    (>= 0) entries of indices[b, h] plus positions tail_start[b] .. p."""
    B, Qn, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    q64, k64, v64 = _cpu64(q), _cpu64(k_cache), _cpu64(v_cache)
    idx, ts, kl = _ints(indices), _ints(tail_start), _ints(kv_len)
    out = torch.zeros(B, Qn, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            kept = [s for s in idx[b][h] if s >= 0]
            for i in range(Qn):
                p = kl[b] - Qn + i
                attended = kept + list(range(ts[b], p + 1))
                sel = torch.tensor(attended, dtype=torch.long)
                heads = slice(h * G, (h + 1) * G)
                out[b, i, heads] = _attend(q64[b, i, heads], k64[b, h, sel], v64[b, h, sel], scale)
    return out


def dense_attention_ref(q, k_cache, v_cache, kv_len, scale):
    """Query i of sequence b (position p = kv_len[b] - Qn + i) attends to positions 0 .. p."""
    B, Qn, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    q64, k64, v64 = _cpu64(q), _cpu64(k_cache), _cpu64(v_cache)
    kl = _ints(kv_len)
    out = torch.zeros(B, Qn, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            for i in range(Qn):
                p = kl[b] - Qn + i
                heads = slice(h * G, (h + 1) * G)
                out[b, i, heads] = _attend(q64[b, i, heads], k64[b, h, : p + 1], v64[b, h, : p + 1], scale)
    return out
