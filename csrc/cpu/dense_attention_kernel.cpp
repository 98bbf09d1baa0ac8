// CPU kernel of torch.ops.std.dense_attention: query i of sequence b attends causally
// to cache positions 0 .. kv_len[b] - Qn + i. Parallel over (sequence, KV head).
#include "cpu/attend_kv_head.h"
#include "op_checks.h"

#include "cpu/dispatch_float_types.h"
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <numeric>

namespace std_ext {
namespace {

template <typename T>
void dense_attention_cpu_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const int32_t* kv_len, float scale, const AttentionDims& dims, at::Tensor& out) {
  const T* q_data = q.const_data_ptr<T>();
  const T* k_data = k_cache.const_data_ptr<T>();
  const T* v_data = v_cache.const_data_ptr<T>();
  T* out_data = out.mutable_data_ptr<T>();
  at::parallel_for(0, dims.batch * dims.kv_heads, 1, [&](int64_t begin, int64_t end) {
    cpu::AttendScratch scratch;
    std::vector<int64_t> positions;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / dims.kv_heads;
      const int64_t h = task % dims.kv_heads;
      const int64_t head0 = h * dims.group;
      positions.resize(kv_len[b]);
      std::iota(positions.begin(), positions.end(), int64_t{0});
      cpu::attend_kv_head<T>(
          {q_data + b * q.stride(0) + head0 * q.stride(2), q.stride(1), q.stride(2)}, dims.q_len, dims.group,
          {k_data + b * k_cache.stride(0) + h * k_cache.stride(1), k_cache.stride(2)},
          {v_data + b * v_cache.stride(0) + h * v_cache.stride(1), v_cache.stride(2)}, positions,
          /*always_visible_below=*/0, /*first_query_pos=*/kv_len[b] - dims.q_len, scale, dims.head_dim,
          {out_data + b * out.stride(0) + head0 * out.stride(2), out.stride(1), out.stride(2)}, scratch);
    }
  });
}

at::Tensor dense_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& kv_len, double scale) {
  const AttentionDims dims = check_dense_attention_args(q, k_cache, v_cache, kv_len);
  check_kv_len_values("dense_attention", kv_len, dims.q_len, dims.capacity);
  const at::Tensor lens = kv_len.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  STD_EXT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "dense_attention_cpu", [&] {
    dense_attention_cpu_impl<scalar_t>(q, k_cache, v_cache, lens.const_data_ptr<int32_t>(),
                                       static_cast<float>(scale), dims, out);
  });
  return out;
}

}  // namespace
}  // namespace std_ext

TORCH_LIBRARY_IMPL(std, CPU, m) { m.impl("dense_attention", &std_ext::dense_attention_cpu); }
