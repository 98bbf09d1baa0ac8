// torch.ops.std_emulated.dense_attention: the CUDA glue and kernels of std::dense_attention, compiled
// unchanged against the CPU emulator (STD_EXT_EMULATOR).
#include "cuda/dense_attention_kernel.cu"
