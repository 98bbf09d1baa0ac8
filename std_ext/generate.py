"""The decode engine: vanilla and Sparse-to-Dense generation over a static cache.

One prefill fills the cache and chooses the keep sets; then each round either decodes
one token densely (``mode="vanilla"``) or drafts γ tokens with sparse attention and
verifies them in one dense pass (``mode="std"``, DESIGN.md §1); with ``gamma="auto"``
a :class:`~std_ext.gamma.GammaController` picks each round's γ (0: a dense step) from
the step times and the draft agreement measured so far. Lengths live on the device and
rollback is just a length, so a round reads one value on the host: whether every
sequence has finished (plus, under ``"auto"``, the previous round's acceptance counts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from . import budget as budget_model
from . import draft_weights as draft_weights_module
from . import generation_inputs, sampling
from .attention import ForwardStep
from .cache import KeepSets, StaticCache
from .distributed import RankAgreement
from .gamma import GammaController, round_trials
from .models import ModelAdapter
from .selection import SelectionInputs, SelectionPolicy, StepKeepSets, keep_indices
from .steps import StepRunner


@dataclass
class GenerationStats:
    """What a generation did and where its time went.

    Attributes
    ----------
    mode : "std" or "vanilla"
    gamma : the most drafts a round may run: the fixed ``gamma``, ``gamma_max`` under
        ``gamma="auto"``, 0 in vanilla mode
    budget : the keep-set budget asked for (an int, or "auto")
    budget_chosen : kept prompt positions per KV head of each sequence, non-candidates
        included: an integer budget clamped to [#non-candidates, prompt length], or what
        ``budget="auto"`` chose
    rounds : decode rounds run after prefill (a vanilla round emits one token)
    new_tokens : tokens emitted per sequence (prefill's token included)
    mean_accepted : accepted draft tokens per drafting round (γ >= 1), averaged over active
        sequences' rounds
    acceptance_by_position : fraction of drafting rounds in which draft ``j`` (1-based ``j = i+1``)
        was accepted (``gamma`` entries; under "auto" a round with fewer drafts counts as a miss)
    draft_agreement : accepted drafts over tried drafts, a draft being tried only when every
        earlier one of its round was accepted: the per-token agreement of sparse and dense
    prefill_s, selection_s, draft_s, verify_s : wall time of each phase (decode = draft + verify;
        a vanilla step counts as verify)
    keep_size : mean kept prompt positions per (sequence, KV head), layer 0
    gamma_auto : whether γ was chosen per round (``gamma="auto"``)
    gammas : γ of each round, in order: the fixed ``gamma``; under "auto" the controller's
        choice, 0 being a plain dense step; all 0 in vanilla mode
    warnings : what the generation warned about (e.g. a budget that keeps no candidate)
    cuda_graphs : decode steps captured as CUDA graphs (one per kind and width used; 0 off CUDA)
    graph_memory_bytes : device memory those captures reserved
    draft_weights : the precision the draft steps' linear layers ran at (None: the model's own)
    draft_weights_bytes : memory the quantized copy holds (made once per model and cached on it;
        0 where it shares the model's weights); ``draft_weight_read_bytes`` is what one draft
        step reads for those layers, against ``dense_weight_read_bytes`` for the model's own
    """

    mode: str
    gamma: int
    budget: int
    rounds: int = 0
    new_tokens: list[int] = field(default_factory=list)
    mean_accepted: float = 0.0
    acceptance_by_position: list[float] = field(default_factory=list)
    prefill_s: float = 0.0
    selection_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    keep_size: float = 0.0
    draft_agreement: float = 0.0
    gamma_auto: bool = False
    gammas: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cuda_graphs: int = 0
    graph_memory_bytes: int = 0
    budget_chosen: list[int] = field(default_factory=list)
    draft_weights: str | None = None
    draft_weights_bytes: int = 0
    draft_weight_read_bytes: int = 0
    dense_weight_read_bytes: int = 0

    @property
    def decode_s(self) -> float:
        return self.draft_s + self.verify_s

    @property
    def draft_steps(self) -> int:
        """Sparse draft forwards run (``sum(gammas)``): ``draft_s / draft_steps`` is one draft step."""
        return sum(self.gammas)

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens emitted per active round (``mean_accepted + 1`` before stops truncate)."""
        return self.mean_accepted + 1.0


@dataclass
class GenerationOutput:
    """``sequences`` long ``[B, T + new]``: the prompt then the new tokens, ``pad_token_id``
    after a sequence's end (like ``transformers``' ``generate``); ``stats``: :class:`GenerationStats`."""

    sequences: torch.Tensor
    stats: GenerationStats


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    mode: str = "std",
    gamma: int | str = 9,
    gamma_max: int = 12,
    budget: int | str = 1024,
    window: int | None = None,
    selection: str | Callable | SelectionPolicy = "question",
    candidate_mask: torch.Tensor | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    max_length: int | None = None,
    generation_config=None,
    cuda_graphs: bool | None = None,
    progress: bool = False,
    draft_weights: str | None = None,
    **model_inputs,
) -> GenerationOutput:
    """Generate with Sparse-to-Dense decoding (or plain dense decoding), losslessly.

    The tokens are ``transformers``' ``model.generate(...)``'s for the same arguments.
    Generation arguments resolve as ``generate`` resolves them: this call's over
    ``generation_config`` (default: the model's own) over ``transformers``' defaults.

    Parameters
    ----------
    model : a ``transformers`` model whose text decoder runs full causal attention through the
        attention interface (:class:`std_ext.models.ModelAdapter` says what is refused, and why)
    input_ids : long ``[B, T]``, left-padded when ragged
    attention_mask : ``[B, T]`` of 0 and 1, 1 for tokens, 0 for left padding (default: the mask
        ``generate`` would infer from ``pad_token_id``)
    max_new_tokens : tokens to generate per sequence (EOS included), >= 1 (default: the
        generation config's; else ``max_length`` minus the prompt width)
    max_length : prompt width + new tokens, as in ``generate`` (``max_new_tokens`` wins)
    mode : "std" (sparse draft + dense verify) or "vanilla" (dense, one token per step)
    gamma : draft tokens per round, >= 1; or "auto": each round's γ in ``0 .. gamma_max`` is
        chosen from the measured draft / verify / dense step times and the running draft
        agreement (:mod:`std_ext.gamma`), 0 being a plain dense step when drafting would not pay
    gamma_max : the largest γ "auto" may choose, >= 1 (ignored for an integer ``gamma``)
    budget : kept prompt positions per KV head: every non-candidate position plus the top
        ``budget - #non-candidate`` candidates (clamped at 0; a budget that leaves no room for
        a candidate warns and is recorded in ``stats.warnings``); or "auto": per sequence, the
        largest keep set whose K/V over all layers (with the policy's scoring reads) costs the
        round at most ``std_ext.budget.DEFAULT_TOLERANCE`` of its predicted speedup under
        ``std_ext.gamma``'s cost model (:mod:`std_ext.budget`); ``stats.budget_chosen`` says what it chose
    window : at most this many observation queries (the tokens after the last candidate)
    selection : "question", "recent", "refresh" or a callable (see :mod:`std_ext.selection`)
    candidate_mask : bool ``[B, T]``, the selection pool; default: the model's video/image tokens
    do_sample, temperature, top_k, top_p : sampling as in ``transformers``' ``generate`` (and
        with its defaults: ``top_k`` 50 when sampling unless set); the draft samples from the
        same warped distribution
    generator : ``torch.Generator`` on the model's device, for reproducible sampling
    eos_token_id, pad_token_id : default to the generation config's
    generation_config : a ``transformers.GenerationConfig`` in place of the model's own
    cuda_graphs : capture each decode step (draft, dense, verify of each width) as a CUDA graph on
        first use and replay it (default: on CUDA; the CPU runs the same static buffers eagerly).
        Same tokens either way; a step that cannot be captured falls back to eager, with a warning
    progress : show progress bars: prefill (per decoder layer) and decoding (per emitted token)
    draft_weights : None (the draft runs the model's own weights), "bf16", "fp8", "int8" or "int4":
        the draft steps run a weight-only quantized copy of the decoder's linear layers and LM head
        (:mod:`std_ext.draft_weights`; made once per model, cached on it); verify and dense steps
        always run the model's own weights, so the tokens are the same. A precision the device
        cannot run is a ``ValueError`` before any work
    **model_inputs : other prefill inputs the model's forward takes (``pixel_values_videos``,
        ``video_grid_thw``, ``mm_token_type_ids``, ...). Any other keyword is a ``TypeError``;
        a generation argument std_ext does not reproduce exactly (``num_beams``,
        ``repetition_penalty``, ``min_new_tokens``, ``stop_strings``, ...) is refused by name.

    Returns
    -------
    GenerationOutput
        ``sequences [B, T + new]`` and :class:`GenerationStats`.
    """
    adapter = ModelAdapter.for_model(model)
    ranks = RankAgreement(model)
    explicit = {name: value for name, value in dict(
        max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id).items() if value is not None}
    call = generation_inputs.check_call(
        model, adapter, ranks, input_ids, attention_mask, candidate_mask, mode=mode, gamma=gamma, gamma_max=gamma_max,
        budget=budget, window=window, selection=selection, generation_config=generation_config, explicit=explicit,
        max_length=max_length, model_inputs=model_inputs)
    input_ids, attention_mask, candidate_mask, prompt_len = (
        call.input_ids, call.attention_mask, call.candidate_mask, call.prompt_len)
    args, model_inputs, gamma, policy, dtype = call.args, call.args.model_inputs, call.gamma, call.policy, call.dtype
    warp = _Warp(args.do_sample, args.temperature, args.top_k, args.top_p, generator, args.repetition_penalty)
    device = input_ids.device
    batch, width = input_ids.shape
    max_new_tokens = args.max_new_tokens
    draft = draft_weights_module.prepare(model, adapter.decoder, draft_weights, device, mode, ranks)
    stats = GenerationStats(mode=mode, gamma=gamma, budget=budget, gamma_auto=call.gamma_auto)
    if draft is not None:
        stats.draft_weights, stats.draft_weights_bytes = draft.precision, draft.nbytes
        stats.draft_weight_read_bytes, stats.dense_weight_read_bytes = draft.weight_bytes, draft.original_bytes
    if mode == "std":
        generation_inputs.warn_on_budget(candidate_mask, prompt_len, budget, stats)
    cache = StaticCache.allocate(adapter.num_layers, batch, adapter.num_kv_heads, adapter.head_dim, call.capacity,
                                 dtype, device, span=width + max_new_tokens)
    timer = _PhaseTimer(device)

    with adapter.std_attention():
        with timer.phase("prefill"), _layer_progress(adapter, progress, "std_ext prefill"):
            first_logits, step, rope_delta = _prefill(adapter, cache, input_ids, attention_mask, candidate_mask,
                                                      prompt_len, window, mode == "std", model_inputs)
        if mode == "std":
            with timer.phase("selection"):
                _select(adapter, cache, policy, step, candidate_mask, prompt_len, budget, stats=stats,
                        draft_weights=draft)
            stats.keep_size = float((cache.keep.indices[0] >= 0).sum(-1).float().mean())
        seen = None if warp.repetition_penalty is None else _SeenTokens(input_ids, first_logits.shape[-1])
        decoder = _Decoder(adapter, cache, policy, warp, gamma, args.eos_ids, args.pad_id, max_new_tokens, rope_delta,
                           prompt_len, timer, stats, seen=seen,
                           controller=GammaController(gamma) if call.gamma_auto else None,
                           cuda_graphs=device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs),
                           ranks=ranks, draft_weights=draft)
        new_tokens = decoder.run(warp.pick(first_logits[:, -1], None if seen is None else seen.now), progress)
    timer.collect(stats)
    sequences = torch.cat([input_ids, new_tokens], dim=1)
    return GenerationOutput(sequences=sequences, stats=stats)


