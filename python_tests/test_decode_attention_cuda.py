"""CUDA dense_attention and sparse_attention (csrc/kernels/decode_attention.cuh) on a GPU.

The CPU-and-CUDA tests in test_dense_attention.py / test_sparse_attention.py cover the
shared parametrization; this file adds what only matters on the GPU kernel: long
contexts (64K, 256K: many splits and a merge), batch 8 ragged, Qn 1..20 and group sizes
1..8 (one, two and several row groups), keep sets of 2K, bitwise row invariance
(Qn = γ+1 against Qn = 1), unchecked out-of-range integers (clamped or skipped, never an
out-of-bounds access: run this file under compute-sanitizer), misaligned cache views,
non-default streams and CUDA-graph capture. Every call's output starts as NaN (the
conftest fixture) and is compared against a float64 reference.

The split plan's promises (csrc/kernels/decode_plan.h) are checked here end to end, bit for
bit: a cache capacity larger by up to γ_max + 1 = 13 (StD against vanilla decoding), both
warp layouts (STD_EXT_DECODE_LAYOUT=rows, the one-math-warp layout, against the default
keys layout at Qn x G <= 16), row invariance across layouts; plus merges of 256 splits and
long draft tails. The CPU checks the plan itself (test_decode_plan*.py).
"""

import contextlib
import os

import pytest
import torch
from conftest import ATTN_TOL, assert_attention_output, ints, make_cache, make_indices, make_q, randint, rel_err
from reference import dense_attention_ref, sparse_attention_ref

import std_ext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
HALF_DTYPES = (torch.bfloat16, torch.float16)
CUDA = "cuda"


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


def attention_inputs(kv_len, S, Qn, Hkv, G, D, dtype, gen, strided=True):
    B = len(kv_len)
    q = make_q(B, Qn, Hkv * G, D, dtype, CUDA, gen, strided)
    k = make_cache(B, Hkv, S, D, kv_len, dtype, CUDA, gen, strided)
    v = make_cache(B, Hkv, S, D, kv_len, dtype, CUDA, gen, strided)
    return q, k, v


