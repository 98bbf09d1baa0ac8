// Shared by the csrc/cuda/<op>_kernel.cu glue files. Glue includes only c10/cuda
// headers, never ATen/cuda/CUDAContext.h (it pulls cuBLAS/cuSPARSE headers that a
// build machine may lack).

//
// The same glue also builds against the CPU emulator of the SIMT machine (STD_EXT_EMULATOR,
// csrc/emulator/): tensors are then CPU tensors, the library is torch.ops.std_emulated, and
// the few c10/cuda pieces (error checks, device guard, stream) have emulator equivalents
// below. Nothing else in the glue differs between the two builds.
#pragma once

#include "kernels/static_switch.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cuda_runtime.h>

#ifdef STD_EXT_EMULATOR
#include "emulator/emulator.h"

#include <c10/util/Exception.h>

#include <cstring>
#include <string>
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdint>

#ifdef STD_EXT_EMULATOR
// The glue's TORCH_LIBRARY_IMPL: the emulated ops are CPU kernels of their own namespace.
#define STD_EXT_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(std_emulated, CPU, m)

// Runs the queued grids (the emulator executes at synchronization points) and turns an
// emulator fault, or the runtime error EXPR returned, into a torch error.
#define C10_CUDA_CHECK(EXPR) ::std_ext::cuda::check_emulated((EXPR), #EXPR, __FILE__, __LINE__)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
#else
#define STD_EXT_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(std, CUDA, m)
#endif

namespace std_ext::cuda {

#ifdef STD_EXT_EMULATOR
inline void check_emulated(cudaError_t err, const char* expr, const char* file, int line) {
  const std::string fault = emu::synchronize();
  TORCH_CHECK(fault.empty(), fault);
  const char* slash = std::strrchr(file, '/');
  TORCH_CHECK(err == cudaSuccess, "CUDA error (emulated): ", cudaGetErrorString(err), " from ", expr, " at ",
              slash ? slash + 1 : file, ":", line);
}

// One emulated device: nothing to switch.
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

// Fresh scratch and outputs the kernels fill: poisoned (0xFF bytes, NaN in every float
// type) so that a kernel reading what nothing wrote, or leaving part of its output
// unwritten, shows.
inline at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (t.numel() > 0) std::memset(t.mutable_data_ptr(), 0xFF, t.nbytes());
  return t;
}
#else
using DeviceGuard = c10::cuda::CUDAGuard;

inline at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }
#endif

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
#ifdef STD_EXT_EMULATOR
  const int device = 0;  // CPU tensors: the emulated device
#else
  const int device = like.device().index();
#endif
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// The CUDA kernels are templates over head_dim; an unsupported one is an argument error.
inline void check_head_dim(const char* op, int64_t head_dim) {
  TORCH_CHECK(kernels::is_supported_head_dim(head_dim), "std::", op, ": the CUDA kernel supports head_dim 64 and ",
              "128, got k_cache.size(3) = ", head_dim, " (the CPU kernel accepts any head_dim)");
}

// The stream every launch of `like`'s device goes to (PyTorch's current stream).
inline cudaStream_t current_stream(const at::Tensor& like) {
#ifdef STD_EXT_EMULATOR
  (void)like;
  return nullptr;  // the emulator has one in-order stream
#else
  return c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
#endif
}

}  // namespace std_ext::cuda
