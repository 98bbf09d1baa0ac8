"""``budget="auto"`` (std_ext.budget): the cost model against hand computations, and the
engine with it: lossless for every policy, the choice reported in ``stats.budget_chosen``.

The hand computations solve the rule of the module docstring in closed form:
``(γD + V) / (γ(D + X) + V) = 1 - ε``  ⇔  ``X = ε / (1 - ε) · (γD + V) / γ``.
"""

import math

import pytest
import torch
from test_generate import assert_same_tokens, candidate_mask_of, hf_generate, new_tokens, run
from tiny_models import make_inputs, make_model

import std_ext
from std_ext import budget
from std_ext.gamma import round_speedup
from std_ext.models import ModelAdapter
from std_ext.selection import FollowPolicy, make_policy

_models: dict = {}


def model_of(kind: str):
    if kind not in _models:
        _models[kind] = make_model(kind)
    return _models[kind]


def closed_form(draft: float, verify: float, gamma: int, tolerance: float) -> float:
    return tolerance / (1.0 - tolerance) * (gamma * draft + verify) / gamma


@pytest.mark.parametrize("draft, verify, gamma, tolerance", [
    (100.0, 300.0, 9, 0.1), (15.2e9, 22.7e9, 9, 0.05), (1.0, 50.0, 1, 0.3), (7.0, 7.0, 12, 0.0),
])
def test_allowed_bytes_solve_the_rule(draft, verify, gamma, tolerance):
    got = budget.allowed_keep_bytes(draft, verify, gamma, tolerance)
    assert got == pytest.approx(closed_form(draft, verify, gamma, tolerance), rel=1e-6, abs=1e-9)
    # and it is what the γ cost model says: the round loses exactly `tolerance` of its speedup
    ratio = round_speedup(0.8, gamma, draft + got, verify, verify) / round_speedup(0.8, gamma, draft, verify, verify)
    assert ratio == pytest.approx(1.0 - tolerance, rel=1e-6)


def test_auto_budget_by_hand():
    cost = budget.DraftCost(weight_bytes=1_000_000, position_bytes=1000)
    chosen = budget.auto_budget(cost, prompt_len=[500, 300], n_candidates=[450, 200], n_always=[50, 100],
                                max_new_tokens=20, gamma=4, tolerance=0.1)
    draft = 1_000_000 + 2 * 10 * 1000  # weights + two mean tails of 10 positions
    verify = 1_000_000 + (510 + 310) * 1000  # weights + every position of both sequences
    positions = closed_form(draft, verify, 4, 0.1) / 2 / 1000  # per sequence: 81.9 positions
    assert positions == pytest.approx(81.94, abs=0.01)
    assert chosen.k == [math.floor(positions - 50), 0]  # the second's 100 text positions exceed its share
    assert chosen.budgets == [50 + chosen.k[0], 100]
    assert chosen.gamma == 4
    assert chosen.fraction == pytest.approx((50 + chosen.k[0] + 100) * 1000 / draft)
    # a policy that also reads a 3x superset's keys per step keeps fewer: k + 1.5 k <= 31.9
    follow = budget.auto_budget(cost, prompt_len=[500, 300], n_candidates=[450, 200], n_always=[50, 100],
                                max_new_tokens=20, gamma=4, tolerance=0.1, reads=FollowPolicy(ratio=3, page=0).draft_reads)
    assert follow.k[0] == math.floor((positions - 50) / 2.5)


def test_auto_budget_caps_at_the_candidates_and_grows_with_the_context():
    cost = budget.DraftCost(weight_bytes=10**12, position_bytes=1000)  # huge weights: keep sets are free
    chosen = budget.auto_budget(cost, prompt_len=[300], n_candidates=[250], n_always=[50], max_new_tokens=8, gamma=9)
    assert chosen.k == [250] and chosen.budgets == [300]
    shares = []
    for context in (16_384, 65_536, 131_072):
        qwen = budget.shape_cost(7.07e9, 28, 4, 128, 2)
        shares.append(budget.auto_budget(qwen, prompt_len=[context], n_candidates=[context - 64], n_always=[64],
                                         max_new_tokens=256, gamma=9).fraction)
    assert shares == sorted(shares) and shares[0] < shares[-1]  # a longer verify pass makes keep bytes cheaper


