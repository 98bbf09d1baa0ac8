"""sparse_attention vs the float64 reference."""

import pytest
import torch
from conftest import (
    CTX_CASES,
    FLOAT_DTYPES,
    assert_attention_output,
    ctx_lengths,
    ints,
    make_cache,
    make_indices,
    make_q,
    randint,
    work_dtype,
)
from reference import sparse_attention_ref

import std_ext

pytestmark = pytest.mark.std_ops("sparse_attention")
HKV = 2


def ragged_tail_starts(kv_len, Qn, gen):
    """Sequence b % 3 == 0: tail covers every query; 1: empty tail (tail_start == kv_len);
    2: tail starts inside the query block (the first queries see only the indices)."""
    out = []
    for b, n in enumerate(kv_len):
        lo = [0, n, min(n - Qn + 1, n)][b % 3]
        hi = [n - Qn, n, n][b % 3]
        out.append(randint(lo, hi, gen))
    return out


def sparse_inputs(kv_len, S, Qn, G, D, N, tail_start, dtype, device, gen):
    B = len(kv_len)
    q = make_q(B, Qn, HKV * G, D, dtype, device, gen)
    k = make_cache(B, HKV, S, D, kv_len, dtype, device, gen)
    v = make_cache(B, HKV, S, D, kv_len, dtype, device, gen)
    idx = make_indices(tail_start, HKV, N, gen, device)
    return q, k, v, idx, ints(tail_start, device), ints(kv_len, device)


def check(args, scale):
    out = std_ext.ops.sparse_attention(*args, scale=scale)
    assert_attention_output(out, args[0], sparse_attention_ref(*args, scale))
    return out


@pytest.mark.parametrize("Qn", [1, 10])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("ctx", CTX_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_sparse_matches_reference(device, gen, dtype, ctx, G, D, Qn):
    kv_len, S = ctx_lengths(ctx, Qn)
    tail = ragged_tail_starts(kv_len, Qn, gen)
    check(sparse_inputs(kv_len, S, Qn, G, D, 24, tail, dtype, device, gen), 1.3 * D**-0.5)


KV, S = [50, 23], 60


def special_case(name, Qn):
    """(N, tail_start, indices-or-None) for the edge cases; None = random make_indices."""
    if name == "all_minus_one":
        return 8, [40, 23 - Qn], torch.full((2, HKV, 8), -1, dtype=torch.int32)
    if name == "n_zero":
        return 0, [30, 23 - Qn], None
    if name == "empty_tail":  # tail_start == kv_len; indices can lie past a query's position
        return 24, KV, None
    if name == "nothing_attended":  # every output row must be zero
        return 8, KV, torch.full((2, HKV, 8), -1, dtype=torch.int32)
    if name == "tail_zero":  # no indices possible: same as dense
        return 4, [0, 0], None
    if name == "full_indices":  # every position below tail_start, no padding
        ts = [20, 13 - Qn]
        idx = torch.tensor([[list(range(ts[0]))] * HKV, [list(range(ts[1])) + [-1] * (ts[0] - ts[1])] * HKV])
        return ts[0], ts, idx.to(torch.int32)
    if name == "gaps":  # every 3rd / 5th position, then padding
        idx = torch.full((2, HKV, 16), -1, dtype=torch.int32)
        idx[0, 0, :10], idx[0, 1, :8] = torch.arange(0, 30, 3), torch.arange(1, 40, 5)
        idx[1, 0, :3], idx[1, 1, :1] = torch.tensor([0, 5, 11]), torch.tensor([7])
        return 16, [45, 12], idx
    if name == "tail_inside_queries":
        return 16, [50 - Qn // 2, 23 - Qn // 2], None
    raise ValueError(name)


SPECIAL = ["all_minus_one", "n_zero", "empty_tail", "nothing_attended", "tail_zero", "full_indices", "gaps",
           "tail_inside_queries"]


@pytest.mark.parametrize("Qn", [1, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SPECIAL)
def test_sparse_edge_cases(device, gen, case, dtype, Qn):
    N, tail, idx = special_case(case, Qn)
    q, k, v, rnd_idx, ts, kv = sparse_inputs(KV, S, Qn, 4, 64, N, tail, dtype, device, gen)
    out = check((q, k, v, rnd_idx if idx is None else idx.to(device), ts, kv), 0.125)
    if case == "nothing_attended":
        assert not out.any()


def test_sparse_default_scale_and_reexport(device, gen):
    args = sparse_inputs([33, 12], 40, 3, 4, 128, 8, [20, 5], work_dtype(device), device, gen)
    assert std_ext.sparse_attention is std_ext.ops.sparse_attention
    out = std_ext.sparse_attention(*args)
    assert torch.equal(out, torch.ops.std.sparse_attention(*args, 128**-0.5))
    assert_attention_output(out, args[0], sparse_attention_ref(*args, 128**-0.5))
