"""``bench/gpu_report.py`` on a synthetic pytest-benchmark JSON shaped like what
``bench/test_bench_ops_cuda.py`` writes (CPU only, well under a second).

The expected figures are worked out by hand from the raw fields below, not with the report's code.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_report
import latency_model

REPORT = Path(__file__).resolve().parent / "gpu_report.py"
MiB = 2**20
RATES = dict(device="NVIDIA H100 80GB HBM3", l2_bytes=50 * MiB, torch="2.13.0", cuda="12.8", copy_GBps=3000.0,
             matmul_TFLOPs=600.0, ref_repeats=10, flush_bytes=256 * MiB, debug_checks=False)


def _entry(impl, median_s, cold_s, host_s=None, **info):
    extra = dict(suite="cuda", impl=impl, dtype="bfloat16", hq=28, hkv=4, head_dim=128, timer="cuda-events")
    extra.update(RATES)
    extra.update(info, cold_time_s=cold_s)
    if host_s is not None:
        extra["host_time_s"] = host_s
    name = f"test_{info['op']}[{info['pair']}-{impl}]"
    return {"group": info["pair"], "name": name, "fullname": f"bench/test_bench_ops_cuda.py::{name}",
            "extra_info": extra, "options": {"timer": "cuda_event_timer"},
            "stats": {"min": median_s, "median": median_s, "mean": median_s, "rounds": 5, "iterations": 1}}


def _dense(qn, impl, median_s, cold_s):
    ctx = 65536
    return _entry(impl, median_s, cold_s, 6e-6 if impl == "kernel" else None, op="dense_attention",
                  pair=f"cuda dense_attention B=1 ctx={ctx} Qn={qn}", batch=1, context=ctx, qn=qn,
                  capacity=ctx + 256, bytes_kv=2 * 1 * 4 * ctx * 128 * 2, one_split_twin=qn == 10)


def _sparse(batch, keep, impl, median_s, cold_s):
    return _entry(impl, median_s, cold_s, 7e-6 if impl == "kernel" else None, op="sparse_attention",
                  pair=f"cuda sparse_attention B={batch} keep={keep} ctx=32768 Qn=1", batch=batch, context=32768,
                  qn=1, capacity=32768 + 256, keep=keep, tail=64, bytes_kv=2 * batch * 4 * (keep + 64) * 128 * 2)


SCORE_FLOPS = 2 * 28 * 128 * (256 * (131072 - 256) + 256 * 257 // 2)  # 240.8 GFLOP


def _scores(impl, median_s, cold_s):
    return _entry(impl, median_s, cold_s, op="attention_scores", pair="cuda attention_scores B=1 S=131072 T=256",
                  batch=1, context=131072, S=131072, T=256, qn=256, capacity=131072 + 256, flops=SCORE_FLOPS)


def _topk(impl, median_s):
    return _entry(impl, median_s, median_s, op="topk_indices", pair="cuda topk_indices 28x4x131072 k=1024",
                  dtype="float32", batch=28, context=131072, qn=None, B=28, H=4, rows=112, S=131072, k=1024)


def _benchmarks():
    return [
        # dense B=1 64K: 134,217,728 K+V bytes; cold 50 us -> 2684 GB/s = 0.895 of copy; Qn10/Qn1 = 55/50
        _dense(1, "torch", 200e-6, 190e-6), _dense(1, "kernel", 52e-6, 50e-6),
        # the verify with one split per block: 61.6 / 55 = 1.12 (target >= 1)
        _dense(10, "torch", 400e-6, 390e-6), _dense(10, "kernel_one_split_per_block", 66e-6, 61.6e-6),
        _dense(10, "kernel", 60e-6, 55e-6),
        # sparse B=1 keep 1024: 8 us cold (target <= 10 us); its twin 300 us warm
        _sparse(1, 1024, "torch", 300e-6, 310e-6), _sparse(1, 1024, "kernel", 9e-6, 8e-6),
        # sparse B=32 keep 2048: 138,412,032 bytes in 70 us = 1977 GB/s = 0.659 of copy (miss); no twin
        _sparse(32, 2048, "kernel", 71e-6, 70e-6),
        # 240.8 GFLOP in 0.8 ms = 301 TFLOP/s = 0.50 of matmul; kernel/torch = 0.85 / 5.0 = 0.17
        _scores("torch", 5e-3, 5e-3), _scores("kernel", 0.85e-3, SCORE_FLOPS / 301e12),
        # topk: 100 / 250 = 0.40 > 1/3 (miss)
        _topk("torch", 250e-6), _topk("kernel", 100e-6),
        _entry("kernel", 25e-3, 24e-3, op="prefill_selection", pair="cuda prefill_selection 28 layers S=131072 T=128",
               batch=1, context=131072, qn=None, layers=28, S=131072, T=128, capacity=131328, k=1024,
               flops=28 * 2 * 28 * 128 * (128 * (131072 - 128) + 128 * 129 // 2)),
        # the CPU suite of the same session: ignored
        {"group": "dense_attention bfloat16 ctx=8192 Qn=1", "name": "test_dense_attention[bfloat16-ctx8192-Qn1-kernel]",
         "extra_info": {"pair": "dense_attention bfloat16 ctx=8192 Qn=1", "op": "dense_attention", "impl": "kernel",
                        "context": 8192, "qn": 1, "batch": 1}, "stats": {"median": 1e-3}},
    ]


@pytest.fixture
def bench_json(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": _benchmarks(), "version": "5.2.3"}))
    return path


def _row(table: str, start: str) -> list[str]:
    rows = [line for line in table.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, table)
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_report_figures_and_targets(bench_json, tmp_path, capsys):
    rows_json = tmp_path / "rows.json"
    assert gpu_report.main([str(bench_json), "--json", str(rows_json)]) == 0
    table = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in table and "3000 GB/s" in table and "600 TFLOP/s" in table
    assert "bfloat16-ctx8192" not in table and "ctx=8K" not in table  # the CPU entry

    # op | shape | warm | cold | model | host | efficiency | kernel/torch | Qn10/Qn1 | targets
    qn1 = _row(table, "| dense_attention | B=1 ctx=64K Qn=1 |")
    assert qn1[2:4] == ["52.0", "50.0"] and qn1[5:7] == ["6.0", "0.89 of copy (2.68 TB/s)"] and qn1[7] == "0.26"
    predicted = latency_model.predict_decode(latency_model.DecodeCall("dense_attention", 1, 4, 7, 1, 128, 65536),
                                             fixes=latency_model.LANDED)
    assert qn1[4] == f"{predicted.total_s * 1e6:.1f}"
    qn10 = _row(table, "| dense_attention | B=1 ctx=64K Qn=10 | 60.0 |")
    assert qn10[6].startswith("0.81 of copy") and qn10[7] == "0.15" and qn10[8] == "1.10"
    assert qn10[9] == ("bandwidth >= 0.80 x copy: pass; Qn10/Qn1 <= 1.15: pass; kernel/torch <= 0.50: pass; "
                       "verify in one wave >= one split per block: pass")
    decode = _row(table, "| dense_attention | B=1 ctx=64K Qn=10 | - |")
    assert decode[6] == "1.12"
    small = _row(table, "| sparse_attention | B=1 keep=1024+64 ctx=32K Qn=1 |")
    assert small[2] == "9.0 (L2)" and small[3] == "8.0" and small[7] == "0.03"
    assert "<= 10 us per call: pass" in small[9]
    big = _row(table, "| sparse_attention | B=32 keep=2048+64 ctx=32K Qn=1 |")
    assert big[6].startswith("0.66 of copy") and big[7] == "-"
    assert big[9] == "bandwidth >= 0.70 x copy: **miss**; kernel/torch <= 0.50: n/a"
    scores = _row(table, "| attention_scores | B=1 S=128K T=256 |")
    assert scores[6] == "0.50 of matmul (301 TFLOP/s)" and scores[7] == "0.17" and scores[4] == "-"
    assert scores[9] == "TFLOP/s >= 0.40 x matmul: pass; kernel/torch <= 0.33: pass"
    topk = _row(table, "| topk_indices | 28x4 rows x 128K, k=1024 |")
    assert topk[7] == "0.40" and topk[9] == "kernel/torch <= 0.33: **miss**"
    select = _row(table, "| prefill_selection |")
    assert select[2] == "25,000" and select[9] == "28 layers <= 30 ms: pass"

    # the summary: one line per (case, target); 2 misses, 1 not measured (no twin)
    assert "| 28 layers <= 30 ms (S=128K, T=128) | prefill_selection" in table and "| 25.000 | pass |" in table
    assert "11 of 13 measured targets met (1 not measured)." in table

    rows = json.loads(rows_json.read_text())
    assert [r["op"] for r in rows] == ["dense_attention"] * 2 + ["sparse_attention"] * 2 + [
        "attention_scores", "topk_indices", "prefill_selection"]
    assert rows[1]["qn10_over_qn1"] == pytest.approx(55 / 50)
    assert rows[1]["one_split_over_default"] == pytest.approx(61.6 / 55)
    assert rows[0]["bw_ratio"] == pytest.approx(134217728 / 50e-6 / 1e9 / 3000)
    assert rows[0]["warm_bw_ratio"] == pytest.approx(134217728 / 52e-6 / 1e9 / 3000)
    assert rows[0]["cold_kernel_over_torch"] == pytest.approx(50 / 190)
    assert rows[2]["l2_resident"] is True and rows[0]["l2_resident"] is False


def test_metrics_match_what_the_benchmark_stores():
    # the benchmark module fills extra_info with metrics(entry, entries so far): twins come first
    entries = _benchmarks()[:5]
    m = gpu_report.metrics(entries[4], entries)
    assert m["kernel_over_torch"] == pytest.approx(60 / 400) and m["qn10_over_qn1"] == pytest.approx(55 / 50)
    assert m["one_split_over_default"] == pytest.approx(61.6 / 55)
    assert [t["pass"] for t in m["targets"]] == [True, True, True, True]
    alone = gpu_report.metrics(entries[4], entries[4:])  # no twins, no Qn=1 run yet
    assert alone["kernel_over_torch"] is None and alone["qn10_over_qn1"] is None
    assert alone["one_split_over_default"] is None
    assert [t["pass"] for t in alone["targets"]] == [True, None, None, None]


def test_command_line(bench_json, tmp_path):
    out = subprocess.run([sys.executable, str(REPORT), str(bench_json)], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("- Device: NVIDIA H100") and "| prefill_selection |" in out.stdout
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": _benchmarks()[-1:]}))  # only the CPU entry
    out = subprocess.run([sys.executable, str(REPORT), str(empty)], capture_output=True, text=True)
    assert out.returncode == 1 and "no timed CUDA benchmarks" in out.stderr
