// Shared by the csrc/cuda/<op>_kernel.cu glue files. Glue includes only c10/cuda
// headers, never ATen/cuda/CUDAContext.h (it pulls cuBLAS/cuSPARSE headers that a
// build machine may lack).
#pragma once

#include "kernels/static_switch.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace std_ext::cuda {

// The CUDA kernels are templates over head_dim; an unsupported one is an argument error.
inline void check_head_dim(const char* op, int64_t head_dim) {
  TORCH_CHECK(kernels::is_supported_head_dim(head_dim), "std::", op, ": the CUDA kernel supports head_dim 64 and ",
              "128, got k_cache.size(3) = ", head_dim, " (the CPU kernel accepts any head_dim)");
}

// The stream every launch of `like`'s device goes to (PyTorch's current stream).
inline cudaStream_t current_stream(const at::Tensor& like) {
  return c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
}

}  // namespace std_ext::cuda
