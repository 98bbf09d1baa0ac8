"""Draft-agreement measurement (std_ext.agreement) against the engine it summarises.

For keep sets that do not move, the rounds replayed from draft runs must reproduce
exactly what ``std_ext.generate`` reports for every γ (mean accepted, acceptance by
position); "refresh" runs the engine's decoder and must equal ``generate`` too; the
oracle keeps each query's own top-K (checked against the float64 reference scores).
"""

import pytest
import torch
from reference import attention_scores_ref
from test_generate import candidate_mask_of
from tiny_models import make_inputs, make_model

import std_ext
from std_ext.agreement import ENGINE_POLICIES, POLICIES, _Measurement, measure_agreement
from std_ext.models import ModelAdapter
from std_ext.selection import FollowPolicy, keep_indices

GAMMAS = [1, 3, 5]
MAX_NEW = 14
EARLY_EOS = 7  # a text id: some rows stop early, as a real answer does


@pytest.fixture(scope="module", params=["qwen2", "qwen2_vl"])
def case(request):
    kind = request.param
    model = make_model(kind)
    inputs = make_inputs(model, kind, [130, 150, 104], n_visual=96)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return model, inputs["input_ids"], inputs["attention_mask"], candidate_mask_of(kind, inputs), extra


@pytest.fixture(scope="module")
def records(case):
    model, input_ids, attention_mask, candidates, extra = case
    return measure_agreement(model, input_ids, attention_mask, candidate_mask=candidates, budgets=[24, 48],
                             gammas=GAMMAS, max_new_tokens=MAX_NEW, eos_token_id=EARLY_EOS, **extra)


def test_every_configuration_is_measured(records):
    configs = {(r.policy, r.budget, r.gamma) for r in records}
    assert configs == {(p, b, g) for p in POLICIES for b in (24, 48) for g in GAMMAS}
    for r in records:
        assert 0.0 <= r.agreement <= 1.0 and 0.0 <= r.mean_accepted <= r.gamma
        assert r.acceptance_rate == pytest.approx(r.mean_accepted / r.gamma)
        assert r.method == ("engine" if r.policy in ENGINE_POLICIES else "chain")


@pytest.mark.parametrize("policy", ["question", "recent", "refresh", "follow_verify"])
def test_rounds_equal_the_engines(case, records, policy):
    model, input_ids, attention_mask, candidates, extra = case
    # "follow_verify" is "follow" as generate runs it today: re-chosen from each verify pass
    selection = FollowPolicy(per_step=False) if policy == "follow_verify" else policy
    for r in (r for r in records if r.policy == policy):
        stats = std_ext.generate(model, input_ids, attention_mask, candidate_mask=candidates, gamma=r.gamma,
                                 budget=r.budget, selection=selection, max_new_tokens=MAX_NEW, eos_token_id=EARLY_EOS,
                                 **extra).stats
        assert r.mean_accepted == pytest.approx(stats.mean_accepted, abs=1e-12), (policy, r.budget, r.gamma)
        assert r.acceptance_by_position == pytest.approx(stats.acceptance_by_position, abs=1e-12)


@pytest.mark.parametrize("policy", ["question", "refresh"])
def test_the_precision_axis_equals_the_engines(case, policy):
    """draft_weights: each precision's rounds (replayed, or the engine's) are generate's with that
    draft precision; the records carry the draft's weight bytes (int4 well under the model's)."""
    model, input_ids, attention_mask, candidates, extra = case
    records = measure_agreement(model, input_ids, attention_mask, candidate_mask=candidates, budgets=[24],
                                gammas=[3], policies=[policy], max_new_tokens=MAX_NEW, eos_token_id=EARLY_EOS,
                                draft_weights=[None, "int4"], **extra)
    assert [r.draft_weights for r in records] == [None, "int4"]
    own, int4 = records
    assert int4.draft_weight_bytes < own.draft_weight_bytes / 4 < own.draft_weight_bytes
    assert int4.draft_total_bytes == pytest.approx(int4.draft_weight_bytes + 3 * int4.draft_kv_bytes)
    for r in records:
        stats = std_ext.generate(model, input_ids, attention_mask, candidate_mask=candidates, gamma=3, budget=24,
                                 selection=policy, max_new_tokens=MAX_NEW, eos_token_id=EARLY_EOS,
                                 draft_weights=r.draft_weights, **extra).stats
        assert r.mean_accepted == pytest.approx(stats.mean_accepted, abs=1e-12), r.draft_weights
        assert r.acceptance_by_position == pytest.approx(stats.acceptance_by_position, abs=1e-12)
    assert own.acceptance_by_position != int4.acceptance_by_position  # the copy really drafted


