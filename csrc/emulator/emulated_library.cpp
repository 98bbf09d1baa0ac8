// torch.ops.std_emulated: the four attention ops with std's schemas, implemented by the
// CUDA glue (csrc/cuda/) and kernels (csrc/kernels/) running on the CPU emulator of the
// SIMT machine. Built on demand by python_tests/emulated_cuda.py.
#include "op_schemas.h"

#include <torch/library.h>

TORCH_LIBRARY(std_emulated, m) { std_ext::define_attention_op_schemas(m); }
