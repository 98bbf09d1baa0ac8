"""Shared fixtures and input builders for the std_ext op tests.

- ``device``: "cpu" and "cuda"; cuda skips without a GPU, and skips while an op the
  test calls has no CUDA kernel (the ops: ``@pytest.mark.std_ops(...)``, else an ``op``
  parameter, else all four).
- ``gen``: a torch.Generator seeded from the test's node id (differs per parametrization).
- Builders return inputs with the layouts the ops must accept: q as a transposed
  [B,H,Q,D] tensor, caches as views into a bigger buffer. Every slot an op must not
  read (past kv_len / past the last queried position, other heads, extra capacity,
  padding of the last dim) holds POISON, so an out-of-range read shows in the result.
"""

import os
import re
import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import std_ext  # noqa: E402,F401  (registers torch.ops.std.*)

OPS = ("attention_scores", "topk_indices", "sparse_attention", "dense_attention")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Bound on ||out - ref|| / ||ref|| for the attention outputs, per output dtype.
ATTN_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
# attention_scores (float32 output for every input dtype), per device: the CPU kernel adds
# probabilities in float32 like the reference; the issue bounds the CUDA kernel at 1e-3.
SCORES_TOL = {"cpu": 1e-5, "cuda": 1e-3}
# The CUDA attention kernels run on tensor cores: float16 / bfloat16 only.
CUDA_FLOAT_OPS = ("attention_scores", "sparse_attention", "dense_attention")
POISON = float("nan")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "std_ops(*names): std ops a test calls (cuda skips until they have a CUDA kernel)"
    )
    config.addinivalue_line(
        "markers", "emulator_subset(*cases, **allowed): with the `kernels` fixture, the cases the emulated "
        "backend runs (param=value or tuple of values; any of the dicts in cases); the others skip as GPU-only",
    )


def pytest_addoption(parser):
    parser.addoption(
        "--first-light", choices=("curated", "rest"), default=None,
        help="split the selected tests for a short GPU run (tools/gpu_run.sh first-light): 'curated' keeps one "
             "case per test function x dtype x head dim plus every row-invariance and graph-capture case; "
             "'rest' keeps the others",
    )


# Test names whose every case belongs to the curated first-light set.
_ALWAYS_CURATED = ("bitwise", "invariance", "graph")


def _first_light_group(item):
    """(function, dtype, head dim) of a parametrized test; one case per group is curated."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    dtype = params.get("dtype")
    head_dim = params.get("D", params.get("head_dim"))
    return item.module.__name__, item.originalname, str(dtype), str(head_dim)


def pytest_collection_modifyitems(config, items):
    part = config.getoption("--first-light")
    if part is None:
        return
    # A GPU run's split: the emulated backend's cases (CPU) belong to neither part.
    emulated = [item for item in items if is_emulated_case(item)]
    if emulated:
        config.hook.pytest_deselected(items=emulated)
        items[:] = [item for item in items if not is_emulated_case(item)]
    seen, curated, rest = set(), [], []
    for item in items:
        group = _first_light_group(item)
        if any(word in item.name for word in _ALWAYS_CURATED) or group not in seen:
            seen.add(group)
            curated.append(item)
        else:
            rest.append(item)
    keep = curated if part == "curated" else rest
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


def has_cuda_kernel(op):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"std::{op}", "CUDA")
    except RuntimeError:
        return False


def skip_without_cuda_kernels(request):
    """Skips a GPU case without a GPU, or while an op it calls (`@pytest.mark.std_ops(...)`,
    else an ``op`` parameter, else all four) has no CUDA kernel. Returns those ops."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    marker = request.node.get_closest_marker("std_ops")
    params = getattr(request.node, "callspec", None)
    op_param = params.params.get("op") if params else None
    ops = marker.args if marker else (op_param,) if op_param in OPS else OPS
    missing = [op for op in ops if not has_cuda_kernel(op)]
    if missing:
        pytest.skip(f"no CUDA kernel registered yet for std::{', std::'.join(missing)}")
    return ops


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda":
        ops = skip_without_cuda_kernels(request)
        params = getattr(request.node, "callspec", None)
        dtype = params.params.get("dtype") if params else None
        if dtype == torch.float32 and any(op in CUDA_FLOAT_OPS for op in ops):
            pytest.skip("the CUDA attention kernels take float16/bfloat16 (float32 runs on CPU)")
    return request.param


def work_dtype(device):
    """The dtype a test uses where any would do: float32 on CPU, bfloat16 on CUDA (whose
    attention kernels take float16/bfloat16 only)."""
    return torch.float32 if device == "cpu" else torch.bfloat16


