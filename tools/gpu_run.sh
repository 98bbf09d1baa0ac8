#!/usr/bin/env bash
# Everything a lent GPU machine should do, from the repo root. One device call may run
# 10 minutes, so the work is in stages, and the build travels between calls:
#
#   bash tools/gpu_run.sh build            # call 1: build; $OUT gets _C.abi3.so + gpu_stamp
#   (here: mkdir -p .gpu_build && cp <files_at>/{_C.abi3.so,gpu_stamp} .gpu_build/)
#   bash tools/gpu_run.sh test             # later calls, with carry: [".gpu_build"]
#   bash tools/gpu_run.sh sanitize
#   bash tools/gpu_run.sh bench
#   bash tools/gpu_run.sh e2e
#   bash tools/gpu_run.sh                  # all of build test sanitize bench (a long call)
#   bash tools/gpu_run.sh first-light      # everything that matters in one call of <= 9 minutes (below)
#
# Stages:
#   build     pip install --no-build-isolation --no-deps . for the visible GPU (9.0a);
#             skipped when .gpu_build/ holds a build of the same sources (its stamp),
#             which is then used as is (PYTHONPATH), on a warm or a fresh machine
#   test      every CUDA test (tests whose module or name mentions cuda, plus the
#             cuda parametrizations of the shared op tests), the value checks with
#             STD_EXT_DEBUG=1, and `python -m std_ext demo --video` on the GPU
#   sanitize  compute-sanitizer memcheck on the CUDA tests (long-context cases left
#             out: memcheck runs them ~50x slower) and racecheck on a small subset
#   bench     the op benchmarks (bench/test_bench_ops_cuda.py) -> bench.json + table
#   e2e       bench/e2e.py -> e2e.md
#   first-light  one call, one budget (FIRST_LIGHT_BUDGET below, 540 s in all), each part capped and
#             writing to $OUT as it goes, so a call cut off still brings back what it had: build for
#             9.0a; the curated CUDA tests (one case per test x dtype x head dim, row invariance,
#             graph capture), then the rest while time remains; memcheck on a small subset; the op
#             benchmarks at the key shapes; e2e at 64K x 1 and 32K x 8 (vanilla, StD, auto, graphs
#             on and off, transformers); summary.md (one table) printed last
# Logs, JSON and tables go to $OUT (the device tool brings back at most 8 files). Each
# stage has its own time limit so one hang cannot eat the call.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/build/gpu_out}
mkdir -p "$OUT" "$REPO/build"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
STAGES=${*:-build test sanitize bench}
status=0
SECONDS=0

log() { echo "[gpu_run ${SECONDS}s] $*"; }

source_stamp() {
  (cd "$REPO" && cat setup.py $(find csrc -type f | LC_ALL=C sort) | sha1sum | cut -c1-16)
}

# A carried build of the same sources: the repo's python package + that _C, on PYTHONPATH.
use_carried_build() {
  local carried="$REPO/.gpu_build"
  [ -f "$carried/gpu_stamp" ] && [ -f "$carried/_C.abi3.so" ] || return 1
  [ "$(cat "$carried/gpu_stamp")" = "$(source_stamp)" ] || { log "build: .gpu_build is stale"; return 1; }
  rm -rf /tmp/std_ext_pkg && mkdir -p /tmp/std_ext_pkg && cp -r "$REPO/std_ext" /tmp/std_ext_pkg/
  cp "$carried/_C.abi3.so" /tmp/std_ext_pkg/std_ext/
  export PYTHONPATH=/tmp/std_ext_pkg${PYTHONPATH:+:$PYTHONPATH}
}

BUILT=0
build() {
  [ "$BUILT" = 1 ] && return 0
  BUILT=1
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
  if use_carried_build; then
    log "build: using the carried .gpu_build"
    return 0
  fi
  log "build: pip install (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  if ! (cd "$REPO" && STD_EXT_CUDA=1 timeout 540 pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1); then
    tail -n 60 "$OUT/build.log"
    log "build FAILED"
    exit 1
  fi
  grep -m1 "std_ext: " "$OUT/build.log"
  # Hand the build back, so later calls (even on a fresh machine) skip it.
  cp "$(cd /tmp && python -c 'import std_ext._C as m; print(m.__file__)')" "$OUT/_C.abi3.so"
  strip --strip-debug "$OUT/_C.abi3.so" 2>/dev/null || true  # host debug info only: a file comes back if <= 16 MB
  source_stamp >"$OUT/gpu_stamp"
  log "build: done"
}

# Tests run from /tmp so the installed build is what gets imported.
CUDA_TESTS=(-k "cuda and not compile_check and not without_cuda and not emulated")

