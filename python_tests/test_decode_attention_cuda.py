"""CUDA dense_attention and sparse_attention (csrc/kernels/decode_attention.cuh), on two
backends (the conftest `kernels` fixture): "cuda", the kernels on a GPU (skips without
one), and "emulated", the same kernel sources and glue run by the CPU emulator of the SIMT
machine on CPU tensors, at small shapes (`kernels.pick`) and on a subset of the big grids
(`emulator_subset`: the rest skip as GPU-only there).

The CPU-and-CUDA tests in test_dense_attention.py / test_sparse_attention.py cover the
shared parametrization; this file adds what only matters on the GPU kernel: long
contexts (64K, 256K on a GPU; 9K on the emulator: many splits and a merge), batch 8
ragged, Qn 1..20 and group sizes 1..8 (one, two and several row groups), keep sets of 2K,
bitwise row invariance (Qn = γ+1 against Qn = 1), unchecked out-of-range integers
(clamped or skipped, never an out-of-bounds access: run this file under compute-sanitizer;
the emulator checks every access), NaN / inf in slots nobody may read, misaligned cache
views, and (GPU only) non-default streams and CUDA-graph capture. Every call's output
starts as NaN (the conftest fixture) and is compared against a float64 reference.

The split plan's promises (csrc/kernels/decode_plan.h) are checked here end to end, bit for
bit: a cache capacity larger by up to γ_max + 1 = 13 (StD against vanilla decoding), both
warp layouts (STD_EXT_DECODE_LAYOUT=rows, the one-math-warp layout, against the default
keys layout at Qn x G <= 16), row invariance across layouts; split counts from 1 to 256
with their merge, long draft tails. The CPU checks the plan itself (test_decode_plan*.py).
"""

import contextlib
import os

import pytest
import torch
from conftest import (ATTN_TOL, assert_attention_output, ints, make_cache, make_indices, make_q, randint, rel_err,
                      requires_cuda)
from reference import dense_attention_ref, sparse_attention_ref

import std_ext

pytestmark = pytest.mark.std_ops("dense_attention", "sparse_attention")
HALF_DTYPES = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- references


def _attend_rows(q_rows, keys, values, visible, scale):
    """float64 softmax(scale q.k, masked) @ v. q_rows [R, D], keys/values [L, D], visible
    bool [R, L]; a row that sees nothing gives zeros."""
    logits = scale * (q_rows @ keys.T)
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs @ values


def sparse_ref_gpu(q, k_cache, v_cache, indices, tail_start, kv_len, scale):
    """Vectorized float64 reference on q's device (for long contexts; reference.py loops
    per query). Dense attention is the case with no indices and tail_start = 0."""
    B, Qn, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Qn, Hq, D, dtype=torch.float64, device=q.device)
    lens, starts = kv_len.tolist(), tail_start.tolist()
    for b in range(B):
        own = lens[b] - Qn + torch.arange(Qn, device=q.device)  # [Qn]
        tail = torch.arange(starts[b], lens[b], device=q.device)
        for h in range(Hkv):
            kept = indices[b, h][indices[b, h] >= 0].long() if indices is not None else tail[:0]
            positions = torch.cat([kept, tail])
            visible = torch.cat(
                [torch.ones(Qn, len(kept), dtype=torch.bool, device=q.device), tail[None, :] <= own[:, None]], dim=1
            )
            heads = slice(h * G, (h + 1) * G)
            rows = q[b, :, heads].double().reshape(Qn * G, D)
            vis_rows = visible.repeat_interleave(G, dim=0)
            o = _attend_rows(rows, k_cache[b, h, positions].double(), v_cache[b, h, positions].double(), vis_rows, scale)
            out[b, :, heads] = o.view(Qn, G, D)
    return out


def dense_ref_gpu(q, k_cache, v_cache, kv_len, scale):
    zeros = torch.zeros_like(kv_len)
    return sparse_ref_gpu(q, k_cache, v_cache, None, zeros, kv_len, scale)


# ----------------------------------------------------------------------------- inputs


def attention_inputs(device, kv_len, S, Qn, Hkv, G, D, dtype, gen, strided=True):
    B = len(kv_len)
    q = make_q(B, Qn, Hkv * G, D, dtype, device, gen, strided)
    k = make_cache(B, Hkv, S, D, kv_len, dtype, device, gen, strided)
    v = make_cache(B, Hkv, S, D, kv_len, dtype, device, gen, strided)
    return q, k, v


