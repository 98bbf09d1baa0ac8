"""pytest configuration for the std_ext benchmarks (pytest-benchmark).

Every kernel benchmark has a pure-PyTorch twin in the same run (``bench/torch_paths.py``). Both
carry ``benchmark.extra_info = {"pair": <key>, "impl": "kernel" | "torch", ...}`` (and share the
``benchmark.group``). At the end of the session this file prints one table of
``kernel median / torch median`` per pair (< 1: the kernel is faster) and, when the environment
variable ``STD_EXT_BENCH_RATIOS`` names a path, writes the same table there as JSON.
``STD_EXT_BENCH_THREADS=n`` sets torch's intra-op thread count for the run (default: torch's).
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path

import pytest

# Make ``import torch_paths`` work whatever the import mode / rootdir.
sys.path.insert(0, str(Path(__file__).resolve().parent))

RATIOS_ENV = "STD_EXT_BENCH_RATIOS"
THREADS_ENV = "STD_EXT_BENCH_THREADS"


def pytest_configure(config):
    threads = os.environ.get(THREADS_ENV)
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _collect_pairs(config):
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return None, []
    pairs: dict[str, dict] = defaultdict(dict)
    for bench in session.benchmarks:  # pytest_benchmark.stats.Metadata
        info = bench.extra_info or {}
        if not bench or "impl" not in info:  # no stats (disabled / errored) or not one of ours
            continue
        key = info.get("pair") or bench.group or bench.name
        entry = pairs[key]
        entry.setdefault("info", dict(info))
        entry[info["impl"]] = bench.stats.median
        entry[info["impl"] + "_name"] = bench.name
    rows = []
    for key, entry in pairs.items():
        if "kernel" not in entry or "torch" not in entry:
            continue
        info = entry["info"]
        rows.append({
            "pair": key,
            "op": info.get("op"),
            "dtype": info.get("dtype"),
            "context": info.get("context"),
            "qn": info.get("qn"),
            "kernel_median_s": entry["kernel"],
            "torch_median_s": entry["torch"],
            "ratio": entry["kernel"] / entry["torch"] if entry["torch"] > 0 else float("nan"),
            "kernel_test": entry["kernel_name"],
            "torch_test": entry["torch_name"],
        })
    rows.sort(key=lambda r: (str(r["op"]), str(r["dtype"]), r["context"] or 0, r["qn"] or 0))
    return session, rows


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def _geomean(values):
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _verify_over_decode(rows) -> list[str]:
    """dense_attention's kernel at Qn = 10 (a γ = 9 verify) over Qn = 1 (a decode step), per dtype and
    context, in the same run: what a verify pass costs in decode steps' attention (issue 22 target: <= 1.5
    at 8K)."""
    kernel = {(r["dtype"], r["context"], r["qn"]): r["kernel_median_s"] for r in rows if r["op"] == "dense_attention"}
    lines = []
    for (dtype, context, qn), seconds in sorted(kernel.items(), key=lambda item: (str(item[0][0]), item[0][1] or 0)):
        one = kernel.get((dtype, context, 1))
        if qn != 1 and one:
            lines.append(f"dense_attention kernel {dtype} context {context}: Qn = {qn} / Qn = 1 = {seconds / one:.2f}")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session, rows = _collect_pairs(config)
    if session is None:
        return
    tr = terminalreporter
    if getattr(session, "disabled", False) and not rows:
        tr.write_sep("-", "std_ext kernel / torch: benchmarks disabled (smoke run, nothing timed)")
        return
    if not rows:
        return
    import torch

    tr.write_sep("-", "std_ext kernel / torch (median time ratio, < 1: kernel faster)")
    header = f"{'op':<18} {'dtype':<9} {'context':>7} {'Qn':>3}  {'kernel':>11}  {'torch':>11}  {'ratio':>6}"
    tr.write_line(header)
    tr.write_line("-" * len(header))
    for r in rows:
        tr.write_line(
            f"{r['op']:<18} {r['dtype']:<9} {r['context']:>7} {r['qn'] if r['qn'] is not None else '-':>3}  "
            f"{_fmt_time(r['kernel_median_s']):>11}  {_fmt_time(r['torch_median_s']):>11}  {r['ratio']:>6.3f}"
        )
    tr.write_line("-" * len(header))
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r["ratio"])
    tr.write_line("geometric mean ratio: " + ", ".join(f"{op} {_geomean(v):.3f}" for op, v in sorted(by_op.items()))
                  + f"; all {_geomean([r['ratio'] for r in rows]):.3f}")
    tr.write_line(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}")
    for line in _verify_over_decode(rows):
        tr.write_line(line)

    path = os.environ.get(RATIOS_ENV)
    if path:
        payload = {
            "description": "kernel median / torch median per pair, same run (< 1: kernel faster)",
            "torch_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "pairs": rows,
            "geomean_by_op": {op: _geomean(v) for op, v in by_op.items()},
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        tr.write_line(f"ratios written to {path}")
