"""Build std_ext._C against the torch that is already installed.

    pip install --no-build-isolation .

CUDA sources are compiled when the installed torch has CUDA and a CUDA toolkit is
found; otherwise the build is CPU-only. ``STD_EXT_CUDA=1`` / ``STD_EXT_CUDA=0`` forces
either way. With no GPU visible, ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0a``.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # an isolated build env would fetch an unpinned (multi-GB) torch
    sys.exit(
        "std_ext builds against the torch you already have: install torch first, then "
        "run `pip install --no-build-isolation .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_ARCH_LIST = "8.0;9.0a"


def sources(pattern: str) -> list[str]:
    # Relative paths: setuptools rejects absolute ones in sources.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def want_cuda() -> bool:
    forced = os.environ.get("STD_EXT_CUDA")
    if forced is not None and forced.strip() not in ("0", "1"):
        sys.exit(f"STD_EXT_CUDA must be 0 or 1, got {forced!r}")
    has_toolkit = cpp_extension.CUDA_HOME is not None
    if forced == "1":
        if torch.version.cuda is None or not has_toolkit:
            sys.exit("STD_EXT_CUDA=1 needs a CUDA build of torch and a CUDA toolkit (CUDA_HOME)")
        return True
    if forced == "0":
        return False
    return torch.version.cuda is not None and has_toolkit


def openmp_flags() -> list[str]:
    # at::parallel_for's OpenMP body is in a header: without -fopenmp it runs serially.
    return [] if sys.platform in ("darwin", "win32") else ["-fopenmp"]


def extension():
    cxx_flags = ["-O3", "-DPy_LIMITED_API=0x030A0000"] + openmp_flags()
    # csrc/emulator/ is the CPU emulator of the CUDA kernels, built on its own by the tests
    # (python_tests/emulated_cuda.py); it is not part of std_ext._C.
    cpp_sources = [s for s in sources("csrc/**/*.cpp") if not s.startswith("csrc/emulator" + os.sep)]
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = CPU_ARCH_LIST
        print(f"std_ext: CUDA build (TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')})")
        return cpp_extension.CUDAExtension(
            "std_ext._C",
            cpp_sources + sources("csrc/**/*.cu"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=openmp_flags(),
            py_limited_api=True,
        )
    print("std_ext: CPU-only build (no CUDA torch or toolkit found; STD_EXT_CUDA=1 forces CUDA)")
    return cpp_extension.CppExtension(
        "std_ext._C",
        cpp_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=openmp_flags(),
        py_limited_api=True,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
