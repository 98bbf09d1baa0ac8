"""attention_scores' CUDA kernel (kernels/attention_scores.cuh) against a float64 reference,
on two backends (the conftest `kernels` fixture): "cuda" on a GPU (skips without one), and
"emulated", the same kernel and glue run by the CPU emulator of the SIMT machine, at small
shapes (`kernels.pick`) and on a subset of the big grid (the rest skip as GPU-only there).

The kernel computes fp32 logits from bf16/fp16 inputs, so the bound is a relative error
(||out - ref|| / ||ref||) of 1e-3. The float64 reference of python_tests/reference.py
loops in Python over every (sequence, head, query), too slow for thousands of rows or
256K keys; `scores_ref_gpu` computes the same definition with chunked float64 matmuls on
the GPU and is itself checked against reference.py first.

Covered: head_dim 64 / 128, group sizes 1, 4, 6, 7, 8 (Qwen2-7B's 7 included), T from 1
to 512 (up to 4096 rows per KV head), a ragged batch of 3 (positions near the end of a
full cache, random unsorted positions of a shorter sequence, -1 padding in the middle and
at the end, a sequence of padding only), keys nobody sees scoring exactly 0, transposed q
and caches that are views into bigger NaN-filled buffers (conftest builders: any slot
the kernel must not read is NaN), large logits, 256K keys, out-of-range positions, CUDA
graph capture (GPU only), padding queries holding NaN / inf, determinism, and the dtype /
head_dim errors. The conftest autouse fixture
fills fresh allocations with NaN, so an output element (or scratch word) the kernel
forgets to write shows.
"""

import os

import pytest
import torch
from conftest import POISON, KernelBackend, assert_raises_naming, ints, make_cache, make_q, rel_err, requires_cuda
from reference import attention_scores_ref

import std_ext

pytestmark = pytest.mark.std_ops("attention_scores")

TOL = 1e-3
HKV = 2


# ----------------------------------------------------------------------------- reference


def scores_ref_gpu(q, k_cache, q_pos, scale, key_chunk=8192):
    """float64 [B, Hkv, S] on q's device: the definition of reference.attention_scores_ref
    (rows = (valid query, head of the group), softmax over keys 0..pos, mean over rows),
    as two passes of chunked float64 matmuls: log-sum-exp per row, then probabilities.
    Positions >= S are clamped to S - 1 and positions < 0 are padding, like the kernel."""
    B, T, Hq, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    G = Hq // Hkv
    out = torch.zeros(B, Hkv, S, dtype=torch.float64, device=q.device)
    pos_host = q_pos.to("cpu", torch.int64)
    for b in range(B):
        valid = (pos_host[b] >= 0).nonzero().flatten()
        if valid.numel() == 0:
            continue
        pos = pos_host[b, valid].clamp(max=S - 1)
        seen = int(pos.max()) + 1
        row_pos = pos.repeat_interleave(G).to(q.device)  # rows (t, j), t-major
        # [Hkv, rows, D]: the G heads of KV head h for every valid query
        qb = q[b, valid.to(q.device)].to(torch.float64).reshape(len(valid), Hkv, G, D)
        qb = qb.permute(1, 0, 2, 3).reshape(Hkv, -1, D)
        kb = k_cache[b, :, :seen].to(torch.float64)  # only keys someone sees: the rest may be NaN

        def chunk_logits(s0, s1):
            logits = scale * torch.bmm(qb, kb[:, s0:s1].transpose(1, 2))
            visible = torch.arange(s0, s1, device=q.device)[None, :] <= row_pos[:, None]
            return torch.where(visible[None], logits, float("-inf"))

        lse = torch.full(qb.shape[:2], float("-inf"), dtype=torch.float64, device=q.device)
        for s0 in range(0, seen, key_chunk):
            lse = torch.logaddexp(lse, torch.logsumexp(chunk_logits(s0, min(seen, s0 + key_chunk)), dim=-1))
        for s0 in range(0, seen, key_chunk):
            s1 = min(seen, s0 + key_chunk)
            out[b, :, s0:s1] = torch.exp(chunk_logits(s0, s1) - lse[..., None]).sum(dim=1)
        out[b] /= qb.shape[1]
    return out


def last_seen(q_pos_rows, S):
    """Per sequence: the last key some valid query sees (-1: none)."""
    return [max([-1] + [min(p, S - 1) for p in row if p >= 0]) for row in q_pos_rows]