def test_auto_gamma_is_priced_at_the_best_gamma():
    cost = budget.DraftCost(weight_bytes=1_000_000, position_bytes=1000)
    chosen = budget.auto_budget(cost, prompt_len=[5000], n_candidates=[4900], n_always=[100], max_new_tokens=10,
                                gamma=None, gamma_max=12)
    from std_ext.gamma import best_gamma

    draft, verify = 1_000_000 + 5 * 1000, 1_000_000 + 5005 * 1000
    assert chosen.gamma == best_gamma(budget.PRIOR_AGREEMENT, draft, verify, verify, 12)[0]


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "0.1"])
def test_bad_tolerance_is_named(bad):
    cost = budget.DraftCost(1000, 10)
    with pytest.raises(ValueError, match="tolerance"):
        budget.auto_budget(cost, prompt_len=[10], n_candidates=[5], n_always=[5], max_new_tokens=4, gamma=2,
                           tolerance=bad)


@pytest.mark.parametrize("bad", ["Auto", "all", -1, 1.5, True, None])
def test_bad_budget_is_named(bad):
    model = model_of("qwen2")
    inputs = make_inputs(model, "qwen2", [60], seed=2)
    with pytest.raises(ValueError, match="budget must be an integer >= 0 or 'auto'"):
        std_ext.generate(model, **inputs, max_new_tokens=4, budget=bad)


def expected_choice(model, inputs, candidates, policy: str, gamma: int, max_new: int,
                    draft_weights: str | None = None) -> list[int]:
    """The budget std_ext.generate must choose, computed by hand from the rule's closed form.

    With ``draft_weights``, a draft step reads the decoder's and the LM head's linear weights
    at that precision: int8 one byte per weight plus a bfloat16 scale per output row."""
    adapter = ModelAdapter.for_model(model)
    decoder = adapter.decoder
    weights = sum(p.numel() * p.element_size() for p in decoder.layers.parameters())
    weights += sum(p.numel() * p.element_size() for p in decoder.norm.parameters())
    weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()  # not tied in the tiny models
    draft_weight_bytes = weights
    if draft_weights is not None:
        assert draft_weights == "int8"
        linears = [m for m in decoder.layers.modules() if isinstance(m, torch.nn.Linear)] + [model.lm_head]
        draft_weight_bytes -= sum(m.weight.numel() * 4 for m in linears)  # float32 weights out
        draft_weight_bytes += sum(m.weight.numel() + 2 * m.weight.shape[0] for m in linears)  # int8 + scales in
    position = 2 * adapter.num_layers * adapter.num_kv_heads * adapter.head_dim * 4  # float32
    prompt = inputs["attention_mask"].sum(1).tolist()
    tail = max_new / 2
    draft = draft_weight_bytes + len(prompt) * tail * position
    verify = weights + sum(p + tail for p in prompt) * position
    share = closed_form(draft, verify, gamma, budget.DEFAULT_TOLERANCE) / len(prompt) / position
    reads = make_policy(policy).draft_reads
    chosen = []
    for b, length in enumerate(prompt):
        n = int(candidates[b].sum())
        always = length - n
        k = max([k for k in range(n + 1) if always + reads(k, n, gamma) <= share], default=0)
        chosen.append(always + k)
    return chosen