# --------------------------------------------------------------------------- prefill


def _prefill(adapter, cache, input_ids, attention_mask, candidate_mask, prompt_len, window, capture, model_inputs):
    """Dense forward over the prompt; writes the cache; returns last-token logits."""
    batch, width = input_ids.shape
    pad = width - prompt_len  # [B]
    columns = torch.arange(width, device=input_ids.device)
    slots = columns[None, :] - pad[:, None]  # [B, T] cache position of each input token
    slots = torch.where(slots < 0, cache.capacity, slots)
    prefill_real = attention_mask.bool() if bool((pad > 0).any()) else None
    capture_rows, capture_real = _observation_rows(candidate_mask, attention_mask, window) if capture else (None, None)
    step = ForwardStep(
        mode="prefill", cache=cache, slots=slots, kv_len=prompt_len.to(torch.int32),
        prefill_real=prefill_real, capture_rows=capture_rows,
    )
    position_ids, rope_delta = adapter.prefill_positions(input_ids, attention_mask, model_inputs)
    if "logits_to_keep" in adapter.forward_inputs:  # the prefill needs the last position's logits only
        model_inputs = {**model_inputs, "logits_to_keep": 1}
    out = adapter.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
        std_ext_step=step, **model_inputs,
    )
    if capture_rows is not None:
        step.capture_pos = torch.where(capture_real, torch.gather(slots, 1, capture_rows), -1)  # [B, R], -1 = pad
    return out.logits, step, rope_delta


