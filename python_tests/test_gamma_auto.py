"""γ chosen per round (``generate(gamma="auto")``, :mod:`std_ext.gamma`).

The controller's math against brute force (exact enumeration of acceptance lengths,
simulated draft chains), its estimator and its choices on synthetic timings; then the
engine: ``gamma="auto"`` emits exactly the vanilla tokens on the tiny models, records
the γ of every round, and stays lossless under any schedule of γ (0 included).
"""

import itertools
import sys

import pytest
import torch

import std_ext
from std_ext import gamma as gm
from tiny_models import KINDS, PAD_ID, VL_KINDS, make_inputs, make_model

engine = sys.modules["std_ext.generate"]  # the module (std_ext.generate is the function)
MAX_NEW = 12
_models: dict = {}


def model_of(kind: str):
    if kind not in _models:
        _models[kind] = make_model(kind)
    return _models[kind]


# --------------------------------------------------------------------------- the model


def accepted_by_enumeration(a: float, gamma: int) -> float:
    """E[accepted] summed over every accept/reject pattern of the γ drafts."""
    total = 0.0
    for pattern in itertools.product([True, False], repeat=gamma):
        probability = 1.0
        for ok in pattern:
            probability *= a if ok else 1.0 - a
        run = next((i for i, ok in enumerate(pattern) if not ok), gamma)  # acceptance stops at the first miss
        total += probability * run
    return total


