// torch.ops.std_emulated.sparse_attention: the CUDA glue and kernels of std::sparse_attention, compiled
// unchanged against the CPU emulator (STD_EXT_EMULATOR).
#include "cuda/sparse_attention_kernel.cu"
