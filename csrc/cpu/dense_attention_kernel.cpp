// CPU kernel of torch.ops.std.dense_attention: query i of sequence b attends causally
// to cache positions 0 .. kv_len[b] - Qn + i. Parallel over (sequence, KV head).
#include "cpu/attend_kv_head.h"
#include "cpu/dispatch_float_types.h"
#include "op_checks.h"

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
  at::parallel_for(0, dims.batch * dims.kv_heads, 1, [&](int64_t begin, int64_t end) {
    cpu::AttendScratch scratch;
    std::vector<int64_t> positions;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / dims.kv_heads;
      positions.resize(kv_len[b]);
      std::iota(positions.begin(), positions.end(), int64_t{0});
      cpu::attend_kv_head<T>(q, k_cache, v_cache, out, b, task % dims.kv_heads, positions,
                             /*always_visible_below=*/0, /*first_query_pos=*/kv_len[b] - dims.q_len, scale, scratch);
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
