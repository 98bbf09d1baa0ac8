// torch.ops.std_emulated.topk_indices: the CUDA glue and kernels of std::topk_indices, compiled
// unchanged against the CPU emulator (STD_EXT_EMULATOR).
#include "cuda/topk_indices_kernel.cu"
