"""How often does the sparse draft predict the dense model's next token?

Sparse-to-Dense is lossless whatever the keep set; the keep set only decides its speed,
through the number of draft tokens the dense verify pass accepts per round. This module
measures that on a real model and prompt, for many budgets, γ and selection policies,
with one prefill:

* the dense greedy answer (the trajectory every lossless decoder emits) is decoded once;
* for a keep set that does not change while decoding (``"question"``, ``"recent"``, and
  the ``"oracle"`` ceiling below), a greedy round starting at answer position ``t`` always
  drafts the same tokens: the draft chain from ``t`` sees the dense cache before ``t`` and
  its own sparse K/V after. So the run ``m(t)`` of drafts that match the answer, measured
  once per ``t`` up to the largest γ, gives the rounds of every γ exactly:
  ``accepted = min(m(t), γ)``, next round at ``t + accepted + 1``;
* ``"refresh"`` changes its keep set after each verify pass, so its rounds depend on γ:
  it runs the engine's own decoder for every (budget, γ), reusing the prefill.

``"oracle"``: at every draft step, each layer keeps the candidates the *current* query
attends to most (its own top-K, group-mean over the query heads of a KV head),
recomputed every step — a ceiling for any keep set chosen ahead of time.

``"follow"`` (:class:`~std_ext.selection.FollowPolicy`) re-chooses at every draft step
too, from the step's own query, but at a bounded read (page summaries, then the best
pages' keys): its keep set depends on the current query only, so its draft runs replay
into rounds exactly like the static sets' (the verify re-choice it also has is overridden
by the next draft step's). ``"follow_question"`` re-chooses inside the question's top
``3·k`` candidates instead of pages. ``"follow_verify"`` is ``"follow"`` without draft
queries (``per_step=False``), as ``std_ext.generate`` runs it today: it re-chooses from
each verify pass only, so it runs the engine's decoder, like ``"refresh"``.

Bytes: every record carries the cache positions a draft step reads per (KV head, layer),
non-candidate prompt positions, keep set and scoring reads together
(:meth:`~std_ext.selection.SelectionPolicy.draft_reads`; the generated tail, the same for
every policy, is left out), and those positions' bytes over all layers. The oracle is
charged its keep set only: its scoring would read every candidate's key at every step.

A budget may be ``"auto"`` (:mod:`std_ext.budget`): priced for this batch at the grid's
largest γ, the policy's own scoring reads included, per sequence.

The per-token agreement of a policy is the share of answer positions at which the first
draft of a round starting there equals the dense next token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from . import budget as budget_model
from . import draft_weights as draft_weights_module
from . import ops
from .attention import ForwardStep
from .cache import StaticCache
from .generate import (
    GenerationStats,
    _Decoder,
    _KeepPlan,
    _PhaseTimer,
    _prefill,
    _select,
    _Warp,
)
from . import generation_args
from .generation_inputs import check_input_ids, check_inputs
from .models import ModelAdapter
from .selection import FollowPolicy, SelectionPolicy, StepKeepSets, make_policy, ragged_topk

STATIC_POLICIES = ("question", "recent", "oracle", "follow", "follow_question")  # keep sets that depend on the current query only
ENGINE_POLICIES = ("refresh", "follow_verify")  # keep sets that depend on the rounds
POLICIES = (*STATIC_POLICIES, *ENGINE_POLICIES)
QUESTION_SUPERSET_RATIO = 3  # "follow_question": the question's top 3 x budget candidates as a fixed superset


@dataclass
class AgreementRecord:
    """One (policy, budget, γ) measurement over a batch of prompts.

    Attributes
    ----------
    policy, budget, gamma : the configuration (``budget`` an int or "auto")
    agreement : share of answer positions whose first draft equals the dense next token
        (for "refresh": of round starts, as the engine measured it)
    mean_accepted : accepted drafts per round (what ``GenerationStats.mean_accepted`` reports)
    acceptance_rate : ``mean_accepted / gamma``
    acceptance_by_position : share of rounds whose draft ``j+1`` was accepted
    answer_tokens : dense answer tokens over the batch (the sample behind the figures)
    method : "chain" (draft runs replayed into rounds) or "engine" (the decoder itself)
    kept : mean kept prompt positions per (sequence, KV head), non-candidates included
    draft_positions : mean cache positions one draft step reads per (sequence, KV head, layer):
        kept positions plus scoring reads (keys count half), the generated tail left out
    draft_kv_bytes : ``draft_positions`` in bytes over all layers and KV heads, per sequence
    draft_weights : the precision the draft's linear layers ran at (None: the model's own)
    draft_weight_bytes : weight bytes one draft step reads at that precision (once per batch);
        ``draft_total_bytes`` adds the batch's KV reads
    """

    policy: str
    budget: int
    gamma: int
    agreement: float
    mean_accepted: float
    acceptance_rate: float
    acceptance_by_position: list[float]
    answer_tokens: int
    method: str
    kept: float = 0.0
    draft_positions: float = 0.0
    draft_kv_bytes: float = 0.0
    draft_weights: str | None = None
    draft_weight_bytes: float = 0.0
    batch: int = 1

    @property
    def draft_total_bytes(self) -> float:
        """What one draft step reads over the batch: its weights plus every sequence's keep-set reads."""
        return self.draft_weight_bytes + self.batch * self.draft_kv_bytes


