"""The static KV cache of the decode engine (DESIGN.md §2).

One preallocated buffer holds every layer's keys and values in HF's layout,
``[B, H_kv, capacity, D]`` per layer. A sequence's valid length is a number, not a
shape: rolling back rejected draft tokens costs nothing, the next write simply
overwrites them. One extra slot past ``capacity`` absorbs the writes of left-padding
tokens at prefill, so a write never needs a mask; no kernel ever reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KeepSets:
    """Per-layer keep sets of the sparse draft (DESIGN.md §1).

    indices : list of int32 ``[B, H_kv, N]`` (one per layer)
        Kept prompt positions, ascending, ``-1`` padded at the end.
    tail_start : int32 ``[B]``
        First position of the dense tail (the prompt length): every position from
        here to a query's own is attended by the draft as well.
    always : bool ``[B, S]``
        Prompt positions every keep set holds (the non-candidates).
    width : int
        ``N``: bounds every keep set's size, so a policy can re-choose without a resize.
    """

    indices: list[torch.Tensor]
    tail_start: torch.Tensor
    always: torch.Tensor
    width: int


@dataclass
class StaticCache:
    """Preallocated per-layer K/V of a batch of sequences.

    Attributes
    ----------
    keys, values : Tensor ``[L, B, H_kv, capacity + 1, D]``
        Slot ``capacity`` is the write sink for padding tokens and is never read.
    capacity : int
        Positions available to each sequence.
    span : int
        Positions a generation can emit from (prompt width + max_new_tokens; the rest of
        the capacity holds draft and verify slots past the end): what a window must cover.
    """

    keys: torch.Tensor
    values: torch.Tensor
    capacity: int
    keep: KeepSets | None = field(default=None)
    span: int = 0

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        span: int | None = None,
    ) -> StaticCache:
        shape = (num_layers, batch_size, num_kv_heads, capacity + 1, head_dim)
        return cls(
            keys=torch.zeros(shape, dtype=dtype, device=device),
            values=torch.zeros(shape, dtype=dtype, device=device),
            capacity=capacity,
            span=capacity if span is None else span,
        )

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Readable K/V of one layer: views ``[B, H_kv, capacity, D]`` without the sink slot."""
        return self.keys[layer_idx, :, :, : self.capacity], self.values[layer_idx, :, :, : self.capacity]

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """Store new K/V rows at per-sequence positions.

        key, value : ``[B, H_kv, Q, D]`` (HF's layout after RoPE)
        slots : int64 ``[B, Q]``, positions in ``[0, capacity]``; ``capacity`` = discard.
        """
        expected = (self.keys.shape[1], self.keys.shape[2], self.keys.shape[4])  # (B, H_kv, D)
        for name, tensor in (("key", key), ("value", value)):
            got = (tensor.shape[0], tensor.shape[1], tensor.shape[3])
            if tensor.dim() != 4 or got != expected:
                raise ValueError(
                    f"std_ext cache: layer {layer_idx} gives a {name} of shape {tuple(tensor.shape)} [B, H_kv, Q, D], "
                    f"but the cache holds B={expected[0]}, H_kv={expected[1]}, D={expected[2]} (the geometry read "
                    "from the model's attention layers); a model whose layers differ in heads or head size, or "
                    "whose keys and values differ in size, is not supported"
                )
        index = slots[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])  # [B, H_kv, Q, D]
        self.keys[layer_idx].scatter_(2, index, key.to(self.keys.dtype))
        self.values[layer_idx].scatter_(2, index, value.to(self.values.dtype))
