"""std_ext: Sparse-to-Dense decoding kernels for long-context (video) LLMs.

Importing the package loads the compiled extension, which registers the operators
``torch.ops.std.attention_scores``, ``topk_indices``, ``sparse_attention`` and
``dense_attention``; :mod:`std_ext.ops` holds their typed wrappers.
"""

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.std.*)
except ImportError as error:  # pragma: no cover - depends on how std_ext was installed
    raise ImportError(
        f"std_ext's compiled extension could not be loaded ({error}). Build it against the installed "
        "torch with `pip install --no-build-isolation .`, or `python setup.py build_ext --inplace` to "
        "use this source tree; an std_ext/ directory without _C*.so shadows an installed copy when "
        "Python runs from the repository root."
    ) from error
from .generate import GenerationOutput, GenerationStats, generate
from .models import UnsupportedModelError
from .ops import attention_scores, dense_attention, sparse_attention, topk_indices

__version__ = "0.1.0"

__all__ = [
    "attention_scores",
    "topk_indices",
    "sparse_attention",
    "dense_attention",
    "cuda_kernels_built",
    "generate",
    "GenerationOutput",
    "GenerationStats",
    "UnsupportedModelError",
]


def cuda_kernels_built() -> bool:
    """Whether this build of std_ext registered CUDA kernels for its operators."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("std::dense_attention", "CUDA")