@pytest.fixture(autouse=True)
def poison_fresh_outputs():
    """Every tensor an op allocates starts as NaN (ints: their max value): PyTorch's
    deterministic mode fills fresh at::empty memory, so an output element a kernel
    forgets to write fails the comparison instead of passing on leftover memory."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture
def gen(request):
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- inputs


def ints(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def poison(cache, valid_len):
    """In place: cache[b, :, s] = POISON for every slot s >= valid_len[b] (garbage slots)."""
    for b, n in enumerate(valid_len):
        cache[b, :, n:] = POISON
    return cache


def make_q(B, Qn, H, D, dtype, device, gen, strided=True):
    """q [B,Qn,H,D]. strided: a [B,H,Qn,D+pad] buffer sliced to D and transposed(1,2);
    the padding holds POISON."""
    if not strided:
        return torch.randn(B, Qn, H, D, generator=gen).to(dtype).to(device)
    buf = torch.full((B, H, Qn, D + 8), POISON)
    buf[..., :D] = torch.randn(B, H, Qn, D, generator=gen)
    return buf.to(dtype).to(device)[..., :D].transpose(1, 2)


def make_cache(B, H, S, D, valid_len, dtype, device, gen, strided=True):
    """Cache [B,H,S,D]; slots s >= valid_len[b] hold POISON. strided: a view
    big[:, 1:1+H, 3:3+S, :D] of a bigger POISON-filled buffer (extra heads, extra
    capacity on both sides, padded last dim)."""
    vals = poison(torch.randn(B, H, S, D, generator=gen), valid_len)
    if not strided:
        return vals.to(dtype).to(device)
    big = torch.full((B, H + 2, S + 9, D + 16), POISON)
    big[:, 1 : 1 + H, 3 : 3 + S, :D] = vals
    return big.to(dtype).to(device)[:, 1 : 1 + H, 3 : 3 + S, :D]


def make_indices(tail_start, Hkv, N, gen, device):
    """indices [B,Hkv,N]: per (b,h) a random number (0..min(N, tail_start[b])) of
    distinct positions < tail_start[b] (gaps in between), ascending, then -1 padding."""
    B = len(tail_start)
    out = torch.full((B, Hkv, N), -1, dtype=torch.int32)
    for b, ts in enumerate(tail_start):
        for h in range(Hkv):
            n = int(torch.randint(0, min(N, ts) + 1, (1,), generator=gen))
            pos = torch.randperm(ts, generator=gen)[:n].sort().values
            out[b, h, :n] = pos.to(torch.int32)
    return out.to(device)


def randint(lo, hi, gen):
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


# ----------------------------------------------------------------------------- checks


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64 (plain ||out|| when ref is all zero); NaN-aware."""
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    num = (out64 - ref64).norm().item()
    den = ref64.norm().item()
    return num / den if den > 0 else num


def assert_attention_output(out, q, ref):
    """Attention output: new contiguous tensor, q's dtype/device/shape, close to ref."""
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert out.is_contiguous()
    assert out.data_ptr() != q.data_ptr()
    assert not out.isnan().any(), "output has NaN (poisoned slot read?)"
    err = rel_err(out, ref)
    assert err < ATTN_TOL[q.dtype], f"relative error {err:.3g} >= {ATTN_TOL[q.dtype]:g}"


def names_word(msg, name):
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg) is not None


def assert_raises_naming(fn, op, *names):
    """fn() raises RuntimeError whose message names op and every argument in names
    (as a whole word; "a|b" accepts either)."""
    with pytest.raises(RuntimeError) as info:
        fn()
    msg = str(info.value)
    assert op in msg, f"message does not name {op!r}: {msg}"
    for name in names:
        assert any(names_word(msg, n) for n in name.split("|")), f"message does not name argument {name!r}: {msg}"


# ----------------------------------------------------------------------------- cases

# Context cases shared by the attention tests: name -> (kv_len per sequence, capacity S).
CTX_CASES = ("b1-eq", "b1-37", "b1-1000", "b3-ragged")


def ctx_lengths(name, Qn):
    """kv_len list and cache capacity S for a context case (kv_len >= Qn always)."""
    return {
        "b1-eq": ([Qn], Qn + 5),  # kv_len == Qn: the queries are the whole context
        "b1-37": ([37], 37),  # kv_len == S: cache full
        "b1-1000": ([1000], 1003),
        "b3-ragged": ([130, Qn, 37], 133),
    }[name]


