"""The CUDA ops on the CPU: builds and loads ``torch.ops.std_emulated``.

The CUDA glue (csrc/cuda/*.cu) and kernels (csrc/kernels/*.cuh) compiled unchanged with
g++ against the CPU emulator of the SIMT machine (csrc/emulator/, README there), as a CPU
torch library with the same four op schemas as ``torch.ops.std``::

    from emulated_cuda import load_emulated_ops
    ops = load_emulated_ops()          # builds on first use (ninja), then cached
    out = ops.dense_attention(q, k_cache, v_cache, kv_len, scale)   # CPU tensors

The sources come from ``$STD_EXT_EMULATOR_CSRC`` (default: this repository's csrc), and the
build goes to ``build/emulated/<key of that root>/``, so tools/mutate_kernels.py can build
mutated copies side by side. Loading does not touch ``std_ext._C`` (another library,
another namespace). Environment read by the emulator at run time: STD_EXT_EMULATOR_SCHEDULE,
STD_EXT_EMULATOR_ARCH, STD_EXT_EMULATOR_THREADS (csrc/emulator/README.md).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# Each glue file is its own translation unit (they keep their helpers in anonymous
# namespaces), as in the CUDA build.
SOURCES = (
    "emulator/emulated_library.cpp",
    "emulator/emulated_attention_scores.cpp",
    "emulator/emulated_dense_attention.cpp",
    "emulator/emulated_sparse_attention.cpp",
    "emulator/emulated_topk_indices.cpp",
    "emulator/self_test.cpp",
    "op_checks.cpp",
)

# The language standard is torch's (C++20; the emulator's headers need only C++17).
# -ffp-contract=off: the kernels' explicit _rn intrinsics and their fp32 order are the
# point; g++ must not fuse a multiply and an add behind them. The __CUDA_NO_* defines are
# the ones torch's CUDA build passes to nvcc.
CFLAGS = (
    "-DSTD_EXT_EMULATOR",
    "-O1",
    "-ffp-contract=off",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)

_loaded: dict[Path, object] = {}


def csrc_root() -> Path:
    return Path(os.environ.get("STD_EXT_EMULATOR_CSRC") or REPO / "csrc").resolve()


def build_directory(root: Path) -> Path:
    key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return REPO / "build" / "emulated" / key


def load_emulated_ops(verbose: bool = False):
    """``torch.ops.std_emulated``, built from csrc_root() on first use in this process."""
    root = csrc_root()
    if root not in _loaded:
        if _loaded:
            raise RuntimeError(
                f"the emulated ops of {next(iter(_loaded))} are loaded already; one process "
                f"loads one csrc root (STD_EXT_EMULATOR_CSRC={root})"
            )
        from torch.utils import cpp_extension

        build = build_directory(root)
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name="std_ext_emulated",
            sources=[str(root / s) for s in SOURCES],
            extra_cflags=[*CFLAGS, f"-I{root / 'emulator' / 'include'}", f"-I{root}"],
            extra_ldflags=["-ldl"],
            build_directory=str(build),
            is_python_module=False,
            with_cuda=False,
            verbose=verbose,
        )
        _loaded[root] = torch.ops.std_emulated
    return _loaded[root]


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    load_emulated_ops(verbose=True)
    print(f"built and loaded {csrc_root()} in {time.perf_counter() - start:.1f} s")