def big_cache(B, Hkv, S, D, dtype, seed):
    """A large contiguous cache filled on the GPU (host-side randn of 256K rows is slow)."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.randn(B, Hkv, S, D, generator=g, device=CUDA).to(dtype)


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("Qn", [1, 10])
@pytest.mark.parametrize("context", [65536, 262144])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_dense_long_context(dtype, context, Qn):
    S = context + 100
    k, v = big_cache(1, 2, S, 128, dtype, 1), big_cache(1, 2, S, 128, dtype, 2)
    k[:, :, context:] = float("nan")  # garbage slots must never be read
    v[:, :, context:] = float("nan")
    q = big_cache(1, Qn, 14, 128, dtype, 3)
    kv = ints([context], CUDA)
    out = std_ext.ops.dense_attention(q, k, v, kv, scale=1.5 * 128**-0.5)
    assert_attention_output(out, q, dense_ref_gpu(q, k, v, kv, 1.5 * 128**-0.5))


@pytest.mark.parametrize("Qn", [1, 10])
@pytest.mark.parametrize("keep", [1024, 2048])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_sparse_long_context(dtype, keep, Qn):
    context, tail = 65536, 300
    S = context + tail + 50
    kv_len = context + tail
    k, v = big_cache(2, 4, S, 128, dtype, 4), big_cache(2, 4, S, 128, dtype, 5)
    g = torch.Generator(device=CUDA).manual_seed(6)
    idx = torch.stack([torch.randperm(context, generator=g, device=CUDA)[:keep].sort().values for _ in range(8)])
    idx = idx.view(2, 4, keep).to(torch.int32)
    idx[1, 3, keep // 2 :] = -1  # one short keep set
    q = big_cache(2, Qn, 28, 128, dtype, 7)
    args = (q, k, v, idx, ints([context, context], CUDA), ints([kv_len, kv_len - 7], CUDA))
    out = std_ext.ops.sparse_attention(*args, scale=128**-0.5)
    assert_attention_output(out, q, sparse_ref_gpu(*args, 128**-0.5))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", range(1, 9))
@pytest.mark.parametrize("Qn", [1, 2, 5, 10, 16, 20])
def test_dense_batch8_ragged(gen, Qn, G, D, dtype):
    """Batch 8, kv_len from Qn to ~5000: Qn x G rows from 1 to 160 (1 to 8 warps, 2 row groups)."""
    kv_len = [Qn, Qn + 1, 63, 64, 65, 777, randint(Qn, 5000, gen), 5000]
    q, k, v = attention_inputs(kv_len, 5003, Qn, 2, G, D, dtype, gen)
    kv = ints(kv_len, CUDA)
    out = std_ext.ops.dense_attention(q, k, v, kv, scale=D**-0.5)
    assert_attention_output(out, q, dense_attention_ref(q, k, v, kv, D**-0.5))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 3, 6, 7, 8])
@pytest.mark.parametrize("Qn", [1, 4, 10, 16])
def test_sparse_batch8_ragged(gen, Qn, G, D, dtype):
    """Batch 8 ragged: full and short keep sets, all -1 rows, empty tails, tails that start
    inside the query block, N = 300 (several splits)."""
    kv_len = [Qn + 5, 200, 1000, 1500, 2100, Qn, 900, 2500]
    tail = [5, 200, 700, randint(0, 1500 - Qn, gen), 2100 - Qn // 2, 0, 900, 2400]
    q, k, v = attention_inputs(kv_len, 2600, Qn, 2, G, D, dtype, gen)
    idx = make_indices(tail, 2, 300, gen, CUDA)
    idx[2, 1] = -1  # a KV head that keeps nothing
    args = (q, k, v, idx, ints(tail, CUDA), ints(kv_len, CUDA))
    out = std_ext.ops.sparse_attention(*args, scale=D**-0.5)
    assert_attention_output(out, q, sparse_attention_ref(*args, D**-0.5))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_sparse_nothing_to_attend_is_zero(gen, dtype):
    """All indices -1 and empty tails: every output row is exactly zero, never NaN."""
    q, k, v = attention_inputs([50, 9], 60, 3, 2, 7, 128, dtype, gen)
    idx = torch.full((2, 2, 700), -1, dtype=torch.int32, device=CUDA)
    out = std_ext.ops.sparse_attention(q, k, v, idx, ints([50, 9], CUDA), ints([50, 9], CUDA))
    assert out.is_contiguous() and not out.isnan().any() and not out.any()


@pytest.mark.parametrize("op", ["dense_attention", "sparse_attention"])
def test_large_logits_and_contiguous_inputs(gen, op):
    q, k, v = attention_inputs([3000, 41], 3010, 10, 4, 7, 128, torch.bfloat16, gen, strided=False)
    kv = ints([3000, 41], CUDA)
    scale = 40.0 * 128**-0.5
    if op == "dense_attention":
        args = (q, k, v, kv)
        ref = dense_attention_ref(*args, scale)
    else:
        args = (q, k, v, make_indices([2900, 30], 4, 512, gen, CUDA), ints([2900, 30], CUDA), kv)
        ref = sparse_attention_ref(*args, scale)
    assert_attention_output(getattr(std_ext.ops, op)(*args, scale=scale), q, ref)


# ----------------------------------------------------------------------------- row invariance


def single_row_calls(op, q, rest, kv_len, Qn):
    """Row i of the Qn call, recomputed as Qn = 1 calls at the same positions."""
    rows = []
    for i in range(Qn):
        lens = ints([n - Qn + 1 + i for n in kv_len], CUDA)
        rows.append(getattr(std_ext.ops, op)(q[:, i : i + 1], *rest, lens))
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G, Qn", [(1, 10), (7, 10), (8, 16), (6, 10), (7, 20)])
@pytest.mark.parametrize("S", [100, 40000])  # 2 tiles; 625 tiles over 44 splits (132 SMs x 2)
def test_dense_rows_bitwise_equal_single_query_calls(gen, S, G, Qn, D, dtype):
    kv_len = [S - 3, Qn, randint(Qn, S - 3, gen)]
    q, k, v = attention_inputs(kv_len, S, Qn, 2, G, D, dtype, gen)
    full = std_ext.ops.dense_attention(q, k, v, ints(kv_len, CUDA))
    rows = single_row_calls("dense_attention", q, (k, v), kv_len, Qn)
    assert torch.equal(full, rows), f"rows differ: max |diff| {(full.float() - rows.float()).abs().max():.3g}"


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("G, Qn", [(1, 10), (7, 10), (8, 16)])
@pytest.mark.parametrize("N", [16, 2048])
def test_sparse_rows_bitwise_equal_single_query_calls(gen, N, G, Qn, dtype):
    kv_len = [5000, 2300, Qn + 40]
    tail = [4900, 2300 - Qn + 1, 40]  # sequence 1's tail starts inside the query block
    q, k, v = attention_inputs(kv_len, 5005, Qn, 2, G, 128, dtype, gen)
    idx, ts = make_indices(tail, 2, N, gen, CUDA), ints(tail, CUDA)
    full = std_ext.ops.sparse_attention(q, k, v, idx, ts, ints(kv_len, CUDA))
    rows = single_row_calls("sparse_attention", q, (k, v, idx, ts), kv_len, Qn)
    assert torch.equal(full, rows), f"rows differ: max |diff| {(full.float() - rows.float()).abs().max():.3g}"


# ----------------------------------------------------------------------------- unchecked values


def finite_inputs(gen, kv_len, S=64, Qn=3):
    """Caches without poison (every slot finite), so a clamped read shows as a value, not NaN."""
    q = make_q(len(kv_len), Qn, 8, 64, torch.bfloat16, CUDA, gen)
    k = make_cache(len(kv_len), 2, S, 64, [S] * len(kv_len), torch.bfloat16, CUDA, gen)
    v = make_cache(len(kv_len), 2, S, 64, [S] * len(kv_len), torch.bfloat16, CUDA, gen)
    return q, k, v


def test_dense_unchecked_kv_len_is_clamped(gen, monkeypatch):
    monkeypatch.delenv("STD_EXT_DEBUG", raising=False)
    q, k, v = finite_inputs(gen, [0, 0, 0])
    out = std_ext.ops.dense_attention(q, k, v, ints([64 + 1000, 2**31 - 1, 10], CUDA))
    torch.cuda.synchronize()
    clamped = std_ext.ops.dense_attention(q, k, v, ints([64, 64, 10], CUDA))
    assert torch.equal(out, clamped)
    # kv_len < Qn and negative: the rows before position 0 see nothing (zeros), no fault
    out = std_ext.ops.dense_attention(q, k, v, ints([1, -5, -(2**31)], CUDA))
    torch.cuda.synchronize()
    assert not out.isnan().any() and not out[1:].any()


def test_sparse_unchecked_values_are_skipped(gen, monkeypatch):
    monkeypatch.delenv("STD_EXT_DEBUG", raising=False)
    q, k, v = finite_inputs(gen, [0, 0])
    bad = ints([[[3, 10, 40, 50, 2**31 - 1], [-7, 5, -1, 63, 64]], [[1, 2, 3, -1, -1], [0, 8, 9, 10, 11]]], CUDA)
    # sequence 0: tail_start 40 -> 40, 50, 2^31-1 skipped; sequence 1: tail_start 5 -> 8..11 skipped
    out = std_ext.ops.sparse_attention(q, k, v, bad, ints([40, 5], CUDA), ints([60, 30], CUDA))
    torch.cuda.synchronize()
    clean = ints([[[3, 10, -1, -1, -1], [5, -1, -1, -1, -1]], [[1, 2, 3, -1, -1], [0, -1, -1, -1, -1]]], CUDA)
    ref = sparse_attention_ref(q, k, v, clean, ints([40, 5], CUDA), ints([60, 30], CUDA), 64**-0.5)
    assert_attention_output(out, q, ref)
    # tail_start past kv_len / negative and kv_len past capacity are clamped; no fault
    out = std_ext.ops.sparse_attention(q, k, v, bad, ints([10**6, -3], CUDA), ints([10**6, 2], CUDA))
    torch.cuda.synchronize()
    assert not out.isnan().any()


# ----------------------------------------------------------------------------- API on CUDA


@pytest.mark.parametrize("op", ["dense_attention", "sparse_attention"])
def test_float32_and_odd_head_dim_are_rejected(gen, op):
    for dtype, D, names in ((torch.float32, 64, ("q", "float32|Float")), (torch.bfloat16, 96, ("head_dim",))):
        q, k, v = attention_inputs([20], 24, 1, 2, 4, D, dtype, gen)
        kv = ints([20], CUDA)
        args = (q, k, v, kv) if op == "dense_attention" else (q, k, v, ints([[[1, 2]], [[3, -1]]], CUDA).view(1, 2, 2), ints([5], CUDA), kv)
        with pytest.raises(RuntimeError) as info:
            getattr(torch.ops.std, op)(*args, 0.1)
        assert op in str(info.value) and all(any(n in str(info.value) for n in name.split("|")) for name in names)


def test_misaligned_views(gen):
    """Cache and query views whose rows do not start on 16 bytes still give the right answer."""
    big = torch.randn(1, 2, 70, 64 * 2 + 1, generator=gen).to(torch.float16).to(CUDA)
    k = big[..., 1 : 1 + 64]
    v = big[..., 65 : 65 + 64]
    q = torch.randn(1, 4, 8, 64 + 3, generator=gen).to(torch.float16).to(CUDA)[..., 3:]
    kv = ints([70], CUDA)
    out = std_ext.ops.dense_attention(q, k, v, kv)
    assert_attention_output(out, q, dense_attention_ref(q, k, v, kv, 64**-0.5))


def test_contiguous_cache_at_an_odd_offset(gen):
    """A contiguous cache whose storage starts 2 bytes past a 16-byte boundary."""
    B, H, S, D = 2, 2, 50, 128
    buf = torch.randn(1 + 2 * B * H * S * D, generator=gen).to(torch.bfloat16).to(CUDA)
    k = buf[1 : 1 + B * H * S * D].view(B, H, S, D)
    v = buf[1 + B * H * S * D :].view(B, H, S, D)
    assert k.is_contiguous() and k.data_ptr() % 16 != 0
    q = make_q(B, 3, 8, D, torch.bfloat16, CUDA, gen)
    kv = ints([50, 20], CUDA)
    assert_attention_output(std_ext.ops.dense_attention(q, k, v, kv), q, dense_attention_ref(q, k, v, kv, D**-0.5))
    idx, ts = make_indices([30, 10], H, 8, gen, CUDA), ints([30, 10], CUDA)
    out = std_ext.ops.sparse_attention(q, k, v, idx, ts, kv)
    assert_attention_output(out, q, sparse_attention_ref(q, k, v, idx, ts, kv, D**-0.5))


def test_strided_integer_tensors(gen):
    """kv_len / tail_start broadcast with stride 0 and indices strided in their last dim
    mean the same as their contiguous copies."""
    q, k, v = attention_inputs([40] * 4, 48, 2, 2, 4, 64, torch.float16, gen)
    kv = ints([40], CUDA).expand(4)
    ts = ints([30], CUDA).expand(4)
    wide = torch.full((4, 2, 6, 2), -7, dtype=torch.int32, device=CUDA)
    wide[..., 0] = make_indices([30] * 4, 2, 6, gen, CUDA)
    idx = wide[..., 0]
    assert kv.stride(0) == 0 and idx.stride(2) == 2
    dense = std_ext.ops.dense_attention(q, k, v, kv)
    assert torch.equal(dense, std_ext.ops.dense_attention(q, k, v, kv.contiguous()))
    assert_attention_output(dense, q, dense_attention_ref(q, k, v, kv, 64**-0.5))
    sparse = std_ext.ops.sparse_attention(q, k, v, idx, ts, kv)
    assert torch.equal(sparse, std_ext.ops.sparse_attention(q, k, v, idx.contiguous(), ts.contiguous(), kv.contiguous()))
    assert_attention_output(sparse, q, sparse_attention_ref(q, k, v, idx, ts, kv, 64**-0.5))


def test_runs_on_the_current_stream(gen):
    q, k, v = attention_inputs([4000, 1200], 4096, 10, 2, 7, 128, torch.bfloat16, gen)
    kv = ints([4000, 1200], CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = std_ext.ops.dense_attention(q, k, v, kv)
    torch.cuda.current_stream().wait_stream(side)
    assert_attention_output(out, q, dense_attention_ref(q, k, v, kv, 128**-0.5))


def test_cuda_graph_capture_and_replay(gen):
    """No host sync inside the ops: a graph captures both, and replays follow new lengths."""
    kv_len, tail = [3000, 800], [2500, 700]
    q, k, v = attention_inputs([3100, 3100], 3100, 10, 2, 7, 128, torch.bfloat16, gen)
    kv, ts = ints(kv_len, CUDA), ints(tail, CUDA)
    idx = make_indices(tail, 2, 1024, gen, CUDA)
    for _ in range(2):  # warm up (allocations, attributes) outside the capture
        std_ext.ops.dense_attention(q, k, v, kv)
        std_ext.ops.sparse_attention(q, k, v, idx, ts, kv)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dense = std_ext.ops.dense_attention(q, k, v, kv)
        sparse = std_ext.ops.sparse_attention(q, k, v, idx, ts, kv)
    for lens in ([3000, 800], [3050, 1000]):
        kv.copy_(ints(lens, CUDA))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(dense, std_ext.ops.dense_attention(q, k, v, kv))
        assert torch.equal(sparse, std_ext.ops.sparse_attention(q, k, v, idx, ts, kv))
        assert rel_err(dense, dense_attention_ref(q, k, v, kv, 128**-0.5)) < ATTN_TOL[torch.bfloat16]


# ----------------------------------------------------------------------------- split plan, bit for bit


@contextlib.contextmanager
def decode_layout(value):
    old = os.environ.get("STD_EXT_DECODE_LAYOUT")
    os.environ["STD_EXT_DECODE_LAYOUT"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["STD_EXT_DECODE_LAYOUT"]
        else:
            os.environ["STD_EXT_DECODE_LAYOUT"] = old


@pytest.mark.parametrize("op", ["dense_attention", "sparse_attention"])
@pytest.mark.parametrize("Qn", [1, 10])
@pytest.mark.parametrize("capacity", [200, 4096 - 7, 4096, 8192 + 63, 40000])  # 40000: left out of memcheck
def test_capacity_change_of_up_to_13_is_bitwise_invisible(gen, op, Qn, capacity):
    """Vanilla decoding allocates γ+1 fewer cache positions than StD: views of one buffer
    with capacities C .. C + 13 give the same bits (the split plan ignores the capacity)."""
    kv_len = [capacity - 3, min(capacity, 150)]
    big_k, big_v = big_cache(2, 2, capacity + 13, 128, torch.bfloat16, 11), big_cache(2, 2, capacity + 13, 128,
                                                                                     torch.bfloat16, 12)
    q = big_cache(2, Qn, 14, 128, torch.bfloat16, 13)
    kv = ints(kv_len, CUDA)
    extra = ()
    if op == "sparse_attention":
        tail = [n - 100 for n in kv_len]
        extra = (make_indices(tail, 2, 1024, gen, CUDA), ints(tail, CUDA))
    outs = []
    for delta in (0, 1, 10, 13):
        k, v = big_k[:, :, : capacity + delta], big_v[:, :, : capacity + delta]
        outs.append(getattr(std_ext.ops, op)(q, k, v, *extra, kv))
    for delta, out in zip((1, 10, 13), outs[1:]):
        assert torch.equal(out, outs[0]), f"capacity + {delta} changes the output"


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Qn, G", [(1, 1), (1, 4), (1, 7), (1, 8), (1, 16), (2, 8)])
@pytest.mark.parametrize("op", ["dense_attention", "sparse_attention"])
def test_warp_layouts_agree_bitwise(gen, op, Qn, G, D, dtype):
    """Up to 16 rows the keys layout (4 warps share the tile's keys) runs by default; the rows
    layout (one math warp) computes every row in the same order, so the bits are equal."""
    kv_len = [5000, 70, Qn]  # 79 tiles: most splits take two
    q, k, v = attention_inputs(kv_len, 5010, Qn, 2, G, D, dtype, gen)
    args = (q, k, v)
    if op == "sparse_attention":
        tail = [4000, 10, 0]
        args += (make_indices(tail, 2, 700, gen, CUDA), ints(tail, CUDA))
    args += (ints(kv_len, CUDA),)
    with decode_layout("keys"):
        keys = getattr(std_ext.ops, op)(*args)
    with decode_layout("rows"):
        rows = getattr(std_ext.ops, op)(*args)
    assert torch.equal(keys, rows), f"layouts differ: max |diff| {(keys.float() - rows.float()).abs().max():.3g}"
    ref = dense_attention_ref(*args, D**-0.5) if op == "dense_attention" else sparse_attention_ref(*args, D**-0.5)
    assert_attention_output(keys, q, ref)


def test_bad_layout_variable_is_named(gen, monkeypatch):
    q, k, v = attention_inputs([20], 24, 1, 2, 4, 64, torch.float16, gen)
    monkeypatch.setenv("STD_EXT_DECODE_LAYOUT", "diagonal")
    with pytest.raises(RuntimeError, match="STD_EXT_DECODE_LAYOUT"):
        std_ext.ops.dense_attention(q, k, v, ints([20], CUDA))


@pytest.mark.parametrize("Qn", [1, 10])
def test_merge_of_256_splits(Qn):
    """One sequence, one KV head: 256 splits (the most) at 40K positions, merged at once."""
    S = 40000
    k, v = big_cache(1, 1, S, 128, torch.bfloat16, 21), big_cache(1, 1, S, 128, torch.bfloat16, 22)
    q = big_cache(1, Qn, 8, 128, torch.bfloat16, 23)
    kv = ints([S - 5], CUDA)
    out = std_ext.ops.dense_attention(q, k, v, kv, scale=2.0 * 128**-0.5)
    assert_attention_output(out, q, dense_ref_gpu(q, k, v, kv, 2.0 * 128**-0.5))


@pytest.mark.parametrize("tail", [1, 64, 1000, 5000])
def test_sparse_long_draft_tails(tail):
    """Tails of up to 5000 generated positions (their tiles spread over the splits)."""
    keep, context = 1024, 20000
    S = context + tail + 10
    k, v = big_cache(2, 4, S, 128, torch.bfloat16, 31), big_cache(2, 4, S, 128, torch.bfloat16, 32)
    g = torch.Generator(device=CUDA).manual_seed(33)
    idx = torch.stack([torch.randperm(context, generator=g, device=CUDA)[:keep].sort().values for _ in range(8)])
    q = big_cache(2, 1, 28, 128, torch.bfloat16, 34)
    args = (q, k, v, idx.view(2, 4, keep).to(torch.int32), ints([context, context], CUDA),
            ints([context + tail, context + tail // 2], CUDA))
    out = std_ext.ops.sparse_attention(*args, scale=128**-0.5)
    assert_attention_output(out, q, sparse_ref_gpu(*args, 128**-0.5))
