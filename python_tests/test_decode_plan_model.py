"""A float64 model of the CUDA decode kernels' control flow, run on the planner's real output.

``model_attention`` follows csrc/kernels/decode_attention.cuh step by step, in float64 instead
of bf16/fp32 and without tensor cores: the position list of each (sequence, KV head) (keep
entries valid iff 0 <= index < tail_start, padding up to tail_offset, the tail), the tiles and
splits of ``std::decode_split_plan`` in the order each split takes them, the visibility masks
(keep entries for every query, tail positions up to the query's own), the online softmax with
the kernel's shift / alpha rules and its four key-group row-sum partials, the per-split
normalization and log2-sum-exp, and the merge (block max, weights 2^(lse - M), weighted sum;
the output written directly when there is one split). It must agree with the float64
references of python_tests/reference.py, so a tile the plan dropped or repeated, a wrong mask
or a wrong rescale shows here without a GPU. It is also row-invariant by construction, which
the last test checks bit for bit: the arguments of decode_attention.cuh's header comment
(a tile a row cannot see, present or absent, leaves its state exactly unchanged).
"""

import math

import pytest
import torch
from conftest import ints, make_cache, make_indices, make_q
from reference import dense_attention_ref, sparse_attention_ref

import std_ext

LOG2E = 1.4426950408889634
KEY_GROUPS = 4  # 16-key groups of a 64-entry tile: the kernel's row-sum partials


def split_tiles(batch, kv_heads, q_len, group, capacity, num_indices, tail_len, sms, per_sm):
    """{split: [(first, end), ...] in processing order} and (num_splits, tail_offset, tile)."""
    tiles, info = std_ext.ops.decode_split_plan(batch, kv_heads, q_len, group, capacity, num_indices, tail_len,
                                                sms, per_sm)
    splits, tail_offset, tile = info.tolist()[:3]
    out = {s: [] for s in range(splits)}
    for split, order, first, end in tiles.tolist():
        assert order == len(out[split])
        out[split].append((first, end))
    return out, splits, tail_offset, tile


def exp2(t):
    """2^t element by element with the C library (torch's vectorized exp2 rounds an element
    differently in its SIMD body and its scalar tail, i.e. by where the element sits)."""
    return torch.tensor([math.exp2(x) for x in t.flatten().tolist()], dtype=torch.float64).view(t.shape)


def log2(t):
    return torch.tensor([math.log2(x) for x in t.flatten().tolist()], dtype=torch.float64).view(t.shape)


def row_dot(a, b):
    """[R, K]: a [R, D] . b [K, D] per row, as a reduction over the last dim, so that a row's
    bits do not depend on how many rows share the call (a BLAS matmul's blocking may)."""
    return (a[:, None, :] * b[None, :, :]).sum(dim=-1)


