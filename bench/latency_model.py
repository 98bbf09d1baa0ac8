"""Per-call latency model of the CUDA kernels on an H100 or H200: what a call should cost
from its bytes, its waves, its launches and DRAM latency, so that the first GPU run shows
each kernel's distance from its floor and each planned fix's predicted effect.

    python bench/latency_model.py                  # the key shapes, H100 and H200, today and with each fix
    python bench/latency_model.py --gpu H200

Standard library only (``bench/gpu_report.py`` imports it to print the prediction beside
each measurement). The split plan is the one in ``csrc/kernels/decode_plan.h`` (a CPU test
checks this copy against ``torch.ops.std.decode_split_plan``); blocks per SM of each kernel
variant are the ptxas figures recorded in ``bench/RESULTS.md`` (registers and shared memory
per block against the SM's 65,536 registers and 228 KB).

The decode model (dense_attention and sparse_attention), one call:

    attention kernel = launch + waves x ([stage Q: one DRAM round trip] + first K/V tile: one
                         round trip + (tiles of the busiest block) x max(tile bytes / block's
                         share of HBM bandwidth among the blocks that read tiles, tile compute)
                         + epilogue: one L2 round trip (writes))
                       where a block takes one split, or (verify occupancy fix) several in turn
                       with one pipeline, so that the grid is one wave of the launched variant
    merge kernel     = (num_splits > 1) the dependent-launch gap + two dependent L2 round trips
                       (the lse, then the partials, written moments ago) + partial bytes / L2
                       bandwidth + one write round trip, per wave of merge blocks; fused into the
                       attention kernel (the last block of a row merges): an atomic arrival
                       (one L2 round trip) instead of the launch gap

Every figure is a prediction, not a measurement; the parameters (launch gap, DRAM round
trip, tile compute) are set from published H100 microbenchmarks and say so. What the model
is for is the comparison: today's kernels against the fixes of the decode-latency issue,
each switched on by a flag of :class:`Fixes`, on the same numbers.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Optional

TILE_KEYS = 64  # decode_plan.h kDecodeTileKeys
MAX_SPLITS = 256  # decode_plan.h kDecodeMaxSplits
ROWS_PER_WARP = 16
MERGE_BLOCKS_PER_SM = 8  # 256 threads, 32 registers (RESULTS.md)


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    hbm_bytes_per_s: float  # achievable copy bandwidth (about 90% of the datasheet's)
    launch_s: float  # kernel-to-kernel gap of a captured graph (no host in the loop)
    dependent_launch_s: float  # the same gap when the next grid is a programmatic dependent launch (sm_90)
    dram_round_trip_s: float  # one dependent global load that misses L2
    l2_round_trip_s: float  # one that hits L2 (data written moments ago: partials, counters)
    l2_bytes_per_s: float
    tile_compute_s: float  # one 64-key tile's mma + softmax work in a block, when not waiting on memory


# Datasheet HBM: H100 SXM 3.35 TB/s, H200 4.8 TB/s; copies reach about 90%. Launch gap and
# latencies (public Hopper microbenchmarks, rounded): about 1 us between dependent kernels of
# a graph, about half of it with a programmatic dependent launch; about 0.7 us per DRAM
# round trip and 0.3 us per L2 hit; L2 bandwidth about 2.5x HBM. Tile compute from the mma
# count of a 64 x 128 tile at the issue rate of one SM sub-partition.
H100 = Gpu("H100", sms=132, hbm_bytes_per_s=3.0e12, launch_s=1.0e-6, dependent_launch_s=0.5e-6,
           dram_round_trip_s=0.7e-6, l2_round_trip_s=0.3e-6, l2_bytes_per_s=7.5e12, tile_compute_s=0.25e-6)
H200 = Gpu("H200", sms=132, hbm_bytes_per_s=4.3e12, launch_s=1.0e-6, dependent_launch_s=0.5e-6,
           dram_round_trip_s=0.7e-6, l2_round_trip_s=0.3e-6, l2_bytes_per_s=7.5e12, tile_compute_s=0.25e-6)
GPUS = {"H100": H100, "H200": H200}

# Resident blocks per SM of each decode kernel variant on sm_90a (bench/RESULTS.md, issue 16
# table): (op, head_dim, layout) -> blocks; layout "keys", "rows64" (4 warps), "rows128" (8 warps).
BLOCKS_PER_SM = {
    ("dense_attention", 128, "keys"): 2, ("dense_attention", 128, "rows64"): 2, ("dense_attention", 128, "rows128"): 1,
    ("dense_attention", 64, "keys"): 3, ("dense_attention", 64, "rows64"): 3, ("dense_attention", 64, "rows128"): 1,
    ("sparse_attention", 128, "keys"): 2, ("sparse_attention", 128, "rows64"): 2, ("sparse_attention", 128, "rows128"): 1,
    ("sparse_attention", 64, "keys"): 3, ("sparse_attention", 64, "rows64"): 3, ("sparse_attention", 64, "rows128"): 1,
}


@dataclass(frozen=True)
class Fixes:
    """The decode-latency issue's fixes, each one a flag (all off: the kernels as they are)."""

    # item 1: the 8-warp rows variant's grid in one wave: its blocks take several splits in turn
    verify_occupancy: bool = False
    empty_splits_exit: bool = False  # item 2: a split with no tile writes only lse = -inf; the merge skips it
    prologue_overlap: bool = False  # item 3: K/V tiles issued before Q is staged (one round trip, not two)
    fused_merge: bool = False  # item 4: the last block of a (sequence, KV head) merges: one launch


