"""Low-precision weights for the draft (``std_ext.generate(draft_weights=...)``).

Only the dense verify decides the emitted tokens (DESIGN.md §1), so the draft may run
any approximation of the model: besides reading a sparse keep set, it may read a
quantized copy of the weights. :func:`draft_weights_for` makes, once per model and
precision, a weight-only copy of every ``nn.Linear`` in the text decoder's layers and of
the LM head; :meth:`DraftWeights.active` swaps those layers' forwards for the
quantized ones for the duration of a block. The engine enters it *inside* the draft
step's function (:class:`~std_ext.steps.StepRunner`), so a CUDA graph captured for the
draft step holds the quantized matrix products, and the verify / dense steps never see
them: they run the model's own weights.

Precisions, and the PyTorch kernels that run them:

* ``"bf16"``: the weights cast to bfloat16, ``F.linear`` in bfloat16. A model already in
  bfloat16 shares its own weights (no copy).
* ``"int8"``: symmetric per-output-channel int8, ``aten._weight_int8pack_mm`` (CPU and
  CUDA), activations in bfloat16.
* ``"int4"``: asymmetric int4 in groups of :data:`DEFAULT_GROUP_SIZE` input features
  (clipped to the largest of 128/64/32 that divides the layer's width), packed by
  ``aten._convert_weight_to_int4pack_for_cpu`` / ``_convert_weight_to_int4pack`` and
  multiplied by ``aten._weight_int4pack_mm_for_cpu`` / ``_weight_int4pack_mm`` (as
  gpt-fast does), activations in bfloat16.
* ``"fp8"``: float8 e4m3 weights with a per-output-channel scale, activations rounded
  to float8 e4m3 with one per-tensor scale computed on the device (no host sync: CUDA
  graphs stay valid). On CUDA (compute capability 8.9 or higher) ``torch._scaled_mm``;
  on the CPU the same roundings followed by a matrix product in the activations' dtype
  (dequantize, then matmul): torch 2.14's CPU ``_scaled_mm`` runs, but far slower than a
  float32 matmul on this kind of machine, so the CPU form is a reference that measures
  fp8's *agreement*, not a speed path.

Layers that are not ``nn.Linear`` (fused MoE expert tensors) and the embeddings keep the
model's precision.

Under ``transformers``' tensor parallelism each rank quantizes its own shard of every
column- and row-parallel linear layer (the LM head too, sharded as the plan shards it), and
the quantized forward runs inside the plan's own input and output transforms: a
column-parallel layer's output stays this rank's slice (or is gathered, as the plan says), a
row-parallel layer's partial product is all-reduced before its bias is added. The draft's
collectives are therefore the model's own, on every rank in the same order, and each rank
holds about ``1 / world`` of the single-process copy.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .distributed import local_shard

PRECISIONS = ("bf16", "fp8", "int8", "int4")
DEFAULT_GROUP_SIZE = 128
"""int4 group size: input features sharing one scale and zero point (gpt-fast's default).
A layer whose width it does not divide uses the largest of 64 and 32 that does."""
_GROUP_SIZES = (128, 64, 32)  # what the int4pack kernels accept (256 too, never preferred)
_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0  # largest finite e4m3fn value
_BITS = {"bf16": 16, "fp8": 8, "int8": 8, "int4": 4}


def _error(message: str) -> ValueError:
    return ValueError(f"std_ext.generate: draft_weights: {message}")


def check_draft_weights(draft_weights, device: torch.device) -> None:
    """Refuse, before any work, a ``draft_weights`` this device cannot run.

    ``None`` (the model's own weights) is always valid. Raises ``ValueError`` naming
    ``draft_weights`` and the precision. Every precision also runs on a tensor-parallel
    model, each rank quantizing its own shard.
    """
    if draft_weights is None:
        return
    if draft_weights not in PRECISIONS:
        raise _error(f"must be None or one of {', '.join(map(repr, PRECISIONS))}, got {draft_weights!r}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if draft_weights == "fp8" and (major, minor) < (8, 9):
            raise _error(f"'fp8' needs float8 matrix products (torch._scaled_mm), which need compute capability "
                         f"8.9 or higher; {torch.cuda.get_device_name(device)} is {major}.{minor}; use 'int8' or 'int4'")
        if draft_weights in ("int4", "bf16") and major < 8:
            raise _error(f"{draft_weights!r} needs bfloat16 matrix products (compute capability 8.0 or higher); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}; use 'int8'")
    elif device.type != "cpu":
        raise _error(f"{draft_weights!r} is implemented for CPU and CUDA devices, not {device.type}")


def group_size(in_features: int) -> int | None:
    """The int4 group size of a layer ``in_features`` wide, or None if no supported size divides it."""
    for size in _GROUP_SIZES:
        if size <= DEFAULT_GROUP_SIZE and in_features % size == 0:
            return size
    return None


# --------------------------------------------------------------------------- quantized layers


class _QuantizedLinear:
    """The forward of one ``nn.Linear`` over a quantized copy of its weight (``y`` in ``x``'s dtype)."""

    bias: torch.Tensor | None
    nbytes: int  # bytes a forward reads for its weight (packed weight, scales, zero points)
    sharded: _Sharding | None = None  # the tensor-parallel plan this rank's shard runs inside

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.sharded is None:
            return self.local(x)
        return self.sharded(self.local, x)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]))
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _Bf16Linear(_QuantizedLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight if weight.dtype == torch.bfloat16 else weight.to(torch.bfloat16)
        self.bias = None if bias is None else bias.to(torch.bfloat16)
        self.nbytes = 0 if self.weight is weight else self.weight.nbytes

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight)