@torch.no_grad()
def measure_agreement(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    candidate_mask: torch.Tensor | None = None,
    budgets: Iterable[int | str] = (128, 256, 512, 1024, 2048),
    gammas: Iterable[int] = range(1, 13),
    policies: Sequence[str] = POLICIES,
    max_new_tokens: int = 32,
    window: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    progress: bool = False,
    configs: Sequence[tuple[str, int | str]] | None = None,
    draft_weights: Sequence[str | None] = (None,),
    **model_inputs,
) -> list[AgreementRecord]:
    """Greedy draft agreement and accepted drafts per round for every configuration.

    Parameters
    ----------
    model, input_ids, attention_mask, candidate_mask, window, eos_token_id, **model_inputs
        as in :func:`std_ext.generate` (a left-padded batch of prompts is measured at once)
    budgets, gammas : the grid (a budget may be "auto")
    policies : among :data:`POLICIES`
    max_new_tokens : answer tokens per prompt (rounds stop there or at EOS, as in ``generate``)
    configs : (policy, budget) pairs to measure instead of every policy x every budget
    draft_weights : draft precisions (:mod:`std_ext.draft_weights`; None: the model's own weights),
        each measured over every configuration: the precision axis of the bytes a draft reads

    Returns
    -------
    list of :class:`AgreementRecord`, one per (policy, budget, γ), pooled over the batch.
    """
    budgets = sorted(set(budgets), key=lambda b: (isinstance(b, str), b if isinstance(b, int) else 0))
    gammas = sorted(set(gammas))
    configs = list(configs) if configs is not None else [(policy, budget) for policy in policies for budget in budgets]
    _check_grid([b for _, b in configs] or budgets, gammas, [p for p, _ in configs] or policies, max_new_tokens)
    adapter = ModelAdapter.for_model(model)
    check_input_ids(input_ids, model)
    explicit = {"max_new_tokens": max_new_tokens, "do_sample": False}
    if eos_token_id is not None:
        explicit["eos_token_id"] = eos_token_id
    args = generation_args.resolve(model, adapter.forward_inputs, input_ids.shape[1], None, explicit, model_inputs)
    eos_ids, pad_id, model_inputs = args.eos_ids, args.pad_id, args.model_inputs
    if attention_mask is None:
        attention_mask = generation_args.infer_attention_mask(input_ids, pad_id, eos_ids)
    input_ids, attention_mask, candidate_mask = check_inputs(input_ids, attention_mask, candidate_mask, model)
    adapter.check_rope_inputs(model_inputs)
    adapter.check_length(input_ids.shape[1] + max_new_tokens)
    if candidate_mask is None:
        candidate_mask = adapter.visual_mask(input_ids)
    candidate_mask = candidate_mask & attention_mask.bool()
    run = _Measurement(adapter, input_ids, attention_mask, candidate_mask, max(gammas), max_new_tokens, eos_ids,
                       pad_id, window, model_inputs)
    for precision in draft_weights:
        draft_weights_module.check_draft_weights(precision, input_ids.device)
    bar = _bar(progress, len(configs) * len(draft_weights))
    records = []
    with adapter.std_attention():
        run.prefill_and_answer()
        for precision in draft_weights:
            run.use_draft_weights(precision)
            for policy, budget in configs:
                if policy in STATIC_POLICIES:
                    runs, plan, selection = run.draft_runs(policy, budget)
                    for gamma in gammas:
                        record = run.rounds_from_runs(runs, policy, budget, gamma)
                        records.append(run.with_bytes(record, plan, selection))
                else:
                    records += [run.engine_rounds(policy, budget, gamma) for gamma in gammas]
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return records