run_tests() {
  log "test: CUDA tests"
  (cd /tmp && timeout 420 pytest "$REPO/python_tests" "${CUDA_TESTS[@]}" -q -rs -p no:cacheprovider \
    >"$OUT/tests.txt" 2>&1) || status=1
  tail -n 5 "$OUT/tests.txt"
  log "test: value checks with STD_EXT_DEBUG=1"
  (cd /tmp && STD_EXT_DEBUG=1 timeout 120 pytest "$REPO/python_tests/test_bad_input.py" -k cuda -q \
    -p no:cacheprovider >>"$OUT/tests.txt" 2>&1) || status=1
  tail -n 2 "$OUT/tests.txt"
  log "test: the video demo on the GPU (bf16; exits 1 if StD and vanilla tokens differ)"
  (cd /tmp && timeout 120 python -m std_ext demo --video --no-progress >>"$OUT/tests.txt" 2>&1) || status=1
  tail -n 12 "$OUT/tests.txt"
}

sanitize() {
  log "sanitize: memcheck"
  (cd /tmp && timeout 420 compute-sanitizer --tool memcheck --error-exitcode 9 \
    pytest "$REPO/python_tests" -k "cuda and not compile_check and not without_cuda and not emulated and not long_context and not 262144" -x -q -p no:cacheprovider \
    >"$OUT/sanitizer.txt" 2>&1) || status=1
  tail -n 5 "$OUT/sanitizer.txt"
  log "sanitize: racecheck"
  (cd /tmp && timeout 300 compute-sanitizer --tool racecheck --error-exitcode 9 \
    pytest "$REPO/python_tests" -x -q -p no:cacheprovider \
    -k "cuda and not emulated and (bitwise and 40000 and bfloat16 or batch8_ragged and D-128 and float16 and Qn-10 or graph)" \
    >>"$OUT/sanitizer.txt" 2>&1) || status=1
  tail -n 5 "$OUT/sanitizer.txt"
}

bench() {
  log "bench: op benchmarks"
  (cd /tmp && timeout 420 pytest "$REPO/bench/test_bench_ops_cuda.py" -q -rs -p no:cacheprovider \
    --benchmark-json="$OUT/bench.json" >"$OUT/bench.txt" 2>&1) || status=1
  tail -n 40 "$OUT/bench.txt"
  # The table with targets, ready for bench/RESULTS.md.
  python "$REPO/bench/gpu_report.py" "$OUT/bench.json" >"$OUT/bench_table.md" ||
    echo "gpu_report: no CUDA benchmark was timed (kernels not registered?), see bench.txt"
  cat "$OUT/bench_table.md"
}

e2e() {
  log "e2e: bench/e2e.py"
  (cd "$REPO" && timeout 560 python bench/e2e.py --out "$OUT/e2e.md" >"$OUT/e2e.txt" 2>&1) || status=1
  tail -n 60 "$OUT/e2e.txt"
}

# ---------------------------------------------------------------- first-light
# Seconds per part, sized from what each takes: the build compiles 4 .cu files (each 30-50 s of
# one core here for one architecture, in parallel there) and the C++ files; the curated tests are
# ~110 small cases; memcheck runs ~50x slower, so it gets a dozen small cases; the op benchmarks
# run ~40 cases at STD_EXT_BENCH_SECONDS=0.15; e2e builds a 7B-shaped model once and prefills 64K
# and 8 x 32K about eight times each. A part gets min(its cap, what is left of the total).
FIRST_LIGHT_TOTAL=540
declare -A FIRST_LIGHT_BUDGET=([build]=150 [curated]=80 [rest]=45 [sanitize]=45 [bench]=80 [e2e]=120 [summary]=10)
FIRST_LIGHT_ORDER=(build curated rest sanitize bench e2e summary)

cap() {  # seconds for part $1: its cap, or what is left of the total (minus the summary's share)
  local left=$((FIRST_LIGHT_TOTAL - SECONDS - ${FIRST_LIGHT_BUDGET[summary]}))
  [ "$1" = summary ] && left=$((FIRST_LIGHT_TOTAL - SECONDS))
  local want=${FIRST_LIGHT_BUDGET[$1]}
  ((left < want)) && want=$left
  ((want < 1)) && want=1
  echo "$want"
}

part_done() {  # part, rc, seconds: one row of the summary, written at once
  local verdict=ok
  [ "$2" = 124 ] && verdict="cut at its cap"
  [ "$2" != 0 ] && [ "$2" != 124 ] && verdict="FAILED (rc $2)"
  echo "| $1 | $verdict | $3 s | ${FIRST_LIGHT_BUDGET[$1]} s |" >>"$OUT/summary.md"
}