@pytest.mark.parametrize("policy", ["question", "recent", "refresh", "follow"])
def test_auto_budget_is_lossless_and_reported(policy):
    kind = "qwen2"
    model = model_of(kind)
    inputs = make_inputs(model, kind, [300, 260], seed=3)
    width = inputs["input_ids"].shape[1]
    candidates = candidate_mask_of(kind, inputs)  # a document after 6 tokens, then a 12-token question
    expected = hf_generate(model, inputs)
    out = std_ext.generate(model, **inputs, candidate_mask=candidates, gamma=4, budget="auto", selection=policy,
                           max_new_tokens=12, eos_token_id=-1)
    for b in range(2):
        row = {k: v[b : b + 1] for k, v in inputs.items()}
        assert_same_tokens(model, row, expected[b], new_tokens(out.sequences, width)[b], f"{policy} auto row {b}")
    chosen = expected_choice(model, inputs, candidates, policy, 4, 12)
    assert out.stats.budget_chosen == chosen
    n_candidates = candidates.sum(1).tolist()
    always = [int(inputs["attention_mask"][b].sum()) - n_candidates[b] for b in range(2)]
    assert all(always[b] < chosen[b] < always[b] + n_candidates[b] for b in range(2)), chosen  # some, not all
    assert out.stats.keep_size == pytest.approx(sum(chosen) / 2)
    assert out.stats.budget == "auto"


def test_a_quantized_draft_is_priced_at_its_own_weight_bytes():
    """budget="auto" with draft_weights: the draft step's weights at their precision (the
    keep set is then a larger share of a cheaper step: it keeps fewer), still lossless."""
    kind = "qwen2"
    model = model_of(kind)
    inputs = make_inputs(model, kind, [300, 260], seed=3)
    candidates = candidate_mask_of(kind, inputs)
    kwargs = dict(candidate_mask=candidates, gamma=4, budget="auto", max_new_tokens=12, eos_token_id=-1)
    own = std_ext.generate(model, **inputs, **kwargs)
    int8 = std_ext.generate(model, **inputs, draft_weights="int8", **kwargs)
    assert int8.stats.budget_chosen == expected_choice(model, inputs, candidates, "question", 4, 12, "int8")
    assert int8.stats.budget_chosen != own.stats.budget_chosen
    assert int8.sequences.tolist() == own.sequences.tolist()
    cost = budget.DraftCost(weight_bytes=1_000_000, position_bytes=1000, draft_weight_bytes=250_000)
    assert cost.draft_weights_read == 250_000
    assert budget.DraftCost(weight_bytes=1_000_000, position_bytes=1000).draft_weights_read == 1_000_000


def test_integer_budget_is_reported_too():
    model = model_of("qwen2_vl")
    inputs = make_inputs(model, "qwen2_vl", [120], n_visual=96, seed=4)
    out = run(model, inputs, "qwen2_vl", gamma=3, budget=40, max_new_tokens=4)
    assert out.stats.budget_chosen == [40]


def test_auto_budget_on_a_vl_model_equals_vanilla():
    kind = "qwen2_vl"
    model = model_of(kind)
    inputs = make_inputs(model, kind, [300], n_visual=256, seed=5)
    width = inputs["input_ids"].shape[1]
    vanilla = run(model, inputs, kind, mode="vanilla")
    std = run(model, inputs, kind, gamma=4, budget="auto", selection="follow")
    assert new_tokens(std.sequences, width) == new_tokens(vanilla.sequences, width)
    assert len(std.stats.budget_chosen) == 1 and 0 < std.stats.budget_chosen[0] < int(inputs["attention_mask"].sum())


def test_agreement_accepts_auto():
    from std_ext.agreement import measure_agreement

    model = model_of("qwen2")
    inputs = make_inputs(model, "qwen2", [200], seed=6)
    candidates = inputs["attention_mask"].bool().clone()
    candidates[:, -12:] = False
    records = measure_agreement(model, inputs["input_ids"], inputs["attention_mask"], candidate_mask=candidates,
                                budgets=["auto"], gammas=[2], policies=["question", "follow"], max_new_tokens=6)
    for record in records:
        assert record.budget == "auto" and 12 < record.kept < 200
        assert record.draft_positions >= record.kept  # scoring reads come on top
    question, follow = (next(r for r in records if r.policy == p) for p in ("question", "follow"))
    assert follow.kept < question.kept  # the same bytes buy "follow" fewer kept positions
