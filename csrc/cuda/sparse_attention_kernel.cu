// CUDA glue of torch.ops.std.sparse_attention; the kernel is
// csrc/kernels/decode_attention.cuh (the position list = the keep set, then the tail).
#include "cuda/decode_attention_glue.h"

#include <torch/library.h>

namespace std_ext {
namespace {

at::Tensor sparse_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& indices, const at::Tensor& tail_start, const at::Tensor& kv_len,
                                 double scale) {
  const char* op = "sparse_attention";
  const AttentionDims dims = check_sparse_attention_args(q, k_cache, v_cache, indices, tail_start, kv_len);
  cuda::check_half_dtype(op, q);
  cuda::check_head_dim(op, dims.head_dim);
  cuda::check_int_range(op, "indices.size(2)", indices.size(2));
  if (value_checks_enabled(q)) {
    check_kv_len_values(op, kv_len, dims.q_len, dims.capacity);
    check_tail_start_values(op, tail_start, kv_len);
    check_indices_values(op, indices, tail_start);
  }
  const cuda::DeviceGuard guard(q.device());
  return cuda::run_decode_attention<true>(op, q, k_cache, v_cache, kv_len, &indices, &tail_start, scale, dims);
}

}  // namespace
}  // namespace std_ext

STD_EXT_CUDA_LIBRARY_IMPL(m) { m.impl("sparse_attention", &std_ext::sparse_attention_cuda); }
