#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one device `run` call from the repo root:
#   bash tools/gpu_run.sh
# builds std_ext for the visible GPU, runs the test suite (CUDA parametrizations
# included), compute-sanitizer memcheck on the CUDA tests, and the benchmarks.
# Logs and benchmark JSON go to $OUT (the device tool brings them back).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/build/gpu_out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
status=0

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
cd "$REPO"
if ! STD_EXT_CUDA=1 pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"
  exit 1
fi
grep -m1 "std_ext: " "$OUT/build.log"

# Run from outside the source tree so the installed build is what gets imported.
cd /tmp
pytest "$REPO/python_tests" -q -rs >"$OUT/tests.txt" 2>&1 || status=1
tail -n 5 "$OUT/tests.txt"
STD_EXT_DEBUG=0 compute-sanitizer --tool memcheck --error-exitcode 9 \
  pytest "$REPO/python_tests" -q -k cuda -x >"$OUT/memcheck.txt" 2>&1 || status=1
tail -n 5 "$OUT/memcheck.txt"
pytest "$REPO/bench" -q --benchmark-json="$OUT/bench.json" >"$OUT/bench.txt" 2>&1 || status=1
tail -n 40 "$OUT/bench.txt"
exit $status
