"""CUDA microbenchmarks: each std_ext op against its best PyTorch path, with rates from the same run.

    pytest bench/test_bench_ops_cuda.py --benchmark-json=bench.json   # ~1-2 min on an H100 (estimate)
    python bench/gpu_report.py bench.json > table.md                  # table + targets for RESULTS.md
    pytest bench/test_bench_ops_cuda.py --benchmark-disable           # smoke: check + one call each
    STD_EXT_BENCH_SECONDS=0.2 pytest bench/test_bench_ops_cuda.py -k dense

The module skips without a CUDA device, and per op when this build of std_ext registered no CUDA
kernel for it (``torch._C._dispatch_has_kernel_for_dispatch_key("std::<op>", "CUDA")``). Run it
with ``STD_EXT_DEBUG`` unset: value checks cost a host sync per call (the report flags such runs).

Shape: Qwen2-7B attention (28 query heads, 4 KV heads, head_dim 128), bfloat16, caches of capacity
context + 256 (kv_len = context), queries in HF's [B, H, Q, D] layout passed as the [B, Q, H, D]
transposed view. Cases (each a kernel benchmark and its PyTorch twin, ``bench/torch_paths.py``):

- dense_attention: Qn 1 (decode) and 10 (verify of γ = 9 drafts) at contexts 4K, 16K, 64K, 128K,
  batch 1 and 8 (batch 8 x 128K: 2 GiB of K+V). Twin: SDPA with enable_gqa.
- sparse_attention: keep sets of 1024 and 2048 random sorted distinct positions below tail_start
  per (sequence, KV head) + a 64-token tail, context 32K, batch 1, 8, 32, Qn 1 (the draft); also
  Qn 10 at batch 1, keep 1024, and the draft (B 1, keep 1024, Qn 1) with tails of 256, 1024 and
  4096 generated tokens (draft time against tail length). Twin: index_select gather + SDPA.
- attention_scores: one layer's prefill score, batch 1, S = 32K and 128K, T = 64 and 256
  observation queries at positions S-T .. S-1. Twin: grouped matmul + float32 softmax + mean.
- topk_indices: k = 1024 of 128K float32 scores (a random permutation per row: no ties, so kernel
  and twin must agree exactly) over a 90% candidates span; 112 rows (B = 28 "layers" x H = 4) and
  4 rows (B = 1). Twin: masked_fill + torch.topk + sort.
- prefill_selection: the whole prefill selection at S = 128K, T = 128, timed as one call: 28 x
  attention_scores (one layer's K cache reused by all 28 layers, with different queries per layer:
  134 MB of K per layer is far beyond L2, so reuse saves memory, not time), stacking the 28
  [4, S + 256] score rows (a 59 MB copy, counted), one topk_indices over [28, 4, S + 256].
  Target <= 30 ms.

Timing: CUDA events. pytest-benchmark's timer is replaced, for these benchmarks only, by a CUDA
event recorded on the current stream (``cuda_event_timer``); a round is ``iterations`` back-to-back
calls between two events and pytest-benchmark divides by ``iterations``, so ``stats`` are seconds
per call of GPU timeline (launch gaps between calls included: a call whose host issue cost exceeds
its GPU time is timed at the issue rate; ``host_time_s`` in extra_info shows that cost). Rounds
last >= 2 ms (launch latency of the first call < 1%) and a benchmark ~``STD_EXT_BENCH_SECONDS``
(default 0.5) s, after 3 warm-up calls (first-launch costs, cuBLAS / allocator set-up). These warm
times are L2-hot when K/V fit in L2 (sparse at batch 1: ~2 MB; dense at 4K-16K batch 1) and are
then an upper bound on bandwidth. So every case is also timed cold: events around each single call,
L2 flushed before it by reading (not zeroing) a buffer of max(256 MiB, 4 x L2) outside the events.
Reading leaves L2 full of clean unrelated lines, as the previous layer's weight reads would; a
zeroed buffer would leave dirty lines whose write-back the timed call would pay. ``cold_time_s``
(median) carries no launch gap: the next call is queued while the flush runs.

Ratios, all from this run (``benchmark.extra_info``; ``bench/gpu_report.py`` prints them with the
targets; ``bench/conftest.py`` prints kernel / torch for every pair):
- bandwidth: K and V bytes that must be read once (dense 2 x B x H_kv x kv_len x D x 2 B; sparse
  2 x B x H_kv x (keep + tail) x D x 2 B; q, out and indices not counted) / cold time, over the
  device copy bandwidth (session fixture: ``copy_`` of a 1 GiB bf16 tensor, read + write bytes,
  best of 10 by CUDA events);
- attention_scores TFLOP/s: QK^T only, 2 x H_q x D x (number of causally visible query-key pairs)
  per sequence, counted once however many passes a kernel makes / cold time, over the bf16
  8192^3 ``torch.matmul`` rate (session fixture, best of 10);
- kernel / torch (warm medians): the twin reads integer tensors with ``.tolist()``, a host sync
  per call that is part of the PyTorch path's cost; a twin that runs out of memory is skipped;
- dense Qn10 / Qn1 at the same context and batch (cold times);
- the decode kernels' split merge: per-call GPU time of merge_splits_kernel over that of
  decode_attention_kernel (torch.profiler over a few calls, outside the timed region);
- dense at Qn 1 is also timed with ``STD_EXT_DECODE_LAYOUT=rows`` (impl ``kernel_rows``: the
  one-math-warp layout that the default keys layout replaced; the same bits, checked), so the
  bandwidth before and after shows in one run;
- dense at Qn 10 is also timed with ``STD_EXT_DECODE_SPLITS_PER_BLOCK=1`` (impl
  ``kernel_one_split_per_block``: the verify grid as it ran before its blocks took several splits,
  two waves of the eight-warp variant where that holds one block per SM; the same bits, checked);
- sparse: cold time at tail T over cold time at tail 64 (same batch, keep, Qn).

Before timing, each case checks once that the kernel agrees with its twin: per output row (a
head's D-vector; a head's score row), relative L2 error < 2e-2; topk exactly equal; the
prefill_selection pipeline: layer-0 scores close and the selected positions' scores equal, as a
multiset, to the top k of the kernel's own scores (tie-proof). When the twin runs out of memory
in the check, the first sequence alone is compared. Inputs are generated on the GPU from fixed
seeds; the cache of one case is kept while consecutive tests (twins, Qn 1 / 10) share it and freed
(``torch.cuda.empty_cache``) when the next case needs another.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
import zlib

import pytest
import torch

import gpu_report
import std_ext
from device_rates import copy_bandwidth
from torch_paths import (attention_scores_torch, dense_attention_torch, sparse_attention_torch,
                         topk_indices_torch)

HQ, HKV, HEAD_DIM = 28, 4, 128  # Qwen2-7B
DTYPE, DTYPE_NAME = torch.bfloat16, "bfloat16"
SPARE = 256  # cache capacity = context + SPARE
DENSE_CONTEXTS = [4096, 16384, 65536, 131072]
SPARSE_CONTEXT = 32768
# (batch, keep, Qn, tail), ordered by batch so consecutive cases share one cache.
SPARSE_CASES = [(1, 1024, 1, 64), (1, 1024, 1, 256), (1, 1024, 1, 1024), (1, 1024, 1, 4096), (1, 1024, 10, 64),
                (1, 2048, 1, 64), (8, 1024, 1, 64), (8, 2048, 1, 64), (32, 1024, 1, 64), (32, 2048, 1, 64)]
SCORE_CONTEXTS, SCORE_QUERIES = [32768, 131072], [64, 256]
TOPK_S, TOPK_K, TOPK_SHAPES = 131072, 1024, [(28, HKV), (1, HKV)]
LAYERS, SELECT_S, SELECT_T = 28, 131072, 128
IMPLS = ["torch", "kernel"]  # twin first: the kernel's extra_info can then carry kernel / torch
# dense: (Qn, impl); at Qn 1 the rows-layout twin too (before the kernel, for the same reason)
DENSE_RUNS = [(1, "torch"), (1, "kernel_rows"), (1, "kernel"), (10, "torch"), (10, "kernel_one_split_per_block"),
              (10, "kernel")]
DECODE_OPS = ("dense_attention", "sparse_attention")

TARGET_S = float(os.environ.get("STD_EXT_BENCH_SECONDS", "0.5"))
WARMUP_CALLS = 3
MIN_ROUND_S = 2e-3
MIN_ROUNDS, MAX_ROUNDS, MAX_ITERATIONS = 5, 500, 10000
COLD_SHARE, MIN_COLD, MAX_COLD = 0.25, 5, 100  # cold calls: ~a quarter of the budget
REF_REPEATS = 10
REL_TOL = 2e-2


def _has_cuda_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"std::{op}", "CUDA")
    except RuntimeError:  # the op is not registered at all
        return False


HAVE_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device")


def _needs_kernels(*ops):
    missing = [op for op in ops if not _has_cuda_kernel(op)]
    # without a device, let the module's own reason ("no CUDA device") be the one reported
    return pytest.mark.skipif(HAVE_CUDA and bool(missing),
                              reason=f"no CUDA kernel for std::{', std::'.join(missing)} in this build")


# --- timing -----------------------------------------------------------------------------------


class _EventStamp:
    """A timer reading for pytest-benchmark: a CUDA event on the current stream. ``later - earlier``
    waits for the later event and gives the GPU time between the two, in seconds."""

    __slots__ = ("event",)

    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, earlier: "_EventStamp") -> float:
        self.event.synchronize()
        return earlier.event.elapsed_time(self.event) / 1e3


def cuda_event_timer() -> _EventStamp:
    return _EventStamp()


def _events_per_call(fn, args, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn(*args)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def _cold_per_call(fn, args, flush, calls: int) -> float:
    """Median GPU time of single calls, each after an L2 flush that lies outside its events."""
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in marks:
        flush()
        start.record()
        fn(*args)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in marks) / 1e3


def _host_per_call(fn, args, gpu_time: float) -> float:
    """Host time to issue one call (wrapper, dispatcher, launches) while the GPU runs behind."""
    calls = max(3, min(20, int(0.05 / gpu_time)))  # keep the GPU's catch-up under ~50 ms
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    t = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    return t


def _measure(benchmark, fn, args, gpu, impl: str) -> dict:
    """Warm (pytest-benchmark stats) and cold timings of fn(*args); one plain call when disabled."""
    if benchmark.disabled:
        benchmark.pedantic(fn, args=args, rounds=1, iterations=1)
        return {}
    if not hasattr(benchmark, "_timer"):
        pytest.fail("pytest-benchmark has no BenchmarkFixture._timer any more: cuda_event_timer cannot be installed")
    # Everything that allocates as much as a timed call runs before pedantic() creates the stats,
    # so a twin that runs out of memory is skipped without leaving a partial benchmark behind.
    for _ in range(WARMUP_CALLS):
        fn(*args)
    t = _events_per_call(fn, args, 1)
    if t < 1e-3:
        t = _events_per_call(fn, args, 10)
    t = max(t, 1e-7)
    iterations = max(1, min(MAX_ITERATIONS, math.ceil(MIN_ROUND_S / t)))
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S / (t * iterations))))
    benchmark._timer = cuda_event_timer
    benchmark.pedantic(fn, args=args, rounds=rounds, iterations=iterations, warmup_rounds=1)
    cold_calls = max(MIN_COLD, min(MAX_COLD, int(COLD_SHARE * TARGET_S / (t + gpu["flush_s"]))))
    out = dict(timer="cuda-events", rounds=rounds, iterations=iterations, cold_calls=cold_calls,
               cold_time_s=_cold_per_call(fn, args, gpu["flush"], cold_calls))
    if impl == "kernel":
        out["host_time_s"] = _host_per_call(fn, args, t)
    return out


# --- reference rates and device facts (once per session) ---------------------------------------


def _best_of(fn, repeats: int) -> float:
    fn()
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def _copy_bandwidth_GBps() -> float:
    return copy_bandwidth(torch.device("cuda"), 1 << 30, REF_REPEATS) / 1e9  # 1 GiB, read + write bytes


def _matmul_TFLOPs() -> float:
    n = 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, dtype=DTYPE, device="cuda", generator=g)
    b = torch.randn(n, n, dtype=DTYPE, device="cuda", generator=g)
    c = torch.empty(n, n, dtype=DTYPE, device="cuda")
    return 2 * n ** 3 / _best_of(lambda: torch.matmul(a, b, out=c), REF_REPEATS) / 1e12


@pytest.fixture(scope="session")
def gpu():
    """Device facts, the two reference rates and the L2 flush, shared by every case."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    flush_buf = torch.ones(max(256 * 2**20, 4 * l2) // 4, dtype=torch.float32, device="cuda")
    sink = torch.empty((), dtype=torch.float32, device="cuda")

    def flush():
        torch.sum(flush_buf, dim=0, out=sink)  # reads every line: L2 ends up holding only this buffer, clean

    flush_s = _best_of(flush, 5)
    info = dict(
        device=props.name, l2_bytes=l2, sms=props.multi_processor_count, torch=torch.__version__,
        cuda=torch.version.cuda, copy_GBps=_copy_bandwidth_GBps(), matmul_TFLOPs=_matmul_TFLOPs(),
        ref_repeats=REF_REPEATS, flush_bytes=flush_buf.numel() * 4,
        debug_checks=os.environ.get("STD_EXT_DEBUG", "0") not in ("", "0"),
    )
    torch.cuda.empty_cache()  # the reference runs' 3 GiB
    return dict(info=info, flush=flush, flush_s=flush_s)


