"""attention_scores vs the float64 reference."""

import pytest
import torch
from conftest import (
    CTX_CASES,
    FLOAT_DTYPES,
    SCORES_TOL,
    ctx_lengths,
    work_dtype,
    ints,
    make_cache,
    make_q,
    rel_err,
)
from reference import attention_scores_ref

import std_ext

pytestmark = pytest.mark.std_ops("attention_scores")
HKV = 2


def make_q_pos(lengths, T, gen):
    """q_pos rows with positions in [0, L_b - 1]. Row b % 3 == 0: the last positions,
    left-padded with two -1 (T >= 3); 1: the last min(T, L) positions (T == 1: padding
    only, an all-zero output row); 2: random unsorted positions, -1 in the middle."""
    rows = []
    for b, L in enumerate(lengths):
        pattern = b % 3
        if pattern == 2:
            row = torch.randint(0, L, (T,), generator=gen).tolist()
            if T >= 3:
                row[T // 2] = -1
        elif pattern == 1 and T == 1:
            row = [-1]
        else:
            n = min(T - (2 if pattern == 0 and T >= 3 else 0), L)
            row = [-1] * (T - n) + list(range(L - n, L))
        rows.append(row)
    return rows


def scores_inputs(q_pos_rows, S, G, D, dtype, device, gen):
    B, T = len(q_pos_rows), len(q_pos_rows[0])
    seen = [max(row) + 1 for row in q_pos_rows]  # keys past the last queried position are garbage
    q = make_q(B, T, HKV * G, D, dtype, device, gen)
    k = make_cache(B, HKV, S, D, seen, dtype, device, gen)
    return q, k, ints(q_pos_rows, device)


def check(q, k, q_pos, scale):
    out = std_ext.ops.attention_scores(q, k, q_pos, scale=scale)
    ref = attention_scores_ref(q, k, q_pos, scale)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.device == k.device
    assert out.is_contiguous()
    assert not out.isnan().any(), "output has NaN (poisoned slot read?)"
    assert not out.cpu()[ref == 0].any(), "keys no valid query sees must score exactly 0"
    err = rel_err(out, ref)
    assert err < SCORES_TOL[out.device.type], f"relative error {err:.3g}"
    return out


@pytest.mark.parametrize("T", [1, 10])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("ctx", CTX_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_scores_match_reference(device, gen, dtype, ctx, G, D, T):
    lengths, S = ctx_lengths(ctx, T)
    q, k, q_pos = scores_inputs(make_q_pos(lengths, T, gen), S, G, D, dtype, device, gen)
    check(q, k, q_pos, 1.3 * D**-0.5)


@pytest.mark.parametrize("T", [1, 4])
def test_scores_all_padding_is_zero(device, gen, T):
    q, k, q_pos = scores_inputs([[-1] * T, [-1] * T], 16, 4, 64, work_dtype(device), device, gen)
    out = check(q, k, q_pos, 0.125)
    assert not out.any()


def test_scores_duplicate_positions_and_last_slot(device, gen):
    """Repeated q_pos values count once each; q_pos == S - 1 sees the whole cache."""
    rows = [[19, 19, 3, -1, 19], [0, 0, -1, -1, 19]]
    q, k, q_pos = scores_inputs(rows, 20, 7, 128, torch.bfloat16, device, gen)
    check(q, k, q_pos, 0.09)


def test_scores_rows_sum_to_one(device, gen):
    """Each valid (t, j) contributes a distribution, so every row with a valid query sums to 1."""
    rows = [[5, 30, -1], [-1, -1, -1], [12, -1, 0]]
    q, k, q_pos = scores_inputs(rows, 31, 4, 64, torch.float16, device, gen)
    out = check(q, k, q_pos, 0.2).cpu().double().sum(-1)
    torch.testing.assert_close(out, torch.tensor([[1.0] * HKV, [0.0] * HKV, [1.0] * HKV], dtype=torch.float64))


def test_scores_default_scale_and_reexport(device, gen):
    q, k, q_pos = scores_inputs([[8, 9, -1], [2, -1, 4]], 12, 4, 128, work_dtype(device), device, gen)
    assert std_ext.attention_scores is std_ext.ops.attention_scores
    out = std_ext.attention_scores(q, k, q_pos)
    assert torch.equal(out, torch.ops.std.attention_scores(q, k, q_pos, 128**-0.5))
    check(q, k, q_pos, 128**-0.5)