@pytest.mark.parametrize("a", [0.0, 0.3, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("gamma", [0, 1, 2, 5, 9])
def test_expected_accepted_matches_enumeration(a, gamma):
    assert gm.expected_accepted(a, gamma) == pytest.approx(accepted_by_enumeration(a, gamma), abs=1e-12)


def test_expected_accepted_matches_simulation():
    gen = torch.Generator().manual_seed(0)
    a, gamma, rounds = 0.8, 6, 200_000
    ok = torch.rand(rounds, gamma, generator=gen) < a  # [R, γ] i.i.d. draft agreement
    accepted = ok.long().cumprod(1).sum(1).double().mean()  # the run of leading accepts
    assert float(accepted) == pytest.approx(gm.expected_accepted(a, gamma), rel=0.01)


def test_speedup_and_best_gamma_by_brute_force():
    for a, t_draft, t_verify in itertools.product([0.5, 0.9, 0.97], [0.05, 0.3, 1.0], [1.0, 1.3]):
        speedups = {g: (gm.expected_accepted(a, g) + 1) / (g * t_draft + t_verify) for g in range(1, 13)}
        gamma, speedup = gm.best_gamma(a, t_draft, t_verify, 1.0, 12)
        assert speedup == pytest.approx(max(speedups.values()))
        assert gamma == min(g for g, s in speedups.items() if s == pytest.approx(max(speedups.values())))
        assert gm.round_speedup(a, gamma, t_draft, t_verify, 1.0) == pytest.approx(speedup)
    assert gm.round_speedup(0.9, 0, 0.5, 1.0, 1.0) == 1.0


def test_expensive_draft_falls_back_to_vanilla():
    # a draft step as slow as a dense step never pays, whatever the agreement
    assert gm.choose_gamma(0.9, t_draft=1.0, t_verify=1.1, t_vanilla=1.0, gamma_max=12) == 0
    assert gm.choose_gamma(1.0, t_draft=1.0, t_verify=1.1, t_vanilla=1.0, gamma_max=12) == 0
    # a win smaller than the margin is not worth the risk
    gamma, speedup = gm.best_gamma(0.9, 0.8, 1.0, 1.0, 12)
    assert 1.0 < speedup < 1.1
    assert gm.choose_gamma(0.9, 0.8, 1.0, 1.0, 12, margin=0.1) == 0
    assert gm.choose_gamma(0.9, 0.8, 1.0, 1.0, 12, margin=0.0) == gamma == 1


def test_cheap_draft_and_high_agreement_pick_a_large_gamma():
    assert gm.choose_gamma(0.95, t_draft=0.05, t_verify=1.05, t_vanilla=1.0, gamma_max=12) == 12
    assert gm.choose_gamma(0.95, t_draft=0.05, t_verify=1.05, t_vanilla=1.0, gamma_max=5) == 5
    # lower agreement or a dearer draft: a shorter round
    low = gm.choose_gamma(0.5, t_draft=0.05, t_verify=1.05, t_vanilla=1.0, gamma_max=12)
    dear = gm.choose_gamma(0.95, t_draft=0.3, t_verify=1.05, t_vanilla=1.0, gamma_max=12)
    assert 1 <= low <= 3 and 1 <= dear < 12


def test_best_gamma_grows_with_agreement_and_shrinks_with_draft_cost():
    by_agreement = [gm.best_gamma(a, 0.1, 1.0, 1.0, 30)[0] for a in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)]
    by_cost = [gm.best_gamma(0.9, t, 1.0, 1.0, 30)[0] for t in (0.01, 0.05, 0.1, 0.2, 0.4)]
    assert by_agreement == sorted(by_agreement) and by_agreement[0] < by_agreement[-1]
    assert by_cost == sorted(by_cost, reverse=True) and by_cost[0] > by_cost[-1]


def test_probe_interval_bounds_what_probes_lose():
    a, gamma, t_draft, t_verify = 0.5, 2, 1.0, 1.2
    loss = gamma * t_draft + t_verify - (gm.expected_accepted(a, gamma) + 1)
    interval = gm.probe_interval(a, gamma, t_draft, t_verify, 1.0, overhead=0.01, low=1, high=10_000)
    assert loss <= 0.01 * interval < loss + 0.01  # the shortest interval within the overhead
    assert gm.probe_interval(a, gamma, t_draft, t_verify, 1.0, 0.01, 8, 64) == 64
    assert gm.probe_interval(0.99, 4, 0.1, 1.0, 1.0, 0.01, 8, 64) == 8  # a probe that wins costs nothing


# --------------------------------------------------------------------------- the estimate


def test_round_trials_counts_only_drafts_that_were_compared():
    assert [gm.round_trials(n, 4) for n in range(5)] == [1, 2, 3, 4, 4]
    n = torch.tensor([0, 2, 4])
    assert gm.round_trials(n, 4).tolist() == [1, 3, 4]
    assert gm.round_trials(0, 1) == 1 and gm.round_trials(1, 1) == 1


def test_per_position_trials_recover_the_agreement():
    gen = torch.Generator().manual_seed(1)
    a, gamma, rounds = 0.7, 5, 20_000
    ok = torch.rand(rounds, gamma, generator=gen) < a
    n = ok.long().cumprod(1).sum(1)  # [R] accepted per round
    successes, trials = float(n.sum()), float(gm.round_trials(n, gamma).sum())
    assert gm.posterior_agreement(successes, trials) == pytest.approx(a, abs=0.01)
    # counting all γ drafts as trials would badly underestimate it
    assert successes / (rounds * gamma) < a - 0.2
    # the fixed-γ stats give the same estimate
    by_position = [float((n >= j).double().mean()) for j in range(1, gamma + 1)]
    assert gm.agreement_from_acceptance(by_position) == pytest.approx(successes / trials)


def test_posterior_starts_at_the_prior():
    assert gm.posterior_agreement(0, 0, prior_mean=0.9, prior_strength=10) == pytest.approx(0.9)
    assert gm.posterior_agreement(0, 10, prior_mean=0.9, prior_strength=10) == pytest.approx(0.45)
    assert gm.agreement_from_acceptance([]) == 0.0


def test_moving_average_forgives_a_slow_first_step():
    ema = gm.MovingAverage(smoothing=0.5)
    for sample in (10.0, 1.0, 2.0):
        ema.update(sample)
    assert ema.value == pytest.approx(1.5) and ema.count == 3


# --------------------------------------------------------------------------- the controller


def drive(controller, rounds, t_draft, t_verify, t_vanilla, accepted_of):
    """Run the controller against synthetic step times; ``accepted_of(gamma)`` plays a round."""
    chosen = []
    for _ in range(rounds):
        gamma = controller.choose()
        chosen.append(gamma)
        n = accepted_of(gamma) if gamma else 0
        controller.observe(gamma, gamma * t_draft, t_vanilla if gamma == 0 else t_verify, n,
                           gm.round_trials(n, gamma) if gamma else 0)
    return chosen


def test_controller_warms_up_then_drafts_long_when_drafts_are_cheap_and_right():
    controller = gm.GammaController(gamma_max=12)
    chosen = drive(controller, 40, t_draft=0.05, t_verify=1.05, t_vanilla=1.0, accepted_of=lambda g: g)
    assert chosen[:4] == [0, 1, 0, 1]  # one of each kind, twice, before choosing
    assert chosen[4:] == [12] * 36
    assert controller.agreement > 0.95


def test_controller_falls_back_to_vanilla_and_probes():
    controller = gm.GammaController(gamma_max=12, probe_bounds=(8, 32))
    chosen = drive(controller, 200, t_draft=1.0, t_verify=1.2, t_vanilla=1.0, accepted_of=lambda g: 0)
    probes = [i for i, g in enumerate(chosen) if g and i >= 4]
    assert len(probes) >= 4 and all(chosen[i] == 1 for i in probes)  # the cheapest probe: one draft
    gaps = [b - a - 1 for a, b in zip(probes, probes[1:])]
    assert all(gap == 32 for gap in gaps), gaps  # probes lose a lot: as rare as allowed


def test_controller_follows_a_change_of_agreement():
    controller = gm.GammaController(gamma_max=8)
    state = {"accept": lambda g: g}
    chosen = drive(controller, 30, 0.1, 1.0, 1.0, lambda g: state["accept"](g))
    assert chosen[-1] == 8
    state["accept"] = lambda g: 0  # the keep set stops matching: drafting no longer pays
    chosen = drive(controller, 100, 0.1, 1.0, 1.0, lambda g: state["accept"](g))
    assert chosen[:40] == sorted(chosen[:40], reverse=True) and chosen[0] == 8  # shorter rounds as it falls
    tail = chosen[-30:]  # vanilla, with an occasional one-draft probe
    assert set(tail) <= {0, 1} and tail.count(0) >= 24, chosen
    assert controller.agreement < 0.15


def test_controller_rejects_bad_arguments():
    with pytest.raises(ValueError, match="gamma_max must be an integer >= 1"):
        gm.GammaController(gamma_max=0)
    with pytest.raises(ValueError, match="memory must be in"):
        gm.GammaController(memory=0.0)


# --------------------------------------------------------------------------- the engine


def candidates_of(kind: str, inputs: dict) -> torch.Tensor | None:
    """The VL models' visual tokens; a middle span for the text models."""
    if kind in VL_KINDS:
        return None
    mask = inputs["attention_mask"].bool().clone()
    first_real = mask.long().argmax(1)
    columns = torch.arange(mask.shape[1])
    return mask & (columns[None] >= first_real[:, None] + 6) & (columns[None] < mask.shape[1] - 12)


def generate(model, inputs, kind, **kwargs):
    kwargs.setdefault("max_new_tokens", MAX_NEW)
    kwargs.setdefault("eos_token_id", -1)
    return std_ext.generate(model, **inputs, candidate_mask=candidates_of(kind, inputs), **kwargs)


def new_tokens(out, inputs) -> list[list[int]]:
    rows = []
    for row in out.sequences[:, inputs["input_ids"].shape[1]:].tolist():
        while row and row[-1] == PAD_ID:
            row.pop()
        rows.append(row)
    return rows


@pytest.mark.parametrize("kind", KINDS)
def test_auto_emits_the_vanilla_tokens(kind):
    model = model_of(kind)
    inputs = make_inputs(model, kind, [100], n_visual=64, seed=1)
    vanilla = generate(model, inputs, kind, mode="vanilla")
    auto = generate(model, inputs, kind, gamma="auto", gamma_max=6, budget=48)
    assert new_tokens(auto, inputs) == new_tokens(vanilla, inputs)
    stats = auto.stats
    assert stats.gamma_auto and stats.gamma == 6
    assert len(stats.gammas) == stats.rounds >= 1 and all(0 <= g <= 6 for g in stats.gammas)
    assert stats.gammas[:2] == [0, 1]  # the warm-up: a dense step, then the shortest round
    assert len(stats.acceptance_by_position) == 6
    assert vanilla.stats.gammas == [0] * vanilla.stats.rounds


class Scheduled(gm.GammaController):
    """A controller replaying a fixed schedule of γ (to test the engine, not the choice)."""

    schedule = [0, 3, 1, 0, 5, 2, 0, 0, 4]

    def choose(self) -> int:
        self.rounds = getattr(self, "rounds", 0) + 1
        return min(self.schedule[(self.rounds - 1) % len(self.schedule)], self.gamma_max)


def test_any_schedule_of_gamma_is_lossless_on_a_ragged_batch_with_eos(monkeypatch):
    model = model_of("qwen2_vl")
    inputs = make_inputs(model, "qwen2_vl", [100, 70, 86], n_visual=40, seed=2)
    vanilla = new_tokens(generate(model, inputs, "qwen2_vl", mode="vanilla", max_new_tokens=20), inputs)
    eos = vanilla[1][5]  # stops row 1 early, the first time it emits that token
    assert eos not in vanilla[1][:5]
    expected = new_tokens(generate(model, inputs, "qwen2_vl", mode="vanilla", max_new_tokens=20, eos_token_id=eos),
                          inputs)
    monkeypatch.setattr(engine, "GammaController", Scheduled)
    out = generate(model, inputs, "qwen2_vl", gamma="auto", gamma_max=5, budget=40, max_new_tokens=20,
                   eos_token_id=eos)
    assert new_tokens(out, inputs) == expected
    assert len(expected[1]) == 6 and out.stats.new_tokens[1] == 6
    stats = out.stats
    assert stats.gammas == (Scheduled.schedule * 5)[: stats.rounds]
    assert stats.draft_steps == sum(stats.gammas)
    rates = stats.acceptance_by_position
    assert len(rates) == 5 and all(a >= b for a, b in zip(rates, rates[1:]))
    assert stats.mean_accepted == pytest.approx(sum(rates))
    assert 0.0 <= stats.draft_agreement <= 1.0


class CheapDrafts(gm.GammaController):
    """Sees synthetic step times (draft 10x cheaper than a dense step, as on a GPU at long
    context; on these tiny CPU models it is not, and CPU timings are noisy) and records the
    measured ones it was handed."""

    measured: list = []

    def observe(self, gamma, draft_s, verify_s, accepted=0.0, trials=0.0):
        self.measured.append((gamma, draft_s, verify_s))
        super().observe(gamma, 0.1 * gamma, 1.0, accepted, trials)


def test_auto_drafts_long_when_drafts_are_cheap_and_the_keep_set_is_everything(monkeypatch):
    model = model_of("llama")
    inputs = make_inputs(model, "llama", [100], n_visual=64, seed=5)
    vanilla = generate(model, inputs, "llama", mode="vanilla", max_new_tokens=40)
    monkeypatch.setattr(engine, "GammaController", CheapDrafts)
    monkeypatch.setattr(CheapDrafts, "measured", [])
    auto = generate(model, inputs, "llama", gamma="auto", gamma_max=8, budget=10_000, max_new_tokens=40)
    assert new_tokens(auto, inputs) == new_tokens(vanilla, inputs)
    # a full keep set drafts the dense model's own tokens: agreement 1, the longest rounds pay best
    stats = auto.stats
    assert stats.draft_agreement == 1.0 and stats.acceptance_by_position[0] == 1.0
    assert stats.gammas[:4] == [0, 1, 0, 1] and set(stats.gammas[4:]) == {8}
    # the engine handed over every round (the last one at the final readback), each with its own phases timed
    measured = CheapDrafts.measured
    assert [gamma for gamma, _, _ in measured] == stats.gammas
    assert all(verify > 0 and (draft > 0) == (gamma > 0) for gamma, draft, verify in measured)


def test_fixed_gamma_stats_record_every_round():
    model = model_of("qwen2")
    inputs = make_inputs(model, "qwen2", [100], n_visual=64, seed=1)
    out = generate(model, inputs, "qwen2", gamma=3, budget=48)
    stats = out.stats
    assert not stats.gamma_auto and stats.gammas == [3] * stats.rounds
    assert stats.draft_steps == 3 * stats.rounds
    assert stats.draft_agreement == pytest.approx(gm.agreement_from_acceptance(stats.acceptance_by_position))


def test_auto_sampling_is_reproducible(monkeypatch):
    model = model_of("qwen2")
    inputs = make_inputs(model, "qwen2", [50], seed=10)
    monkeypatch.setattr(engine, "GammaController", Scheduled)

    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate(model, inputs, "qwen2", gamma="auto", gamma_max=4, do_sample=True, temperature=1.5,
                        generator=gen, budget=20).sequences

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(gamma="fast"), r"gamma must be an integer >= 1 or 'auto', got 'fast'"),
    (dict(gamma=None), r"gamma must be an integer >= 1 or 'auto'"),
    (dict(gamma="auto", gamma_max=0), "gamma_max must be an integer >= 1, got 0"),
    (dict(gamma="auto", gamma_max=2.5), "gamma_max must be an integer >= 1"),
    (dict(gamma=4, gamma_max=True), "gamma_max must be an integer >= 1"),
])
def test_bad_gamma_values_name_the_argument(kwargs, pattern):
    model = model_of("qwen2")
    inputs = make_inputs(model, "qwen2", [30], seed=0)
    with pytest.raises(ValueError, match=pattern):
        std_ext.generate(model, **inputs, **kwargs)
