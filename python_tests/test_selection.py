"""Keep-set building blocks and policies (std_ext.selection) against plain-Python references."""

import pytest
import torch
from reference import topk_indices_ref
from test_generate import assert_same_tokens, candidate_mask_of, hf_generate, model_of, new_tokens, row_inputs
from test_steps import counting_host_reads
from tiny_models import make_inputs

import std_ext
from std_ext import selection
from std_ext.generate import _Decoder
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


# --------------------------------------------------------------------------- "follow"


def _group_softmax_ref(query, keys, scale):
    """float64: mean over query heads of each KV head's group of softmax(scale q.k) over ``keys``.

    query ``[H_q, D]``, keys ``[H_kv, M, D]`` → ``[H_kv, M]``.
    """
    heads = keys.shape[0]
    group = query.shape[0] // heads
    out = torch.zeros(keys.shape[:2], dtype=torch.float64)
    for h in range(heads):
        for j in range(group):
            logits = scale * keys[h].double() @ query[h * group + j].double()
            out[h] += torch.softmax(logits, 0) / group
    return out


def test_superset_scores_match_reference():
    gen = torch.Generator().manual_seed(3)
    batch, heads, size, dim = 2, 2, 30, 8
    k_cache = torch.randn(batch, heads, size, dim, generator=gen)
    queries = torch.randn(batch, 2, heads * 3, dim, generator=gen)
    valid = torch.tensor([[True, False], [True, True]])
    superset = torch.tensor([[[1, 4, 9, -1], [0, 2, -1, -1]], [[3, 5, 7, 29], [6, 8, 10, 12]]], dtype=torch.int32)
    got = selection.superset_scores(queries, valid, k_cache, superset, 0.3)
    for b in range(batch):
        for h in range(heads):
            slots = [i for i, p in enumerate(superset[b, h].tolist()) if p >= 0]
            keys = k_cache[b, h, superset[b, h, slots].long()][None]  # [1, M, D]
            rows = [q for q in range(2) if valid[b, q]]
            expected = sum(_group_softmax_ref(queries[b, q, h * 3 : (h + 1) * 3], keys, 0.3)[0] for q in rows) / len(rows)
            torch.testing.assert_close(got[b, h, slots].double(), expected, rtol=1e-5, atol=1e-7)
            assert (got[b, h, [i for i in range(4) if i not in slots]] == 0).all()


def test_follow_keeps_the_draft_querys_top_k_inside_the_question_superset():
    candidates = torch.zeros(2, 64, dtype=torch.bool)
    candidates[0, 4:60] = True
    candidates[1, 10:30] = True  # 20 candidates: the superset is all of them
    inputs = _inputs([6, 6], candidates)
    policy = selection.FollowPolicy(ratio=3, page=0)
    first = policy.select(inputs)
    torch.testing.assert_close(first, make_policy("question").select(inputs), rtol=0, atol=0)
    superset = policy._superset[0]
    assert ((superset >= 0).sum(-1) == torch.tensor([[18, 18], [18, 18]])).all()
    question18 = ragged_topk(selection.ops.attention_scores(inputs.queries, inputs.k_cache, inputs.query_pos,
                                                            inputs.scale), candidates, torch.tensor([18, 18]), 18)
    torch.testing.assert_close(superset, question18, rtol=0, atol=0)  # the question's top 3k
    gen = torch.Generator().manual_seed(9)
    query = torch.randn(2, 1, 4, 8, generator=gen)
    chosen = policy.draft_keep(0, query, inputs.k_cache)
    for b in range(2):
        for h in range(2):
            pool = [p for p in superset[b, h].tolist() if p >= 0]
            scores = _group_softmax_ref(query[b, 0, 2 * h : 2 * h + 2], inputs.k_cache[b, h, pool][None], inputs.scale)[0]
            best = sorted(pool[i] for i in scores.argsort(descending=True)[:6].tolist())
            assert chosen[b, h].tolist() == best
    # the verify re-choice uses the last accepted query only
    verify = torch.cat([torch.randn(2, 2, 4, 8, generator=gen), query, torch.randn(2, 1, 4, 8, generator=gen)], 1)
    positions = torch.tensor([[60, 61, 62, -1], [60, 61, 62, -1]], dtype=torch.int32)
    torch.testing.assert_close(policy.after_verify(0, verify, positions, inputs.k_cache), chosen, rtol=0, atol=0)