def _observation_rows(
    candidate_mask: torch.Tensor, attention_mask: torch.Tensor, window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input rows of the observation queries, int64 ``[B, R]``, and which are real (bool ``[B, R]``).

    The prompt tokens after the last candidate, at most ``window`` of them; a prompt that
    ends on a candidate observes with its last token.
    """
    batch, width = candidate_mask.shape
    columns = torch.arange(width, device=candidate_mask.device)
    last_candidate = torch.where(candidate_mask, columns, -1).amax(1)  # [B], -1: none
    observe = (columns[None] > last_candidate[:, None]) & attention_mask.bool()
    if window is not None:
        observe &= columns[None] >= width - window
    observe[:, -1] = True
    count = int(observe.sum(1).max())
    rows = torch.where(observe, columns, width).sort(1).values[:, :count]
    real = rows < width
    return torch.where(real, rows, width - 1), real  # padding repeats the last row


# --------------------------------------------------------------------------- selection


def _select(adapter, cache, policy, step, candidate_mask, prompt_len, budget, *, gamma: int | None = None,
            max_new_tokens: int | None = None, stats: GenerationStats | None = None,
            draft_weights=None) -> _KeepPlan:
    """Keep sets of every layer (DESIGN.md §1), stored in ``cache.keep``; returns the plan
    (and records the budget chosen in ``stats``).

    ``gamma`` and ``max_new_tokens`` price ``budget="auto"``; by default they are read from
    the cache as :func:`generate` sizes it (``span`` = prompt width + max_new_tokens,
    ``capacity`` = span + γ + 1, γ being ``gamma_max`` under ``gamma="auto"``); ``draft_weights``
    (the draft's quantized copy, or None) prices the draft step's weight reads.
    """
    auto = None
    if budget == "auto":
        width = candidate_mask.shape[1]
        gamma = cache.capacity - cache.span - 1 if gamma is None else gamma
        max_new_tokens = cache.span - width if max_new_tokens is None else max_new_tokens
        cost = budget_model.model_cost(adapter, cache.keys.dtype, draft_weights)  # a quantized draft reads less

        def auto(n_candidates: list[int], n_always: list[int]) -> list[int]:
            return budget_model.auto_budget(cost, prompt_len=prompt_len.tolist(), n_candidates=n_candidates,
                                            n_always=n_always, max_new_tokens=max_new_tokens, gamma=max(gamma, 1),
                                            reads=policy.draft_reads).k

    plan = _keep_plan(cache, step, candidate_mask, prompt_len, budget, auto)
    if stats is not None:
        stats.budget_chosen = plan.budgets
    if auto is not None:
        _warn_on_auto_budget(plan, stats)
    query_pos = step.capture_pos.to(torch.int32)
    indices = []
    for layer in range(adapter.num_layers):
        k_cache, _ = cache.layer(layer)
        chosen = None
        if plan.k_max > 0:
            chosen = policy.select(SelectionInputs(
                layer=layer, queries=step.captured[layer], query_pos=query_pos, k_cache=k_cache,
                candidates=plan.candidates, k=plan.k, k_max=plan.k_max, scale=step.scale,
                prompt_len=prompt_len.to(torch.int32),
            ))
        indices.append(keep_indices(plan.always, chosen, adapter.num_kv_heads, plan.width))
    step.captured.clear()
    cache.keep = KeepSets(indices=indices, tail_start=prompt_len.to(torch.int32), always=plan.always, width=plan.width)
    return plan


@dataclass
class _KeepPlan:
    """How a budget splits over cache positions: ``candidates`` and ``always`` bool ``[B, S]``,
    ``k`` long ``[B]`` candidates to choose, ``k_max = max(k)``, ``width`` bounds a keep set,
    ``budgets`` the kept prompt positions per KV head of each sequence (``always + k``, ``B`` ints)."""

    candidates: torch.Tensor
    always: torch.Tensor
    k: torch.Tensor
    k_max: int
    width: int
    budgets: list[int] = field(default_factory=list)


def _keep_plan(cache, step, candidate_mask, prompt_len, budget, auto=None) -> _KeepPlan:
    """The plan of an integer ``budget``, or of ``auto(n_candidates, n_always) -> k`` (``B`` ints each)."""
    batch = candidate_mask.shape[0]
    device = candidate_mask.device
    capacity = cache.capacity
    candidates = torch.zeros(batch, capacity + 1, dtype=torch.bool, device=device)
    candidates.scatter_(1, step.slots, candidate_mask)
    candidates = candidates[:, :capacity]  # [B, S] over cache positions
    in_prompt = torch.arange(capacity, device=device)[None] < prompt_len[:, None]
    always = in_prompt & ~candidates  # [B, S]
    n_candidates = candidates.sum(1)
    if auto is None:
        k = (budget - always.sum(1)).clamp(min=0).minimum(n_candidates)  # [B]
    else:
        k = torch.tensor(auto(n_candidates.tolist(), always.sum(1).tolist()), dtype=torch.long, device=device)
    budgets = (always.sum(1) + k).tolist()
    return _KeepPlan(candidates=candidates, always=always, k=k, k_max=int(k.max()), width=max(budgets),
                     budgets=budgets)


def _warn_on_auto_budget(plan: _KeepPlan, stats: GenerationStats | None) -> None:
    """``budget="auto"`` keeping no candidate where there are some: the keep set would not pay its bytes."""
    starved = (plan.k == 0) & plan.candidates.any(1)
    if bool(starved.any()):
        message = (f"budget='auto' keeps no candidate (visual) token in {int(starved.sum())} of {starved.numel()} "
                   "sequences: their non-candidate prompt tokens alone cost the draft step more than the cost model "
                   "allows (a small model over a long prompt); pass an integer budget to keep candidates anyway")
        warnings.warn(f"std_ext.generate: {message}", stacklevel=4)
        if stats is not None:
            stats.warnings.append(message)


# --------------------------------------------------------------------------- decoding


class _Warp:
    """Greedy or sampled token choice, with the same processing for draft and target.

    ``seen`` (bool ``[..., V]``, the tokens of each row's sequence so far) feeds the
    repetition penalty, applied before the warping as ``generate`` applies it; it is
    ignored when there is no penalty.
    """

    def __init__(self, do_sample, temperature, top_k, top_p, generator, repetition_penalty=None):
        self.do_sample, self.generator = do_sample, generator
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.repetition_penalty = repetition_penalty

    def process(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        if self.repetition_penalty is None:
            return logits
        return sampling.repetition_penalize(logits, seen, self.repetition_penalty)

    def probs(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        return sampling.warp_probs(self.process(logits, seen), self.temperature, self.top_k, self.top_p)

    def pick(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        if not self.do_sample:
            return sampling.greedy_tokens(self.process(logits, seen))
        return sampling.sample_tokens(self.probs(logits, seen), self.generator)


class _SeenTokens:
    """Which tokens each sequence holds so far (the repetition penalty's input), on the device.

    ``now`` is bool ``[B, V]``: the prompt as passed (padding included, as ``generate``
    counts it) and every emitted token. A round reads it with its drafts added: draft
    ``j`` and verify row ``j`` see the drafts before them as part of the sequence.
    """

    def __init__(self, input_ids: torch.Tensor, vocab: int) -> None:
        self.vocab = vocab
        self.table = torch.zeros(input_ids.shape[0], vocab + 1, dtype=torch.bool, device=input_ids.device)
        self.table.scatter_(1, input_ids.clamp(0, vocab), True)  # column V absorbs masked writes

    @property
    def now(self) -> torch.Tensor:
        return self.table[:, : self.vocab]  # [B, V]

    def add(self, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """Mark ``tokens [B, k]`` where ``valid [B, k]``."""
        self.table.scatter_(1, torch.where(valid, tokens, self.vocab), True)

    def with_drafts(self, drafts: torch.Tensor) -> torch.Tensor:
        """bool ``[B, γ+1, V]``: row ``i`` holds the sequence up to draft ``i`` (row 0: none)."""
        batch, gamma = drafts.shape
        rows = self.now[:, None].repeat(1, gamma + 1, 1)
        for j in range(gamma):
            rows[:, j + 1:].scatter_(2, drafts[:, j, None, None].expand(-1, gamma - j, 1), True)
        return rows


class _Tally:
    """Acceptance counts of the decode loop, kept on the device (read once, at the end).

    ``last`` holds the previous round's accepted and tried drafts summed over its active
    sequences, long ``[2]``: under ``gamma="auto"`` it rides along with the round's readback.
    """

    def __init__(self, gamma: int, batch: int, device: torch.device) -> None:
        def zeros(size: int) -> torch.Tensor:
            return torch.zeros(size, dtype=torch.long, device=device)

        self.rounds, self.accepted, self.trials = zeros(batch), zeros(batch), zeros(batch)  # [B] drafting rounds
        self.accepted_at = zeros(max(gamma, 1))  # [γ_max] rounds accepting draft j+1
        self.last = zeros(2)
        self.offsets = torch.arange(max(gamma, 1), device=device)

    def add(self, active: torch.Tensor, n: torch.Tensor, gamma: int, keep_last: bool) -> None:
        """Count a round of ``gamma`` drafts: ``active`` bool ``[B]``, ``n`` accepted long ``[B]``."""
        if gamma == 0:  # a dense step drafts nothing
            if keep_last:
                self.last = torch.zeros_like(self.last)
            return
        accepted = torch.where(active, n, 0)
        trials = torch.where(active, round_trials(n, gamma), 0)
        self.rounds += active.long()
        self.accepted += accepted
        self.trials += trials
        self.accepted_at[:gamma] += ((self.offsets[None, :gamma] < n[:, None]) & active[:, None]).sum(0)
        if keep_last:
            self.last = torch.stack([accepted.sum(), trials.sum()])


class _Decoder:
    """Rounds after prefill; all per-sequence state stays on the device.

    ``gamma`` is every round's γ (0: vanilla decoding) or, with a ``controller``
    (``gamma="auto"``), the most drafts a round may run: the cache is sized for it and
    the controller picks each round's γ in ``0 .. gamma``.
    """

    def __init__(self, adapter, cache, policy, warp, gamma, eos_ids, pad_id, max_new_tokens, rope_delta,
                 prompt_len, timer, stats, controller: GammaController | None = None, seen: _SeenTokens | None = None,
                 cuda_graphs: bool = False, ranks: RankAgreement | None = None, draft_weights=None):
        self.adapter, self.cache, self.policy, self.warp = adapter, cache, policy, warp
        self.ranks = ranks if ranks is not None else RankAgreement(adapter.model)
        self.steps = StepRunner(adapter, cache, rope_delta, cuda_graphs, stats.warnings, draft_weights)
        self.draft_queries = policy is not None and policy.needs_draft_queries
        if self.draft_queries:  # the policy re-chooses inside every draft step, in place (graph-safe)
            cache.keep = dataclasses.replace(cache.keep, indices=StepKeepSets(
                cache, adapter.num_kv_heads, lambda: self.steps.current, policy.draft_keep))
        self.seen = seen  # the repetition penalty's token sets; None without a penalty
        self.gamma, self.pad_id, self.max_new_tokens = gamma, pad_id, max_new_tokens
        self.rope_delta, self.timer, self.stats = rope_delta, timer, stats
        self.controller = controller
        device = prompt_len.device
        self.eos_ids = torch.tensor(eos_ids, dtype=torch.long, device=device)
        self.cur_len = prompt_len.clone()  # [B] cached tokens; the pending token sits at cur_len
        self.offsets = torch.arange(gamma + 1, device=device)  # [γ+1]
        if controller is not None:
            timer.track_rounds()

    def run(self, first: torch.Tensor, progress: bool) -> torch.Tensor:
        batch, device = first.shape[0], first.device
        out = torch.full((batch, self.max_new_tokens + 1), self.pad_id, dtype=torch.long, device=device)
        out[:, 0] = first
        if self.seen is not None:
            self.seen.add(first[:, None], torch.ones_like(first[:, None], dtype=torch.bool))
        emitted = torch.ones(batch, dtype=torch.long, device=device)
        finished = torch.isin(first, self.eos_ids) | (emitted >= self.max_new_tokens)
        pending = first
        tally = _Tally(self.gamma, batch, device)
        gammas: list[int] = []
        bar = _progress_bar(progress, batch * self.max_new_tokens)
        while True:
            readback = torch.stack([finished.all().long(), emitted.sum()])
            if self.controller is not None:
                readback = torch.cat([readback, tally.last])  # + the last round's accepted and tried drafts
            done, total, *counts = readback.tolist()  # the round's one sync
            if counts and gammas:
                self._observe(gammas[-1], *counts)
            if bar is not None:
                bar.update(total - bar.n)
            if done:
                break
            gamma = self.gamma if self.controller is None else self.controller.choose()
            active = ~finished
            n, bonus, drafts = self._round(pending, gamma)  # [B], [B], [B, γ]
            self._emit(out, emitted, finished, active, n, bonus, drafts, gamma)
            # stale lengths of finished rows are clamped so their writes stay inside the cache
            self.cur_len = torch.where(active, self.cur_len + n + 1, self.cur_len).clamp(
                max=self.cache.capacity - self.gamma - 1)
            pending = bonus
            tally.add(active, n, gamma, keep_last=self.controller is not None)
            gammas.append(gamma)
        if bar is not None:
            _end_progress(bar)
        self._finish_stats(gammas, tally, emitted)
        return out[:, : int(emitted.max())]

    def _emit(self, out, emitted, finished, active, n, bonus, drafts, gamma) -> None:
        """Write a round's accepted drafts and bonus token into ``out``, up to EOS and
        ``max_new_tokens``; updates ``emitted`` and ``finished`` in place."""
        offsets = self.offsets[: gamma + 1]  # [γ+1]
        tokens = torch.where(offsets[None] < n[:, None], torch.cat([drafts, bonus[:, None]], 1), bonus[:, None])
        valid = (offsets[None] <= n[:, None]) & active[:, None]  # [B, γ+1]
        is_eos = torch.isin(tokens, self.eos_ids) & valid
        first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), gamma + 1)
        valid &= offsets[None] <= first_eos[:, None]
        valid &= offsets[None] < (self.max_new_tokens - emitted)[:, None]
        slots = torch.where(valid, emitted[:, None] + offsets[None], self.max_new_tokens)
        out.scatter_(1, slots, torch.where(valid, tokens, self.pad_id))
        if self.seen is not None:
            self.seen.add(tokens, valid)
        emitted += valid.sum(1)
        finished |= (is_eos & valid).any(1) | (emitted >= self.max_new_tokens)

    def _observe(self, gamma: int, accepted: int, trials: int) -> None:
        """Hand the controller what the previous round measured (its CUDA events are complete:
        the readback that returned ``accepted`` and ``trials`` waited for the round)."""
        seconds = {"draft": 0.0, "verify": 0.0}
        for name, elapsed in self.timer.drain():
            if name in seconds:
                seconds[name] += elapsed
        # every rank must choose the same γ (it shapes the next forward): the slowest rank's times
        draft, verify = self.ranks.max([seconds["draft"], seconds["verify"]])
        self.controller.observe(gamma, draft, verify, accepted, trials)

    def _round(self, pending: torch.Tensor, gamma: int):
        if gamma == 0:
            with self.timer.phase("verify"):
                logits = self._forward("dense", pending[:, None], self.cur_len[:, None])  # [B, 1, V]
                token = self.warp.pick(logits[:, 0], self._seen_now())
            empty = pending.new_empty(pending.shape[0], 0)
            return torch.zeros_like(pending), token, empty
        with self.timer.phase("draft"):
            drafts, draft_probs = self._draft(pending, gamma)
        with self.timer.phase("verify"):
            offsets = self.offsets[: gamma + 1]
            block = torch.cat([pending[:, None], drafts], 1)  # [B, γ+1]
            positions = self.cur_len[:, None] + offsets[None]  # [B, γ+1]
            capture = self.policy.needs_verify_queries
            step_logits = self._forward("dense", block, positions, capture=capture)  # [B, γ+1, V]
            seen = None if self.seen is None else self.seen.with_drafts(drafts)  # [B, γ+1, V]
            if self.warp.do_sample:
                n, bonus = sampling.speculative_accept(drafts, draft_probs, self.warp.probs(step_logits, seen),
                                                       self.warp.generator)
            else:
                n, bonus = sampling.greedy_accept(drafts, self.warp.process(step_logits, seen))
            if capture:
                self._refresh(positions, n, offsets)
        return n, bonus, drafts

    def _draft(self, pending: torch.Tensor, gamma: int):
        batch = pending.shape[0]
        drafts = pending.new_empty(batch, gamma)
        probs = []
        token = pending
        seen = None if self.seen is None else self.seen.now.clone()  # [B, V], grows with the drafts
        for j in range(gamma):
            logits = self._forward("sparse", token[:, None], (self.cur_len + j)[:, None],
                                   capture=self.draft_queries)[:, 0]  # [B, V]
            if self.warp.do_sample:
                q = self.warp.probs(logits, seen)
                token = sampling.sample_tokens(q, self.warp.generator)
                probs.append(q)
            else:
                token = self.warp.pick(logits, seen)
            drafts[:, j] = token
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
        return drafts, (torch.stack(probs, 1) if probs else None)  # [B, γ], [B, γ, V]

    def _seen_now(self) -> torch.Tensor | None:
        return None if self.seen is None else self.seen.now

    def _forward(self, mode: str, tokens: torch.Tensor, positions: torch.Tensor, capture: bool = False):
        """One model forward of ``tokens [B, Q]`` at cache ``positions [B, Q]``; logits ``[B, Q, V]``
        (the step's output buffer: consumed before the same step runs again)."""
        logits, _ = self.steps(mode, tokens, positions, capture)
        return logits

    @property
    def _step(self) -> ForwardStep | None:
        """The forward running, or the last one run (its captured queries feed the policies)."""
        return self.steps.current

    def _refresh(self, positions: torch.Tensor, n: torch.Tensor, offsets: torch.Tensor) -> None:
        """Let the policy re-choose keep sets from the accepted verify queries."""
        query_pos = torch.where(offsets[None] <= n[:, None], positions, -1).to(torch.int32)  # [B, γ+1]
        keep = self.cache.keep
        for layer in range(self.adapter.num_layers):
            k_cache, _ = self.cache.layer(layer)
            chosen = self.policy.after_verify(layer, self._step.captured[layer], query_pos, k_cache)
            if chosen is not None:  # in place: captured draft steps read these very buffers
                keep.indices[layer].copy_(keep_indices(keep.always, chosen, self.adapter.num_kv_heads, keep.width))

    def _finish_stats(self, gammas: list[int], tally: _Tally, emitted: torch.Tensor) -> None:
        stats = self.stats
        stats.rounds = len(gammas)
        stats.gammas = gammas
        stats.new_tokens = emitted.tolist()
        rounds, accepted, trials = (int(v) for v in torch.stack(
            [tally.rounds.sum(), tally.accepted.sum(), tally.trials.sum()]).tolist())
        stats.mean_accepted = accepted / max(rounds, 1)
        stats.acceptance_by_position = [v / max(rounds, 1) for v in tally.accepted_at[: self.gamma].tolist()]
        stats.draft_agreement = accepted / max(trials, 1)
        stats.cuda_graphs, stats.graph_memory_bytes = self.steps.captured, self.steps.graph_bytes


# --------------------------------------------------------------------------- helpers


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="std_ext decode", unit="tok")


def _end_progress(bar) -> None:
    """Close the decode bar; one that every sequence's EOS stopped short of its total says so
    (a bar frozen at 17/48 reads as a hang or a crash)."""
    if bar.n < bar.total:
        bar.set_postfix_str(f"ended at EOS after {bar.n} of at most {bar.total} tokens", refresh=False)
        bar.total = bar.n
        bar.refresh()
    bar.close()


@contextlib.contextmanager
def _layer_progress(adapter: ModelAdapter, enabled: bool, desc: str) -> Iterator[None]:
    """A progress bar advanced by each decoder layer of one long forward (the prefill)."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    layers = list(adapter.decoder.layers)
    bar = tqdm(total=len(layers), desc=desc, unit="layer")

    def advance(*_) -> None:  # a forward hook that returns a value replaces the layer's output
        bar.update(1)

    handles = [layer.register_forward_hook(advance) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        bar.close()


class _PhaseTimer:
    """Wall time per phase without a host sync per phase (CUDA events, read at the end).

    After :meth:`track_rounds`, :meth:`drain` also returns each phase recorded since the
    previous drain (for the γ controller); on CUDA only once a sync has covered them.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.recent: list[tuple[str, float]] | None = None  # CPU phases not drained yet; None: not tracked
        self.drained = 0  # CUDA: events before this index were drained

    def track_rounds(self) -> None:
        """Start keeping phases for :meth:`drain` (those recorded so far are skipped)."""
        self.recent, self.drained = [], len(self.events)

    def drain(self) -> list[tuple[str, float]]:
        """``(phase, seconds)`` of every phase recorded since the last drain, in order."""
        if self.cuda:
            fresh = self.events[self.drained:]
            self.drained = len(self.events)
            return [(name, start.elapsed_time(end) / 1000.0) for name, start, end in fresh]
        fresh, self.recent = self.recent or [], []
        return fresh

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
        else:
            began = time.perf_counter()
            yield
            elapsed = time.perf_counter() - began
            self.totals[name] += elapsed
            if self.recent is not None:
                self.recent.append((name, elapsed))

    def collect(self, stats: GenerationStats) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self.events:
                self.totals[name] += start.elapsed_time(end) / 1000.0
        for name in ("prefill", "selection", "draft", "verify"):
            setattr(stats, f"{name}_s", self.totals.get(name, 0.0))