class _Measurement:
    """One prefill, one dense answer, then draft runs per keep set."""

    def __init__(self, adapter, input_ids, attention_mask, candidate_mask, gamma_max, max_new_tokens, eos_ids, pad_id,
                 window, model_inputs):
        self.adapter, self.input_ids, self.attention_mask = adapter, input_ids, attention_mask
        self.candidate_mask, self.gamma_max, self.max_new = candidate_mask, gamma_max, max_new_tokens
        self.eos_ids, self.pad_id, self.window, self.model_inputs = eos_ids, pad_id, window, model_inputs
        self.prompt_len = attention_mask.sum(1)  # [B]
        self.device = input_ids.device
        # every draft of a round that starts before max_new_tokens compares with an answer token
        self.horizon = max_new_tokens + gamma_max + 1
        batch, width = input_ids.shape
        dtype = next(adapter.model.parameters()).dtype
        self.cache = StaticCache.allocate(adapter.num_layers, batch, adapter.num_kv_heads, adapter.head_dim,
                                          width + self.horizon + gamma_max + 2, dtype, self.device)
        self.timer = _PhaseTimer(self.device)
        self.warp = _Warp(False, 1.0, None, None, None)
        self.draft_weights = None  # the DraftWeights the draft steps run (None: the model's own)
        self.weight_bytes = budget_model.model_cost(adapter, dtype).weight_bytes

    def use_draft_weights(self, precision: str | None) -> None:
        """Draft with ``precision``'s copy of the weights from now on (None: the model's own)."""
        model = self.adapter.model
        self.draft_weights = (None if precision is None else
                              draft_weights_module.draft_weights_for(model, self.adapter.decoder, precision))
        self.decoder.steps.use_draft_weights(self.draft_weights)

    def prefill_and_answer(self) -> None:
        """Dense prefill, then the dense greedy answer, decoded past EOS up to the horizon."""
        logits, self.step, self.rope_delta = _prefill(
            self.adapter, self.cache, self.input_ids, self.attention_mask, self.candidate_mask, self.prompt_len,
            self.window, True, self.model_inputs)
        self.captured = dict(self.step.captured)
        self.first = self.warp.pick(logits[:, -1])  # [B]
        # a one-query decoder: decodes the answer, then runs every draft step with the engine's own forward
        self.decoder = _Decoder(self.adapter, self.cache, None, self.warp, 0, [-1], self.pad_id, self.horizon,
                                self.rope_delta, self.prompt_len, self.timer, GenerationStats("vanilla", 0, 0))
        self.answer = self.decoder.run(self.first, False)  # [B, horizon]
        is_eos = torch.isin(self.answer[:, : self.max_new], torch.tensor(self.eos_ids, device=self.device))
        # emitted answer length per sequence: through the first EOS, at most max_new_tokens
        self.answer_len = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, self.max_new).tolist()
        low, high = int(self.prompt_len.min()), int(self.prompt_len.max()) + self.horizon
        self.region = slice(low, high)
        self.dense_keys = self.cache.keys[:, :, :, self.region].clone()
        self.dense_values = self.cache.values[:, :, :, self.region].clone()

    def _restore(self) -> None:
        """Put back the dense answer K/V that draft steps or replays overwrote."""
        self.cache.keys[:, :, :, self.region].copy_(self.dense_keys)
        self.cache.values[:, :, :, self.region].copy_(self.dense_values)

    def _fresh_step(self) -> ForwardStep:
        return dataclasses.replace(self.step, captured=dict(self.captured))

    def _keep(self, policy: str, budget: int | str) -> tuple[_StepIndices | None, _KeepPlan, SelectionPolicy]:
        """Set the keep sets of ``policy`` in the cache: (the per-step indices or None, the plan, the policy).

        The oracle's and ``"follow"``'s keep sets are re-chosen at each draft step (the oracle
        prices ``"auto"`` as the question's set: its scoring is not charged).
        """
        selection = _policy(policy)
        plan = _select(self.adapter, self.cache, selection, self._fresh_step(), self.candidate_mask, self.prompt_len,
                       budget, gamma=self.gamma_max, max_new_tokens=self.max_new)
        if policy == "oracle":
            choose = self._oracle_choice(plan)
        elif selection.needs_draft_queries:
            choose = selection.draft_keep
        else:
            return None, plan, selection
        indices = _StepIndices(self.cache, plan, self.adapter.num_kv_heads, self.decoder, choose)
        self.cache.keep = dataclasses.replace(self.cache.keep, indices=indices)
        return indices, plan, selection

    def _oracle_choice(self, plan: _KeepPlan):
        def choose(layer: int, query: torch.Tensor, k_cache: torch.Tensor) -> torch.Tensor | None:
            if plan.k_max == 0:
                return None
            scores = ops.attention_scores(query, k_cache, self.decoder._step.slots.to(torch.int32),
                                          self.decoder._step.scale)
            return ragged_topk(scores, plan.candidates, plan.k, plan.k_max)

        return choose

    def with_bytes(self, record: AgreementRecord, plan: _KeepPlan, selection: SelectionPolicy) -> AgreementRecord:
        """``record`` with its keep sets' sizes and draft-step reads (see :class:`AgreementRecord`)."""
        n_candidates = plan.candidates.sum(1).tolist()
        n_always = plan.always.sum(1).tolist()
        reads = [always + (float(k) if record.policy == "oracle" else selection.draft_reads(k, n, record.gamma))
                 for always, k, n in zip(n_always, plan.k.tolist(), n_candidates)]
        positions = sum(reads) / len(reads)
        element = self.cache.keys.element_size()
        position_bytes = 2 * self.adapter.num_layers * self.adapter.num_kv_heads * self.adapter.head_dim * element
        weights = self.weight_bytes
        if self.draft_weights is not None:
            weights += self.draft_weights.weight_bytes - self.draft_weights.original_bytes
        return dataclasses.replace(record, kept=sum(plan.budgets) / len(plan.budgets), draft_positions=positions,
                                   draft_kv_bytes=positions * position_bytes,
                                   draft_weights=None if self.draft_weights is None else self.draft_weights.precision,
                                   draft_weight_bytes=float(weights), batch=len(reads))

    def draft_runs(self, policy: str, budget: int | str) -> tuple[torch.Tensor, _KeepPlan, SelectionPolicy]:
        """long ``[B, max_new]``: drafts matching the answer in a chain starting at each position (≤ γ_max);
        with the plan and the policy that chose the keep sets."""
        oracle, plan, selection = self._keep(policy, budget)
        batch = self.answer.shape[0]
        runs = torch.zeros(batch, self.max_new, dtype=torch.long, device=self.device)
        answer_len = torch.tensor(self.answer_len, device=self.device)
        for start in range(max(self.answer_len)):
            alive = start < answer_len  # [B]
            token = self.answer[:, start]
            for j in range(self.gamma_max):
                positions = (self.prompt_len + start + j)[:, None]  # [B, 1]
                logits = self._sparse_forward(token[:, None], positions, oracle)
                alive &= logits[:, 0].argmax(-1) == self.answer[:, start + j + 1]
                runs[:, start] += alive.long()
                if not bool(alive.any()):
                    break
                token = self.answer[:, start + j + 1]
            self._restore()
        return runs, plan, selection

    def _sparse_forward(self, tokens, positions, oracle):
        """One draft step ``tokens [B, 1]`` at ``positions [B, 1]``; a per-step policy needs its query captured."""
        return self.decoder._forward("sparse", tokens, positions, capture=oracle is not None)  # [B, 1, V]

    def rounds_from_runs(self, runs: torch.Tensor, policy: str, budget: int, gamma: int) -> AgreementRecord:
        """Greedy StD rounds with draft length ``gamma``, replayed from the draft runs."""
        runs = runs.tolist()
        answer = self.answer.tolist()
        eos = set(self.eos_ids)
        rounds = accepted = 0
        accepted_at = [0] * gamma
        agree = positions = 0
        for b, length in enumerate(self.answer_len):
            agree += sum(run > 0 for run in runs[b][: length - 1])
            positions += length - 1
            emitted, start = 1, 0
            finished = answer[b][0] in eos or emitted >= self.max_new
            while not finished:
                n = min(runs[b][start], gamma)
                rounds, accepted = rounds + 1, accepted + n
                for j in range(n):
                    accepted_at[j] += 1
                for token in answer[b][start + 1 : start + n + 2]:  # the accepted drafts, then the bonus token
                    emitted += 1
                    if token in eos or emitted >= self.max_new:
                        finished = True
                        break
                start += n + 1
        mean = accepted / max(rounds, 1)
        by_position = [count / max(rounds, 1) for count in accepted_at]
        return AgreementRecord(policy, budget, gamma, agree / max(positions, 1), mean, mean / gamma, by_position,
                               sum(self.answer_len), "chain")

    def engine_rounds(self, policy: str, budget: int | str, gamma: int) -> AgreementRecord:
        """The engine's own decoder after the shared prefill; its answer must be the dense one."""
        selection = _policy(policy)
        plan = _select(self.adapter, self.cache, selection, self._fresh_step(), self.candidate_mask, self.prompt_len,
                       budget, gamma=self.gamma_max, max_new_tokens=self.max_new)
        stats = GenerationStats("std", gamma, budget)
        decoder = _Decoder(self.adapter, self.cache, selection, self.warp, gamma, self.eos_ids, self.pad_id,
                           self.max_new, self.rope_delta, self.prompt_len, self.timer, stats,
                           draft_weights=self.draft_weights)
        tokens = decoder.run(self.first, False).tolist()
        self._restore()
        for b, length in enumerate(self.answer_len):
            if tokens[b][:length] != self.answer[b, :length].tolist():
                raise RuntimeError(f"std_ext.measure_agreement: {policy} budget {budget} γ {gamma}: sequence {b} "
                                   "differs from dense decoding (a near-tie flipped by rounding?)")
        by_position = stats.acceptance_by_position
        agreement = by_position[0] if by_position else 0.0
        record = AgreementRecord(policy, budget, gamma, agreement, stats.mean_accepted, stats.mean_accepted / gamma,
                                 by_position, sum(self.answer_len), "engine")
        return self.with_bytes(record, plan, selection)


