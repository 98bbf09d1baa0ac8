// CUDA glue of torch.ops.std.dense_attention; the kernel is
// csrc/kernels/decode_attention.cuh (dense = the position list 0 .. kv_len - 1, causal).
#include "cuda/decode_attention_glue.h"

#include <torch/library.h>

namespace std_ext {
namespace {

at::Tensor dense_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& kv_len, double scale) {
  const char* op = "dense_attention";
  const AttentionDims dims = check_dense_attention_args(q, k_cache, v_cache, kv_len);
  cuda::check_half_dtype(op, q);
  cuda::check_head_dim(op, dims.head_dim);
  if (value_checks_enabled(q)) check_kv_len_values(op, kv_len, dims.q_len, dims.capacity);
  const cuda::DeviceGuard guard(q.device());
  return cuda::run_decode_attention<false>(op, q, k_cache, v_cache, kv_len, nullptr, nullptr, scale, dims);
}

}  // namespace
}  // namespace std_ext

STD_EXT_CUDA_LIBRARY_IMPL(m) { m.impl("dense_attention", &std_ext::dense_attention_cuda); }