ALL_FIXES = Fixes(True, True, True, True)
# What the kernels on main do (the fused merge was not taken: bench/RESULTS.md says why).
LANDED = Fixes(verify_occupancy=True, empty_splits_exit=True, prologue_overlap=True)


@dataclass(frozen=True)
class DecodeCall:
    op: str  # "dense_attention" | "sparse_attention"
    batch: int
    kv_heads: int
    group: int
    qn: int
    head_dim: int
    context: int  # dense: kv_len; sparse: the position the tail starts at (only for bytes of nothing)
    keep: int = 0  # sparse: keep-set entries (all valid)
    tail: int = 0  # sparse: generated positions after the prompt
    dtype_bytes: int = 2


def split_plan(batch: int, kv_heads: int, qn: int, group: int, num_indices: int, sms: int, blocks_per_sm: int,
               launched_blocks_per_sm: int = 0):
    """(num_splits, tail_offset, layout, warps, block_rows, row_groups, splits_per_block, split_blocks):
    decode_plan.h's plan."""
    heads = batch * kv_heads
    splits = max(1, min(MAX_SPLITS, (sms * max(blocks_per_sm, 1)) // heads if heads > 0 else 1))
    tail_offset = math.ceil(num_indices / TILE_KEYS) * TILE_KEYS
    rows = qn * group
    if rows <= ROWS_PER_WARP:
        layout, warps, block_rows = "keys", 4, ROWS_PER_WARP
    else:
        warps = 4 if rows <= 4 * ROWS_PER_WARP else 8
        layout, block_rows = "rows", warps * ROWS_PER_WARP
    row_groups = max(1, math.ceil(rows / block_rows))
    slots = sms * (launched_blocks_per_sm or blocks_per_sm)
    per_block = 1
    while per_block < splits and math.ceil(splits / per_block) * batch * kv_heads * row_groups > slots:
        per_block += 1
    split_blocks = math.ceil(splits / per_block)
    per_block = math.ceil(splits / split_blocks)
    return splits, tail_offset, layout, warps, block_rows, row_groups, per_block, split_blocks


def block_tiles(list_tiles: int, first_split: int, split_blocks: int, splits: int) -> int:
    """Tiles of the block that takes splits first_split, first_split + split_blocks, ...
    (decode_plan.h DecodeBlockTiles: split s holds list_tiles // splits tiles, one more below
    list_tiles % splits)."""
    return sum(list_tiles // splits + (s < list_tiles % splits) for s in range(first_split, splits, split_blocks))


@dataclass
class Prediction:
    attention_s: float
    merge_s: float
    waves: int
    num_splits: int
    busy_splits: int
    kv_bytes: int
    partial_bytes: int

    @property
    def total_s(self) -> float:
        return self.attention_s + self.merge_s


def predict_decode(call: DecodeCall, gpu: Gpu = H100, fixes: Fixes = Fixes()) -> Prediction:
    """Predicted time of one dense_attention / sparse_attention call (see the module docstring)."""
    sparse = call.op == "sparse_attention"
    keys_bps = BLOCKS_PER_SM[(call.op, call.head_dim, "keys")]
    rows = call.qn * call.group
    variant = "keys" if rows <= ROWS_PER_WARP else ("rows64" if rows <= 4 * ROWS_PER_WARP else "rows128")
    bps = BLOCKS_PER_SM[(call.op, call.head_dim, variant)]
    splits, tail_offset, layout, warps, block_rows, row_groups, _, split_blocks = split_plan(
        call.batch, call.kv_heads, call.qn, call.group, call.keep if sparse else 0, gpu.sms, keys_bps, bps)
    if not fixes.verify_occupancy:
        split_blocks = splits  # one split per block
    list_len = (tail_offset + call.tail) if sparse else call.context
    tiles = math.ceil(list_len / TILE_KEYS) if list_len > 0 else 0
    busy = min(splits, tiles)
    busy_blocks = min(split_blocks, tiles)  # a block's first split is its longest
    tiles_per_block = block_tiles(tiles, 0, split_blocks, splits)  # block 0 is the busiest

    working_blocks = (busy_blocks if fixes.empty_splits_exit else split_blocks) * call.kv_heads * row_groups * call.batch
    waves = max(1, math.ceil(working_blocks / (gpu.sms * bps)))

    kv_bytes = kv_bytes_once(call) * row_groups  # each row group reads the list again
    tile_bytes = TILE_KEYS * call.head_dim * call.dtype_bytes * 2
    # Idle splits cost their Q staging and partial writes (counted in the merge's bytes).
    # Only blocks that read tiles share the bandwidth, wave by wave (a last, partial wave's
    # blocks each get a larger share).
    capacity = gpu.sms * bps
    readers_left = busy_blocks * call.kv_heads * row_groups * call.batch
    stream = 0.0
    for _ in range(waves):
        readers = max(1, min(readers_left, capacity))
        readers_left -= readers
        stream += tiles_per_block * max(tile_bytes * readers / gpu.hbm_bytes_per_s, gpu.tile_compute_s)
    # Q staging then the first tile: two dependent round trips, or one when the tiles are
    # issued first and Q arrives meanwhile. Each wave pays its own; a block that takes
    # several splits pays one (its pipeline runs on into the next split, and a split's
    # partial writes do not wait).
    prologue = gpu.dram_round_trip_s * (1 if fixes.prologue_overlap else 2)
    epilogue = gpu.l2_round_trip_s
    attention = gpu.launch_s + waves * (prologue + epilogue) + stream

    out_rows = call.batch * call.qn * call.kv_heads * call.group
    merge = 0.0
    partial_bytes = 0
    if splits > 1:
        read_splits = busy if fixes.empty_splits_exit else splits
        partial_bytes = out_rows * read_splits * (call.head_dim * 4 + 4) + out_rows * splits * 4
        written = out_rows * splits * (4 + (0 if fixes.empty_splits_exit else call.head_dim * 4))
        partial_bytes = max(partial_bytes, written)
        merge_waves = max(1, math.ceil(out_rows / (gpu.sms * MERGE_BLOCKS_PER_SM)))
        body = 3 * gpu.l2_round_trip_s + partial_bytes / gpu.l2_bytes_per_s
        if fixes.fused_merge:
            merge = gpu.l2_round_trip_s + body
        else:
            merge = gpu.dependent_launch_s + merge_waves * body
    return Prediction(attention, merge, waves, splits, busy, kv_bytes, partial_bytes)


def kv_bytes_once(call: DecodeCall) -> int:
    """K and V bytes of the positions the call attends to, each read once."""
    valid = (call.keep + call.tail) if call.op == "sparse_attention" else call.context
    return call.batch * call.kv_heads * valid * call.head_dim * call.dtype_bytes * 2


def floor_s(call: DecodeCall, gpu: Gpu = H100) -> float:
    """The bandwidth floor: K and V read once at the copy bandwidth."""
    return kv_bytes_once(call) / gpu.hbm_bytes_per_s


def gpu_for(device_name: Optional[str]) -> Optional[Gpu]:
    """The modelled GPU a device name (as torch prints it) refers to, or None."""
    name = (device_name or "").upper()
    for key in ("H200", "H100"):
        if key in name:
            return GPUS[key]
    return None


def predict_entry(info: dict) -> Optional[float]:
    """Predicted microseconds per call of a benchmark entry's ``extra_info`` (the kernels on
    main, :data:`LANDED`; the one-split-per-block twin without the verify fix), or None for an
    op or device the model does not cover."""
    gpu = gpu_for(info.get("device"))
    op = info.get("op")
    if gpu is None or op not in ("dense_attention", "sparse_attention"):
        return None
    hkv, hq = info.get("hkv"), info.get("hq")
    if not hkv or not hq:
        return None
    call = DecodeCall(op, batch=info.get("batch") or 1, kv_heads=hkv, group=hq // hkv, qn=info.get("qn") or 1,
                      head_dim=info.get("head_dim") or 128, context=info.get("context") or 0,
                      keep=info.get("keep") or 0, tail=info.get("tail") or 0)
    fixes = LANDED
    if info.get("impl") == "kernel_one_split_per_block":
        fixes = Fixes(empty_splits_exit=True, prologue_overlap=True)
    return predict_decode(call, gpu, fixes).total_s * 1e6


# Qwen2-7B's attention geometry: 28 query heads over 4 KV heads (G = 7), head_dim 128.
KEY_SHAPES = (
    ("decode, B=1, 64K", DecodeCall("dense_attention", 1, 4, 7, 1, 128, 65536)),
    ("decode, B=8, 32K", DecodeCall("dense_attention", 8, 4, 7, 1, 128, 32768)),
    ("verify γ=9, B=1, 64K", DecodeCall("dense_attention", 1, 4, 7, 10, 128, 65536)),
    ("verify γ=9, B=8, 32K", DecodeCall("dense_attention", 8, 4, 7, 10, 128, 32768)),
    ("draft, B=1, keep 1024 + tail 64", DecodeCall("sparse_attention", 1, 4, 7, 1, 128, 65536, keep=1024, tail=64)),
    ("draft, B=8, keep 1024 + tail 64", DecodeCall("sparse_attention", 8, 4, 7, 1, 128, 32768, keep=1024, tail=64)),
)

FIX_STEPS = (
    ("before issue 23", Fixes()),
    ("+ empty splits exit", Fixes(empty_splits_exit=True)),
    ("+ prologue overlap", Fixes(empty_splits_exit=True, prologue_overlap=True)),
    ("+ verify in one wave (main)", LANDED),
    ("+ one launch (not taken)", ALL_FIXES),
)


def table(gpu: Gpu) -> str:
    lines = [f"Predicted us per call on an {gpu.name} (model: bench/latency_model.py; floor = K/V bytes "
             f"over {gpu.hbm_bytes_per_s / 1e12:.1f} TB/s):", "",
             "| call | floor | " + " | ".join(name for name, _ in FIX_STEPS) + " | waves before / main |",
             "|---|---|" + "---|" * len(FIX_STEPS) + "---|"]
    for label, call in KEY_SHAPES:
        cells = []
        for _, fixes in FIX_STEPS:
            cells.append(f"{predict_decode(call, gpu, fixes).total_s * 1e6:.1f}")
        waves = f"{predict_decode(call, gpu).waves} / {predict_decode(call, gpu, LANDED).waves}"
        lines.append(f"| {label} | {floor_s(call, gpu) * 1e6:.1f} | " + " | ".join(cells) + f" | {waves} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", choices=sorted(GPUS), nargs="+", default=sorted(GPUS))
    args = parser.parse_args(argv)
    for name in args.gpu:
        sys.stdout.write(table(GPUS[name]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
