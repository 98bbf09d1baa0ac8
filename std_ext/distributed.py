"""Agreement across tensor-parallel ranks (DESIGN.md §7).

Under ``transformers``' tensor parallelism every rank runs the same generation on its
own slice of the heads; the model's plan already gathers the logits, so the tokens —
and everything decided from them — are the same on every rank. What a rank measures
for itself is not: its step times, its free memory. A decision that changes the shape
of a forward (γ under ``gamma="auto"``) or whether the generation runs at all must
therefore come from values the ranks agree on, or the ranks run different collectives
and the job hangs. :class:`RankAgreement` agrees on such values with one small host-side
collective (no device sync: a gloo group, also when the model's own backend is NCCL).
"""

from __future__ import annotations

import torch

_CPU_GROUPS: dict[int, object] = {}  # id(default group) -> a gloo group over the same ranks


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a tensor-parallel (DTensor) parameter; the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "device_mesh") else tensor


def tensor_parallel_size(model: torch.nn.Module) -> int:
    """How many ranks share this model's heads (1: not tensor-parallel)."""
    size = getattr(model, "_tp_size", None)
    if isinstance(size, int) and size > 1:
        return size
    for parameter in model.parameters():
        mesh = getattr(parameter, "device_mesh", None)
        if mesh is not None:
            return int(mesh.size())
    return 1


class RankAgreement:
    """Agrees host values across the ranks of a tensor-parallel model; a no-op on one process."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.group = None
        if tensor_parallel_size(model) > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.group = _cpu_group()

    @property
    def active(self) -> bool:
        return self.group is not None

    def max(self, values: list[float]) -> list[float]:
        """The elementwise maximum over the ranks (e.g. step times: the slowest rank sets the pace)."""
        if self.group is None or not values:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return tensor.tolist()

    def same(self, values: list[float]) -> bool:
        """Whether every rank holds exactly these values."""
        if self.group is None:
            return True
        high = torch.tensor(values, dtype=torch.float64)
        low = -high
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX, group=self.group)
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(torch.equal(high, -low))

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        if self.group is None:
            return flag
        tensor = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return tensor.item() == 0.0


def _cpu_group():
    """A gloo group over every rank, created once (collectively) per process group."""
    default = torch.distributed.distributed_c10d._get_default_group()
    if torch.distributed.get_backend(default) == "gloo":
        return default
    key = id(default)
    if key not in _CPU_GROUPS:
        _CPU_GROUPS[key] = torch.distributed.new_group(backend="gloo")
    return _CPU_GROUPS[key]