class _Int8Linear(_QuantizedLinear):
    """Symmetric per-output-channel int8: ``w ~ q * scale``, ``q`` in [-127, 127]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.float()
        scale = (w.abs().amax(1) / 127.0).clamp(min=1e-12)  # [N]
        self.q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()  # [N, K]
        self.scale = scale.to(torch.bfloat16)
        self.bias = None if bias is None else bias.to(torch.bfloat16)
        self.nbytes = self.q.nbytes + self.scale.nbytes

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.q, self.scale)


def int4_quantize(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group`` input features, as gpt-fast computes it.

    Returns ``q`` int32 ``[N, K]`` in 0..15 and ``scales_and_zeros`` float32
    ``[K / group, N, 2]`` such that ``w ~ (q - 8) * scale + zero``, the form the
    ``_weight_int4pack_mm`` kernels take.
    """
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((high - low) / 15.0).clamp(min=1e-6)
    zero = low + scale * 8.0  # the kernels subtract 8 from q, then scale, then add the zero point
    q = ((w - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    scales_and_zeros = torch.cat([scale, zero], -1).transpose(0, 1).contiguous()  # [K/g, N, 2]
    return q, scales_and_zeros


class _Int4Linear(_QuantizedLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: int) -> None:
        q, scales_and_zeros = int4_quantize(weight, group)
        self.group = group
        k = weight.shape[1]
        if weight.device.type == "cuda":
            inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
            packed_pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # two int4 per byte, high nibble first
            self.packed = torch.ops.aten._convert_weight_to_int4pack(packed_pairs.contiguous(), inner_k_tiles)
            self.mm = torch.ops.aten._weight_int4pack_mm
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
            self.mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        self.scales_and_zeros = scales_and_zeros.to(torch.bfloat16)
        self.bias = None if bias is None else bias.to(torch.bfloat16)
        self.nbytes = self.packed.nbytes + self.scales_and_zeros.nbytes

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm(x.to(torch.bfloat16).contiguous(), self.packed, self.group, self.scales_and_zeros)


def fp8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 weights ``[N, K]`` and a float32 per-output-channel scale ``[N]``."""
    w = weight.float()
    scale = (w.abs().amax(1) / _FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).to(_FP8), scale


class _Fp8Linear(_QuantizedLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.q, self.scale = fp8_quantize(weight)
        self.cuda = weight.device.type == "cuda"
        self.qt = self.q.t()  # [K, N] column-major: the layout _scaled_mm takes for its second operand
        self.bias = None if bias is None else bias.float()
        self.one = torch.ones((), dtype=torch.float32, device=weight.device)
        self.nbytes = self.q.nbytes + self.scale.nbytes

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # one per-tensor activation scale, on the device (no host read: graph-safe)
        x_scale = (x.abs().amax().float() / _FP8_MAX).clamp(min=1e-12)
        x8 = (x.float() / x_scale).to(_FP8)
        if self.cuda:
            y = torch._scaled_mm(x8.contiguous(), self.qt, scale_a=x_scale, scale_b=self.one, out_dtype=torch.float32)
        else:  # the reference form: the same float8 roundings, then a float32 product
            y = (x8.float() * x_scale) @ self.qt.float()
        return y * self.scale


class _Sharding:
    """The tensor-parallel plan's own input and output transforms around a rank's quantized shard.

    ``transformers`` installs its transforms around the layer's original forward in a closure
    that cannot be pointed at another matrix product, so the quantized forward calls the same
    style's transforms itself: the draft then runs exactly the collectives of the model's own
    forward (a row-parallel all-reduce, a gathered LM head), in the same order on every rank.
    """

    def __init__(self, module: torch.nn.Module, style, mesh) -> None:
        self.module, self.style, self.mesh = module, style, mesh

    def __call__(self, local, x: torch.Tensor) -> torch.Tensor:
        (x, *_), _ = self.style.transform_inputs_pre_forward(self.module, (x,), {}, self.mesh)
        return self.style.transform_output_post_forward(self.module, local(x), self.mesh)


def _sharding_of(module: torch.nn.Linear, precision: str) -> tuple[_Sharding, bool] | None:
    """How tensor parallelism shards ``module`` (None: it does not) and whether the local
    forward adds the bias (a column shard's own slice) or the plan adds it after the reduce (rows).

    Only the column- and row-parallel linear styles are reproduced; any other sharding of a
    linear layer is refused, since a quantized forward without the plan's collectives would
    compute something else on each rank.
    """
    weight = module.weight
    if not hasattr(weight, "device_mesh"):
        return None
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard
    from transformers.distributed.tensor_parallel import ColwiseParallel, RowwiseParallel

    forward = module.__dict__.get("forward")
    cells = [cell.cell_contents for cell in (getattr(forward, "__closure__", None) or ())]
    style = next((c for c in cells if isinstance(c, (ColwiseParallel, RowwiseParallel))), None)
    mesh = next((c for c in cells if isinstance(c, DeviceMesh)), None)
    placements = tuple(weight.placements)
    row = isinstance(style, RowwiseParallel)
    sharded_dim = 1 if row else 0
    if (style is None or mesh is None or mesh.ndim != 1 or len(placements) != 1
            or not isinstance(placements[0], Shard) or placements[0].dim % 2 != sharded_dim):
        raise _error(f"{precision!r}: a tensor-parallel {type(module).__name__} ({tuple(weight.shape)}, placements "
                     f"{placements}) is sharded in a way std_ext does not reproduce (only transformers' column- and "
                     "row-parallel linear styles on a 1-D mesh are quantized per shard); pass draft_weights=None")
    return _Sharding(module, style, mesh), not row


def _quantize_linear(module: torch.nn.Linear, precision: str) -> _QuantizedLinear:
    sharding = _sharding_of(module, precision)
    weight = local_shard(module.weight.detach())
    row_parallel = sharding is not None and not sharding[1]  # the plan adds the bias after the reduce
    bias = None if module.bias is None or row_parallel else local_shard(module.bias.detach())
    quantized = _quantize(module, weight, bias, precision)
    quantized.sharded = None if sharding is None else sharding[0]
    return quantized


def _quantize(module: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
              precision: str) -> _QuantizedLinear:
    if precision == "bf16":
        return _Bf16Linear(weight, bias)
    if precision == "int8":
        return _Int8Linear(weight, bias)
    if precision == "fp8":
        return _Fp8Linear(weight, bias)
    group = group_size(weight.shape[1])
    if group is None or (weight.device.type == "cuda" and weight.shape[0] % 8):
        shard = " (this rank's shard)" if hasattr(module.weight, "device_mesh") else ""
        raise _error(f"'int4' needs every linear layer's input width to be a multiple of 32 (and, on CUDA, its "
                     f"output width a multiple of 8); {type(module).__name__} is {weight.shape[1]} -> {weight.shape[0]}"
                     f"{shard}; use 'int8'")
    return _Int4Linear(weight, bias, group)


# --------------------------------------------------------------------------- the copy of a model


@dataclass
class DraftWeights:
    """A quantized copy of a model's decoder linear layers and LM head.

    Attributes
    ----------
    precision : one of :data:`PRECISIONS`
    layers : ``(module, quantized forward)`` pairs, in module order
    nbytes : memory the copy holds (0 for ``"bf16"`` of a bfloat16 model: it shares the weights)
    weight_bytes : bytes one draft step reads for the quantized layers' weights
    original_bytes : bytes the same layers' own weights take (what a verify step reads for them)

    Under tensor parallelism every figure is this rank's: its shards, quantized.
    """

    precision: str
    layers: list[tuple[torch.nn.Module, _QuantizedLinear]]
    nbytes: int
    weight_bytes: int
    original_bytes: int
    versions: tuple[int, ...]  # the weights' version counters when quantized: a later in-place edit re-quantizes
    draft_forwards: int = 0  # forwards traced under active(): eager runs and captures (a graph replay does not count)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run the quantized forwards in place of the layers' own for the block.

        Each module's forward is set as an instance attribute (what ``nn.Module.__call__``
        calls) and restored after, also on an error; hooks on the modules still run.
        """
        saved = [(module, module.__dict__.get("forward")) for module, _ in self.layers]
        for module, quantized in self.layers:
            module.forward = quantized
        self.draft_forwards += 1
        try:
            yield
        finally:
            for module, previous in saved:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {precision: DraftWeights}


def draft_linears(model: torch.nn.Module, decoder: torch.nn.Module) -> list[torch.nn.Linear]:
    """Every ``nn.Linear`` of the text decoder's layers, then the LM head (if it is one)."""
    linears = [m for layer in decoder.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear) and all(head is not m for m in linears):
        linears.append(head)
    return linears


def draft_weights_for(model: torch.nn.Module, decoder: torch.nn.Module, precision: str) -> DraftWeights:
    """The model's quantized copy at ``precision``, made on first use and cached on the model.

    The cache is keyed weakly by the model (it goes with the model) and re-made when a
    layer's weight was changed in place since (its version counter moved).
    """
    linears = draft_linears(model, decoder)
    versions = tuple(local_shard(m.weight)._version for m in linears)
    per_model = _CACHE.setdefault(model, {})
    cached = per_model.get(precision)
    if cached is not None and cached.versions == versions and len(cached.layers) == len(linears) and all(
            a is b for (a, _), b in zip(cached.layers, linears)):
        return cached
    with torch.no_grad():
        layers = [(m, _quantize_linear(m, precision)) for m in linears]
    held = sum(q.nbytes for _, q in layers)
    weight_bytes = held if precision != "bf16" else sum(q.weight.nbytes for _, q in layers)
    original = sum(local_shard(m.weight).nbytes for m in linears)
    per_model[precision] = DraftWeights(precision=precision, layers=layers, nbytes=held, weight_bytes=weight_bytes,
                                        original_bytes=original, versions=versions)
    return per_model[precision]


def weight_bytes_ratio(precision: str | None, model_dtype: torch.dtype) -> float:
    """Bytes a quantized linear weight takes relative to the model's own (scales ignored)."""
    if precision is None:
        return 1.0
    return _BITS[precision] / (8 * torch.empty((), dtype=model_dtype).element_size())


def prepare(model: torch.nn.Module, decoder: torch.nn.Module, precision, device: torch.device, mode: str,
            ranks=None) -> DraftWeights | None:
    """Check ``draft_weights`` (before any work) and return the copy the draft steps use.

    None for ``precision=None`` and in vanilla mode (no draft step runs; the argument is
    still checked, so a typo is an error in either mode). Under tensor parallelism each rank
    quantizes its own shards, and ``ranks`` (a :class:`~std_ext.distributed.RankAgreement`)
    makes a refusal, or different precisions on different ranks, an error on every rank
    rather than a hang of the ranks that went on.
    """
    check_draft_weights(precision, device)
    draft, error = None, None
    if precision is not None and mode == "std":
        try:
            draft = draft_weights_for(model, decoder, precision)
        except ValueError as caught:
            error = caught
    if ranks is not None and not ranks.same([-1 if precision is None else PRECISIONS.index(precision),
                                              float(error is not None)]):
        raise error or _error(f"{precision!r}: the tensor-parallel ranks were given different draft_weights, or "
                              "another rank could not quantize its shard (its error names the layer)")
    if error is not None:
        raise error
    return draft


def read_bytes(weight_bytes: float, element_bytes: int, precision: str | None,
               group: int = DEFAULT_GROUP_SIZE) -> float:
    """Bytes one draft step reads for linear weights that take ``weight_bytes`` at the model's
    ``element_bytes`` per weight, stored at ``precision`` (a model shape's estimate, for
    :mod:`std_ext.budget` and the benchmarks' floor tables).

    int4 adds its bfloat16 scale and zero point per ``group`` weights (``4 / group`` bytes per
    weight); the per-row scales of int8 and fp8 (one value per output row, under 0.1% at a
    7B shape) are left out. ``None`` reads the weights as they are.
    """
    if precision is None:
        return float(weight_bytes)
    weights = weight_bytes / element_bytes
    per_weight = {"bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4.0 / group}[precision]
    return weights * per_weight
