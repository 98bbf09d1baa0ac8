"""Decode steps as functions of preallocated device buffers, replayed as CUDA graphs.

A decode step is one model forward of ``W`` new tokens per sequence: a sparse draft
step (``W = 1``), a dense step (``W = 1``) or a verify step (``W = γ + 1``). Each
(kind, width) owns its input buffers — tokens, cache positions, lengths — and a round
copies its tokens and positions into them on the device; everything else a step reads
(the cache, the keep sets, the rope deltas) is already a fixed device tensor that the
engine updates in place. So a step is a function of device memory alone, and on CUDA
it is captured once as a graph on first use and replayed after, with every graph of a
generation sharing one memory pool: an eager 28-layer forward costs hundreds of kernel
launches of host time, of the order of a 7B model's whole bandwidth floor per step.
On the CPU the same buffers run eagerly, so the buffer logic is what CI tests.
"""

from __future__ import annotations

import contextlib
import warnings as _warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import ForwardStep
from .cache import StaticCache


@dataclass
class _Step:
    """One (kind, width, captures-queries) step: its buffers, its forward, its graph."""

    tokens: torch.Tensor  # [B, W] long
    positions: torch.Tensor  # [B, W] long: cache positions, also the K/V write slots
    kv_len: torch.Tensor  # [B] int32, set inside the step from the positions
    state: ForwardStep
    forward: Callable[[], torch.Tensor] | None = None
    logits: torch.Tensor | None = None  # [B, W, V]: the graph's output buffer once captured
    graph: torch.cuda.CUDAGraph | None = None


class StepRunner:
    """Runs decode steps over static buffers; captures each (kind, width) once on CUDA.

    Parameters
    ----------
    adapter : the :class:`~std_ext.models.ModelAdapter` of the model
    cache : the static cache (its keep sets must be updated in place once decoding starts)
    rope_delta : long ``[B]``, the per-sequence RoPE offset (read by every step)
    use_graphs : capture CUDA graphs (ignored off CUDA)
    warnings : where a failed capture is reported (the run then continues eagerly: the
        tokens are the same, only slower)
    draft_weights : a :class:`~std_ext.draft_weights.DraftWeights` the sparse (draft) steps run
        with, or None (the model's own weights). The swap happens inside the step's function,
        so a captured draft graph holds the quantized matrix products; dense and verify steps
        never see them.
    """

    def __init__(self, adapter, cache: StaticCache, rope_delta: torch.Tensor, use_graphs: bool,
                 warnings: list[str] | None = None, draft_weights=None) -> None:
        self.adapter, self.cache, self.rope_delta = adapter, cache, rope_delta
        self.draft_weights = draft_weights
        self.use_graphs = use_graphs and rope_delta.device.type == "cuda"
        self.warnings = warnings if warnings is not None else []
        self.steps: dict[tuple[str, int, bool], _Step] = {}
        self.pool = None
        self.graph_bytes = 0  # device memory the captures reserved
        self.current: ForwardStep | None = None  # the step running or last run (policies read it mid-forward)

    def use_draft_weights(self, draft_weights) -> None:
        """Run later draft steps with ``draft_weights`` (a DraftWeights, or None); the draft steps
        built (or captured) with other weights are dropped, since their function holds those."""
        if draft_weights is not self.draft_weights:
            self.draft_weights = draft_weights
            self.steps = {key: step for key, step in self.steps.items() if key[0] != "sparse"}

    @property
    def captured(self) -> int:
        """Graphs captured so far."""
        return sum(step.graph is not None for step in self.steps.values())

    def __call__(self, mode: str, tokens: torch.Tensor, positions: torch.Tensor,
                 capture_queries: bool = False) -> tuple[torch.Tensor, ForwardStep]:
        """One forward of ``tokens [B, W]`` at cache ``positions [B, W]``.

        Returns the logits ``[B, W, V]`` (a buffer the next call of the same step
        overwrites) and the step's :class:`ForwardStep`, whose ``captured`` holds the
        layers' queries when ``capture_queries``.
        """
        key = (mode, tokens.shape[1], capture_queries)
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = self._build(*key)
        step.tokens.copy_(tokens)
        step.positions.copy_(positions)
        self.current = step.state
        if step.graph is not None:
            step.graph.replay()
        elif self.use_graphs:
            self._capture(step)
        else:
            step.logits = step.forward()
        return step.logits, step.state

    def _build(self, mode: str, width: int, capture_queries: bool) -> _Step:
        batch, device = self.rope_delta.shape[0], self.rope_delta.device
        tokens = torch.zeros(batch, width, dtype=torch.long, device=device)
        positions = torch.zeros(batch, width, dtype=torch.long, device=device)
        kv_len = torch.zeros(batch, dtype=torch.int32, device=device)
        rows = torch.arange(width, device=device)[None].expand(batch, -1) if capture_queries else None
        state = ForwardStep(mode=mode, cache=self.cache, slots=positions, kv_len=kv_len, capture_rows=rows)
        step = _Step(tokens=tokens, positions=positions, kv_len=kv_len, state=state)
        adapter, rope_delta = self.adapter, self.rope_delta
        weights = self.draft_weights.active if mode == "sparse" and self.draft_weights is not None else None

        def forward() -> torch.Tensor:
            kv_len.copy_(positions[:, -1] + 1)  # the queries' own K/V are stored first
            with weights() if weights is not None else contextlib.nullcontext():
                out = adapter.model(input_ids=tokens, position_ids=adapter.decode_positions(positions, rope_delta),
                                    use_cache=False, std_ext_step=state)
            return out.logits

        step.forward = forward
        return step

    def _capture(self, step: _Step) -> None:
        """Warm up on a side stream (the result is this call's), capture, then replay.

        Running a step twice at the same positions rewrites the same K/V and reads the
        same keys, so the warm-up and the replay give identical results.
        """
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step.logits = step.forward()
        torch.cuda.current_stream().wait_stream(side)
        reserved = torch.cuda.memory_reserved()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                logits = step.forward()
        except Exception as error:  # a model op that cannot be captured: decode eagerly instead
            self.use_graphs = False
            message = (f"CUDA graph capture of the {step.state.mode} step failed ({type(error).__name__}: "
                       f"{(str(error).splitlines() or [''])[0][:200]}); decoding continues without graphs (same "
                       "tokens, slower); pass cuda_graphs=False to skip the attempt")
            self.warnings.append(message)
            _warnings.warn(f"std_ext.generate: {message}", stacklevel=2)
            step.logits = step.forward()
            return
        self.graph_bytes += torch.cuda.memory_reserved() - reserved
        step.graph, step.logits = graph, logits
        graph.replay()
