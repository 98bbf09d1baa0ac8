"""tools/check_cuda_compile.py works: a valid .cu compiles (exit 0), a broken one fails (exit != 0)
with nvcc's error shown. Skipped where nvcc is absent. The .cu files are torch-free so this is fast."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "check_cuda_compile.py"

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")

VALID_CU = r"""
#include <cuda_runtime.h>
template <typename T>
__global__ void axpy(int n, T a, const T* __restrict__ x, T* __restrict__ y) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
template __global__ void axpy<float>(int, float, const float*, float*);
void launch_axpy(int n, float a, const float* x, float* y, cudaStream_t s) {
  axpy<float><<<(n + 255) / 256, 256, 0, s>>>(n, a, x, y);
}
"""

BROKEN_CU = r"""
__global__ void broken_kernel(float* y) {
  y[threadIdx.x] = 1.0f   // missing semicolon
  int definitely_undeclared_here = not_declared_symbol_xyz;
}
"""


def run_check(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_valid_source_compiles(tmp_path):
    src = tmp_path / "valid_kernel.cu"
    src.write_text(VALID_CU)
    proc = run_check("--sources", str(src), "--arch", "80", "90a")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "sm_80" in out and "sm_90a" in out
    assert "FAIL" not in out


def test_broken_source_fails_with_error_shown(tmp_path):
    src = tmp_path / "broken_kernel.cu"
    src.write_text(BROKEN_CU)
    proc = run_check("--sources", str(src), "--arch", "80")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert proc.returncode != 2, out  # 2 = nvcc missing / usage error, not a compile failure
    assert "FAIL" in out
    assert "broken_kernel.cu" in out
    assert "error" in out.lower()
    assert "not_declared_symbol_xyz" in out or "expected" in out


def test_missing_nvcc_exits_2(tmp_path):
    src = tmp_path / "valid_kernel.cu"
    src.write_text(VALID_CU)
    proc = run_check("--sources", str(src), "--nvcc", str(tmp_path / "no_such_nvcc"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nvcc not found" in proc.stderr