def model_attention(q, k_cache, v_cache, kv_len, scale, indices=None, tail_start=None, sms=6, per_sm=2):
    """float64 [B, Qn, H_q, D]: the kernel's computation under the plan for (sms, per_sm)."""
    B, Qn, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    N = indices.shape[2] if indices is not None else 0
    q64, k64, v64 = (t.detach().to(torch.float64) for t in (q, k_cache, v_cache))
    out = torch.zeros(B, Qn, Hq, D, dtype=torch.float64)
    scale_log2 = scale * LOG2E
    for b in range(B):
        n = min(max(int(kv_len[b]), 0), S)
        start = min(max(int(tail_start[b]), 0), n) if tail_start is not None else 0
        plan, splits, tail_offset, tile = split_tiles(B, Hkv, Qn, G, S, N, n - start, sms, per_sm)
        list_len = tail_offset + n - start
        row_pos = torch.tensor([n - Qn + r // G for r in range(Qn * G)], dtype=torch.float64)
        for h in range(Hkv):
            # entry -> (position or -1, smallest query position that sees it)
            position = torch.full((list_len + tile,), -1, dtype=torch.long)
            visible_from = torch.full((list_len + tile,), math.inf, dtype=torch.float64)
            for e in range(N):
                index = int(indices[b, h, e])
                if 0 <= index < start:
                    position[e], visible_from[e] = index, 0.0
            tail = torch.arange(start, n)
            position[tail_offset:list_len] = tail
            visible_from[tail_offset:list_len] = tail.to(torch.float64)
            rows = q64[b, :, h * G:(h + 1) * G].reshape(Qn * G, D)
            results = []  # per split: (o [R, D], lse [R])
            for split in range(splits):
                row_max = torch.full((Qn * G,), -math.inf, dtype=torch.float64)
                sums = torch.zeros(Qn * G, KEY_GROUPS, dtype=torch.float64)
                acc = torch.zeros(Qn * G, D, dtype=torch.float64)
                for first, _end in plan[split]:
                    pos = position[first:first + tile]
                    valid = pos >= 0
                    keys = torch.where(valid[:, None], k64[b, h, pos.clamp_min(0)], 0.0)  # zero-filled rows
                    vals = torch.where(valid[:, None], v64[b, h, pos.clamp_min(0)], 0.0)
                    visible = visible_from[first:first + tile][None, :] <= row_pos[:, None]
                    logits = torch.where(visible, row_dot(rows, keys) * scale_log2, -math.inf)
                    new_max = torch.maximum(row_max, logits.max(dim=1).values)
                    shift = torch.where(new_max == -math.inf, 0.0, new_max)
                    alpha = exp2(row_max - shift)
                    row_max = new_max
                    probs = exp2(logits - shift[:, None])
                    sums = sums * alpha[:, None] + probs.view(-1, KEY_GROUPS, tile // KEY_GROUPS).sum(dim=2)
                    acc = acc * alpha[:, None] + row_dot(probs, vals.T.contiguous())
                total = (sums[:, 0] + sums[:, 1]) + (sums[:, 2] + sums[:, 3])
                saw = total > 0
                o = acc * torch.where(saw, 1.0 / torch.where(saw, total, 1.0), 0.0)[:, None]
                lse = torch.where(saw, row_max + log2(torch.where(saw, total, 1.0)), -math.inf)
                results.append((o, lse))
            if splits == 1:
                merged = results[0][0]
            else:
                lse = torch.stack([r[1] for r in results], dim=1)  # [R, splits]
                top = lse.max(dim=1).values
                weights = exp2(lse - torch.where(top == -math.inf, 0.0, top)[:, None])
                weighted = sum(weights[:, s, None] * results[s][0] for s in range(splits))
                weight_sum = weights.sum(dim=1)
                merged = weighted * torch.where(weight_sum > 0, 1.0 / weight_sum.clamp_min(1e-300), 0.0)[:, None]
            out[b, :, h * G:(h + 1) * G] = merged.view(Qn, G, D)
    return out


def dense_inputs(gen, kv_len, S, Qn, Hkv=2, G=7, D=32):
    B = len(kv_len)
    q = make_q(B, Qn, Hkv * G, D, torch.float32, "cpu", gen)
    k = make_cache(B, Hkv, S, D, kv_len, torch.float32, "cpu", gen)
    v = make_cache(B, Hkv, S, D, kv_len, torch.float32, "cpu", gen)
    return q, k, v


def assert_model_matches(model, ref):
    assert not model.isnan().any()
    err = (model - ref).abs().max().item()
    assert err < 1e-9, f"model vs reference: max |diff| {err:.3g}"


# (sm_count, blocks_per_sm): one split (the direct write), a few (several tiles per split), many
# (most splits empty for short lists)
PLANS = [(1, 1), (6, 2), (132, 2)]


@pytest.mark.parametrize("sms, per_sm", PLANS)
@pytest.mark.parametrize("Qn, G", [(1, 7), (10, 7), (3, 1)])
def test_dense_model_matches_reference(gen, Qn, G, sms, per_sm):
    kv_len = [700, Qn, 129]
    q, k, v = dense_inputs(gen, kv_len, 710, Qn, G=G)
    kv = ints(kv_len, "cpu")
    scale = 3.0 * 32**-0.5  # large logits: the running max moves, rescaling matters
    assert_model_matches(model_attention(q, k, v, kv, scale, sms=sms, per_sm=per_sm),
                         dense_attention_ref(q, k, v, kv, scale))


@pytest.mark.parametrize("sms, per_sm", PLANS)
@pytest.mark.parametrize("Qn", [1, 4])
def test_sparse_model_matches_reference(gen, Qn, sms, per_sm):
    """Keep sets of 150 (a partial tile, then padding), -1 padding and a KV head keeping
    nothing, tails from empty to 400 positions, one starting inside the query block."""
    kv_len = [600, 300, Qn + 20]
    tail = [200, 300 - Qn + 1, Qn + 20]
    q, k, v = dense_inputs(gen, kv_len, 610, Qn)
    idx = make_indices(tail, 2, 150, gen, "cpu")
    idx[1, 0] = -1
    args = (q, k, v, idx, ints(tail, "cpu"), ints(kv_len, "cpu"))
    model = model_attention(q, k, v, args[5], 32**-0.5, indices=idx, tail_start=args[4], sms=sms, per_sm=per_sm)
    assert_model_matches(model, sparse_attention_ref(*args, 32**-0.5))


def test_sparse_model_skips_out_of_range_indices(gen):
    """Indices at or past tail_start or negative are skipped, as the kernel skips them."""
    q, k, v = dense_inputs(gen, [80], 90, 2, G=3)
    bad = ints([[[3, 10, 40, 50, 2**31 - 1], [-7, 5, -1, 63, 64]]], "cpu")
    clean = ints([[[3, 10, -1, -1, -1], [5, -1, -1, -1, -1]]], "cpu")
    ts, kv = ints([40], "cpu"), ints([80], "cpu")
    model = model_attention(q, k, v, kv, 0.2, indices=bad, tail_start=ts)
    assert_model_matches(model, sparse_attention_ref(q, k, v, clean, ts, kv, 0.2))


@pytest.mark.parametrize("op", ["dense", "sparse"])
def test_model_rows_equal_single_query_calls_bitwise(gen, op):
    """Row i of a Qn = 10 call equals a Qn = 1 call at the same position exactly: the later
    tiles are absent in the one and fully masked for that row in the other."""
    Qn, kv_len = 10, [500, 140]
    q, k, v = dense_inputs(gen, kv_len, 520, Qn)
    tail = [400, 131] if op == "sparse" else None
    extra = {}
    if tail:
        extra = dict(indices=make_indices(tail, 2, 70, gen, "cpu"), tail_start=ints(tail, "cpu"))
    full = model_attention(q, k, v, ints(kv_len, "cpu"), 0.3, **extra)
    for i in range(Qn):
        lens = ints([n - Qn + 1 + i for n in kv_len], "cpu")
        one = model_attention(q[:, i:i + 1], k, v, lens, 0.3, **extra)
        assert torch.equal(full[:, i:i + 1], one), f"row {i}"
