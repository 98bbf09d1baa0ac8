// torch.ops.std_emulated.attention_scores: the CUDA glue and kernels of std::attention_scores, compiled
// unchanged against the CPU emulator (STD_EXT_EMULATOR).
#include "cuda/attention_scores_kernel.cu"
