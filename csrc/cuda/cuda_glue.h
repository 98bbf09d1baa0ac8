// Shared by the csrc/cuda/<op>_kernel.cu glue files. Glue includes only c10/cuda
// headers, never ATen/cuda/CUDAContext.h (it pulls cuBLAS/cuSPARSE headers that a
// build machine may lack).
#pragma once

#include "kernels/static_switch.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace std_ext::cuda {

// The attention kernels run on tensor cores: fp16 and bf16 only.
inline void check_half_dtype(const char* op, const at::Tensor& q) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "std::", op,
              ": the CUDA kernel supports float16 and bfloat16, got q of dtype ", dtype,
              " (the CPU kernel also accepts float32)");
}

// cp.async and vector loads move 16-byte chunks: every row (the last dim) must start
// 16-byte aligned. A size-1 dim's stride never enters an address.
inline bool rows_16_byte_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  const int64_t elements_per_16_bytes = 16 / static_cast<int64_t>(t.element_size());
  for (int64_t d = 0; d < t.dim() - 1; ++d) {
    if (t.size(d) > 1 && t.stride(d) % elements_per_16_bytes != 0) return false;
  }
  return true;
}

// A view that breaks the alignment (an odd offset or stride) is copied into a fresh,
// aligned tensor: correct, and only as slow as that copy. (clone, not contiguous(): a
// contiguous tensor at an odd offset would come back unchanged.)
inline at::Tensor with_aligned_rows(const at::Tensor& t) {
  return rows_16_byte_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Streaming multiprocessors of `like`'s device: the kernels size their grids by it.
inline int sm_count(const at::Tensor& like) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, like.device().index()));
  return count;
}

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