# --- inputs: generated on the GPU from fixed seeds; one case's cache kept at a time -------------

_slot: dict = {}
_checked: set = set()
_entries: list = []  # what pytest-benchmark's JSON will hold, for the derived figures and the table


def _gen(*key) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(key).encode()))


def _kept(key, build):
    """build() once for consecutive tests with the same key; frees the previous case first."""
    if key not in _slot:
        _slot.clear()
        torch.cuda.empty_cache()
        _slot[key] = build()
    return _slot[key]


def _caches(batch: int, ctx: int):
    def build():
        g = _gen("kv", batch, ctx)
        shape = (batch, HKV, ctx + SPARE, HEAD_DIM)
        return (torch.randn(shape, dtype=DTYPE, device="cuda", generator=g),
                torch.randn(shape, dtype=DTYPE, device="cuda", generator=g))

    return _kept(("kv", batch, ctx), build)


def _queries(key, batch: int, qn: int) -> torch.Tensor:
    # HF's layout [B, H, Q, D]; the ops take the [B, Q, H, D] transposed view without a copy.
    q = torch.randn(batch, HQ, qn, HEAD_DIM, dtype=DTYPE, device="cuda", generator=_gen("q", *key))
    return q.transpose(1, 2)


def _lengths(batch: int, value: int) -> torch.Tensor:
    return torch.full((batch,), value, dtype=torch.int32, device="cuda")