def _policy(name: str) -> SelectionPolicy:
    """The policy object behind a measured policy name (the oracle's keep sets start as the question's)."""
    if name == "oracle":
        return make_policy("question")
    if name == "follow_verify":
        return FollowPolicy(per_step=False)
    if name == "follow_question":
        return FollowPolicy(ratio=QUESTION_SUPERSET_RATIO, page=0)
    return make_policy(name)


class _StepIndices(StepKeepSets):
    """:class:`~std_ext.selection.StepKeepSets` over the measurement's decoder (``plan`` kept for the tests)."""

    def __init__(self, cache, plan: _KeepPlan, heads: int, decoder: _Decoder, choose) -> None:
        super().__init__(cache, heads, lambda: decoder._step, choose)
        self.plan, self.decoder = plan, decoder

    @property
    def step(self) -> ForwardStep:
        return self.decoder._step


def _check_grid(budgets, gammas, policies, max_new_tokens) -> None:
    def integers(values, name, low):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
            raise ValueError(f"std_ext.measure_agreement: {name} must be integers >= {low}, got {values!r}")

    if not budgets or any(b != "auto" and (isinstance(b, bool) or not isinstance(b, int) or b < 0) for b in budgets):
        raise ValueError(f"std_ext.measure_agreement: budgets must be integers >= 0 or 'auto', got {budgets!r}")
    integers(gammas, "gammas", 1)
    integers([max_new_tokens], "max_new_tokens", 1)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise ValueError(f"std_ext.measure_agreement: policies: unknown {unknown or policies!r}; use some of {POLICIES}")


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="std_ext agreement", unit="config")
