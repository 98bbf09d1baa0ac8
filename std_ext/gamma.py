"""Choosing γ, the number of drafts per round, while decoding (``generate(gamma="auto")``).

Cost model
----------
A Sparse-to-Dense round with ``γ >= 1`` runs γ sparse one-token forwards and one dense
forward over ``γ + 1`` tokens, so it costs ``γ·t_draft + t_verify``. If each successive
draft matches the dense model's token with probability ``a`` (the per-token draft
agreement, taken as i.i.d.) and acceptance stops at the first mismatch, the round
accepts ``n`` drafts with ``P(n >= j) = a^j`` and emits ``n + 1`` tokens (the verify pass
adds one), so::

    E[accepted](a, γ) = a + a² + ... + a^γ = a (1 - a^γ) / (1 - a)
    speedup(γ)        = (E[accepted] + 1) · t_vanilla / (γ·t_draft + t_verify)

against vanilla decoding, whose step costs ``t_vanilla`` and emits one token. The best γ
maximises the speedup over ``1 .. gamma_max`` (it is unimodal in γ: the gain of one more
draft, ``a^(γ+1)``, shrinks while its cost stays ``t_draft``); when even that γ does not
beat vanilla by ``margin``, a round is a plain dense step (γ = 0). ``t_verify`` is taken
as independent of γ: decoding is memory-bound, and a verify pass reads the weights and
the KV cache once whatever the number of its queries.

Estimating the agreement
------------------------
A round with γ drafts and ``n`` accepted tried drafts ``1 .. min(n + 1, γ)``: the drafts
after the first rejection were never compared on their own (their prefix was already
wrong), so they are not trials. That gives ``n`` successes in ``min(n + 1, γ)`` Bernoulli
trials (:func:`round_trials`), exactly the likelihood ``a^n (1 - a)^[n < γ]`` of the
model above. :class:`GammaController` adds them, over the batch's active sequences, to
counts that decay geometrically (by ``memory`` per observed StD round: a window of about
``1 / (1 - memory)`` = 10 rounds, so the estimate follows a drifting agreement) and reads
the posterior mean under a Beta prior centred on the paper's ~0.9
(:func:`posterior_agreement`). The prior's weight decays with the data, so it shapes the
first rounds only and a long run of rejections can drive the estimate to 0.

Step times are exponential moving averages of the measured draft, verify and vanilla
steps. The engine measures them with CUDA events on a GPU and reads them at the next
round's single host readback (no extra synchronisation), or with ``perf_counter`` on the
CPU. While vanilla rounds win, an StD round is still run now and then (a *probe*), so
that the agreement estimate does not go stale; probes are spaced so that what they may
lose stays below ``probe_overhead`` of the decode time (:func:`probe_interval`).

The functions are pure (numbers in, numbers out) and tested against brute force; the
class holds the running state of one generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "expected_accepted",
    "round_speedup",
    "best_gamma",
    "choose_gamma",
    "round_trials",
    "posterior_agreement",
    "agreement_from_acceptance",
    "probe_interval",
    "MovingAverage",
    "GammaController",
]


# --------------------------------------------------------------------------- the model


def expected_accepted(agreement: float, gamma: int) -> float:
    """Expected accepted drafts of a round of ``gamma`` drafts: ``a (1 - a^γ) / (1 - a)``.

    Parameters
    ----------
    agreement : float
        Probability ``a`` in [0, 1] that a draft matches, given that its prefix did.
    gamma : int
        Drafts in the round, >= 0.

    Returns
    -------
    float
        In [0, gamma]; ``gamma`` when ``a = 1``.
    """
    if agreement >= 1.0:
        return float(gamma)
    return agreement * (1.0 - agreement**gamma) / (1.0 - agreement)


def round_speedup(agreement: float, gamma: int, t_draft: float, t_verify: float, t_vanilla: float) -> float:
    """Tokens per second of rounds with ``gamma`` drafts over those of vanilla decoding.

    Parameters
    ----------
    agreement : float
        Per-token draft agreement ``a``.
    gamma : int
        Drafts per round; 0 is a vanilla step (speedup 1).
    t_draft, t_verify, t_vanilla : float
        Seconds of one draft step, one verify pass, one vanilla step (> 0).

    Returns
    -------
    float
        ``(E[accepted] + 1) · t_vanilla / (γ·t_draft + t_verify)``.
    """
    if gamma == 0:
        return 1.0
    return (expected_accepted(agreement, gamma) + 1.0) * t_vanilla / (gamma * t_draft + t_verify)


def best_gamma(agreement: float, t_draft: float, t_verify: float, t_vanilla: float,
               gamma_max: int) -> tuple[int, float]:
    """The γ in ``1 .. gamma_max`` with the highest :func:`round_speedup` (ties: the smaller γ).

    Returns
    -------
    (int, float)
        That γ and its speedup, which may be below 1 (see :func:`choose_gamma`).
    """
    speedups = [round_speedup(agreement, g, t_draft, t_verify, t_vanilla) for g in range(1, gamma_max + 1)]
    best = max(range(gamma_max), key=lambda i: (speedups[i], -i))
    return best + 1, speedups[best]


def choose_gamma(agreement: float, t_draft: float, t_verify: float, t_vanilla: float, gamma_max: int,
                 margin: float = 0.0) -> int:
    """:func:`best_gamma`, or 0 (a vanilla step) unless it beats vanilla by ``margin`` (0.03 = 3%)."""
    gamma, speedup = best_gamma(agreement, t_draft, t_verify, t_vanilla, gamma_max)
    return gamma if speedup >= 1.0 + margin else 0


def probe_interval(agreement: float, gamma: int, t_draft: float, t_verify: float, t_vanilla: float,
                   overhead: float, low: int, high: int) -> int:
    """Vanilla rounds between two probe rounds of ``gamma`` drafts.

    A probe emits ``E[accepted] + 1`` tokens in ``γ·t_draft + t_verify`` where vanilla
    steps would take ``(E[accepted] + 1)·t_vanilla``; the difference, ``loss``, is spread
    over the interval's vanilla rounds so that ``loss <= overhead · interval · t_vanilla``.

    Returns
    -------
    int
        ``ceil(loss / (overhead · t_vanilla))`` clamped to ``[low, high]``.
    """
    loss = gamma * t_draft + t_verify - (expected_accepted(agreement, gamma) + 1.0) * t_vanilla
    if loss <= 0 or t_vanilla <= 0:
        return low
    return max(low, min(high, math.ceil(loss / (overhead * t_vanilla))))


# --------------------------------------------------------------------------- the estimate


def round_trials(accepted, gamma: int):
    """Drafts a round actually tried: ``min(accepted + 1, gamma)``.

    Works on ints and on integer tensors (elementwise, no host sync). A draft after the
    first rejection is not a trial: its prefix was already wrong.
    """
    return accepted + (accepted < gamma)


def posterior_agreement(successes: float, trials: float, prior_mean: float = 0.9,
                        prior_strength: float = 10.0) -> float:
    """Posterior mean of the agreement under a ``Beta(m·s, (1 - m)·s)`` prior.

    Parameters
    ----------
    successes, trials : float
        Accepted drafts and tried drafts (:func:`round_trials`), possibly decayed.
    prior_mean : float
        ``m``, the agreement believed before any round (the paper reports ~0.9).
    prior_strength : float
        ``s``, how many trials the prior weighs.

    Returns
    -------
    float
        ``(m·s + successes) / (s + trials)``.
    """
    return (prior_mean * prior_strength + successes) / (prior_strength + trials)


def agreement_from_acceptance(acceptance_by_position: list[float]) -> float:
    """Per-token agreement from a fixed-γ run's ``acceptance_by_position`` (``r_j = P(n >= j)``).

    Successes per round are ``Σ_{j<=γ} r_j``; trials are ``1 + Σ_{j<γ} r_j`` (draft ``j + 1``
    is tried exactly when draft ``j`` was accepted).

    Returns
    -------
    float
        The maximum-likelihood agreement; 0.0 for an empty list.
    """
    if not acceptance_by_position:
        return 0.0
    return sum(acceptance_by_position) / (1.0 + sum(acceptance_by_position[:-1]))


# --------------------------------------------------------------------------- the state


@dataclass
class MovingAverage:
    """Exponential moving average of a step time, robust to a slow first step.

    The first sample initialises the average and the second replaces it when smaller: a
    first kernel launch can include one-time costs (lazy module loading, allocation).
    Later samples move it by ``smoothing`` of their difference.
    """

    smoothing: float = 0.3
    value: float = 0.0
    count: int = 0

    def update(self, sample: float) -> None:
        if self.count == 0:
            self.value = sample
        elif self.count == 1:
            self.value = min(self.value, sample)
        else:
            self.value += self.smoothing * (sample - self.value)
        self.count += 1


class GammaController:
    """Picks γ for each decode round of one generation (see the module docstring).

    Call :meth:`choose` before a round and :meth:`observe` with what the round measured
    (it may come a round later: :meth:`choose` bootstraps from its own choices).

    Parameters
    ----------
    gamma_max : int
        Largest γ a round may use, >= 1.
    prior_agreement, prior_strength : float
        The Beta prior of the agreement (mean, weight in trials).
    memory : float
        In (0, 1]: the decay of the agreement counts (and of the prior's weight) per
        observed StD round; 1 never forgets.
    margin : float
        StD rounds must beat vanilla by this fraction (predicted) to be chosen.
    smoothing : float
        Weight of a new step-time sample in its moving average.
    probe_overhead : float
        Share of decode time probes may lose while vanilla rounds win.
    probe_bounds : (int, int)
        Fewest and most vanilla rounds between two probes.
    warmup : int
        Rounds of each kind (vanilla, StD) run first, alternately, before choosing.
    bootstrap_gamma : int
        γ of the warm-up StD rounds (clamped to ``gamma_max``). 1 by default: such a round
        measures a draft step and a verify pass (whose cost barely depends on γ) and,
        where drafting does not pay, loses the least.
    """

    def __init__(self, gamma_max: int = 12, *, prior_agreement: float = 0.9, prior_strength: float = 10.0,
                 memory: float = 0.9, margin: float = 0.03, smoothing: float = 0.3, probe_overhead: float = 0.01,
                 probe_bounds: tuple[int, int] = (8, 256), warmup: int = 2, bootstrap_gamma: int = 1) -> None:
        if isinstance(gamma_max, bool) or not isinstance(gamma_max, int) or gamma_max < 1:
            raise ValueError(f"GammaController: gamma_max must be an integer >= 1, got {gamma_max!r}")
        if not 0.0 < memory <= 1.0:
            raise ValueError(f"GammaController: memory must be in (0, 1], got {memory!r}")
        self.gamma_max, self.margin = gamma_max, margin
        self.prior_agreement, self.prior_strength, self.memory = prior_agreement, prior_strength, memory
        self.probe_overhead, self.probe_bounds = probe_overhead, probe_bounds
        self.warmup, self.bootstrap_gamma = warmup, max(1, min(bootstrap_gamma, gamma_max))
        self.t_draft, self.t_verify, self.t_vanilla = (MovingAverage(smoothing) for _ in range(3))
        self.successes = self.trials = 0.0  # decayed counts of accepted and tried drafts
        self.prior_weight = prior_strength  # decays with the counts
        self.chosen_vanilla = self.chosen_std = 0
        self.vanilla_streak = 0  # vanilla rounds since the last StD round

    @property
    def agreement(self) -> float:
        """Current estimate of the per-token draft agreement (posterior mean)."""
        return posterior_agreement(self.successes, self.trials, self.prior_agreement, self.prior_weight)

    def observe(self, gamma: int, draft_s: float, verify_s: float, accepted: float = 0.0, trials: float = 0.0) -> None:
        """Record a finished round.

        Parameters
        ----------
        gamma : int
            The round's γ (0: a vanilla step).
        draft_s, verify_s : float
            Seconds its draft phase (all γ steps) and its verify pass (or vanilla step) took.
        accepted, trials : float
            Accepted and tried drafts (:func:`round_trials`), summed over active sequences.
        """
        if gamma == 0:
            self.t_vanilla.update(verify_s)
            return
        self.t_draft.update(draft_s / gamma)
        self.t_verify.update(verify_s)
        self.successes = self.memory * self.successes + accepted
        self.trials = self.memory * self.trials + trials
        self.prior_weight *= self.memory

    def best(self) -> tuple[int, float]:
        """The best γ >= 1 under the current estimates and its predicted speedup."""
        return best_gamma(self.agreement, *self._times(), self.gamma_max)

    def _times(self) -> tuple[float, float, float]:
        """(t_draft, t_verify, t_vanilla); a timer's zero would divide by zero, so a floor of 1 ns."""
        return tuple(max(ema.value, 1e-9) for ema in (self.t_draft, self.t_verify, self.t_vanilla))

    def choose(self) -> int:
        """γ for the next round: 0 for a vanilla step, else the drafts to run."""
        gamma = self._choice()
        if gamma == 0:
            self.chosen_vanilla += 1
            self.vanilla_streak += 1
        else:
            self.chosen_std += 1
            self.vanilla_streak = 0
        return gamma

    def _choice(self) -> int:
        if self._warming_up():
            # alternate, vanilla first, until both kinds of step are measured
            return 0 if self.chosen_vanilla <= self.chosen_std else self.bootstrap_gamma
        gamma, speedup = self.best()
        if speedup >= 1.0 + self.margin:
            return gamma
        low, high = self.probe_bounds
        interval = probe_interval(self.agreement, gamma, *self._times(), self.probe_overhead, low, high)
        return gamma if self.vanilla_streak >= interval else 0

    def _warming_up(self) -> bool:
        chosen = min(self.chosen_vanilla, self.chosen_std) < self.warmup
        measured = min(self.t_draft.count, self.t_verify.count, self.t_vanilla.count) >= 1
        return chosen or not measured
