"""Keep-set building blocks and policies (std_ext.selection) against plain-Python references."""

import pytest
import torch
from reference import topk_indices_ref

from std_ext import selection
from std_ext.selection import (
    REFRESH_BLOCK,
    SelectionInputs,
    indices_to_mask,
    make_policy,
    mask_to_indices,
    ragged_topk,
)


def _topk_reference(scores, candidates, k):
    """``topk_indices_ref`` row by row with k[b], -1 padded to max(k)."""
    width = int(max(k))
    rows = [topk_indices_ref(scores[b : b + 1], candidates[b : b + 1], int(k[b])) for b in range(len(k))]
    return torch.cat([torch.nn.functional.pad(row, (0, width - row.shape[-1]), value=-1) for row in rows])


@pytest.mark.parametrize("seed", range(4))
def test_ragged_topk_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, heads, size = 3, 2, 40
    scores = torch.randint(0, 6, (batch, heads, size), generator=gen).float()  # many ties
    candidates = torch.rand(batch, size, generator=gen) < 0.6
    k = torch.tensor([0, 5, 40])  # none, some, more than there are candidates
    k = torch.minimum(k, candidates.sum(1))
    got = ragged_topk(scores, candidates, k, int(k.max()))
    torch.testing.assert_close(got, _topk_reference(scores, candidates, k), rtol=0, atol=0)


def test_mask_indices_round_trip():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 50, generator=gen) < 0.3
    width = int(mask.sum(-1).max()) + 2
    indices = mask_to_indices(mask, width)
    for b in range(2):
        for h in range(3):
            expected = mask[b, h].nonzero().flatten().tolist()
            assert indices[b, h].tolist() == expected + [-1] * (width - len(expected))
    assert torch.equal(indices_to_mask(indices, 50), mask)


def _inputs(k, candidates, heads=2, seed=0, layer=0):
    gen = torch.Generator().manual_seed(seed)
    batch, size = candidates.shape
    q = torch.randn(batch, 3, heads * 2, 8, generator=gen)
    k_cache = torch.randn(batch, heads, size, 8, generator=gen)
    q_pos = torch.full((batch, 3), size - 1, dtype=torch.int32)
    k = torch.as_tensor(k)
    return SelectionInputs(layer=layer, queries=q, query_pos=q_pos, k_cache=k_cache, candidates=candidates,
                           k=k, k_max=int(k.max()), scale=8 ** -0.5, prompt_len=torch.full((batch,), size, dtype=torch.int32))


def test_recent_policy_keeps_sinks_and_most_recent():
    candidates = torch.zeros(2, 60, dtype=torch.bool)
    candidates[0, 10:50] = True
    candidates[1, 5:20] = True
    chosen = make_policy("recent").select(_inputs([10, 3], candidates))
    assert chosen[0, 0].tolist() == [10, 11, 12, 13] + list(range(44, 50))
    assert chosen[1, 1].tolist() == [5, 6, 7] + [-1] * 7  # fewer than 4 sinks: the first ones


def test_question_policy_is_topk_of_attention_scores():
    from reference import attention_scores_ref

    candidates = torch.zeros(1, 48, dtype=torch.bool)
    candidates[0, 4:40] = True
    inputs = _inputs([7], candidates)
    chosen = make_policy("question").select(inputs)
    scores = attention_scores_ref(inputs.queries, inputs.k_cache, inputs.query_pos, inputs.scale).float()
    torch.testing.assert_close(chosen, _topk_reference(scores, candidates, inputs.k), rtol=0, atol=0)


def test_refresh_policy_keeps_question_half_and_picks_aligned_blocks():
    size = 6 * REFRESH_BLOCK
    candidates = torch.zeros(1, size, dtype=torch.bool)
    candidates[0, 16 : size - 8] = True
    policy = make_policy("refresh")
    k = 4 * REFRESH_BLOCK  # half of it = 2 blocks re-chosen
    inputs = _inputs([k], candidates)
    first = policy.select(inputs)
    assert ((first >= 0).sum(-1) == k).all()
    gen = torch.Generator().manual_seed(1)
    verify_q = torch.randn(1, 4, 4, 8, generator=gen)
    verify_pos = torch.tensor([[size - 1, size - 1, -1, -1]], dtype=torch.int32)
    refreshed = policy.after_verify(0, verify_q, verify_pos, inputs.k_cache)
    question_half = policy._question_half[0]
    for h in range(2):
        kept = set(refreshed[0, h][refreshed[0, h] >= 0].tolist())
        half = set(question_half[0, h].nonzero().flatten().tolist())
        assert len(half) == k - 2 * REFRESH_BLOCK and half <= kept
        extra = kept - half
        blocks = {p // REFRESH_BLOCK for p in extra}
        assert 1 <= len(blocks) <= 2 and all(candidates[0, p] for p in kept)
        # every candidate of a chosen block is kept
        for block in blocks:
            span = range(block * REFRESH_BLOCK, (block + 1) * REFRESH_BLOCK)
            assert all(p in kept for p in span if candidates[0, p])


def test_callable_policy_is_checked():
    candidates = torch.zeros(1, 30, dtype=torch.bool)
    candidates[0, 5:25] = True
    inputs = _inputs([4], candidates)
    good = make_policy(lambda i: torch.tensor([[[5, 6, 7, 8]] * 2]))
    assert good.select(inputs).dtype == torch.int32
    with pytest.raises(ValueError, match="not candidates"):
        make_policy(lambda i: torch.tensor([[[1, 6, 7, 8]] * 2])).select(inputs)
    with pytest.raises(ValueError, match="must return"):
        make_policy(lambda i: torch.tensor([5, 6])).select(inputs)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("newest")
    with pytest.raises(TypeError, match="selection"):
        make_policy(3)
    assert isinstance(make_policy(selection.QuestionPolicy()), selection.QuestionPolicy)
