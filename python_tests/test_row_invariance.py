"""CPU: a query's output does not depend on how many queries share the call.

Row i of a Qn = 10 call must equal, bitwise, a Qn = 1 call with the same query row at
the same position (kv_len - 9 + i as that call's kv_len). Verification (Qn = γ+1) then
reproduces plain decoding exactly, which the lossless decode tests rely on.
"""

import pytest
import torch
from conftest import FLOAT_DTYPES, ints, make_cache, make_indices, make_q, randint

import std_ext

QN, KV_LEN, S, HKV = 10, [130, 10, 37], 140, 2


def inputs(dtype, G, D, gen):
    q = make_q(len(KV_LEN), QN, HKV * G, D, dtype, "cpu", gen)
    k = make_cache(len(KV_LEN), HKV, S, D, KV_LEN, dtype, "cpu", gen)
    v = make_cache(len(KV_LEN), HKV, S, D, KV_LEN, dtype, "cpu", gen)
    return q, k, v


def single_row_kv_len(i):
    return ints([n - QN + 1 + i for n in KV_LEN], "cpu")


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 7])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dense_rows_match_single_query_calls(gen, dtype, G, D):
    q, k, v = inputs(dtype, G, D, gen)
    full = std_ext.ops.dense_attention(q, k, v, ints(KV_LEN, "cpu"))
    for i in range(QN):
        one = std_ext.ops.dense_attention(q[:, i : i + 1], k, v, single_row_kv_len(i))
        assert torch.equal(full[:, i : i + 1], one), f"row {i} differs"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dense_rows_match_across_the_cpu_chunk_boundaries(gen, dtype):
    """The CPU kernel splits keys into tasks of 1,024 positions: verify rows whose single-query
    calls end on either side of a chunk boundary (1,025 and 1,030 keys: rows from 1,016 to
    1,030) and a multi-chunk context still equal those calls bit for bit."""
    lens, G, D = [2100, 1030, 1025], 3, 64
    q = make_q(len(lens), QN, HKV * G, D, dtype, "cpu", gen)
    k = make_cache(len(lens), HKV, 2110, D, lens, dtype, "cpu", gen)
    v = make_cache(len(lens), HKV, 2110, D, lens, dtype, "cpu", gen)
    full = std_ext.ops.dense_attention(q, k, v, ints(lens, "cpu"))
    for i in range(QN):
        one = std_ext.ops.dense_attention(q[:, i : i + 1], k, v, ints([n - QN + 1 + i for n in lens], "cpu"))
        assert torch.equal(full[:, i : i + 1], one), f"row {i} differs"


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 7])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_sparse_rows_match_single_query_calls(gen, dtype, G, D):
    q, k, v = inputs(dtype, G, D, gen)
    # tail_start <= kv_len - 9 keeps every single-query call valid; sequence 2's tail starts
    # just past query 0 (query 0 sees only its indices)
    tail = [randint(0, n - QN + 1, gen) for n in KV_LEN[:2]] + [KV_LEN[2] - QN + 1]
    idx, ts = make_indices(tail, HKV, 16, gen, "cpu"), ints(tail, "cpu")
    full = std_ext.ops.sparse_attention(q, k, v, idx, ts, ints(KV_LEN, "cpu"))
    for i in range(QN):
        one = std_ext.ops.sparse_attention(q[:, i : i + 1], k, v, idx, ts, single_row_kv_len(i))
        assert torch.equal(full[:, i : i + 1], one), f"row {i} differs"