def check(kernels, q, k, q_pos, scale, ref=None):
    """Runs the op; checks layout, NaN-freedom, exact zeros where nobody looks, and the
    relative error. Returns the output."""
    out = kernels.ops.attention_scores(q, k, q_pos, scale=scale)
    B, _, S = out.shape
    assert out.shape == (k.shape[0], k.shape[1], k.shape[2]) and out.dtype == torch.float32
    assert out.device == k.device and out.is_contiguous()
    assert not out.isnan().any(), "output has NaN (poisoned slot read, or an element never written?)"
    for b, last in enumerate(last_seen(q_pos.tolist(), S)):
        unseen = out[b, :, last + 1 :]
        assert torch.equal(unseen, torch.zeros_like(unseen)), f"sequence {b}: keys past {last} must score exactly 0"
    if ref is None:
        ref = scores_ref_gpu(q, k, q_pos, scale)
    err = rel_err(out, ref)
    assert err < TOL, f"relative error {err:.3g} >= {TOL:g}"
    return out


# ----------------------------------------------------------------------------- inputs


def ragged_positions(T, lengths, gen):
    """q_pos rows for a batch of 3 of lengths L0 > L1 (and a third of padding only):
    sequence 0 holds the last T positions of L0 with -1 in the middle and at the end;
    sequence 1 random unsorted positions below L1 with -1 first and last; sequence 2 -1."""
    L0, L1 = lengths
    row0 = list(range(L0 - T, L0))
    row1 = torch.randint(0, L1, (T,), generator=gen).tolist()
    if T >= 3:
        row0[T // 2] = -1
        row0[-1] = -1
        row1[0] = -1
        row1[-1] = -1
    return [row0, row1, [-1] * T]


def scores_inputs(device, q_pos_rows, S, G, D, dtype, gen, strided=True):
    B, T = len(q_pos_rows), len(q_pos_rows[0])
    seen = [last + 1 for last in last_seen(q_pos_rows, S)]  # slots past it hold NaN
    q = make_q(B, T, HKV * G, D, dtype, device, gen, strided)
    k = make_cache(B, HKV, S, D, seen, dtype, device, gen, strided)
    return q, k, ints(q_pos_rows, device)


# ----------------------------------------------------------------------------- tests


def test_gpu_reference_matches_reference_py(kernels, gen):
    """The chunked float64 helper agrees with reference.py (which the CPU tests use)."""
    rows = [[40, -1, 7, 41, -1], [-1, -1, -1, -1, -1], [3, 3, 0, -1, 12]]
    q, k, q_pos = scores_inputs(kernels.device, rows, 45, 3, 64, torch.bfloat16, gen)
    ref = attention_scores_ref(q, k, q_pos, 0.3)
    got = scores_ref_gpu(q, k, q_pos, 0.3, key_chunk=16).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.emulator_subset(T=(1, 16, 64), G=(1, 7))
@pytest.mark.parametrize("T", [1, 16, 64, 256, 512])
@pytest.mark.parametrize("G", [1, 4, 6, 7, 8])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(kernels, gen, dtype, D, G, T):
    # S above 2 * 2048 (emulated: above 2048): pass 1 splits the keys in several chunks;
    # S % 128 != 0: partial tiles.
    S = kernels.pick(cuda=4200, emulated=2600) + 37
    rows = ragged_positions(T, (S, kernels.pick(cuda=1900, emulated=1200)), gen)
    q, k, q_pos = scores_inputs(kernels.device, rows, S, G, D, dtype, gen)
    out = check(kernels, q, k, q_pos, 1.3 * D**-0.5)
    assert torch.equal(out[2], torch.zeros_like(out[2])), "a sequence of padding only scores 0"


@pytest.mark.parametrize("D", [64, 128])
def test_matches_reference_py_directly(kernels, gen, D):
    """A small ragged case against reference.py itself (rows of 1 and 2 valid queries)."""
    rows = [[19, 19, 3, -1, 19], [0, -1, -1, -1, -1], [-1, 7, -1, -1, -1]]
    q, k, q_pos = scores_inputs(kernels.device, rows, 20, 7, D, torch.bfloat16, gen)
    check(kernels, q, k, q_pos, 0.09, ref=attention_scores_ref(q, k, q_pos, 0.09))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_padding_queries_may_hold_nan_and_inf(kernels, gen, dtype):
    """Padding queries (q_pos = -1: in the middle, at the end, a whole sequence) hold NaN,
    +inf and -inf in q: nothing of them reaches the output (masked rows are selected away)."""
    rows = ragged_positions(20, (300, 120), gen)
    q, k, q_pos = scores_inputs(kernels.device, rows, 300, 4, 64, dtype, gen)
    garbage = (float("nan"), float("inf"), -float("inf"))
    for b, row in enumerate(rows):
        for t, pos in enumerate(row):
            if pos < 0:
                q[b, t] = garbage[(b + t) % 3]
    check(kernels, q, k, q_pos, 0.2, ref=attention_scores_ref(q, k, q_pos, 0.2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_large_logits(kernels, gen, dtype, D):
    """scale 40 / sqrt(D): logits of a few hundred; the softmax is nearly one-hot per row."""
    S = kernels.pick(cuda=3000, emulated=1000)
    rows = ragged_positions(64, (S, S // 3), gen)
    q, k, q_pos = scores_inputs(kernels.device, rows, S, 7, D, dtype, gen)
    check(kernels, q, k, q_pos, 40 * D**-0.5)


def test_contiguous_inputs(kernels, gen):
    rows = ragged_positions(16, (700, 333), gen)
    q, k, q_pos = scores_inputs(kernels.device, rows, 700, 4, 128, torch.bfloat16, gen, strided=False)
    check(kernels, q, k, q_pos, 128**-0.5)


def test_misaligned_views(kernels, gen):
    """Rows that are not 16-byte aligned (views at an odd element offset, odd strides)
    take the kernel's copy path."""
    B, T, G, D, S = 2, 8, 4, 64, 300
    dev = kernels.device
    rows = [[290 + t for t in range(T)], [-1] + [100 + t for t in range(T - 1)]]
    q = torch.randn(B, HKV * G, T, D + 1, generator=gen).to(dev, torch.bfloat16)[..., 1:].transpose(1, 2)
    k = torch.randn(B, HKV, S, D + 3, generator=gen).to(dev, torch.bfloat16)[..., 3:]
    assert q.data_ptr() % 16 != 0 and k.data_ptr() % 16 != 0
    check(kernels, q, k, ints(rows, dev), 0.1)


def test_one_query_one_head(kernels, gen):
    """A single row per KV head (T = 1, G = 1): each output row is one softmax."""
    q, k, q_pos = scores_inputs(kernels.device, [[4095], [130]], 4096, 1, 128, torch.bfloat16, gen)
    out = check(kernels, q, k, q_pos, 128**-0.5)
    sums = out.double().sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=1e-4, atol=0)


def test_long_context_256k(kernels, gen):
    """S = 256K (emulated: 8K), T = 32, Qwen2-7B's group of 7: the full output against the
    float64 reference; sequence 1 stops at 100K (emulated 3K), so most of its keys score
    exactly 0."""
    B, T, G, D = 2, 32, 7, 128
    S, stop = kernels.pick(cuda=(256 * 1024, 100_000), emulated=(8192, 3000))
    dev = kernels.device
    lengths = [S, stop]
    rows = [list(range(S - T, S)), list(range(lengths[1] - T, lengths[1]))]
    rows[1][5] = -1
    q = make_q(B, T, HKV * G, D, torch.bfloat16, dev, gen)
    # Built where the tensors live (a CPU-built 256K cache would dominate a GPU test's time):
    # a view into a bigger NaN buffer, NaN past each sequence's last position.
    big = torch.full((B, HKV + 1, S + 5, D + 8), POISON, dtype=torch.bfloat16, device=dev)
    k = big[:, 1:, 2 : 2 + S, :D]
    for b, n in enumerate(lengths):
        k[b, :, :n] = torch.randn(HKV, n, D, device=dev).to(torch.bfloat16)
    check(kernels, q, k, ints(rows, dev), D**-0.5)


def test_positions_out_of_range_are_clamped(kernels, gen, monkeypatch):
    """Without STD_EXT_DEBUG, q_pos >= S reads as S - 1 and q_pos < -1 as padding (no
    out-of-bounds access); with STD_EXT_DEBUG=1 the value check names q_pos."""
    S, dev = 500, kernels.device
    rows = [[S + 7, 2**31 - 1, 100, -5], [-2, 30, -1, 499]]
    q, k, q_pos = scores_inputs(dev, [[S - 1, S - 1, 100, -1], [-1, 30, -1, 499]], S, 4, 64, torch.bfloat16, gen)
    monkeypatch.delenv("STD_EXT_DEBUG", raising=False)
    out = kernels.ops.attention_scores(q, k, ints(rows, dev), scale=0.2)
    clamped = kernels.ops.attention_scores(q, k, q_pos, scale=0.2)
    assert torch.equal(out, clamped)
    check(kernels, q, k, q_pos, 0.2)
    monkeypatch.setenv("STD_EXT_DEBUG", "1")
    assert_raises_naming(lambda: kernels.ops.attention_scores(q, k, ints(rows, dev), scale=0.2),
                         "attention_scores", "q_pos")


def test_deterministic(kernels, gen):
    S = kernels.pick(cuda=3000, emulated=1000)
    rows = ragged_positions(64, (S, S * 2 // 5), gen)
    q, k, q_pos = scores_inputs(kernels.device, rows, S, 7, 128, torch.bfloat16, gen)
    first = kernels.ops.attention_scores(q, k, q_pos, scale=0.1)
    for _ in range(3):
        assert torch.equal(kernels.ops.attention_scores(q, k, q_pos, scale=0.1), first)


@requires_cuda
def test_cuda_graph_capture(gen, monkeypatch):
    """No host synchronization: the op captures into a CUDA graph and replays with new
    inputs (copied into the captured buffers)."""
    monkeypatch.delenv("STD_EXT_DEBUG", raising=False)
    rows = ragged_positions(16, (2500, 900), gen)
    q, k, q_pos = scores_inputs("cuda", rows, 2500, 4, 128, torch.bfloat16, gen)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, attributes)
        std_ext.ops.attention_scores(q, k, q_pos, scale=0.1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = std_ext.ops.attention_scores(q, k, q_pos, scale=0.1)
    rows2 = ragged_positions(16, (2500, 1700), gen)
    q2, k2, q_pos2 = scores_inputs("cuda", rows2, 2500, 4, 128, torch.bfloat16, gen)
    q.copy_(q2)
    k.copy_(k2)
    q_pos.copy_(q_pos2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, std_ext.ops.attention_scores(q, k, q_pos, scale=0.1))
    check(KernelBackend("cuda", "cuda", std_ext.ops), q, k, q_pos, 0.1)


def test_float32_raises_naming_dtype(kernels):
    dev = kernels.device
    q = torch.randn(1, 2, 4, 64, device=dev)
    k = torch.randn(1, 2, 8, 64, device=dev)
    q_pos = ints([[3, 7]], dev)
    assert_raises_naming(lambda: kernels.ops.attention_scores(q, k, q_pos, scale=0.125), "attention_scores", "q",
                         "Float|float32")


def test_unsupported_head_dim_raises(kernels):
    dev = kernels.device
    q = torch.randn(1, 2, 4, 96, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 8, 96, device=dev, dtype=torch.bfloat16)
    q_pos = ints([[3, 7]], dev)
    assert_raises_naming(lambda: kernels.ops.attention_scores(q, k, q_pos, scale=0.125), "attention_scores",
                         "head_dim")


def test_empty_inputs(kernels):
    """T = 0: no query, every key scores 0 (the kernels are not launched)."""
    dev = kernels.device
    q = torch.randn(2, 0, 4, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 10, 64, device=dev, dtype=torch.bfloat16)
    out = kernels.ops.attention_scores(q, k, torch.zeros(2, 0, dtype=torch.int32, device=dev), scale=0.125)
    assert torch.equal(out, torch.zeros(2, 2, 10, device=dev))


if os.environ.get("STD_EXT_SCORES_PROFILE"):  # pragma: no cover - manual timing aid

    def test_profile_qwen2_shape(gen):
        """Times one Qwen2-7B layer (28 query heads, 4 KV heads, D 128) at T = 256, S = 128K."""
        B, T, Hq, Hkv, D, S = 1, 256, 28, 4, 128, 128 * 1024
        q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
        q_pos = torch.arange(S - T, S, device="cuda", dtype=torch.int32)[None]
        for _ in range(3):
            torch.ops.std.attention_scores(q, k, q_pos, D**-0.5)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            torch.ops.std.attention_scores(q, k, q_pos, D**-0.5)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 10
        flops = 2 * 2 * B * Hq * T * S * D  # two passes of q . k
        print(f"\nattention_scores T={T} S={S}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s (both passes)")
