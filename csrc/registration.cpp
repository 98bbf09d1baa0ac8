// The one registration file of torch.ops.std: the attention schemas come from
// op_schemas.h (shared with the emulated library), the rest live here. Backends only
// register implementations (csrc/cpu/*_kernel.cpp, csrc/cuda/*_kernel.cu), and the
// fake (meta) kernels for torch.compile are registered from std_ext/ops.py.
// Semantics: ../shared/DESIGN.md §3 (mirrored in README.md).
#include <Python.h>

#include "op_schemas.h"

#include <torch/library.h>

extern "C" {
// `import std_ext._C` only needs to load this library: loading runs the static
// registrations below. The module itself is empty (and ABI-stable: Py_LIMITED_API).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(std, m) {
  std_ext::define_attention_op_schemas(m);
  // Introspection, not part of the attention API: the CUDA decode kernels' split plan
  // (csrc/kernels/decode_plan.h) for a list of num_indices keep entries and tail_len tail
  // positions, computed on the host (csrc/cpu/decode_split_plan.cpp).
  m.def(
      "decode_split_plan(int batch, int kv_heads, int q_len, int group, int capacity, int num_indices, "
      "int tail_len, int sm_count, int blocks_per_sm, int launched_blocks_per_sm=0, int splits_per_block=0) "
      "-> (Tensor, Tensor)");
}
