"""``budget="auto"``: a keep set sized by what a draft step reads anyway.

A draft step is memory-bound: it reads every weight of the text decoder (once for the
whole batch) and every sequence's generated tail, whatever the keep set. The keep set's
K/V (plus whatever the policy reads to choose it, :meth:`~std_ext.selection.SelectionPolicy.draft_reads`)
comes on top, so it is cheap exactly when it is small next to those bytes: 1,024 positions
of a 7B model at batch 1 are 0.4% of a draft step, 16K would be 6%.

The rule
--------
With ``D`` the bytes of a draft step without its keep set (weights, at the draft's precision
under ``draft_weights``, + the batch's tails),
``V`` those of a verify pass (weights + every position's K/V; a vanilla step reads the
same) and ``X`` the batch's keep-set bytes, :func:`std_ext.gamma.round_speedup` prices a
round of γ drafts at ``γ·(D + X) + V``. ``budget="auto"`` takes the largest ``X`` that
costs the round at most ``tolerance`` of its predicted speedup::

    round_speedup(a, γ, D + X, V, V) >= (1 - tolerance) · round_speedup(a, γ, D, V, V)

(the agreement ``a`` cancels in the ratio; γ is the call's, or under ``gamma="auto"`` the
:func:`std_ext.gamma.best_gamma` of the controller's prior agreement). So the allowed
share ``X / D`` grows with the context: a long verify pass makes the same keep set a
smaller part of the round. Each sequence gets an equal share of ``X``: the most candidates
``k`` whose K/V over all layers, with its non-candidate prompt positions and the policy's
scoring reads, fit in it, capped at its candidate count. The agreement side is why the
keep set is worth any bytes at all: a larger one agrees more (``bench/RESULTS.md``); the
tolerance is the price paid for it, ``DEFAULT_TOLERANCE`` unless set.

All functions are pure (numbers in, numbers out), so the choice for a model shape can be
computed without the model (:func:`shape_cost`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .distributed import local_shard
from .gamma import best_gamma, round_speedup

__all__ = ["DEFAULT_TOLERANCE", "PRIOR_AGREEMENT", "DraftCost", "AutoBudget", "model_cost", "shape_cost",
           "allowed_keep_bytes", "auto_budget", "predicted_speedup"]

DEFAULT_TOLERANCE = 0.1  # a keep set may cost a round up to 10% of its predicted speedup
PRIOR_AGREEMENT = 0.9  # the agreement γ is chosen for under gamma="auto" (GammaController's prior)


@dataclass(frozen=True)
class DraftCost:
    """Bytes a decode step reads, by source.

    weight_bytes : the text decoder's weights read by every dense forward (verify, vanilla), once per batch
    position_bytes : K/V bytes of one cached position of one sequence, over all layers and KV heads
    draft_weight_bytes : the weights a draft step reads, when the draft runs a quantized copy of the
        linear layers (``generate(draft_weights=...)``: their packed weights and scales, plus the
        parameters kept at the model's precision); None: the draft reads ``weight_bytes``
    """

    weight_bytes: int
    position_bytes: int
    draft_weight_bytes: int | None = None

    @property
    def draft_weights_read(self) -> int:
        """Weight bytes one draft step reads."""
        return self.weight_bytes if self.draft_weight_bytes is None else self.draft_weight_bytes


@dataclass(frozen=True)
class AutoBudget:
    """What ``budget="auto"`` chose for a batch.

    k : candidates kept per sequence (``B`` ints)
    budgets : kept prompt positions per sequence and KV head, non-candidates included (``always + k``)
    fraction : the batch's keep-set bytes over the draft step's other bytes (weights + tails)
    gamma : the γ the round was priced at
    allowance : keep-set bytes each sequence may read per draft step
    """

    k: list[int]
    budgets: list[int]
    fraction: float
    gamma: int
    allowance: float


def model_cost(adapter, dtype: torch.dtype, draft_weights=None) -> DraftCost:
    """The :class:`DraftCost` of a model (:class:`~std_ext.models.ModelAdapter`) whose cache holds ``dtype``.

    Weights: the decoder layers, the final norm and the output projection, the parameters a
    draft step reads in full (a vision tower runs at prefill only; the input embedding reads
    one row per token). With ``draft_weights`` (a :class:`~std_ext.draft_weights.DraftWeights`)
    a draft step reads its quantized layers in place of the originals. Under tensor
    parallelism every figure is one rank's: its shards of the weights (the quantized copy is
    made of them), its KV heads.
    """
    seen: set[int] = set()
    total = 0
    modules = [adapter.decoder.layers, getattr(adapter.decoder, "norm", None), adapter.model.get_output_embeddings()]
    for module in modules:
        if module is None:
            continue
        for parameter in module.parameters():
            if id(parameter) not in seen:  # tied weights are read once
                seen.add(id(parameter))
                local = local_shard(parameter)  # tensor parallelism: the shard this rank reads
                total += local.numel() * local.element_size()
    element = torch.empty((), dtype=dtype).element_size()
    draft = None if draft_weights is None else total - draft_weights.original_bytes + draft_weights.weight_bytes
    return DraftCost(total, 2 * adapter.num_layers * adapter.num_kv_heads * adapter.head_dim * element, draft)


def shape_cost(parameters: float, layers: int, kv_heads: int, head_dim: int, element_bytes: int) -> DraftCost:
    """The :class:`DraftCost` of a model shape: ``parameters`` read per forward, ``element_bytes`` each."""
    return DraftCost(int(parameters * element_bytes), 2 * layers * kv_heads * head_dim * element_bytes)


def allowed_keep_bytes(draft_bytes: float, verify_bytes: float, gamma: int,
                       tolerance: float = DEFAULT_TOLERANCE) -> float:
    """The largest keep-set bytes ``X`` (over the batch) with
    ``round_speedup(a, γ, D + X, V, V) >= (1 - tolerance) · round_speedup(a, γ, D, V, V)``.

    Parameters
    ----------
    draft_bytes : ``D``, a draft step without its keep set (> 0)
    verify_bytes : ``V``, a verify pass (and a vanilla step)
    gamma : drafts per round, >= 1
    tolerance : in [0, 1)

    Returns
    -------
    float
        ``X`` in bytes, found by bisection on :func:`std_ext.gamma.round_speedup` (to 1e-9 relative).
    """
    def speedup(extra: float) -> float:  # the agreement cancels in the ratio: any value does
        return round_speedup(PRIOR_AGREEMENT, gamma, draft_bytes + extra, verify_bytes, verify_bytes)

    target = (1.0 - tolerance) * speedup(0.0)
    low, high = 0.0, max(draft_bytes, 1.0)
    while speedup(high) >= target:  # speedup falls without bound as X grows: this ends
        low, high = high, 2.0 * high
    while high - low > 1e-9 * high:
        middle = 0.5 * (low + high)
        low, high = (middle, high) if speedup(middle) >= target else (low, middle)
    return low


def auto_budget(cost: DraftCost, *, prompt_len: Sequence[int], n_candidates: Sequence[int],
                n_always: Sequence[int], max_new_tokens: int, gamma: int | None, gamma_max: int = 12,
                reads: Callable[[int, int, int], float] | None = None,
                tolerance: float = DEFAULT_TOLERANCE) -> AutoBudget:
    """Candidates to keep per sequence under ``budget="auto"`` (see the module docstring).

    Parameters
    ----------
    cost : the model's :class:`DraftCost`
    prompt_len, n_candidates, n_always : per sequence (``B`` each): prompt tokens, candidate
        positions, non-candidate prompt positions (every keep set holds these)
    max_new_tokens : the generation's length; a draft reads on average half of it as its tail
    gamma : drafts per round, or None for ``gamma="auto"`` (priced at the best γ <= ``gamma_max``
        for :data:`PRIOR_AGREEMENT`)
    reads : ``reads(k, candidates, gamma)``, positions a draft step reads per (KV head, layer)
        for ``k`` kept candidates, scoring included (:meth:`SelectionPolicy.draft_reads`);
        default ``k``. Must not decrease in ``k``
    tolerance : share of the predicted round speedup the keep sets may cost, in [0, 1)

    Returns
    -------
    AutoBudget
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 <= tolerance < 1.0:
        raise ValueError(f"std_ext.budget: tolerance must be in [0, 1), got {tolerance!r}")
    reads = reads or (lambda k, candidates, gamma: float(k))
    batch = len(prompt_len)
    tail = max_new_tokens / 2.0  # the mean generated tail over the generation
    draft = cost.draft_weights_read + batch * tail * cost.position_bytes
    verify = cost.weight_bytes + sum(p + tail for p in prompt_len) * cost.position_bytes
    if gamma is None:
        gamma, _ = best_gamma(PRIOR_AGREEMENT, draft, verify, verify, gamma_max)
    allowance = allowed_keep_bytes(draft, verify, gamma, tolerance) / batch
    positions = allowance / cost.position_bytes  # per (KV head, layer) of one sequence
    chosen = []
    for candidates, always in zip(n_candidates, n_always):
        low, high = 0, int(candidates)  # the largest k with always + reads(k) <= positions (reads grows with k)
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if always + reads(middle, candidates, gamma) <= positions else (low, middle - 1)
        chosen.append(low)
    budgets = [int(always) + k for always, k in zip(n_always, chosen)]
    keep_bytes = sum(always + reads(k, c, gamma) for always, k, c in zip(n_always, chosen, n_candidates))
    return AutoBudget(k=chosen, budgets=budgets, fraction=keep_bytes * cost.position_bytes / draft, gamma=gamma,
                      allowance=allowance)


def predicted_speedup(cost: DraftCost, *, batch: int, context: int, keep: int, max_new_tokens: int,
                      agreement: float = PRIOR_AGREEMENT, gamma_max: int = 12) -> tuple[int, float]:
    """The best γ and its speedup over vanilla when every step costs its bytes (the bandwidth floor).

    A draft step reads :attr:`DraftCost.draft_weights_read` plus each sequence's keep set and
    mean generated tail (``max_new_tokens / 2``); a verify pass and a vanilla step read the
    model's weights plus every cached position. The same prices :func:`auto_budget` uses,
    through :func:`std_ext.gamma.best_gamma`.

    Returns
    -------
    (int, float)
        γ in ``1 .. gamma_max`` and its :func:`std_ext.gamma.round_speedup`.
    """
    tail = max_new_tokens / 2.0
    draft = cost.draft_weights_read + batch * (keep + tail) * cost.position_bytes
    verify = cost.weight_bytes + batch * (context + tail) * cost.position_bytes
    return best_gamma(agreement, draft, verify, verify, gamma_max)