def big_cache(device, B, Hkv, S, D, dtype, seed):
    """A large contiguous cache filled where the tensors live (on a GPU, a host-side randn
    of 256K rows is slow)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(B, Hkv, S, D, generator=g, device=device).to(dtype)


def random_keep_sets(device, rows, context, keep, seed):
    """[rows, keep] int32: per row `keep` distinct positions below `context`, ascending."""
    g = torch.Generator(device=device).manual_seed(seed)
    idx = [torch.randperm(context, generator=g, device=device)[:keep].sort().values for _ in range(rows)]
    return torch.stack(idx).to(torch.int32)


def call(kernels, op, *args, **kwargs):
    return getattr(kernels.ops, op)(*args, **kwargs)


def reference(op, *args):
    return (dense_attention_ref if op == "dense_attention" else sparse_attention_ref)(*args)


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.emulator_subset(dict(Qn=1), dict(Qn=10, dtype=torch.bfloat16), context=65536)
@pytest.mark.parametrize("Qn", [1, 10])
@pytest.mark.parametrize("context", [65536, 262144])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_dense_long_context(kernels, dtype, context, Qn):
    """Emulated: 9,000 positions, 141 tiles over 132 splits (some take two)."""
    context = kernels.pick(cuda=context, emulated=9000)
    S = context + 100
    k, v = big_cache(kernels.device, 1, 2, S, 128, dtype, 1), big_cache(kernels.device, 1, 2, S, 128, dtype, 2)
    k[:, :, context:] = float("nan")  # garbage slots must never be read
    v[:, :, context:] = float("nan")
    q = big_cache(kernels.device, 1, Qn, 14, 128, dtype, 3)
    kv = ints([context], kernels.device)
    out = kernels.ops.dense_attention(q, k, v, kv, scale=1.5 * 128**-0.5)
    assert_attention_output(out, q, dense_ref_gpu(q, k, v, kv, 1.5 * 128**-0.5))


@pytest.mark.emulator_subset(dict(Qn=1), dict(Qn=10, dtype=torch.float16), keep=1024)
@pytest.mark.parametrize("Qn", [1, 10])
@pytest.mark.parametrize("keep", [1024, 2048])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_sparse_long_context(kernels, dtype, keep, Qn):
    """Emulated: a context of 4,096 (keep sets of 1,024 of it)."""
    context, tail = kernels.pick(cuda=65536, emulated=4096), 300
    S = context + tail + 50
    kv_len = context + tail
    k, v = big_cache(kernels.device, 2, 4, S, 128, dtype, 4), big_cache(kernels.device, 2, 4, S, 128, dtype, 5)
    idx = random_keep_sets(kernels.device, 8, context, keep, 6).view(2, 4, keep)
    idx[1, 3, keep // 2 :] = -1  # one short keep set
    q = big_cache(kernels.device, 2, Qn, 28, 128, dtype, 7)
    args = (q, k, v, idx, ints([context, context], kernels.device), ints([kv_len, kv_len - 7], kernels.device))
    out = kernels.ops.sparse_attention(*args, scale=128**-0.5)
    assert_attention_output(out, q, sparse_ref_gpu(*args, 128**-0.5))


@pytest.mark.emulator_subset(dict(Qn=1, G=1), dict(Qn=1, G=8, D=128), dict(Qn=20, G=7, D=64, dtype=torch.bfloat16),
                             dict(Qn=20, G=7, D=128, dtype=torch.float16), dict(Qn=10, G=8, D=128, dtype=torch.float16))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", range(1, 9))
@pytest.mark.parametrize("Qn", [1, 2, 5, 10, 16, 20])
def test_dense_batch8_ragged(kernels, gen, Qn, G, D, dtype):
    """Batch 8, kv_len from Qn to ~5000 (emulated ~1000): Qn x G rows from 1 to 160 (1 to 8
    warps, 2 row groups)."""
    top = kernels.pick(cuda=5000, emulated=1000)
    kv_len = [Qn, Qn + 1, 63, 64, 65, kernels.pick(cuda=777, emulated=300), randint(Qn, top, gen), top]
    q, k, v = attention_inputs(kernels.device, kv_len, top + 3, Qn, 2, G, D, dtype, gen)
    kv = ints(kv_len, kernels.device)
    out = kernels.ops.dense_attention(q, k, v, kv, scale=D**-0.5)
    assert_attention_output(out, q, dense_attention_ref(q, k, v, kv, D**-0.5))


@pytest.mark.emulator_subset(dict(Qn=1, G=1), dict(Qn=1, G=8, D=128), dict(Qn=16, G=7, D=64, dtype=torch.float16),
                             dict(Qn=16, G=7, D=128, dtype=torch.bfloat16), dict(Qn=10, G=8, D=128, dtype=torch.bfloat16))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 3, 6, 7, 8])
@pytest.mark.parametrize("Qn", [1, 4, 10, 16])
def test_sparse_batch8_ragged(kernels, gen, Qn, G, D, dtype):
    """Batch 8 ragged: full and short keep sets, all -1 rows, empty tails, tails that start
    inside the query block, N = 300 (emulated 150: several tiles, several splits)."""
    if kernels.emulated:
        kv_len = [Qn + 5, 200, 500, 600, 800, Qn, 400, 900]
        tail = [5, 200, 300, randint(0, 600 - Qn, gen), 800 - Qn // 2, 0, 400, 850]
    else:
        kv_len = [Qn + 5, 200, 1000, 1500, 2100, Qn, 900, 2500]
        tail = [5, 200, 700, randint(0, 1500 - Qn, gen), 2100 - Qn // 2, 0, 900, 2400]
    q, k, v = attention_inputs(kernels.device, kv_len, max(kv_len) + 100, Qn, 2, G, D, dtype, gen)
    idx = make_indices(tail, 2, kernels.pick(cuda=300, emulated=150), gen, kernels.device)
    idx[2, 1] = -1  # a KV head that keeps nothing
    args = (q, k, v, idx, ints(tail, kernels.device), ints(kv_len, kernels.device))
    out = kernels.ops.sparse_attention(*args, scale=D**-0.5)
    assert_attention_output(out, q, sparse_attention_ref(*args, D**-0.5))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_sparse_nothing_to_attend_is_zero(kernels, gen, dtype):
    """All indices -1 and empty tails: every output row is exactly zero, never NaN."""
    q, k, v = attention_inputs(kernels.device, [50, 9], 60, 3, 2, 7, 128, dtype, gen)
    idx = torch.full((2, 2, 700), -1, dtype=torch.int32, device=kernels.device)
    lens = ints([50, 9], kernels.device)
    out = kernels.ops.sparse_attention(q, k, v, idx, lens, lens)
    assert out.is_contiguous() and not out.isnan().any() and not out.any()


@pytest.mark.parametrize("op", ["dense_attention", "sparse_attention"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_unread_slots_may_hold_nan_and_inf(kernels, gen, op, dtype):
    """Every K/V slot a query must not read holds NaN, +inf or -inf (past kv_len, and for
    sparse also every position below tail_start outside the keep set; q's buffer padding is
    NaN too): the output is finite and matches the reference."""
    kv_len, S, Qn, G, D = [300, 77, 4], 320, 4, 4, 64
    tail = [250, 70, 0]
    q, k, v = attention_inputs(kernels.device, kv_len, S, Qn, 2, G, D, dtype, gen)
    idx = make_indices(tail, 2, 96, gen, kernels.device)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    for b, n in enumerate(kv_len):
        for h in range(2):
            unread = torch.ones(S, dtype=torch.bool)
            if op == "dense_attention":
                unread[:n] = False
            else:
                unread[tail[b] : n] = False
                kept = idx[b, h][idx[b, h] >= 0].long().cpu()
                unread[kept] = False
            slots = unread.nonzero().flatten()
            fill = garbage[torch.arange(len(slots)) % 3].to(kernels.device)[:, None]
            k[b, h, slots.to(kernels.device)] = fill
            v[b, h, slots.to(kernels.device)] = fill.flip(0)
    args = (q, k, v) + ((idx, ints(tail, kernels.device)) if op == "sparse_attention" else ())
    args += (ints(kv_len, kernels.device),)
    out = call(kernels, op, *args)
    assert_attention_output(out, q, reference(op, *args, D**-0.5))


@pytest.mark.parametrize("op", ["dense_attention", "sparse_attention"])
def test_large_logits_and_contiguous_inputs(kernels, gen, op):
    n = kernels.pick(cuda=3000, emulated=1000)
    q, k, v = attention_inputs(kernels.device, [n, 41], n + 10, 10, 4, 7, 128, torch.bfloat16, gen, strided=False)
    kv = ints([n, 41], kernels.device)
    scale = 40.0 * 128**-0.5
    if op == "dense_attention":
        args = (q, k, v, kv)
    else:
        tail = [n - 100, 30]
        idx = make_indices(tail, 4, kernels.pick(cuda=512, emulated=256), gen, kernels.device)
        args = (q, k, v, idx, ints(tail, kernels.device), kv)
    assert_attention_output(call(kernels, op, *args, scale=scale), q, reference(op, *args, scale))


# ----------------------------------------------------------------------------- row invariance


def single_row_calls(kernels, op, q, rest, kv_len, Qn):
    """Row i of the Qn call, recomputed as Qn = 1 calls at the same positions."""
    rows = []
    for i in range(Qn):
        lens = ints([n - Qn + 1 + i for n in kv_len], kernels.device)
        rows.append(call(kernels, op, q[:, i : i + 1], *rest, lens))
    return torch.cat(rows, dim=1)


def assert_bitwise_equal(got, want, what):
    assert torch.equal(got, want), f"{what} differ: max |diff| {(got.float() - want.float()).abs().max():.3g}"


@pytest.mark.emulator_subset(dict(S=40000, G=7, Qn=10, D=128), dict(S=100, G=(1, 7), D=64))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G, Qn", [(1, 10), (7, 10), (8, 16), (6, 10), (7, 20)])
@pytest.mark.parametrize("S", [100, 40000])  # 2 tiles; 625 tiles over 44 splits (132 SMs x 2)
def test_dense_rows_bitwise_equal_single_query_calls(kernels, gen, S, G, Qn, D, dtype):
    """Emulated: S 40000 runs as 3,000 (47 tiles over 44 splits)."""
    S = S if S < 1000 else kernels.pick(cuda=S, emulated=3000)
    kv_len = [S - 3, Qn, randint(Qn, S - 3, gen)]
    q, k, v = attention_inputs(kernels.device, kv_len, S, Qn, 2, G, D, dtype, gen)
    full = kernels.ops.dense_attention(q, k, v, ints(kv_len, kernels.device))
    assert_bitwise_equal(full, single_row_calls(kernels, "dense_attention", q, (k, v), kv_len, Qn), "rows")


@pytest.mark.emulator_subset(dict(N=2048, G=7, dtype=torch.bfloat16), dict(N=16, G=(1, 8), dtype=torch.float16))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("G, Qn", [(1, 10), (7, 10), (8, 16)])
@pytest.mark.parametrize("N", [16, 2048])
def test_sparse_rows_bitwise_equal_single_query_calls(kernels, gen, N, G, Qn, dtype):
    """Emulated: contexts of 1,200 / 600 and keep sets of at most 512."""
    if kernels.emulated:
        kv_len, tail, N = [1200, 600, Qn + 40], [1100, 600 - Qn + 1, 40], min(N, 512)
    else:
        kv_len, tail = [5000, 2300, Qn + 40], [4900, 2300 - Qn + 1, 40]  # seq 1's tail starts inside the queries
    q, k, v = attention_inputs(kernels.device, kv_len, max(kv_len) + 5, Qn, 2, G, 128, dtype, gen)
    idx, ts = make_indices(tail, 2, N, gen, kernels.device), ints(tail, kernels.device)
    full = kernels.ops.sparse_attention(q, k, v, idx, ts, ints(kv_len, kernels.device))
    assert_bitwise_equal(full, single_row_calls(kernels, "sparse_attention", q, (k, v, idx, ts), kv_len, Qn), "rows")


# ----------------------------------------------------------------------------- unchecked values


def finite_inputs(kernels, gen, kv_len, S=64, Qn=3):
    """Caches without poison (every slot finite), so a clamped read shows as a value, not NaN."""
    q = make_q(len(kv_len), Qn, 8, 64, torch.bfloat16, kernels.device, gen)
    k = make_cache(len(kv_len), 2, S, 64, [S] * len(kv_len), torch.bfloat16, kernels.device, gen)
    v = make_cache(len(kv_len), 2, S, 64, [S] * len(kv_len), torch.bfloat16, kernels.device, gen)
    return q, k, v


def test_dense_unchecked_kv_len_is_clamped(kernels, gen, monkeypatch):
    monkeypatch.delenv("STD_EXT_DEBUG", raising=False)
    dev = kernels.device
    q, k, v = finite_inputs(kernels, gen, [0, 0, 0])
    out = kernels.ops.dense_attention(q, k, v, ints([64 + 1000, 2**31 - 1, 10], dev))
    kernels.synchronize()
    clamped = kernels.ops.dense_attention(q, k, v, ints([64, 64, 10], dev))
    assert torch.equal(out, clamped)
    assert_attention_output(clamped, q, dense_attention_ref(q, k, v, ints([64, 64, 10], dev), 64**-0.5))
    # kv_len < Qn and negative: the rows before position 0 see nothing (zeros), no fault
    out = kernels.ops.dense_attention(q, k, v, ints([1, -5, -(2**31)], dev))
    kernels.synchronize()
    assert not out.isnan().any() and not out[1:].any() and not out[0, :2].any()
    # sequence 0's last query sits at position 0: it sees key 0 only
    last = dense_attention_ref(q[:1, 2:], k[:1], v[:1], ints([1], dev), 64**-0.5)
    assert rel_err(out[:1, 2:], last) < ATTN_TOL[torch.bfloat16]


def test_sparse_unchecked_values_are_skipped(kernels, gen, monkeypatch):
    monkeypatch.delenv("STD_EXT_DEBUG", raising=False)
    dev = kernels.device
    q, k, v = finite_inputs(kernels, gen, [0, 0])
    bad = ints([[[3, 10, 40, 50, 2**31 - 1], [-7, 5, -1, 63, 64]], [[1, 2, 3, -1, -1], [0, 8, 9, 10, 11]]], dev)
    # sequence 0: tail_start 40 -> 40, 50, 2^31-1 skipped; sequence 1: tail_start 5 -> 8..11 skipped
    out = kernels.ops.sparse_attention(q, k, v, bad, ints([40, 5], dev), ints([60, 30], dev))
    kernels.synchronize()
    clean = ints([[[3, 10, -1, -1, -1], [5, -1, -1, -1, -1]], [[1, 2, 3, -1, -1], [0, -1, -1, -1, -1]]], dev)
    ref = sparse_attention_ref(q, k, v, clean, ints([40, 5], dev), ints([60, 30], dev), 64**-0.5)
    assert_attention_output(out, q, ref)
    # tail_start past kv_len / negative and kv_len past capacity are clamped; no fault
    out = kernels.ops.sparse_attention(q, k, v, bad, ints([10**6, -3], dev), ints([10**6, 2], dev))
    kernels.synchronize()
    assert not out.isnan().any()


# ----------------------------------------------------------------------------- API


@pytest.mark.parametrize("op", ["dense_attention", "sparse_attention"])
def test_float32_and_odd_head_dim_are_rejected(kernels, gen, op):
    for dtype, D, names in ((torch.float32, 64, ("q", "float32|Float")), (torch.bfloat16, 96, ("head_dim",))):
        q, k, v = attention_inputs(kernels.device, [20], 24, 1, 2, 4, D, dtype, gen)
        kv = ints([20], kernels.device)
        sparse = (ints([[[1, 2]], [[3, -1]]], kernels.device).view(1, 2, 2), ints([5], kernels.device))
        args = (q, k, v, kv) if op == "dense_attention" else (q, k, v, *sparse, kv)
        with pytest.raises(RuntimeError) as info:
            call(kernels, op, *args, scale=0.1)
        assert op in str(info.value) and all(any(n in str(info.value) for n in name.split("|")) for name in names)


def test_misaligned_views(kernels, gen):
    """Cache and query views whose rows do not start on 16 bytes still give the right answer."""
    big = torch.randn(1, 2, 70, 64 * 2 + 1, generator=gen).to(torch.float16).to(kernels.device)
    k = big[..., 1 : 1 + 64]
    v = big[..., 65 : 65 + 64]
    q = torch.randn(1, 4, 8, 64 + 3, generator=gen).to(torch.float16).to(kernels.device)[..., 3:]
    kv = ints([70], kernels.device)
    out = kernels.ops.dense_attention(q, k, v, kv)
    assert_attention_output(out, q, dense_attention_ref(q, k, v, kv, 64**-0.5))


def test_contiguous_cache_at_an_odd_offset(kernels, gen):
    """A contiguous cache whose storage starts 2 bytes past a 16-byte boundary."""
    B, H, S, D = 2, 2, 50, 128
    buf = torch.randn(1 + 2 * B * H * S * D, generator=gen).to(torch.bfloat16).to(kernels.device)
    k = buf[1 : 1 + B * H * S * D].view(B, H, S, D)
    v = buf[1 + B * H * S * D :].view(B, H, S, D)
    assert k.is_contiguous() and k.data_ptr() % 16 != 0
    q = make_q(B, 3, 8, D, torch.bfloat16, kernels.device, gen)
    kv = ints([50, 20], kernels.device)
    assert_attention_output(kernels.ops.dense_attention(q, k, v, kv), q, dense_attention_ref(q, k, v, kv, D**-0.5))
    idx, ts = make_indices([30, 10], H, 8, gen, kernels.device), ints([30, 10], kernels.device)
    out = kernels.ops.sparse_attention(q, k, v, idx, ts, kv)
    assert_attention_output(out, q, sparse_attention_ref(q, k, v, idx, ts, kv, D**-0.5))


def test_strided_integer_tensors(kernels, gen):
    """kv_len / tail_start broadcast with stride 0 and indices strided in their last dim
    mean the same as their contiguous copies."""
    dev = kernels.device
    q, k, v = attention_inputs(kernels.device, [40] * 4, 48, 2, 2, 4, 64, torch.float16, gen)
    kv = ints([40], dev).expand(4)
    ts = ints([30], dev).expand(4)
    wide = torch.full((4, 2, 6, 2), -7, dtype=torch.int32, device=dev)
    wide[..., 0] = make_indices([30] * 4, 2, 6, gen, dev)
    idx = wide[..., 0]
    assert kv.stride(0) == 0 and idx.stride(2) == 2
    dense = kernels.ops.dense_attention(q, k, v, kv)
    assert torch.equal(dense, kernels.ops.dense_attention(q, k, v, kv.contiguous()))
    assert_attention_output(dense, q, dense_attention_ref(q, k, v, kv, 64**-0.5))
    sparse = kernels.ops.sparse_attention(q, k, v, idx, ts, kv)
    assert torch.equal(sparse, kernels.ops.sparse_attention(q, k, v, idx.contiguous(), ts.contiguous(), kv.contiguous()))
    assert_attention_output(sparse, q, sparse_attention_ref(q, k, v, idx, ts, kv, 64**-0.5))


@requires_cuda
def test_runs_on_the_current_stream(gen):
    q, k, v = attention_inputs("cuda", [4000, 1200], 4096, 10, 2, 7, 128, torch.bfloat16, gen)
    kv = ints([4000, 1200], "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = std_ext.ops.dense_attention(q, k, v, kv)
    torch.cuda.current_stream().wait_stream(side)
    assert_attention_output(out, q, dense_attention_ref(q, k, v, kv, 128**-0.5))


@requires_cuda
def test_cuda_graph_capture_and_replay(gen):
    """No host sync inside the ops: a graph captures both, and replays follow new lengths."""
    kv_len, tail = [3000, 800], [2500, 700]
    q, k, v = attention_inputs("cuda", [3100, 3100], 3100, 10, 2, 7, 128, torch.bfloat16, gen)
    kv, ts = ints(kv_len, "cuda"), ints(tail, "cuda")
    idx = make_indices(tail, 2, 1024, gen, "cuda")
    for _ in range(2):  # warm up (allocations, attributes) outside the capture
        std_ext.ops.dense_attention(q, k, v, kv)
        std_ext.ops.sparse_attention(q, k, v, idx, ts, kv)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dense = std_ext.ops.dense_attention(q, k, v, kv)
        sparse = std_ext.ops.sparse_attention(q, k, v, idx, ts, kv)
    for lens in ([3000, 800], [3050, 1000]):
        kv.copy_(ints(lens, "cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(dense, std_ext.ops.dense_attention(q, k, v, kv))
        assert torch.equal(sparse, std_ext.ops.sparse_attention(q, k, v, idx, ts, kv))
        assert rel_err(dense, dense_attention_ref(q, k, v, kv, 128**-0.5)) < ATTN_TOL[torch.bfloat16]


# ----------------------------------------------------------------------------- split plan, bit for bit


@contextlib.contextmanager
def environment(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def decode_layout(value):
    return environment("STD_EXT_DECODE_LAYOUT", value)


@pytest.mark.emulator_subset(dict(capacity=4096 - 7, Qn=1), dict(capacity=200, Qn=10))
@pytest.mark.parametrize("op", ["dense_attention", "sparse_attention"])
@pytest.mark.parametrize("Qn", [1, 10])
@pytest.mark.parametrize("capacity", [200, 4096 - 7, 4096, 8192 + 63, 40000])  # 40000: left out of memcheck
def test_capacity_change_of_up_to_13_is_bitwise_invisible(kernels, gen, op, Qn, capacity):
    """Vanilla decoding allocates γ+1 fewer cache positions than StD: views of one buffer
    with capacities C .. C + 13 give the same bits (the split plan ignores the capacity)."""
    kv_len = [capacity - 3, min(capacity, 150)]
    big_k = big_cache(kernels.device, 2, 2, capacity + 13, 128, torch.bfloat16, 11)
    big_v = big_cache(kernels.device, 2, 2, capacity + 13, 128, torch.bfloat16, 12)
    q = big_cache(kernels.device, 2, Qn, 14, 128, torch.bfloat16, 13)
    kv = ints(kv_len, kernels.device)
    extra = ()
    if op == "sparse_attention":
        tail = [n - 100 for n in kv_len]
        extra = (make_indices(tail, 2, 1024, gen, kernels.device), ints(tail, kernels.device))
    outs = []
    for delta in (0, 1, 10, 13):
        k, v = big_k[:, :, : capacity + delta], big_v[:, :, : capacity + delta]
        outs.append(call(kernels, op, q, k, v, *extra, kv))
    for delta, out in zip((1, 10, 13), outs[1:]):
        assert torch.equal(out, outs[0]), f"capacity + {delta} changes the output"
    k, v = big_k[:, :, :capacity], big_v[:, :, :capacity]
    assert_attention_output(outs[0], q, reference(op, q, k, v, *extra, kv, 128**-0.5))


@pytest.mark.emulator_subset(dict(Qn=1, G=7), dict(Qn=2, G=8, D=128))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Qn, G", [(1, 1), (1, 4), (1, 7), (1, 8), (1, 16), (2, 8)])
@pytest.mark.parametrize("op", ["dense_attention", "sparse_attention"])
def test_warp_layouts_agree_bitwise(kernels, gen, op, Qn, G, D, dtype):
    """Up to 16 rows the keys layout (4 warps share the tile's keys) runs by default; the rows
    layout (one math warp) computes every row in the same order, so the bits are equal."""
    kv_len = [kernels.pick(cuda=5000, emulated=2000), 70, Qn]  # GPU: 79 tiles, most splits take two
    q, k, v = attention_inputs(kernels.device, kv_len, kv_len[0] + 10, Qn, 2, G, D, dtype, gen)
    args = (q, k, v)
    if op == "sparse_attention":
        tail = [kv_len[0] - 1000, 10, 0]
        args += (make_indices(tail, 2, 700, gen, kernels.device), ints(tail, kernels.device))
    args += (ints(kv_len, kernels.device),)
    with decode_layout("keys"):
        keys = call(kernels, op, *args)
    with decode_layout("rows"):
        rows = call(kernels, op, *args)
    assert_bitwise_equal(keys, rows, "layouts")
    assert_attention_output(keys, q, reference(op, *args, D**-0.5))


def test_bad_layout_variable_is_named(kernels, gen, monkeypatch):
    q, k, v = attention_inputs(kernels.device, [20], 24, 1, 2, 4, 64, torch.float16, gen)
    monkeypatch.setenv("STD_EXT_DECODE_LAYOUT", "diagonal")
    with pytest.raises(RuntimeError, match="STD_EXT_DECODE_LAYOUT"):
        kernels.ops.dense_attention(q, k, v, ints([20], kernels.device))


@pytest.mark.emulator_subset(dict(Qn=1, G=7, D=64), dict(Qn=10, G=7, D=128), dict(Qn=20, G=8, D=64))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Qn, G", [(1, 7), (4, 8), (10, 7), (20, 8)])
@pytest.mark.parametrize("op", ["dense_attention", "sparse_attention"])
def test_blocks_taking_several_splits_change_no_bit(kernels, gen, op, Qn, G, D):
    """Where the launched variant holds fewer blocks per SM than the splits assume (the
    eight-warp rows variant of a verify: Qn x G of 65..128 rows, or several row groups), a
    block takes several splits in turn, its pipeline running on from one into the next.
    Any count (STD_EXT_DECODE_SPLITS_PER_BLOCK) gives the bits of one split per block: ragged
    lists (16 splits per (sequence, KV head): the longest has 2-3 tiles per split, the short
    ones leave most splits empty), and the values against float64."""
    kv_len = [kernels.pick(cuda=9000, emulated=2600), 700, 70, Qn]
    q, k, v = attention_inputs(kernels.device, kv_len, kv_len[0] + 10, Qn, 4, G, D, torch.bfloat16, gen)
    args = (q, k, v)
    if op == "sparse_attention":
        tail = [kv_len[0] - 1200, 650, 10, 0]
        args += (make_indices(tail, 4, 300, gen, kernels.device), ints(tail, kernels.device))
    args += (ints(kv_len, kernels.device),)
    with environment("STD_EXT_DECODE_SPLITS_PER_BLOCK", "1"):
        one = call(kernels, op, *args)
    assert_attention_output(one, q, reference(op, *args, D**-0.5))
    for per_block in ("0", "2", "3", "7", "16", "256"):
        with environment("STD_EXT_DECODE_SPLITS_PER_BLOCK", per_block):
            assert_bitwise_equal(call(kernels, op, *args), one, f"{per_block} splits per block")


def test_bad_splits_per_block_variable_is_named(kernels, gen, monkeypatch):
    q, k, v = attention_inputs(kernels.device, [20], 24, 1, 2, 4, 64, torch.float16, gen)
    for bad in ("two", "-1", "257", "3x"):
        monkeypatch.setenv("STD_EXT_DECODE_SPLITS_PER_BLOCK", bad)
        with pytest.raises(RuntimeError, match="STD_EXT_DECODE_SPLITS_PER_BLOCK"):
            kernels.ops.dense_attention(q, k, v, ints([20], kernels.device))


@pytest.mark.emulator_subset(Qn=(1,))
@pytest.mark.parametrize("Qn", [1, 10])
def test_merge_of_256_splits(kernels, Qn):
    """One sequence, one KV head: 256 splits (the most) at 40K positions (emulated: 16,500,
    258 tiles: two splits take two), merged at once."""
    S = kernels.pick(cuda=40000, emulated=16500)
    k, v = big_cache(kernels.device, 1, 1, S, 128, torch.bfloat16, 21), big_cache(kernels.device, 1, 1, S, 128, torch.bfloat16, 22)
    q = big_cache(kernels.device, 1, Qn, 8, 128, torch.bfloat16, 23)
    kv = ints([S - 5], kernels.device)
    out = kernels.ops.dense_attention(q, k, v, kv, scale=2.0 * 128**-0.5)
    assert_attention_output(out, q, dense_ref_gpu(q, k, v, kv, 2.0 * 128**-0.5))


# (batch, KV heads, longest kv_len) -> splits per (sequence, KV head) with 132 SMs x 2 blocks
# (an H100, D = 128; checked against decode_split_plan below). With one block per SM (an
# sm_80-sized shared memory, STD_EXT_EMULATOR_ARCH=80) they are 1, 1, 4 and 132.
SPLIT_CASES = {1: (67, 4, 150), 2: (33, 4, 130), 8: (4, 8, 700), 256: (1, 1, 16500)}


@pytest.mark.parametrize("splits", sorted(SPLIT_CASES))
def test_split_counts_bitwise_and_merged(kernels, gen, splits):
    """Dense attention with 1, 2, 8 and 256 splits: values against the float64 reference
    (ragged lengths: some (sequence, head) lists fill every split, short ones few), and row i
    of the Qn = 3 call equal, bit for bit, to a Qn = 1 call at its position."""
    B, Hkv, longest = SPLIT_CASES[splits]
    Qn, G, D = 3, 4, 128
    plan = torch.ops.std.decode_split_plan(B, Hkv, Qn, G, longest + 7, 0, longest, 132, 2)[1]
    assert int(plan[0]) == splits
    kv_len = [longest] + [randint(Qn, longest, gen) for _ in range(B - 1)]
    q, k, v = attention_inputs(kernels.device, kv_len, longest + 7, Qn, Hkv, G, D, torch.bfloat16, gen)
    kv = ints(kv_len, kernels.device)
    out = kernels.ops.dense_attention(q, k, v, kv)
    assert_attention_output(out, q, dense_ref_gpu(q, k, v, kv, D**-0.5))
    assert_bitwise_equal(out, single_row_calls(kernels, "dense_attention", q, (k, v), kv_len, Qn), "rows")


def test_rows_that_see_nothing_first_then_something(kernels, gen):
    """One split per (sequence, KV head) (67 x 2 lists > 132 SMs x 2 blocks / 2), keep sets
    of -1 only on half the heads: those rows' first tile hides every key from them, so their
    online softmax is still empty (max -inf) when a masked tile arrives, and must stay an
    exact zero state (shift 0, rescale exp2(-inf) = 0) to come out right when the tail's
    tile follows; a NaN there would survive into the output. (With several splits such a
    split is merged with weight 0, which hides it.)"""
    B, Hkv, Qn, G, D, N = 67, 2, 2, 2, 128, 64
    plan = torch.ops.std.decode_split_plan(B, Hkv, Qn, G, 90, N, 30, 132, 2)[1]
    assert int(plan[0]) == 1
    tail = [60] * B
    kv_len = [60 + randint(Qn, 30, gen) for _ in range(B)]
    q, k, v = attention_inputs(kernels.device, kv_len, 90, Qn, Hkv, G, D, torch.bfloat16, gen, strided=False)
    idx = make_indices(tail, Hkv, N, gen, kernels.device)
    idx[::2, 0] = -1  # nothing kept: the tail is all these heads see
    idx[1::2, 1] = -1
    args = (q, k, v, idx, ints(tail, kernels.device), ints(kv_len, kernels.device))
    out = kernels.ops.sparse_attention(*args)
    assert_attention_output(out, q, sparse_ref_gpu(*args, D**-0.5))


@pytest.mark.emulator_subset(tail=(1, 64, 1000))
@pytest.mark.parametrize("tail", [1, 64, 1000, 5000])
def test_sparse_long_draft_tails(kernels, tail):
    """Tails of up to 5000 generated positions (their tiles spread over the splits);
    emulated: a context of 2,000 with keep sets of 256."""
    keep, context = kernels.pick(cuda=1024, emulated=256), kernels.pick(cuda=20000, emulated=2000)
    S = context + tail + 10
    k, v = big_cache(kernels.device, 2, 4, S, 128, torch.bfloat16, 31), big_cache(kernels.device, 2, 4, S, 128, torch.bfloat16, 32)
    idx = random_keep_sets(kernels.device, 8, context, keep, 33).view(2, 4, keep)
    q = big_cache(kernels.device, 2, 1, 28, 128, torch.bfloat16, 34)
    args = (q, k, v, idx, ints([context, context], kernels.device),
            ints([context + tail, context + tail // 2], kernels.device))
    out = kernels.ops.sparse_attention(*args, scale=128**-0.5)
    assert_attention_output(out, q, sparse_ref_gpu(*args, 128**-0.5))