def _span_candidates(rows: int, cap: int, ctx: int) -> torch.Tensor:
    """bool [rows, cap]: one contiguous 'visual' span over 90% of the context, starting at 5%."""
    cand = torch.zeros(rows, cap, dtype=torch.bool, device="cuda")
    start, span = ctx // 20, (9 * ctx) // 10
    cand[:, start:start + span] = True
    return cand


# --- correctness guard ------------------------------------------------------------------------


def _max_row_error(got: torch.Tensor, want: torch.Tensor, row: int) -> float:
    g, w = got.float().reshape(-1, row), want.float().reshape(-1, row)
    return ((g - w).norm(dim=1) / w.norm(dim=1).clamp_min(1e-30)).max().item()


def _rows_close(row: int):
    def compare(key, got, want):
        assert torch.isfinite(got).all(), f"{key}: kernel output has non-finite values"
        err = _max_row_error(got, want, row)
        assert err < REL_TOL, f"{key}: kernel vs torch path, max per-row relative error {err:.3g} >= {REL_TOL}"
    return compare


def _exactly_equal(key, got, want):
    assert torch.equal(got, want), f"{key}: kernel and torch path select different indices"


def _first_sequence(args):
    return tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)


def _check_once(key, kernel_fn, torch_fn, args, compare):
    """The kernel agrees with its twin on this case (outside the timed region; once per pair)."""
    if key in _checked:
        return
    got = kernel_fn(*args)
    try:
        want = torch_fn(*args)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        if args[0].shape[0] == 1:
            pytest.skip(f"{key}: the torch path ran out of memory; the kernel cannot be checked")
        args, got = _first_sequence(args), got[:1]
        want = torch_fn(*args)
    assert got.shape == want.shape and got.dtype == want.dtype, (key, got.shape, got.dtype, want.shape, want.dtype)
    compare(key, got, want)
    _checked.add(key)