def test_static_agreement_does_not_depend_on_gamma(records):
    for policy in ("question", "recent", "oracle"):
        for budget in (24, 48):
            values = {r.agreement for r in records if r.policy == policy and r.budget == budget}
            assert len(values) == 1


def test_full_budget_agrees_everywhere(case):
    model, input_ids, attention_mask, candidates, extra = case
    records = measure_agreement(model, input_ids, attention_mask, candidate_mask=candidates, budgets=[10_000],
                                gammas=[4], policies=["question", "oracle"], max_new_tokens=8, **extra)
    for r in records:  # nothing dropped: the draft is the dense model (up to rounding)
        assert r.agreement == 1.0 and r.mean_accepted == 4.0


def _measurement(case):
    """A one-prompt-batch measurement of γ <= 2 over 6 answer tokens (prefilled by the caller)."""
    model, input_ids, attention_mask, candidates, extra = case
    adapter = ModelAdapter.for_model(model)
    candidates = (candidates if candidates is not None else adapter.visual_mask(input_ids)) & attention_mask.bool()
    return adapter, _Measurement(adapter, input_ids, attention_mask, candidates, 2, 6, [-1], 0, None, extra)


def test_oracle_keeps_the_current_querys_top_k(case):
    adapter, run = _measurement(case)
    with adapter.std_attention():
        run.prefill_and_answer()
        oracle, _, _ = run._keep("oracle", 40)
        positions = (run.prompt_len + 2)[:, None]
        run._sparse_forward(run.answer[:, 2:3], positions, oracle)
    step, plan = oracle.step, oracle.plan
    for layer in range(adapter.num_layers):
        keep = oracle[layer]  # [B, H, W] from this step's query
        k_cache, _ = run.cache.layer(layer)
        reference = attention_scores_ref(step.captured[layer], k_cache, step.slots, step.scale)  # [B, H, S]
        for b in range(keep.shape[0]):
            for h in range(keep.shape[1]):
                kept = {int(p) for p in keep[b, h] if p >= 0}
                pool = {int(p) for p in plan.candidates[b].nonzero()}
                chosen, dropped = kept & pool, pool - kept
                assert len(chosen) == int(plan.k[b])
                assert kept - pool == {int(p) for p in plan.always[b].nonzero()}
                if chosen and dropped:  # every kept candidate scores at least as high as every dropped one
                    assert min(reference[b, h, sorted(chosen)]) >= max(reference[b, h, sorted(dropped)]) - 1e-6


@pytest.mark.parametrize("bad, message", [
    (dict(policies=["nearest"]), "policies"),
    (dict(gammas=[]), "gammas"),
    (dict(gammas=[0, 2]), "gammas"),
    (dict(budgets=[-1]), "budgets"),
    (dict(budgets=["all"]), "budgets"),
    (dict(configs=[("question", 24), ("nearest", 24)]), "policies"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_grid(case, bad, message):
    model, input_ids, attention_mask, candidates, extra = case
    kwargs = dict(candidate_mask=candidates, budgets=[24], gammas=[2], max_new_tokens=4, **extra)
    with pytest.raises(ValueError, match=message):
        measure_agreement(model, input_ids, attention_mask, **{**kwargs, **bad})


def test_follow_rechooses_from_each_draft_query_in_place(case):
    adapter, run = _measurement(case)
    with adapter.std_attention():
        run.prefill_and_answer()
        indices, plan, policy = run._keep("follow", 40)
        pointers = [t.data_ptr() for t in indices.buffers]
        kept = []
        for start in (1, 3):  # two draft steps at different positions: their own queries, their own sets
            run._sparse_forward(run.answer[:, start : start + 1], (run.prompt_len + start)[:, None], indices)
            kept.append([t.clone() for t in indices.buffers])
            step = indices.step
            for layer in range(adapter.num_layers):
                k_cache, _ = run.cache.layer(layer)
                expected = keep_indices(plan.always, policy.draft_keep(layer, step.captured[layer], k_cache),
                                        adapter.num_kv_heads, plan.width)
                assert torch.equal(kept[-1][layer], expected)
    assert [t.data_ptr() for t in indices.buffers] == pointers  # written in place, as a captured step needs
    assert any(not torch.equal(a, b) for a, b in zip(*kept)), "the keep sets never moved: the test cannot fail"
