"""dense_attention vs the float64 reference."""

import pytest
import torch
from conftest import (
    CTX_CASES,
    FLOAT_DTYPES,
    assert_attention_output,
    ctx_lengths,
    ints,
    make_cache,
    make_q,
    work_dtype,
)
from reference import dense_attention_ref

import std_ext

pytestmark = pytest.mark.std_ops("dense_attention")
HKV = 2


def dense_inputs(B_lens, S, Qn, G, D, dtype, device, gen, strided=True):
    B = len(B_lens)
    q = make_q(B, Qn, HKV * G, D, dtype, device, gen, strided)
    k = make_cache(B, HKV, S, D, B_lens, dtype, device, gen, strided)
    v = make_cache(B, HKV, S, D, B_lens, dtype, device, gen, strided)
    return q, k, v, ints(B_lens, device)


@pytest.mark.parametrize("Qn", [1, 10])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("ctx", CTX_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dense_matches_reference(device, gen, dtype, ctx, G, D, Qn):
    kv_len, S = ctx_lengths(ctx, Qn)
    q, k, v, kv = dense_inputs(kv_len, S, Qn, G, D, dtype, device, gen)
    scale = 1.3 * D**-0.5
    out = std_ext.ops.dense_attention(q, k, v, kv, scale=scale)
    assert_attention_output(out, q, dense_attention_ref(q, k, v, kv, scale))


@pytest.mark.parametrize("Qn", [1, 10])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dense_long_contexts_split_into_chunks(gen, dtype, Qn):
    """Contexts past the CPU kernel's 1,024-position tasks (exactly one, one position over,
    several, and one shorter than a chunk in the same batch): the merged chunk states against
    the float64 reference, and the same bits on one thread as on several."""
    kv_len = [1024, 1025, 2 * 1024 + 300, Qn + 20]
    q, k, v, kv = dense_inputs(kv_len, max(kv_len) + 7, Qn, 3, 64, dtype, "cpu", gen)
    scale = 1.3 * 64**-0.5
    out = std_ext.ops.dense_attention(q, k, v, kv, scale=scale)
    assert_attention_output(out, q, dense_attention_ref(q, k, v, kv, scale))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = std_ext.ops.dense_attention(q, k, v, kv, scale=scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, alone)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dense_contiguous_inputs(device, gen, dtype):
    q, k, v, kv = dense_inputs([20, 7], 24, 7, 4, 64, dtype, device, gen, strided=False)
    out = torch.ops.std.dense_attention(q, k, v, kv, 0.125)
    assert_attention_output(out, q, dense_attention_ref(q, k, v, kv, 0.125))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dense_large_logits(device, gen, dtype):
    """Logits in the hundreds: softmax must subtract the max (no overflow / NaN)."""
    q, k, v, kv = dense_inputs([300, 41], 310, 10, 7, 128, dtype, device, gen)
    scale = 40.0 * 128**-0.5
    out = std_ext.ops.dense_attention(q, k, v, kv, scale=scale)
    assert_attention_output(out, q, dense_attention_ref(q, k, v, kv, scale))


def test_dense_default_scale_and_reexport(device, gen):
    q, k, v, kv = dense_inputs([33, 12], 40, 3, 4, 128, work_dtype(device), device, gen)
    assert std_ext.dense_attention is std_ext.ops.dense_attention
    out = std_ext.dense_attention(q, k, v, kv)
    assert torch.equal(out, torch.ops.std.dense_attention(q, k, v, kv, 128**-0.5))
    assert_attention_output(out, q, dense_attention_ref(q, k, v, kv, 128**-0.5))
