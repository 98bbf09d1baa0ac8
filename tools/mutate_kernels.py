#!/usr/bin/env python3
"""A test of the tests: inject realistic bugs into copies of the CUDA kernel sources and
check that the emulated CUDA test suite catches each one.

    python tools/mutate_kernels.py                 # every mutant; prints caught / missed
    python tools/mutate_kernels.py --only short_wait_group missing_stage_barrier
    python tools/mutate_kernels.py --list          # the mutants and what each breaks
    python tools/mutate_kernels.py --check         # every mutation still applies (no build, no tests)
    python tools/mutate_kernels.py --markdown bench/mutants.md   # also write the table

Each mutant is one textual edit of one file under csrc/ (the edit must match exactly once,
so the list breaks loudly when the kernels change under it). A scratch copy of csrc/ lives
in build/mutants/csrc; for each mutant the tool restores the pristine copy, applies the
edit, and runs the emulated tests of the kernels the file feeds (python_tests/
test_*_cuda.py, ``-k emulated``) in a subprocess with STD_EXT_EMULATOR_CSRC pointing at the
scratch copy, so python_tests/emulated_cuda.py builds the emulated library from it (ninja
rebuilds only what the edit touches). A mutant is

  caught      the suite fails (a wrong value, a bitwise mismatch, an emulator fault such as
              a deadlock or a NaN from an unfinished cp.async, a crash, or a time-out);
  missed      every selected test passes under every schedule tried;
  invalid     the edit does not compile (not counted: it is no test of the tests).

Races depend on the interleaving, so a mutant that survives the default schedule is run
again under the others (reverse, random:1, warp) before it is called missed. A miss is
not automatically a hole in the tests: some bugs cannot change the output on this
emulator (its memory is sequentially consistent, so a missing __threadfence is invisible);
each mutant says in `fair_miss` when that is expected, and why.

Before any mutant, the unmutated copy must pass the same suites (the control), or the
run stops: a suite that already fails would make every mutant look caught.

Exit status: 0 when at least --min-caught (default 0.9) of the valid mutants are caught and
every miss is an expected one; 1 otherwise; 2 on bad usage or a mutation that no longer
applies.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
SCRATCH = REPO / "build" / "mutants"
TESTS = {
    "decode": "python_tests/test_decode_attention_cuda.py",
    "topk": "python_tests/test_topk_indices_cuda.py",
    "scores": "python_tests/test_attention_scores_cuda.py",
}
SCHEDULES = ("forward", "reverse", "random:1", "warp")


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to csrc/
    old: str  # must occur exactly once in the file
    new: str
    bug: str  # what a developer would have done wrong
    suites: tuple[str, ...]  # keys of TESTS whose kernels include the file
    fair_miss: str = ""  # why the emulator cannot see it, when that is expected


DECODE = "kernels/decode_attention.cuh"
TOPK = "kernels/topk_indices.cuh"
SCORES = "kernels/attention_scores.cuh"
MMA = "kernels/mma_utils.cuh"
PLAN = "kernels/decode_plan.h"
ATTENTION = ("decode",)
ALL = ("decode", "topk", "scores")

MUTANTS = (
    # --- synchronization and the cp.async pipeline
    Mutant("missing_query_barrier", DECODE,
           "  __syncthreads();                    // and every thread's\n", "",
           "the query fragments are loaded before every thread's query copy has landed", ATTENTION),
    Mutant("query_wait_short", DECODE,
           "  mma::cp_async_wait<kTileGroups * (kStages - 1)>();  // this thread's query chunks have landed\n",
           "  mma::cp_async_wait<kTileGroups * (kStages - 1) + 1>();  // this thread's query chunks have landed\n",
           "the query copy is not waited for (the wait leaves one group too many in flight)", ATTENTION),
    Mutant("empty_split_leaves_lse_unwritten", DECODE,
           "        p.partial_lse[output_row(row) * p.num_splits + block.split(i)] = -INFINITY;\n", "",
           "a split with no tile exits without marking its rows empty for the merge", ATTENTION),
    Mutant("merge_skips_live_splits", DECODE,
           "    if (w == 0.f) continue;", "    if (w < 0.5f) continue;",
           "the merge's skip test drops splits of small but nonzero weight", ATTENTION),
    Mutant("short_wait_group", DECODE,
           "    mma::cp_async_wait<kPendingAtK>();\n", "    mma::cp_async_wait<kPendingAtK + 1>();\n",
           "the pipeline waits for one group too few: tile j is used before it lands", ATTENTION),
    Mutant("short_v_wait", DECODE,
           "      mma::cp_async_wait<kPendingAtV>();\n", "      mma::cp_async_wait<kPendingAtV + 1>();\n",
           "keys layout: P.V reads the tile's V before its copy group has landed", ATTENTION),
    Mutant("missing_tile_barrier", DECODE,
           "    // with tile j - 1, whose stage the next issue refills.\n    __syncthreads();\n",
           "    // with tile j - 1, whose stage the next issue refills.\n",
           "no barrier between a tile landing and its use / the refill of the previous stage", ATTENTION),
    Mutant("missing_exchange_barrier", DECODE,
           "        prob_exchange[warp * 32 + lane] = probabilities(0);\n        __syncthreads();\n",
           "        prob_exchange[warp * 32 + lane] = probabilities(0);\n",
           "keys layout: warps read each other's probabilities before they are written", ATTENTION),
    Mutant("k_group_not_committed", DECODE,
           "    if constexpr (kSplitKV) mma::cp_async_commit();\n", "",
           "keys layout: K is not committed as a group of its own, so every wait counts one group too many", ATTENTION),
    Mutant("query_copy_not_committed", DECODE,
           "    }\n    mma::cp_async_commit();\n  }\n  {\n    int first_indices", "    }\n  }\n  {\n    int first_indices",
           "the queries' copies are not committed as their own group: the first wait does not cover them", ATTENTION),
    # (Not resetting acc or the row sums would be an equivalent mutant: with the running max
    # back at -inf, the next split's first tile rescales them by exp2(-inf) = 0.)
    Mutant("next_split_keeps_running_max", DECODE,
           "    row_max[0] = row_max[1] = -INFINITY;\n", "",
           "a block that takes several splits starts the next one from the last one's running max", ATTENTION),
    Mutant("split_finished_a_tile_early", DECODE,
           "    if (j + 1 == split_end && j + 1 < num_tiles) {\n",
           "    if (j + 2 == split_end && j + 1 < num_tiles) {\n",
           "a block that takes several splits writes a split out before its last tile", ATTENTION),
    Mutant("block_takes_neighbouring_splits", PLAN,
           "  STD_EXT_HOST_DEVICE int split(int i) const { return first_split + i * split_blocks; }",
           "  STD_EXT_HOST_DEVICE int split(int i) const { return first_split + i; }",
           "a block's splits are taken as neighbours, not strided: some are computed twice, others never",
           ATTENTION),
    Mutant("merge_skips_griddep_wait", DECODE,
           "  mma::wait_for_primary_grid();\n", "",
           "the dependent merge reads the partials without waiting for the attention grid", ATTENTION),
    # --- fragments, layouts, swizzles
    Mutant("swapped_v_fragments", DECODE,
           "        E::mma(acc[2 * dl], pa, vb[0], vb[1]);\n", "        E::mma(acc[2 * dl], pa, vb[1], vb[0]);\n",
           "P.V takes the two B registers of an mma in the wrong order", ATTENTION),
    Mutant("wrong_k_fragment_half", DECODE,
           "        E::mma(logits[2 * np + 1], q_frag[ks], kb[2], kb[3]);\n",
           "        E::mma(logits[2 * np + 1], q_frag[ks], kb[0], kb[1]);\n",
           "Q.K^T uses the first 8 keys' fragments for the second 8", ATTENTION),
    Mutant("unswizzled_kv_write", DECODE,
           "        mma::cp_async_16_evict_first(dst + swizzled<kHeadDim>(row, copy_chunk),\n",
           "        mma::cp_async_16_evict_first(dst + row * kHeadDim + copy_chunk * 8,\n",
           "K and V rows are written unswizzled but read through the swizzle", ATTENTION),
    Mutant("query_ldmatrix_wrong_chunk", DECODE,
           "mma::ldmatrix_x4(q_frag[ks], q_smem + swizzled<kHeadDim>(r, ks * 2 + m / 2));",
           "mma::ldmatrix_x4(q_frag[ks], q_smem + swizzled<kHeadDim>(r, ks * 2 + m % 2));",
           "the query fragments' ldmatrix addresses take the row half for the column half", ATTENTION),
    Mutant("bf16_pack_swapped", MMA,
           "    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);\n",
           "    __nv_bfloat162 v = __floats2bfloat162_rn(hi, lo);\n",
           "bf16 pairs packed high half first (P.V probabilities and outputs columns swap)", ALL),
    # --- masks and bounds
    Mutant("causal_mask_off_by_one", DECODE,
           "    row_pos[half] = row < rows_total ? kv_len - p.q_len + row / p.group : -1;\n",
           "    row_pos[half] = row < rows_total ? kv_len - p.q_len + row / p.group + 1 : -1;\n",
           "each query also sees the next position (its own future)", ATTENTION),
    Mutant("keep_entry_not_below_tail", DECODE,
           "        if (index >= 0 && index < tail_start) {\n", "        if (index >= 0) {\n",
           "keep-set entries at or past tail_start are read (they are counted twice with the tail)", ATTENTION),
    Mutant("kv_len_not_clamped", DECODE,
           "  const int kv_len = min(max(p.kv_len[b], 0), p.capacity);\n",
           "  const int kv_len = max(p.kv_len[b], 0);\n",
           "an unchecked kv_len past the capacity reads past the cache", ATTENTION),
    Mutant("masked_row_shift_nan", DECODE,
           "  shift = new_max == -INFINITY ? 0.f : new_max;\n", "  shift = new_max;\n",
           "a row that has seen only masked keys computes exp2(-inf - -inf) = NaN", ATTENTION),
    Mutant("scores_causal_mask_off_by_one", SCORES,
           "          if (kMasked) x = key0 + n * 8 + e <= pos[i][half] ? x : neg_inf();\n",
           "          if (kMasked) x = key0 + n * 8 + e < pos[i][half] ? x : neg_inf();\n",
           "attention_scores' row statistics leave out each query's own key", ("scores",)),
    Mutant("scores_padding_query_kept", SCORES,
           "{ return p < 0 ? -1 : min(p, capacity - 1); }",
           "{ return p < 0 ? 0 : min(p, capacity - 1); }",
           "a padding query (q_pos = -1) is scored as a query at position 0", ("scores",)),
    # --- merges and reductions
    Mutant("merge_unweighted", DECODE,
           "    for (int e = 0; e < kPerLane; ++e) total[e] = __fmaf_rn(w, o[e], total[e]);\n",
           "    for (int e = 0; e < kPerLane; ++e) total[e] = __fadd_rn(o[e], total[e]);\n",
           "the merge adds the splits' partial outputs without their softmax weights", ATTENTION),
    Mutant("merge_drops_last_split", DECODE,
           "    if (s >= num_splits) break;\n",
           "    if (s >= num_splits - 1) break;\n",
           "the merge's split loop stops one split early", ATTENTION),
    Mutant("lse_written_by_every_warp", DECODE,
           "      if (t4 == 0 && (!kKeySplit || warp == 0)) {\n", "      if (t4 == 0 && !kKeySplit) {\n",
           "keys layout: no warp writes the split's log2-sum-exp", ATTENTION),
    Mutant("rescale_with_wrong_alpha", DECODE,
           "      acc[n][2] = __fmul_rn(acc[n][2], alpha[1]);\n", "      acc[n][2] = __fmul_rn(acc[n][2], alpha[0]);\n",
           "the online softmax rescales a row's accumulator with the other row's factor", ATTENTION),
    # --- collectives
    Mutant("lane_skips_shuffle", DECODE,
           "  x = __fadd_rn(x, __shfl_xor_sync(0xffffffffu, x, 1));\n",
           "  if (threadIdx.x % 32 != 5) x = __fadd_rn(x, __shfl_xor_sync(0xffffffffu, x, 1));\n",
           "one lane skips a full-mask shuffle (undefined on hardware; a hang or garbage)", ATTENTION),
    Mutant("scan_off_by_one", TOPK,
           "    if (lane >= delta) inclusive += other;\n", "    if (lane > delta) inclusive += other;\n",
           "the warp prefix sum skips the lane exactly delta away", ("topk",)),
    Mutant("aggregated_atomic_counts_one", TOPK,
           "atomicAdd(&histogram[bin], static_cast<uint32_t>(__popc(peers)));",
           "atomicAdd(&histogram[bin], 1u);",
           "the warp-aggregated histogram atomic adds 1 for the whole group of matching lanes", ("topk",)),
    Mutant("aggregating_lane_wrong", TOPK,
           "if (bin != kNoBin && lane == __ffs(peers) - 1)", "if (bin != kNoBin && lane == __ffs(peers))",
           "the aggregating lane of a group is chosen off by one (some groups never add, some twice)", ("topk",)),
    # --- selection logic
    Mutant("tie_order_broken", TOPK,
           "    above += masked > prefix ? 1u : 0u;\n", "    above += masked >= prefix ? 1u : 0u;\n",
           "keys equal to the k-th are counted as above it: the tie slots shift", ("topk",)),
    Mutant("straddling_bin_off_by_one", TOPK,
           "    if (above < selection.need && above + counts[i] >= selection.need) {\n",
           "    if (above < selection.need && above + counts[i] > selection.need) {\n",
           "the radix pass picks the wrong digit when a bin ends exactly at the k-th key", ("topk",)),
    Mutant("last_block_ticket_wrong", TOPK,
           "    is_last_block = ticket == static_cast<uint32_t>(blocks_per_row - 1);\n",
           "    is_last_block = ticket == 0u;\n",
           "the first block to arrive, not the last, narrows the row's selection", ("topk",)),
    Mutant("missing_threadfence_before_ticket", TOPK,
           "  // last ticket sees every block's histogram.\n  __threadfence();\n",
           "  // last ticket sees every block's histogram.\n",
           "no fence between a block's histogram atomics and its ticket", ("topk",),
           fair_miss="the emulator's global memory is sequentially consistent: a missing fence cannot "
                     "reorder anything here; only a GPU (or a weak-memory model) can show it"),
)


def apply(mutant: Mutant, root: Path) -> None:
    path = root / mutant.file
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name}: its edit matches {count} times in csrc/{mutant.file} (must be once); "
                         "update tools/mutate_kernels.py to the current kernel sources")
    path.write_text(text.replace(mutant.old, mutant.new))


def restore(root: Path) -> None:
    """The scratch copy back to the pristine sources, touching only files that differ (so
    ninja rebuilds only what the last mutant changed)."""
    for src in CSRC.rglob("*"):
        if src.is_dir():
            continue
        dst = root / src.relative_to(CSRC)
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def run_tests(root: Path, suites: tuple[str, ...], schedule: str, timeout: float, select: str) -> tuple[str, str]:
    """('pass' | 'fail' | 'timeout' | 'build', last lines of output) of `suites` (keys of TESTS)."""
    env = dict(os.environ, STD_EXT_EMULATOR_CSRC=str(root), STD_EXT_EMULATOR_SCHEDULE=schedule,
               STD_EXT_REQUIRE_EMULATOR="1")
    build = subprocess.run([sys.executable, "-c", "from emulated_cuda import load_emulated_ops; load_emulated_ops()"],
                           cwd=REPO / "python_tests", env=env, capture_output=True, text=True)
    if build.returncode != 0:
        return "build", (build.stdout + build.stderr)[-2000:]
    files = [TESTS[s] for s in suites]
    cmd = [sys.executable, "-m", "pytest", *files, "-k", select, "-x", "-q", "-p", "no:cacheprovider",
           "--no-header", "-rfE"]
    try:
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result after {timeout:.0f} s"
    out = (run.stdout + run.stderr).strip().splitlines()
    if run.returncode == 0:
        return "pass", out[-1] if out else ""
    if run.returncode == 5:
        raise SystemExit(f"no emulated test selected by {cmd}")
    failed = [line for line in out if line.startswith(("FAILED", "ERROR"))]
    return "fail", (failed[0] if failed else out[-1] if out else f"exit {run.returncode}")[:300]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run just these mutants")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--check", action="store_true", help="check every edit applies exactly once, then exit")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES),
                        help=f"schedules to try, in order, until one catches the mutant (default: {' '.join(SCHEDULES)})")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run (default 600)")
    parser.add_argument("-k", dest="select", default="emulated",
                        help="pytest -k expression selecting the emulated tests (default: emulated)")
    parser.add_argument("--min-caught", type=float, default=0.9, help="required caught fraction (default 0.9)")
    parser.add_argument("--markdown", type=Path, help="also write the result table to this file")
    args = parser.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"unknown mutant(s): {', '.join(sorted(unknown))}; see --list")
        mutants = tuple(m for m in MUTANTS if m.name in args.only)
    if args.list:
        for m in mutants:
            print(f"{m.name:36} csrc/{m.file:32} {m.bug}")
        return 0

    # Every edit must still apply before anything runs; checked on a throwaway copy, so that
    # a --check never disturbs a mutation run using the scratch copy.
    with tempfile.TemporaryDirectory() as tmp:
        for m in mutants:
            target = Path(tmp) / m.file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(CSRC / m.file, target)
            apply(m, Path(tmp))
    if args.check:
        print(f"all {len(mutants)} mutations apply to the current sources")
        return 0

    root = SCRATCH / "csrc"

    # The control: the unmutated sources must pass every suite a mutant runs, else every
    # mutant would look caught.
    restore(root)
    for suite in sorted({s for m in mutants for s in m.suites}):
        result, detail = run_tests(root, (suite,), args.schedules[0], args.timeout, args.select)
        if result != "pass":
            print(f"the unmutated {TESTS[suite]} does not pass under the emulator ({result}): {detail}")
            return 1
        print(f"control: {TESTS[suite]} passes unmutated ({detail})", flush=True)

    rows = []
    for i, m in enumerate(mutants, 1):
        restore(root)
        apply(m, root)
        start = time.time()
        verdict, detail, schedule = "missed", "", ""
        for schedule in args.schedules:
            result, detail = run_tests(root, m.suites, schedule, args.timeout, args.select)
            if result == "build":
                verdict = "invalid"
                break
            if result in ("fail", "timeout"):
                verdict = "caught"
                break
        seconds = time.time() - start
        if verdict == "missed" and m.fair_miss:
            detail = "expected: " + m.fair_miss
        rows.append((m, verdict, schedule if verdict == "caught" else "", detail, seconds))
        print(f"[{i:2}/{len(mutants)}] {verdict:8} {m.name:36} {schedule if verdict == 'caught' else '':9} "
              f"{seconds:6.0f}s  {detail[:150]}", flush=True)
    restore(root)

    valid = [r for r in rows if r[1] != "invalid"]
    caught = [r for r in valid if r[1] == "caught"]
    unexpected = [r for r in valid if r[1] == "missed" and not r[0].fair_miss]
    fraction = len(caught) / len(valid) if valid else 0.0
    summary = (f"{len(caught)} of {len(valid)} valid mutants caught ({100 * fraction:.0f}%); "
               f"{len(rows) - len(valid)} invalid; {len(unexpected)} unexpected miss(es)")
    print(summary)
    if args.markdown:
        lines = ["| mutant | file | bug | verdict | schedule | evidence |", "|---|---|---|---|---|---|"]
        for m, verdict, schedule, detail, _ in rows:
            cell = detail.replace("|", "\\|")[:160]
            lines.append(f"| {m.name} | {m.file} | {m.bug} | {verdict} | {schedule} | {cell} |")
        args.markdown.write_text("\n".join(lines + ["", summary, ""]))
    return 0 if fraction >= args.min_caught and not unexpected else 1


if __name__ == "__main__":
    sys.exit(main())