def test_follow_pages_superset_holds_the_best_pages():
    size, page = 96, 8
    candidates = torch.zeros(1, size, dtype=torch.bool)
    candidates[0, 3:90] = True  # not page-aligned
    inputs = _inputs([8], candidates)
    policy = selection.FollowPolicy(ratio=2, page=page)
    policy.select(inputs)
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(1, 1, 4, 8, generator=gen)
    superset = policy._page_superset(0, query, torch.ones(1, 1, dtype=torch.bool))
    chosen = policy.draft_keep(0, query, inputs.k_cache)
    for h in range(2):
        pages = sorted({p // page for p in superset[0, h].tolist() if p >= 0})
        assert len(pages) == 2  # ceil(2 * 8 / 8)
        means = torch.stack([inputs.k_cache[0, h, [p for p in range(n * page, (n + 1) * page) if candidates[0, p]]].mean(0)
                             for n in range(size // page)])  # [pages, D]
        page_scores = _group_softmax_ref(query[0, 0, 2 * h : 2 * h + 2], means[None], inputs.scale)[0]
        assert pages == sorted(page_scores.argsort(descending=True)[:2].tolist())
        kept = [p for p in chosen[0, h].tolist() if p >= 0]
        assert len(kept) == 8 and kept == sorted(kept) and all(candidates[0, p] and p // page in pages for p in kept)
    # a budget of every candidate keeps every candidate, pages unaligned or not
    policy.select(_inputs([87], candidates))
    full = policy.draft_keep(0, query, inputs.k_cache)
    assert all(sorted(p for p in full[0, h].tolist() if p >= 0) == list(range(3, 90)) for h in range(2))


def test_draft_reads():
    assert make_policy("question").draft_reads(100, 1000, 9) == 100
    assert make_policy("refresh").draft_reads(100, 900, 9) == 100 + 0.5 * 900 / 9  # every key once per round
    question_superset = selection.FollowPolicy(ratio=3, page=0)
    assert question_superset.draft_reads(100, 1000, 9) == 100 + 0.5 * 300  # the superset per step
    assert question_superset.draft_reads(100, 200, 9) == 100 + 0.5 * 200  # capped at the candidates
    verify_only = selection.FollowPolicy(ratio=3, per_step=False, page=0)
    assert verify_only.draft_reads(100, 1000, 10) == 100 + 0.5 * 300 / 10
    # pages: the summaries of every page, and the chosen pages' keys
    assert selection.FollowPolicy(ratio=2, page=16).draft_reads(100, 1000, 9) == 100 + 0.5 * (208 + 63)
    assert make_policy("follow").draft_reads(100, 1000, 9) == 100 + 0.5 * (208 + 63)  # the default
    assert selection.FollowPolicy().draft_reads(0, 1000, 9) == 0


@pytest.mark.parametrize("bad", [dict(ratio=0.5), dict(ratio="2"), dict(page=-1), dict(page=2.0)])
def test_follow_bad_arguments_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        selection.FollowPolicy(**bad)


# --------------------------------------------------------------------------- "follow" in the engine


def _engine_inputs(kind, seed):
    model = model_of(kind)
    inputs = make_inputs(model, kind, [300, 240], n_visual=200, seed=seed)
    return model, inputs


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
@pytest.mark.parametrize("policy", ["follow", "question-superset", "verify-only"])
def test_follow_is_lossless(kind, policy):
    model, inputs = _engine_inputs(kind, seed=11)
    width = inputs["input_ids"].shape[1]
    chosen = {"follow": "follow", "question-superset": selection.FollowPolicy(page=0),
              "verify-only": selection.FollowPolicy(per_step=False)}[policy]
    candidates = candidate_mask_of(kind, inputs)
    expected = hf_generate(model, inputs)
    vanilla = std_ext.generate(model, **inputs, candidate_mask=candidates, mode="vanilla", max_new_tokens=12,
                               eos_token_id=-1)
    std = std_ext.generate(model, **inputs, candidate_mask=candidates, gamma=4, budget=130, selection=chosen,
                           max_new_tokens=12, eos_token_id=-1)
    for b in range(2):
        row = row_inputs(kind, inputs, b)  # the row alone, padding stripped (for the near-tie check)
        got, dense = new_tokens(std.sequences, width)[b], new_tokens(vanilla.sequences, width)[b]
        assert_same_tokens(model, row, expected[b], dense, f"vanilla row {b}")
        assert_same_tokens(model, row, expected[b], got, f"{policy} row {b}")
    assert 0 < std.stats.mean_accepted <= 4


def test_follow_reads_the_device_once_per_round_and_rewrites_keep_sets_in_place():
    model, inputs = _engine_inputs("qwen2", seed=12)
    seen = {"changed": False, "moved": False}
    original = _Decoder._refresh

    def spy(self, *args):
        before = [t.data_ptr() for t in self.cache.keep.indices]
        snapshot = [t.clone() for t in self.cache.keep.indices]
        original(self, *args)
        seen["moved"] |= before != [t.data_ptr() for t in self.cache.keep.indices]
        seen["changed"] |= any(not torch.equal(a, b) for a, b in zip(snapshot, self.cache.keep.indices))

    _Decoder._refresh = spy
    try:
        with counting_host_reads() as counts:
            out = std_ext.generate(model, **inputs, candidate_mask=candidate_mask_of("qwen2", inputs), gamma=3,
                                   budget=60, selection="follow", max_new_tokens=10, eos_token_id=-1)
    finally:
        _Decoder._refresh = original
    # as test_steps counts it: one readback per round, one that sees every sequence done, four for the stats
    assert counts["reads"] == out.stats.rounds + 1 + 4, counts
    assert seen["changed"], "the verify re-choice never changed a keep set: the test cannot fail"
    assert not seen["moved"]  # written in place: a captured draft step reads these very buffers
