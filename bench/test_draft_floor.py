"""bench/draft_floor.py: the bandwidth-floor speedups per draft precision, against a brute
force written here from the round-cost formula (DESIGN.md §1, std_ext.gamma's docstring)."""

import pytest
from draft_floor import QWEN2_7B_POSITION_BYTES, QWEN2_7B_WEIGHT_BYTES, floor_speedups, floor_table

from std_ext import draft_weights as dw

BYTES_PER_BF16_WEIGHT = {None: 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / 128}


def brute_force(batch, context, precision, agreement=0.9, keep=1024, new_tokens=256):
    draft = (QWEN2_7B_WEIGHT_BYTES / 2 * BYTES_PER_BF16_WEIGHT[precision]
             + batch * (keep + new_tokens / 2) * QWEN2_7B_POSITION_BYTES)
    verify = QWEN2_7B_WEIGHT_BYTES + batch * (context + new_tokens / 2) * QWEN2_7B_POSITION_BYTES
    best = (0, 0.0)
    for gamma in range(1, 13):
        tokens = 1 + sum(agreement**j for j in range(1, gamma + 1))
        speedup = tokens * verify / (gamma * draft + verify)
        if speedup > best[1] + 1e-12:
            best = (gamma, speedup)
    return best


def test_floor_speedups_are_the_round_cost_formula():
    table = floor_speedups()
    assert len(table) == 6 * 4
    for (batch, context, precision), (gamma, speedup) in table.items():
        expected_gamma, expected = brute_force(batch, context, precision)
        assert gamma == expected_gamma and speedup == pytest.approx(expected, rel=1e-9), (batch, context, precision)


def test_the_issue_table():
    """The figures issue 22 quotes for Qwen2-7B (bf16 draft, fp8, int4 with group 128)."""
    table = floor_speedups()
    quoted = {(1, 16_384): (0.98, 1.41, 2.06), (1, 65_536): (1.05, 1.56, 2.27), (1, 131_072): (1.16, 1.74, 2.51),
              (8, 131_072): (2.32, 3.30, 4.32)}
    for (batch, context), values in quoted.items():
        for precision, value in zip((None, "fp8", "int4"), values):
            assert table[batch, context, precision][1] == pytest.approx(value, abs=0.015)


def test_read_bytes_and_table_text():
    assert dw.read_bytes(1000.0, 4, "int4", group=64) == pytest.approx(250 * (0.5 + 4 / 64))
    assert dw.read_bytes(1000.0, 2, None) == 1000.0 and dw.read_bytes(1000.0, 4, "bf16") == 500.0
    text = floor_table()
    assert "| 1 × 16K | 0.98× (γ 1) |" in text and "draft int4" in text
