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
A callable ``policy(inputs: SelectionInputs) -> Tensor`` returning int32
``[B, H_kv, N]`` candidate positions (``-1`` padded) is used like ``"question"``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import ops

REFRESH_BLOCK = 64
SINK_TOKENS = 4


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
    """Base class: choose at prefill; optionally re-choose after each verify pass."""

    needs_verify_queries = False

    @abstractmethod
    def select(self, inputs: SelectionInputs) -> torch.Tensor:
        """int32 ``[B, H_kv, N]`` chosen candidate positions (``-1`` padded)."""

    def after_verify(self, layer: int, queries: torch.Tensor, query_pos: torch.Tensor, k_cache: torch.Tensor) -> torch.Tensor | None:
        """New chosen candidate positions for ``layer`` after a verify pass, or None to keep them."""
        return None


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


POLICIES: dict[str, Callable[[], SelectionPolicy]] = {
    "question": QuestionPolicy,
    "recent": RecentPolicy,
    "refresh": RefreshPolicy,
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