# Twins of the decode kernel that differ only in how the CUDA glue launches it (read at each
# call; the same bits, checked): the one-math-warp layout at Qn = 1, and the verify grid with
# one split per block (two waves of the eight-warp variant, as before blocks took several).
_IMPL_ENVIRONMENT = {"kernel_rows": ("STD_EXT_DECODE_LAYOUT", "rows"),
                     "kernel_one_split_per_block": ("STD_EXT_DECODE_SPLITS_PER_BLOCK", "1")}


@contextlib.contextmanager
def _launch_twin(impl: str):
    if impl not in _IMPL_ENVIRONMENT:
        yield
        return
    name, value = _IMPL_ENVIRONMENT[impl]
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _decode_kernel_times(fn, args, calls: int = 5) -> dict:
    """Per-call GPU time of the decode attention kernel and of the split merge (torch.profiler);
    {} where the profiler gives nothing (no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn(*args)
            torch.cuda.synchronize()
        events = prof.key_averages()
    except Exception:  # noqa: BLE001 - a profiler that cannot run only loses this figure
        return {}
    merge = attention = 0.0
    for event in events:
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if "merge_splits_kernel" in event.key:
            merge += us
        elif "decode_attention_kernel" in event.key:
            attention += us
    if attention <= 0:
        return {}
    return dict(merge_us=merge / calls, attention_us=attention / calls)


# --- the benchmark driver ---------------------------------------------------------------------


def _bench(benchmark, gpu, impl, info, kernel_fn, torch_fn, args, compare, check=None):
    pair = info["pair"]
    if check is None:
        _check_once(pair, kernel_fn, torch_fn, args, compare)
    elif pair not in _checked:
        check()
        _checked.add(pair)
    benchmark.group = pair
    benchmark.extra_info.update(suite=gpu_report.SUITE, impl=impl, dtype=DTYPE_NAME, hq=HQ, hkv=HKV, head_dim=HEAD_DIM)
    benchmark.extra_info.update(gpu["info"])
    benchmark.extra_info.update(info)
    fn = kernel_fn if impl.startswith("kernel") else torch_fn
    if impl in _IMPL_ENVIRONMENT and (pair, impl) not in _checked:
        with _launch_twin(impl):
            twin = kernel_fn(*args)
        assert torch.equal(twin, kernel_fn(*args)), f"{pair}: {impl} and the default launch give different bits"
        _checked.add((pair, impl))
    try:
        with _launch_twin(impl):
            measured = _measure(benchmark, fn, args, gpu, impl)
    except torch.cuda.OutOfMemoryError:
        if impl != "torch" or benchmark.stats is not None:
            raise
        torch.cuda.empty_cache()
        pytest.skip(f"{pair}: the torch path ran out of memory")
    benchmark.extra_info.update(measured)
    if benchmark.disabled or benchmark.stats is None:
        return
    if impl == "kernel" and info["op"] in DECODE_OPS:
        benchmark.extra_info.update(_decode_kernel_times(fn, args))
    entry = {"name": benchmark.name, "group": pair, "extra_info": benchmark.extra_info,
             "stats": {"median": benchmark.stats.stats.median}}
    _entries.append(entry)
    if impl == "kernel":
        benchmark.extra_info.update(gpu_report.metrics(entry, _entries))


@pytest.fixture(scope="module", autouse=True)
def _free_and_report(request):
    """After the module: free the last case, print the report table (also: bench/gpu_report.py)."""
    yield
    _slot.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not _entries:
        return
    text = gpu_report.markdown(gpu_report.build_rows(_entries), _entries)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_sep("-", "std_ext CUDA benchmarks (python bench/gpu_report.py BENCH.json gives the same)")
        for line in text.splitlines():
            reporter.write_line(line)


def _k(n: int) -> str:
    return f"{n // 1024}K"


# --- cases ------------------------------------------------------------------------------------


@_needs_kernels("dense_attention")
@pytest.mark.parametrize("qn,impl", DENSE_RUNS, ids=[f"Qn{q}-{i}" for q, i in DENSE_RUNS])
@pytest.mark.parametrize("ctx", DENSE_CONTEXTS, ids=lambda c: f"ctx{_k(c)}")
@pytest.mark.parametrize("batch", [1, 8], ids=lambda b: f"B{b}")
def test_dense_attention(benchmark, gpu, batch, ctx, qn, impl):
    k, v = _caches(batch, ctx)
    args = (_queries(("dense", batch, ctx, qn), batch, qn), k, v, _lengths(batch, ctx))
    info = dict(op="dense_attention", pair=f"cuda dense_attention B={batch} ctx={ctx} Qn={qn}", batch=batch,
                context=ctx, qn=qn, capacity=ctx + SPARE, bytes_kv=2 * batch * HKV * ctx * HEAD_DIM * 2,
                rows_twin=qn == 1, one_split_twin=qn == 10)
    _bench(benchmark, gpu, impl, info, std_ext.dense_attention, dense_attention_torch, args, _rows_close(HEAD_DIM))


def _keep_sets(batch: int, keep: int, tail_start: int) -> torch.Tensor:
    """int32 [B, H_kv, keep]: per row, `keep` random distinct positions below tail_start, ascending."""
    noise = torch.rand(batch * HKV, tail_start, device="cuda", generator=_gen("keep", batch, keep))
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values.to(torch.int32).view(batch, HKV, keep)


@_needs_kernels("sparse_attention")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,keep,qn,tail", SPARSE_CASES,
                         ids=[f"B{b}-keep{n}-Qn{q}-tail{t}" for b, n, q, t in SPARSE_CASES])
def test_sparse_attention(benchmark, gpu, batch, keep, qn, tail, impl):
    ctx = SPARSE_CONTEXT
    k, v = _caches(batch, ctx)
    tail_start = ctx - tail  # the tail holds every query (Qn <= tail)
    args = (_queries(("sparse", batch, keep, qn), batch, qn), k, v, _keep_sets(batch, keep, tail_start),
            _lengths(batch, tail_start), _lengths(batch, ctx))
    pair = f"cuda sparse_attention B={batch} keep={keep} tail={tail} ctx={ctx} Qn={qn}"
    info = dict(op="sparse_attention", pair=pair, batch=batch, context=ctx, qn=qn, capacity=ctx + SPARE, keep=keep,
                tail=tail, bytes_kv=2 * batch * HKV * (keep + tail) * HEAD_DIM * 2)
    _bench(benchmark, gpu, impl, info, std_ext.sparse_attention, sparse_attention_torch, args, _rows_close(HEAD_DIM))


def _score_flops(batch: int, t: int, s: int) -> int:
    """QK^T over the causally visible pairs: queries at S-T .. S-1 see S-T+1 .. S keys."""
    pairs = t * (s - t) + t * (t + 1) // 2
    return 2 * batch * HQ * HEAD_DIM * pairs


@_needs_kernels("attention_scores")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t", SCORE_QUERIES, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("s", SCORE_CONTEXTS, ids=lambda s: f"S{_k(s)}")
def test_attention_scores(benchmark, gpu, s, t, impl):
    batch = 1
    k, _ = _caches(batch, s)  # V is generated too (shared builder); 134 MB at 128K, harmless
    q_pos = torch.arange(s - t, s, dtype=torch.int32, device="cuda").expand(batch, -1).contiguous()
    args = (_queries(("scores", s, t), batch, t), k, q_pos)
    info = dict(op="attention_scores", pair=f"cuda attention_scores B={batch} S={s} T={t}", batch=batch,
                context=s, S=s, T=t, qn=t, capacity=s + SPARE, flops=_score_flops(batch, t, s))
    _bench(benchmark, gpu, impl, info, std_ext.attention_scores, attention_scores_torch, args,
           _rows_close(s + SPARE))


@_needs_kernels("topk_indices")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,h", TOPK_SHAPES, ids=[f"{b}x{h}rows" for b, h in TOPK_SHAPES])
def test_topk_indices(benchmark, gpu, b, h, impl):
    def build():
        noise = torch.rand(b * h, TOPK_S, device="cuda", generator=_gen("topk", b, h))
        # a random permutation of 1..S per row, / S (a power of two): distinct, exact float32 values
        scores = (noise.argsort(dim=1).float() + 1).div_(TOPK_S).view(b, h, TOPK_S)
        return scores, _span_candidates(b, TOPK_S, TOPK_S)

    scores, cand = _kept(("topk", b, h), build)
    args = (scores, cand, TOPK_K)
    info = dict(op="topk_indices", pair=f"cuda topk_indices {b}x{h}x{TOPK_S} k={TOPK_K}", dtype="float32", batch=b,
                context=TOPK_S,
                qn=None, B=b, H=h, rows=b * h, S=TOPK_S, k=TOPK_K, candidates=int(cand[0].sum()))
    _bench(benchmark, gpu, impl, info, std_ext.topk_indices, topk_indices_torch, args, _exactly_equal)


def _select(scores_fn, topk_fn, qs, k_cache, q_pos, cand, k):
    """The prefill selection of all layers: per-layer scores, stacked, one top-k over them."""
    scores = torch.stack([scores_fn(q, k_cache, q_pos)[0] for q in qs])  # [layers, H_kv, S]
    return topk_fn(scores, cand, k)


def _select_kernel(*args):
    return _select(std_ext.attention_scores, std_ext.topk_indices, *args)


def _select_torch(*args):
    return _select(attention_scores_torch, topk_indices_torch, *args)


@_needs_kernels("attention_scores", "topk_indices")
@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_selection(benchmark, gpu, impl):
    s, t, cap = SELECT_S, SELECT_T, SELECT_S + SPARE

    def build():
        k_cache, _ = _caches(1, s)
        qs = [_queries(("select", layer), 1, t) for layer in range(LAYERS)]
        q_pos = torch.arange(s - t, s, dtype=torch.int32, device="cuda")[None]
        return qs, k_cache, q_pos, _span_candidates(LAYERS, cap, s)

    qs, k_cache, q_pos, cand = _kept(("select",), build)
    args = (qs, k_cache, q_pos, cand, TOPK_K)

    def check():
        # Scores differ from the twin's by rounding (its logits are bf16), which can swap
        # near-equal positions at the top-k boundary; so: scores close on a layer, and the kernel's
        # selection is exactly a top k of the kernel's own scores, compared as values.
        got_scores = std_ext.attention_scores(qs[0], k_cache, q_pos)
        _rows_close(cap)("prefill_selection layer 0", got_scores, attention_scores_torch(qs[0], k_cache, q_pos))
        scores = torch.stack([std_ext.attention_scores(q, k_cache, q_pos)[0] for q in qs])
        chosen = std_ext.topk_indices(scores, cand, TOPK_K)
        assert torch.equal(chosen, _select_kernel(*args)), "prefill_selection: the pipeline is not deterministic"
        masked = scores.masked_fill(~cand[:, None, :], float("-inf"))
        best = masked.topk(TOPK_K, dim=-1).values.sort(dim=-1).values
        picked = masked.gather(-1, chosen.long()).sort(dim=-1).values
        assert (chosen.diff(dim=-1) > 0).all(), "prefill_selection: positions not strictly ascending"
        assert torch.equal(picked, best), "prefill_selection: the kernel's selection is not a top k of its scores"

    info = dict(op="prefill_selection", pair=f"cuda prefill_selection {LAYERS} layers S={s} T={t} k={TOPK_K}",
                batch=1, context=s, qn=None, layers=LAYERS, S=s, T=t, capacity=cap, k=TOPK_K, k_cache_reused=True,
                flops=LAYERS * _score_flops(1, t, s))
    _bench(benchmark, gpu, impl, info, _select_kernel, _select_torch, args, None, check=check)
