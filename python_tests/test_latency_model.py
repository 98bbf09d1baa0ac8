"""bench/latency_model.py: its copy of the split plan is the C++ planner's (checked against
torch.ops.std.decode_split_plan, which runs csrc/kernels/decode_plan.h), and its predictions
behave as a latency model must: never below the bandwidth floor, approaching it as the
bytes grow, each fix of the decode-latency issue never slower than the kernels it replaces,
and the verify shape of Qwen2-7B in two waves today and one with the occupancy fix."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import std_ext  # noqa: F401  (registers torch.ops.std)

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("latency_model", REPO / "bench" / "latency_model.py")
lm = importlib.util.module_from_spec(_spec)
sys.modules["latency_model"] = lm  # dataclasses look their module up there
_spec.loader.exec_module(lm)

LAYOUT = {1: "rows", 2: "keys"}


@pytest.mark.parametrize("batch, kv_heads, qn, group, keep", [
    (1, 4, 1, 7, 0), (1, 4, 10, 7, 0), (8, 4, 10, 7, 1024), (1, 1, 1, 1, 5), (3, 8, 20, 8, 300), (64, 8, 1, 8, 0),
])
@pytest.mark.parametrize("sms, blocks_per_sm", [(132, 2), (132, 3), (108, 1)])
@pytest.mark.parametrize("launched", [0, 1, 2])
def test_split_plan_is_the_cpp_planner(batch, kv_heads, qn, group, keep, sms, blocks_per_sm, launched):
    tiles, plan = torch.ops.std.decode_split_plan(batch, kv_heads, qn, group, 5000, keep, 100, sms, blocks_per_sm,
                                                  launched)
    splits, tail_offset, layout, warps, _, row_groups, per_block, split_blocks = lm.split_plan(
        batch, kv_heads, qn, group, keep, sms, blocks_per_sm, launched)
    assert [splits, tail_offset, layout, warps, row_groups, per_block, split_blocks] == [
        int(plan[0]), int(plan[1]), LAYOUT[int(plan[3])], int(plan[4]), int(plan[5]), int(plan[6]), int(plan[7])]
    assert int(plan[2]) == lm.TILE_KEYS
    list_tiles = -(-(tail_offset + 100) // lm.TILE_KEYS)
    per_block_tiles = [lm.block_tiles(list_tiles, x, split_blocks, splits) for x in range(split_blocks)]
    assert sum(per_block_tiles) == len(tiles) and per_block_tiles[0] == max(per_block_tiles)


CALLS = [call for _, call in lm.KEY_SHAPES]


@pytest.mark.parametrize("gpu", [lm.H100, lm.H200], ids=lambda g: g.name)
@pytest.mark.parametrize("call", CALLS, ids=[label for label, _ in lm.KEY_SHAPES])
def test_never_below_the_floor_and_fixes_never_slower(call, gpu):
    today = lm.predict_decode(call, gpu).total_s
    assert today > lm.floor_s(call, gpu)
    previous = today
    for _, fixes in lm.FIX_STEPS[1:]:
        now = lm.predict_decode(call, gpu, fixes).total_s
        assert lm.floor_s(call, gpu) < now <= previous + 1e-12
        previous = now


def test_long_contexts_approach_the_floor_and_short_calls_are_latency():
    call = replace(CALLS[0], context=1 << 20)
    assert lm.predict_decode(call).total_s / lm.floor_s(call) < 1.05
    draft = CALLS[4]
    assert lm.predict_decode(draft).total_s / lm.floor_s(draft) > 3  # a 2 MB draft call is latency-bound


def test_qwen2_verify_runs_in_two_waves_until_the_occupancy_fix():
    verify = CALLS[2]  # G = 7, γ = 9: 70 rows, the eight-warp rows variant at one block per SM
    assert lm.predict_decode(verify).waves == 2
    assert lm.predict_decode(verify, fixes=lm.Fixes(verify_occupancy=True)).waves == 1
    assert lm.predict_decode(verify, fixes=lm.LANDED).waves == 1
    # one prologue and epilogue saved, the same tiles streamed
    saved = lm.predict_decode(verify, fixes=lm.Fixes(empty_splits_exit=True, prologue_overlap=True)).total_s - \
        lm.predict_decode(verify, fixes=lm.LANDED).total_s
    assert saved == pytest.approx(lm.H100.dram_round_trip_s + lm.H100.l2_round_trip_s)


def test_entries_of_the_gpu_report():
    info = {"op": "dense_attention", "device": "NVIDIA H100 80GB HBM3", "hkv": 4, "hq": 28, "head_dim": 128,
            "batch": 1, "qn": 1, "context": 65536}
    assert lm.predict_entry(info) == pytest.approx(lm.predict_decode(CALLS[0], fixes=lm.LANDED).total_s * 1e6)
    verify = dict(info, qn=10)
    twin = dict(verify, impl="kernel_one_split_per_block")
    assert lm.predict_entry(twin) > lm.predict_entry(verify)
    assert lm.predict_entry(dict(info, device="NVIDIA A100")) is None
    assert lm.predict_entry(dict(info, op="topk_indices")) is None
