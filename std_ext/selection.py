"""Keep-set policies: which candidate (visual) positions the sparse draft attends to.

Every policy fills the same slot: per layer, per KV head, a set of at most ``k[b]``
candidate positions. The engine adds every non-candidate prompt position (text) and
the dense tail of generated tokens. Whatever a policy picks, decoding stays lossless:
the dense verify pass decides every emitted token; a better keep set only means more
accepted drafts per round.

Policies
--------
``"question"`` (default, the paper's): top-K candidates by the attention the
observation queries (the question after the visual span) give them at prefill.
``"recent"``: text-blind baseline, 4 sink candidates and the most recent ones.
``"refresh"``: the question's set at prefill; after every verify pass, half of the
candidate budget is re-chosen, in blocks of 64 positions, from the attention the
accepted verify queries gave the candidates; the other half stays the question's.
``"follow"``: the keep set follows the newest query the engine shows the policy: where a
draft step hands the policy its own query (:meth:`SelectionPolicy.draft_keep`,
``needs_draft_queries``), that query, at every draft step; and after every verify pass
the last accepted verify query (:meth:`SelectionPolicy.after_verify`). Each re-choice
ranks pages of ``FOLLOW_PAGE`` positions by the query's attention to their mean candidate
key (one summary key per page, computed at prefill), takes the best pages covering
``SUPERSET_RATIO`` x the candidate budget, and keeps the top-K of those positions by the
query's exact attention. The extra read is bounded: the page summaries and the chosen
pages' keys, once per re-choice (:meth:`SelectionPolicy.draft_reads`). ``FollowPolicy(page=0)``
takes the question's top candidates at prefill as a fixed superset instead.
A callable ``policy(inputs: SelectionInputs) -> Tensor`` returning int32
``[B, H_kv, N]`` candidate positions (``-1`` padded) is used like ``"question"``.

Bytes
-----
:meth:`SelectionPolicy.draft_reads` says what one draft step reads from the cache for a
keep set of ``k`` candidates, in *positions*: one position is the keys and values of one
cached token for one KV head and layer (scoring reads keys only: half a position each).
``budget="auto"`` (:mod:`std_ext.budget`) and ``bench/agreement.py`` measure keep sets on
that axis.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import ops

REFRESH_BLOCK = 64
SINK_TOKENS = 4
SUPERSET_RATIO = 2  # "follow": superset width over the candidate budget
FOLLOW_PAGE = 16  # "follow": positions per page summary
KEY_SHARE = 0.5  # a scoring read of one position reads its key, half of its K/V bytes


@dataclass
class SelectionInputs:
    """What a policy sees for one layer at prefill.

    Attributes
    ----------
    layer : layer index
    queries : ``[B, T, H_q, D]`` observation queries (post-RoPE) of this layer
    query_pos : int32 ``[B, T]`` their cache positions, ``-1`` = padding
    k_cache : ``[B, H_kv, S, D]`` this layer's keys (prompt written)
    candidates : bool ``[B, S]`` positions a policy may choose from
    k : int64 ``[B]`` how many candidates to keep per sequence
    k_max : int, ``max(k)`` (a Python int, so policies need no host sync)
    scale : softmax scale of the layer
    prompt_len : int32 ``[B]``
    """

    layer: int
    queries: torch.Tensor
    query_pos: torch.Tensor
    k_cache: torch.Tensor
    candidates: torch.Tensor
    k: torch.Tensor
    k_max: int
    scale: float
    prompt_len: torch.Tensor


def ragged_topk(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """``topk_indices`` with a per-sequence ``k``.

    scores float32 ``[B, H, S]``, candidates bool ``[B, S]``, k int64 ``[B]`` (``<= k_max``)
    → int32 ``[B, H, k_max]``: each row's ``k[b]`` best candidates, ascending, ``-1`` padded.
    """
    chosen = ops.topk_indices(scores, candidates, k_max)  # [B, H, k_max] ascending
    if k_max == 0:
        return chosen
    valid = chosen >= 0
    chosen_scores = scores.gather(-1, chosen.clamp(min=0).long()).nan_to_num(nan=float("-inf"))
    chosen_scores = chosen_scores.masked_fill(~valid, float("-inf"))
    # a stable descending sort keeps ties in ascending position order, as topk_indices does
    order = torch.argsort(chosen_scores, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(k_max, device=order.device).expand_as(order))
    keep = valid & (rank < k.to(rank.device)[:, None, None])
    return _compact(chosen.masked_fill(~keep, -1))


def _compact(indices: torch.Tensor) -> torch.Tensor:
    """Move the ``-1`` entries of ascending index rows to the end (keeping the order)."""
    big = torch.iinfo(torch.int32).max
    ordered = indices.masked_fill(indices < 0, big).sort(dim=-1).values
    return ordered.masked_fill(ordered == big, -1)


def mask_to_indices(mask: torch.Tensor, width: int) -> torch.Tensor:
    """bool ``[B, H, S]`` → int32 ``[B, H, width]``: the True positions ascending, ``-1`` padded.

    ``width`` must bound every row's count (rows beyond it would be truncated).
    """
    rank = mask.long().cumsum(-1) - 1  # [B, H, S]
    slot = torch.where(mask, rank, torch.full_like(rank, width)).clamp(max=width)
    out = torch.full((*mask.shape[:-1], width + 1), -1, dtype=torch.int32, device=mask.device)
    positions = torch.arange(mask.shape[-1], dtype=torch.int32, device=mask.device).expand_as(mask)
    out.scatter_(-1, slot, torch.where(mask, positions, -1))
    return out[..., :width]


def indices_to_mask(indices: torch.Tensor, size: int) -> torch.Tensor:
    """int32 ``[B, H, N]`` (``-1`` padded) → bool ``[B, H, size]``."""
    mask = torch.zeros((*indices.shape[:-1], size + 1), dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, indices.long().masked_fill(indices < 0, size), True)
    return mask[..., :size]


def keep_indices(always: torch.Tensor, chosen: torch.Tensor | None, heads: int, width: int) -> torch.Tensor:
    """A layer's keep set: the ``always`` positions (bool ``[B, S]``) ∪ ``chosen`` (int32
    ``[B, H, N]`` or None) → int32 ``[B, H, width]`` ascending, ``-1`` padded."""
    keep = always[:, None, :].expand(-1, heads, -1)
    if chosen is not None:
        keep = keep | indices_to_mask(chosen, always.shape[-1])
    return mask_to_indices(keep, width)


class SelectionPolicy(ABC):
    """Base class: choose at prefill; optionally re-choose after each verify pass or per draft step."""

    needs_verify_queries = False
    needs_draft_queries = False

    @abstractmethod
    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        """int32 ``[B, H_kv, N]`` chosen candidate positions (``-1`` padded)."""

    def after_verify(self, layer: int, queries: torch.Tensor, query_pos: torch.Tensor, k_cache: torch.Tensor) -> torch.Tensor | None:
        """New chosen candidate positions for ``layer`` after a verify pass, or None to keep them."""
        return None

    def draft_keep(self, layer: int, query: torch.Tensor, k_cache: torch.Tensor) -> torch.Tensor | None:
        """Chosen candidate positions for one draft step of ``layer`` from its own query
        ``[B, 1, H_q, D]`` (int32 ``[B, H_kv, N]``, ``-1`` padded), or None to keep the current set.

        Called inside the draft forward (before its sparse attention) only when
        ``needs_draft_queries``; it must not read device values on the host.
        """
        return None

    def draft_reads(self, k: int, candidates: int, gamma: int) -> float:
        """Cache positions one draft step reads per (KV head, layer) for ``k`` kept candidates
        out of ``candidates``, with ``gamma`` drafts per round, scoring reads included
        (non-candidate positions and the generated tail not counted)."""
        return float(k)


class QuestionPolicy(SelectionPolicy):
    """The paper's selection: the observation queries' attention at prefill, top-K."""

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        scores = ops.attention_scores(inputs.queries, inputs.k_cache, inputs.query_pos, inputs.scale)
        return ragged_topk(scores, inputs.candidates, inputs.k, inputs.k_max)


class RecentPolicy(SelectionPolicy):
    """Text-blind baseline: the first 4 candidates (attention sinks) and the most recent ones."""

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        batch, heads, size = inputs.k_cache.shape[0], inputs.k_cache.shape[1], inputs.k_cache.shape[2]
        position = torch.arange(size, device=inputs.candidates.device, dtype=torch.float32)
        order = inputs.candidates.long().cumsum(-1)  # 1-based rank among candidates
        # sinks first (earliest first), then the most recent
        scores = torch.where(order <= SINK_TOKENS, 2.0 * size - position, position)
        scores = scores[:, None, :].expand(batch, heads, size).contiguous()
        return ragged_topk(scores, inputs.candidates, inputs.k, inputs.k_max)


class RefreshPolicy(SelectionPolicy):
    """The question's set at prefill; after each verify, half the budget follows the decode queries."""

    needs_verify_queries = True

    def draft_reads(self, k: int, candidates: int, gamma: int) -> float:
        # after each verify pass every candidate's key is scored again, once per round of γ drafts
        return float(k) + KEY_SHARE * candidates / max(gamma, 1)

    def __init__(self) -> None:
        self._question_half: dict[int, torch.Tensor] = {}  # layer -> bool [B, H, S]
        self._candidates: torch.Tensor | None = None
        self._blocks: torch.Tensor | None = None
        self._blocks_max = 0
        self._k_max = 0
        self._scale = 1.0

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        scores = ops.attention_scores(inputs.queries, inputs.k_cache, inputs.query_pos, inputs.scale)
        blocks = (inputs.k // 2) // REFRESH_BLOCK  # [B] blocks re-chosen each round
        question_k = inputs.k - blocks * REFRESH_BLOCK
        blocks_max = (inputs.k_max // 2) // REFRESH_BLOCK
        size = inputs.k_cache.shape[2]
        half = ragged_topk(scores, inputs.candidates, question_k, inputs.k_max)
        self._question_half[inputs.layer] = indices_to_mask(half, size)
        self._candidates, self._blocks, self._blocks_max = inputs.candidates, blocks, blocks_max
        self._k_max, self._scale = inputs.k_max, inputs.scale
        return ragged_topk(scores, inputs.candidates, inputs.k, inputs.k_max)

    def after_verify(self, layer: int, queries: torch.Tensor, query_pos: torch.Tensor, k_cache: torch.Tensor) -> torch.Tensor | None:
        if self._blocks_max == 0:
            return None
        question_half = self._question_half[layer]  # [B, H, S]
        batch, heads, size = question_half.shape
        scores = ops.attention_scores(queries, k_cache, query_pos, self._scale)  # [B, H, S]
        free = self._candidates[:, None, :] & ~question_half
        padded = -(-size // REFRESH_BLOCK) * REFRESH_BLOCK
        pooled = torch.nn.functional.pad(torch.where(free, scores, 0.0), (0, padded - size))
        block_scores = pooled.view(batch, heads, -1, REFRESH_BLOCK).sum(-1)  # [B, H, blocks]
        block_candidates = torch.nn.functional.pad(self._candidates, (0, padded - size))
        block_candidates = block_candidates.view(batch, -1, REFRESH_BLOCK).any(-1)  # [B, blocks]
        chosen_blocks = ragged_topk(block_scores, block_candidates, self._blocks, self._blocks_max)
        block_mask = indices_to_mask(chosen_blocks, padded // REFRESH_BLOCK)  # [B, H, blocks]
        refreshed = block_mask.repeat_interleave(REFRESH_BLOCK, dim=-1)[..., :size] & self._candidates[:, None, :]
        return mask_to_indices(question_half | refreshed, self._k_max)


def superset_scores(queries: torch.Tensor, valid: torch.Tensor, k_cache: torch.Tensor, superset: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """The attention ``queries`` give the positions of ``superset``, normalised over the superset.

    queries ``[B, Q, H_q, D]``, valid bool ``[B, Q]`` (which queries count), k_cache
    ``[B, H_kv, S, D]``, superset int32 ``[B, H_kv, M]`` (``-1`` padded) → float32
    ``[B, H_kv, M]``: per KV head, the mean over valid queries and the group's query heads of
    their softmax over the superset's keys (only those keys are read); 0 at padding.
    """
    batch, heads, width = superset.shape
    dim = k_cache.shape[-1]
    group = queries.shape[2] // heads
    padded = superset < 0  # [B, H, M]
    index = superset.clamp(min=0).long()[..., None].expand(-1, -1, -1, dim)
    keys = k_cache.gather(2, index).float()  # [B, H, M, D]
    q = queries.float().view(batch, queries.shape[1], heads, group, dim)  # [B, Q, H, G, D]
    logits = torch.einsum("bqhgd,bhmd->bhqgm", q, keys) * scale  # [B, H, Q, G, M]
    logits = logits.masked_fill(padded[:, :, None, None, :], float("-inf"))
    probs = logits.softmax(-1).nan_to_num(0.0)  # an all-padding row (no candidate) stays 0
    weight = valid.to(probs.dtype)[:, None, :, None, None]  # [B, 1, Q, 1, 1]
    count = (valid.sum(1).clamp(min=1) * group).to(probs.dtype)[:, None, None]  # [B, 1, 1]
    return (probs * weight).sum((2, 3)) / count


class FollowPolicy(SelectionPolicy):
    """The newest query's own top-K inside a superset: its best pages, or the question's set
    (see the module docstring).

    Parameters
    ----------
    ratio : superset width over the candidate budget ``k`` (capped at the candidates), >= 1
    per_step : re-choose at every draft step from its own query (``needs_draft_queries``),
        where the engine hands draft queries over; the verify re-choice runs either way
    page : ``P > 0``: the superset is re-chosen with the keep set, as the ``ceil(ratio·k / P)``
        pages of ``P`` consecutive positions whose mean candidate key the query attends to
        most (one summary key per page is read to rank them). 0: the superset is the
        question's top ``ratio·k`` candidates, fixed at prefill
    """

    needs_verify_queries = True

    def __init__(self, ratio: float = SUPERSET_RATIO, per_step: bool = True, page: int = FOLLOW_PAGE) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1:
            raise ValueError(f"std_ext.selection: FollowPolicy: ratio must be a number >= 1, got {ratio!r}")
        if isinstance(page, bool) or not isinstance(page, int) or page < 0:
            raise ValueError(f"std_ext.selection: FollowPolicy: page must be an integer >= 0, got {page!r}")
        self.ratio, self.needs_draft_queries, self.page = ratio, bool(per_step), page
        self._pages: dict[int, torch.Tensor] = {}  # layer -> [B, H, n_pages, D] mean candidate key per page
        self._page_index: torch.Tensor | None = None  # int32 [B, H, n_pages]: page number, -1 = no candidate
        self._page_count: torch.Tensor | None = None  # long [B] pages to pick
        self._page_max = 0
        self._candidates: torch.Tensor | None = None
        self._superset: dict[int, torch.Tensor] = {}  # layer -> int32 [B, H, M] ascending, -1 padded
        self._slots: torch.Tensor | None = None  # bool [B, M]: the superset slots that hold a position
        self._k: torch.Tensor | None = None
        self._k_max = 0
        self._scale = 1.0

    def superset_size(self, k: int, candidates: int) -> int:
        """Superset width for ``k`` kept candidates out of ``candidates``: ``min(ceil(ratio·k), candidates)``."""
        return min(candidates, max(k, math.ceil(self.ratio * k)))

    def draft_reads(self, k: int, candidates: int, gamma: int) -> float:
        # the keep set, plus the superset's keys (and the page summaries): at every draft step,
        # or once per round of γ drafts
        scored = self.superset_size(k, candidates) if k > 0 else 0
        if self.page and k > 0:
            scored = min(candidates, math.ceil(scored / self.page) * self.page) + math.ceil(candidates / self.page)
        scoring = KEY_SHARE * scored
        return float(k) + (scoring if self.needs_draft_queries else scoring / max(gamma, 1))

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        scores = ops.attention_scores(inputs.queries, inputs.k_cache, inputs.query_pos, inputs.scale)
        n_candidates = inputs.candidates.sum(1)  # [B]
        m = torch.minimum(n_candidates, torch.maximum(inputs.k, torch.ceil(inputs.k * self.ratio).long()))
        m_max = int(m.max())  # prefill: the selection phase may read the host
        self._superset[inputs.layer] = ragged_topk(scores, inputs.candidates, m, m_max)  # [B, H, M]
        self._slots = torch.arange(m_max, device=m.device)[None] < m[:, None]  # [B, M]
        self._k, self._k_max, self._scale = inputs.k, inputs.k_max, inputs.scale
        if self.page:
            self._page_summaries(inputs, m)
        return ragged_topk(scores, inputs.candidates, inputs.k, inputs.k_max)

    def _page_summaries(self, inputs: SelectionInputs, m: torch.Tensor) -> None:
        """Mean candidate key of every page of ``page`` positions (prompt keys never change)."""
        batch, heads, size, dim = inputs.k_cache.shape
        page = self.page
        padded = -(-size // page) * page
        candidates = torch.nn.functional.pad(inputs.candidates, (0, padded - size))  # [B, S']
        keys = torch.nn.functional.pad(inputs.k_cache.float(), (0, 0, 0, padded - size))  # [B, H, S', D]
        keys = keys * candidates[:, None, :, None]
        count = candidates.view(batch, -1, page).sum(-1)  # [B, n_pages]
        sums = keys.view(batch, heads, -1, page, dim).sum(3)  # [B, H, n_pages, D]
        self._pages[inputs.layer] = sums / count.clamp(min=1)[:, None, :, None]
        pages = torch.arange(count.shape[1], dtype=torch.int32, device=count.device)
        self._page_index = torch.where(count > 0, pages, -1)[:, None, :].expand(-1, heads, -1).contiguous()
        # a superset of every candidate needs every page that holds one (candidates need not align with pages)
        pages_with = (count > 0).sum(1)  # [B]
        self._page_count = torch.where(m >= inputs.candidates.sum(1), pages_with, torch.minimum(-(-m // page), pages_with))
        self._page_max = int(self._page_count.max())
        self._candidates = inputs.candidates

    def _page_superset(self, layer: int, queries: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """int32 ``[B, H, pages·P]``: the candidate positions of the best pages, ascending, ``-1`` elsewhere."""
        page = self.page
        scores = superset_scores(queries, valid, self._pages[layer], self._page_index, self._scale)  # [B, H, n]
        page_valid = self._page_index[:, 0] >= 0  # [B, n]
        chosen = ragged_topk(scores, page_valid, self._page_count, self._page_max)  # [B, H, pages] ascending
        offsets = torch.arange(page, dtype=torch.int32, device=chosen.device)
        positions = (chosen[..., None] * page + offsets).flatten(-2)  # [B, H, pages·P]
        size = self._candidates.shape[1]
        inside = (chosen[..., None] >= 0).expand(-1, -1, -1, page).flatten(-2) & (positions < size)
        heads = positions.shape[1]
        is_candidate = self._candidates[:, None, :].expand(-1, heads, -1).gather(
            -1, positions.clamp(0, size - 1).long())
        return torch.where(inside & is_candidate, positions, -1)

    def _choose(self, layer: int, queries: torch.Tensor, valid: torch.Tensor, k_cache: torch.Tensor) -> torch.Tensor:
        """int32 ``[B, H, k_max]``: the top-``k`` superset positions by the valid queries' attention."""
        if self.page:
            superset = self._page_superset(layer, queries, valid)  # -1 anywhere: per-head holes
            scores = superset_scores(queries, valid, k_cache, superset, self._scale)
            scores = scores.masked_fill(superset < 0, float("nan"))  # NaN ranks below every score
            slots = ragged_topk(scores, torch.ones_like(superset[:, 0], dtype=torch.bool), self._k, self._k_max)
            chosen = torch.where(slots >= 0, superset.gather(-1, slots.clamp(min=0).long()), -1)
            return _compact(chosen.to(torch.int32))  # a hole picked for want of candidates moves to the end
        superset = self._superset[layer]
        scores = superset_scores(queries, valid, k_cache, superset, self._scale)  # [B, H, M]
        slots = ragged_topk(scores, self._slots, self._k, self._k_max)  # superset slots, ascending
        # the superset is ascending, so ascending slots are ascending positions
        return torch.where(slots >= 0, superset.gather(-1, slots.clamp(min=0).long()), -1).to(torch.int32)

    def after_verify(self, layer: int, queries: torch.Tensor, query_pos: torch.Tensor, k_cache: torch.Tensor) -> torch.Tensor | None:
        if self._k_max == 0:
            return None
        # the last accepted verify query (the one that predicted the bonus token) is the newest
        accepted = query_pos >= 0  # [B, γ+1]
        last = (accepted.long().cumsum(1) == accepted.sum(1, keepdim=True)) & accepted
        return self._choose(layer, queries, last, k_cache)

    def draft_keep(self, layer: int, query: torch.Tensor, k_cache: torch.Tensor) -> torch.Tensor | None:
        if self._k_max == 0 or not self.needs_draft_queries:
            return None
        valid = torch.ones(query.shape[:2], dtype=torch.bool, device=query.device)
        return self._choose(layer, query, valid, k_cache)


class StepKeepSets:
    """``cache.keep.indices`` whose keep sets a policy re-chooses at every draft step, in place.

    The attention function stores a step's captured query before it reads
    ``keep.indices[layer]``, so indexing here during a sparse step that captures its query
    sees the query of the running step, and ``choose(layer, query [B, 1, H_q, D], k_cache)
    -> chosen int32 [B, H_kv, N] | None`` (e.g. :meth:`SelectionPolicy.draft_keep`)
    re-chooses from it; the keep set is copied into the layer's own buffer, so that a draft
    step captured as a CUDA graph replays the choice and reads the result (no host sync on
    the way). Outside such a step the buffer is returned as it stands (an in-place verify
    re-choice writes into it).

    Parameters
    ----------
    cache : the static cache, its keep sets chosen (``cache.keep``)
    heads : KV heads
    current_step : returns the :class:`~std_ext.attention.ForwardStep` running, or None
    choose : the per-step choice
    """

    def __init__(self, cache, heads: int, current_step: Callable, choose: Callable) -> None:
        keep = cache.keep
        self.cache, self.heads, self.current_step, self.choose = cache, heads, current_step, choose
        self.always, self.width = keep.always, keep.width
        self.buffers = [indices.clone() for indices in keep.indices]  # int32 [B, H, width] per layer

    def __len__(self) -> int:
        return len(self.buffers)

    def __getitem__(self, layer: int) -> torch.Tensor:
        step = self.current_step()
        if step is not None and step.mode == "sparse" and layer in step.captured:
            k_cache = self.cache.layer(layer)[0]
            chosen = self.choose(layer, step.captured[layer], k_cache)
            if chosen is not None:
                self.buffers[layer].copy_(keep_indices(self.always, chosen, self.heads, self.width))
        return self.buffers[layer]


POLICIES: dict[str, Callable[[], SelectionPolicy]] = {
    "question": QuestionPolicy,
    "recent": RecentPolicy,
    "refresh": RefreshPolicy,
    "follow": FollowPolicy,
}


class CallablePolicy(SelectionPolicy):
    """Wraps a user function ``fn(inputs: SelectionInputs) -> int32 [B, H_kv, N]``."""

    def __init__(self, fn: Callable[[SelectionInputs], torch.Tensor]) -> None:
        self.fn = fn

    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        chosen = self.fn(inputs)
        batch, heads = inputs.k_cache.shape[0], inputs.k_cache.shape[1]
        if not isinstance(chosen, torch.Tensor) or chosen.dim() != 3 or tuple(chosen.shape[:2]) != (batch, heads):
            raise ValueError(
                f"std_ext.generate: selection: the callable must return an int tensor [B={batch}, H_kv={heads}, N], "
                f"got {getattr(chosen, 'shape', type(chosen).__name__)} for layer {inputs.layer}"
            )
        chosen = chosen.to(device=inputs.candidates.device, dtype=torch.int32)
        in_range = (chosen >= 0) & (chosen < inputs.k_cache.shape[2])
        is_candidate = inputs.candidates[:, None, :].expand(-1, heads, -1).gather(-1, chosen.clamp(min=0).long())
        if bool(((chosen >= 0) & ~(in_range & is_candidate)).any()):
            raise ValueError(
                f"std_ext.generate: selection: the callable returned positions that are not candidates (layer {inputs.layer})"
            )
        return chosen


def make_policy(selection: str | Callable | SelectionPolicy) -> SelectionPolicy:
    """Resolve ``selection=`` into a fresh policy object."""
    if isinstance(selection, SelectionPolicy):
        return selection
    if isinstance(selection, str):
        if selection not in POLICIES:
            raise ValueError(f"std_ext.generate: selection: unknown policy {selection!r}; use one of {sorted(POLICIES)} or a callable")
        return POLICIES[selection]()
    if callable(selection):
        return CallablePolicy(selection)
    raise TypeError(f"std_ext.generate: selection: expected a policy name or a callable, got {type(selection).__name__}")
