#!/usr/bin/env bash
# Everything a lent GPU machine should do, from the repo root, in as few device `run`
# calls as possible. One device call may run 10 minutes, so the work is in stages:
#
#   bash tools/gpu_run.sh                 # build test sanitize bench (the whole list)
#   bash tools/gpu_run.sh build test      # first call: build, then the CUDA tests
#   bash tools/gpu_run.sh sanitize bench  # next call, while the machine is still warm
#   bash tools/gpu_run.sh e2e             # end-to-end benchmark (bench/e2e.py)
#
# Stages:
#   build     pip install --no-build-isolation --no-deps . for the visible GPU (9.0a)
#   test      every CUDA test (tests whose module or name mentions cuda, plus the
#             cuda parametrizations of the shared op tests), the value checks with
#             STD_EXT_DEBUG=1, and `python -m std_ext demo --video` on the GPU
#   sanitize  compute-sanitizer memcheck on the CUDA tests (long-context cases left
#             out: memcheck runs them ~50x slower) and racecheck on a small subset
#   bench     the op benchmarks (bench/test_bench_ops_cuda.py) -> bench.json + table
#   e2e       bench/e2e.py -> e2e.md
# A stage that needs the build reuses it when the sources are unchanged (a stamp in
# build/), so a warm machine's second call skips the build. Logs, JSON and tables go to
# $OUT (the device tool brings them back; at most 8 files). Each stage has its own time
# limit so one hang cannot eat the call.
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
  (cd "$REPO" && cat setup.py $(git ls-files csrc) 2>/dev/null | sha1sum | cut -c1-16)
}

build() {
  local stamp
  stamp=$(source_stamp)
  if [ -f "$REPO/build/gpu_stamp" ] && [ "$(cat "$REPO/build/gpu_stamp")" = "$stamp" ] &&
    (cd /tmp && python -c "import std_ext, torch; assert torch._C._dispatch_has_kernel_for_dispatch_key('std::dense_attention', 'CUDA')" 2>/dev/null); then
    log "build: up to date"
    return 0
  fi
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
  log "build: pip install (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  if ! (cd "$REPO" && STD_EXT_CUDA=1 timeout 540 pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1); then
    tail -n 60 "$OUT/build.log"
    log "build FAILED"
    exit 1
  fi
  grep -m1 "std_ext: " "$OUT/build.log"
  grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | sort -rn | head -n 20 >"$OUT/ptxas.txt" || true
  echo "$stamp" >"$REPO/build/gpu_stamp"
  log "build: done"
}

# Tests run from /tmp so the installed build is what gets imported.
CUDA_TESTS=(-k "cuda and not compile_check and not without_cuda")

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
    pytest "$REPO/python_tests" -k "cuda and not compile_check and not without_cuda and not long_context and not 262144" -x -q -p no:cacheprovider \
    >"$OUT/sanitizer.txt" 2>&1) || status=1
  tail -n 5 "$OUT/sanitizer.txt"
  log "sanitize: racecheck"
  (cd /tmp && timeout 300 compute-sanitizer --tool racecheck --error-exitcode 9 \
    pytest "$REPO/python_tests" -x -q -p no:cacheprovider \
    -k "cuda and (bitwise and 40000 and bfloat16 or batch8_ragged and D-128 and float16 and Qn-10 or graph)" \
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

for stage in $STAGES; do
  case "$stage" in
    build) build ;;
    test) build; run_tests ;;
    sanitize) build; sanitize ;;
    bench) build; bench ;;
    e2e) build; e2e ;;
    *) echo "unknown stage '$stage' (build test sanitize bench e2e)"; exit 2 ;;
  esac
done
log "done (status $status)"
exit $status