first_light() {
  local FL_TESTS=(-k "cuda and not compile_check and not without_cuda and not emulated")
  {
    echo "# first-light $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -n 2
    python -c 'import torch, transformers; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")' 2>&1
    echo
    echo "| part | result | took | cap |"
    echo "|---|---|---|---|"
  } >"$OUT/summary.md"
  local began rc
  began=$SECONDS
  if use_carried_build; then
    log "first-light build: using the carried .gpu_build"; rc=0
  else
    log "first-light build (cap $(cap build) s)"
    (cd "$REPO" && STD_EXT_CUDA=1 timeout "$(cap build)" pip install --no-build-isolation --no-deps -v . \
      >/tmp/build.log 2>&1); rc=$?
    if [ $rc = 0 ]; then
      cp "$(cd /tmp && python -c 'import std_ext._C as m; print(m.__file__)')" "$OUT/_C.abi3.so"
      strip --strip-debug "$OUT/_C.abi3.so" 2>/dev/null || true
      source_stamp >"$OUT/gpu_stamp"
    else
      { echo; echo '```'; tail -n 40 /tmp/build.log; echo '```'; } >>"$OUT/summary.md"
    fi
  fi
  part_done build $rc $((SECONDS - began))
  [ $rc = 0 ] || { status=1; cat "$OUT/summary.md"; return; }

  began=$SECONDS; log "first-light curated CUDA tests (cap $(cap curated) s)"
  (cd /tmp && timeout "$(cap curated)" pytest "$REPO/python_tests" "${FL_TESTS[@]}" --first-light curated -q -rfE \
    -p no:cacheprovider >"$OUT/tests.txt" 2>&1); rc=$?
  part_done curated $rc $((SECONDS - began)); [ $rc = 0 ] || status=1
  echo "curated: $(tail -n 1 "$OUT/tests.txt")" >>/tmp/first_light_counts

  began=$SECONDS; log "first-light the other CUDA tests (cap $(cap rest) s)"
  { echo; echo "==== the rest"; } >>"$OUT/tests.txt"
  (cd /tmp && timeout "$(cap rest)" pytest "$REPO/python_tests" "${FL_TESTS[@]}" --first-light rest -q -rfE \
    -p no:cacheprovider >>"$OUT/tests.txt" 2>&1); rc=$?
  part_done rest $rc $((SECONDS - began)); [ $rc = 0 ] || [ $rc = 124 ] || status=1
  echo "rest: $(tail -n 1 "$OUT/tests.txt")" >>/tmp/first_light_counts

  began=$SECONDS; log "first-light memcheck (cap $(cap sanitize) s)"
  (cd /tmp && timeout "$(cap sanitize)" compute-sanitizer --tool memcheck --error-exitcode 9 \
    pytest "$REPO/python_tests" -x -q -p no:cacheprovider --first-light curated \
    -k "cuda and not compile_check and not without_cuda and not emulated and not long_context and not 40000 and not graph" \
    >"$OUT/sanitizer.txt" 2>&1); rc=$?
  part_done sanitize $rc $((SECONDS - began)); [ $rc = 0 ] || [ $rc = 124 ] || status=1
  echo "memcheck: $(grep -c '^========= Invalid\|^========= Error' "$OUT/sanitizer.txt") errors; $(tail -n 1 "$OUT/sanitizer.txt")" \
    >>/tmp/first_light_counts

  began=$SECONDS; log "first-light op benchmarks at the key shapes (cap $(cap bench) s)"
  (cd /tmp && STD_EXT_BENCH_SECONDS=0.15 timeout "$(cap bench)" pytest "$REPO/bench/test_bench_ops_cuda.py" -q -rs \
    -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
    -k "(dense_attention and (ctx32K or ctx64K or ctx128K)) or (sparse_attention and (B1- or B8-)) or topk_indices or (attention_scores and S128K and T256) or prefill_selection" \
    >"$OUT/bench.txt" 2>&1); rc=$?
  python "$REPO/bench/gpu_report.py" "$OUT/bench.json" >>"$OUT/bench.txt" 2>&1 || true
  part_done bench $rc $((SECONDS - began)); [ $rc = 0 ] || status=1

  began=$SECONDS; log "first-light e2e (cap $(cap e2e) s)"
  (cd "$REPO" && timeout "$(cap e2e)" python bench/e2e.py --pairs 65536x1,32768x8 --new-tokens 64 --max-margins 2 \
    --out "$OUT/e2e.md" >/tmp/e2e.txt 2>&1); rc=$?
  [ -f "$OUT/e2e.md" ] || cp /tmp/e2e.txt "$OUT/e2e.md"
  part_done e2e $rc $((SECONDS - began)); [ $rc = 0 ] || status=1

  {
    echo
    sed 's/^/- /' /tmp/first_light_counts 2>/dev/null
    echo
    echo "## op benchmarks (bench/gpu_report.py)"
    sed -n '/^|/p' "$OUT/bench.txt" | head -n 40
    echo
    echo "## end to end (bench/e2e.py)"
    sed -n '/^## Decode speed/,/^## Speedup at draft/p' "$OUT/e2e.md" | grep '^|' | head -n 12
    sed -n '/^## CUDA graphs/,/^## Exactness/p' "$OUT/e2e.md" | grep '^|' | head -n 6
    sed -n '/^## Exactness/,$p' "$OUT/e2e.md" | grep '^|' | head -n 6
  } >>"$OUT/summary.md"
  log "first-light done in ${SECONDS} s"
  cat "$OUT/summary.md"
}

for stage in $STAGES; do
  case "$stage" in
    build) build ;;
    test) build; run_tests ;;
    sanitize) build; sanitize ;;
    bench) build; bench ;;
    e2e) build; e2e ;;
    first-light) rm -f /tmp/first_light_counts; first_light ;;
    *) echo "unknown stage '$stage' (build test sanitize bench e2e first-light)"; exit 2 ;;
  esac
done
log "done (status $status)"
exit $status