# ----------------------------------------------------------------------------- CUDA kernel backends
#
# The CUDA op tests (test_*_cuda.py) take the `kernels` fixture: each kernel test runs on
#   "cuda":     the real kernels (torch.ops.std on a GPU); skips without one;
#   "emulated": the same kernel sources and glue compiled against the CPU emulator of the
#               SIMT machine (csrc/emulator/, torch.ops.std_emulated.*), on CPU tensors, at
#               small shapes (kernels.pick) and on a subset of the big grids
#               (@pytest.mark.emulator_subset). It skips when the emulator cannot be built
#               here, unless STD_EXT_REQUIRE_EMULATOR=1 (CI), where that is an error.
# `pytest -k emulated` selects exactly the emulated cases (their id holds "emulated").

KERNEL_BACKENDS = ("cuda", "emulated")
EMULATED_SUBSET_REASON = "GPU-only case (emulated subset)"


def is_emulated_case(item):
    return getattr(getattr(item, "callspec", None), "params", {}).get("kernels") == "emulated"


class EmulatedOps:
    """std_ext.ops' Python signatures and defaults over torch.ops.std_emulated (CPU tensors)."""

    def __init__(self, namespace):
        self._ns = namespace

    def attention_scores(self, q, k_cache, q_pos, scale=None):
        return self._ns.attention_scores(q, k_cache, q_pos, std_ext.ops._scale(q, scale))

    def topk_indices(self, scores, candidates, k):
        return self._ns.topk_indices(scores, candidates, k)

    def sparse_attention(self, q, k_cache, v_cache, indices, tail_start, kv_len, scale=None):
        return self._ns.sparse_attention(q, k_cache, v_cache, indices, tail_start, kv_len,
                                         std_ext.ops._scale(q, scale))

    def dense_attention(self, q, k_cache, v_cache, kv_len, scale=None):
        return self._ns.dense_attention(q, k_cache, v_cache, kv_len, std_ext.ops._scale(q, scale))


class KernelBackend:
    """Where a CUDA kernel test runs: `.name` ("cuda" / "emulated"), `.device` (where its
    tensors live: "cuda" / "cpu"), `.ops` (std_ext.ops' signatures), `.synchronize()`,
    `.pick(cuda=..., emulated=...)` (a size per backend)."""

    def __init__(self, name, device, ops):
        self.name, self.device, self.ops = name, device, ops

    @property
    def emulated(self):
        return self.name == "emulated"

    def pick(self, cuda, emulated):
        return emulated if self.emulated else cuda

    def synchronize(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def __repr__(self):
        return f"KernelBackend({self.name})"


_EMULATED_BACKEND = []  # [KernelBackend] or [skip reason], filled on first use


def _load_emulated_backend():
    if not _EMULATED_BACKEND:
        try:
            from emulated_cuda import load_emulated_ops

            _EMULATED_BACKEND.append(KernelBackend("emulated", "cpu", EmulatedOps(load_emulated_ops())))
        except Exception as error:  # noqa: BLE001 - any build or load failure
            _EMULATED_BACKEND.append(f"the CUDA emulator could not be built here: {type(error).__name__}: {error}")
    loaded = _EMULATED_BACKEND[0]
    if isinstance(loaded, str):
        if os.environ.get("STD_EXT_REQUIRE_EMULATOR") == "1":
            pytest.fail(f"STD_EXT_REQUIRE_EMULATOR=1 and {loaded}", pytrace=False)
        pytest.skip(loaded)
    return loaded


def _matches(params, allowed):
    """Every parameter named in `allowed` (name -> a value or a tuple of values) has an allowed value."""
    def ok(value, spec):
        return value in spec if isinstance(spec, tuple) else value == spec

    return all(ok(params[name], spec) for name, spec in allowed.items() if name in params)


def _in_emulator_subset(node):
    """Whether the emulated backend runs this case: `@pytest.mark.emulator_subset(*cases, **allowed)`;
    a case runs when its parameters match `allowed` and (if any are given) one of `cases`
    (dicts of the same form). Without the marker every case runs."""
    marker = node.get_closest_marker("emulator_subset")
    callspec = getattr(node, "callspec", None)
    if marker is None or callspec is None:
        return True
    params = callspec.params
    return _matches(params, marker.kwargs) and (not marker.args or any(_matches(params, c) for c in marker.args))


@pytest.fixture(params=KERNEL_BACKENDS)
def kernels(request):
    if request.param == "cuda":
        skip_without_cuda_kernels(request)
        return KernelBackend("cuda", "cuda", std_ext.ops)
    if not _in_emulator_subset(request.node):
        pytest.skip(EMULATED_SUBSET_REASON)
    return _load_emulated_backend()


# Tests that only mean something on a real GPU (streams, graph capture, the CUDA dispatch).
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
