// CPU kernel of torch.ops.std.sparse_attention: query i of sequence b attends to the
// valid entries of indices[b, h, :] plus the dense tail tail_start[b] .. its own
// position kv_len[b] - Qn + i. Parallel over (sequence, KV head).
#include "cpu/attend_kv_head.h"
#include "cpu/dispatch_float_types.h"
#include "op_checks.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace std_ext {
namespace {

template <typename T>
void sparse_attention_cpu_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& indices, const int32_t* tail_start, const int32_t* kv_len,
                               float scale, const AttentionDims& dims, at::Tensor& out) {
  const int32_t* index_data = indices.const_data_ptr<int32_t>();
  const int64_t keep = indices.size(2);
  at::parallel_for(0, dims.batch * dims.kv_heads, 1, [&](int64_t begin, int64_t end) {
    cpu::AttendScratch scratch;
    std::vector<int64_t> positions;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / dims.kv_heads;
      // Keep set (validated: ascending, below tail_start, -1 only as trailing padding),
      // then the tail up to the last query's position: one ascending list.
      positions.clear();
      const int32_t* keep_set = index_data + task * keep;
      for (int64_t i = 0; i < keep && keep_set[i] >= 0; ++i) positions.push_back(keep_set[i]);
      for (int64_t s = tail_start[b]; s < kv_len[b]; ++s) positions.push_back(s);
      cpu::attend_kv_head<T>(q, k_cache, v_cache, out, b, task % dims.kv_heads, positions,
                             /*always_visible_below=*/tail_start[b], /*first_query_pos=*/kv_len[b] - dims.q_len,
                             scale, scratch);
    }
  });
}

at::Tensor sparse_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& indices, const at::Tensor& tail_start, const at::Tensor& kv_len,
                                double scale) {
  const char* op = "sparse_attention";
  const AttentionDims dims = check_sparse_attention_args(q, k_cache, v_cache, indices, tail_start, kv_len);
  check_kv_len_values(op, kv_len, dims.q_len, dims.capacity);
  check_tail_start_values(op, tail_start, kv_len);
  check_indices_values(op, indices, tail_start);
  const at::Tensor lens = kv_len.contiguous();
  const at::Tensor starts = tail_start.contiguous();
  const at::Tensor keep_sets = indices.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  STD_EXT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "sparse_attention_cpu", [&] {
    sparse_attention_cpu_impl<scalar_t>(q, k_cache, v_cache, keep_sets, starts.const_data_ptr<int32_t>(),
                                        lens.const_data_ptr<int32_t>(), static_cast<float>(scale), dims, out);
  });
  return out;
}

}  // namespace
}  // namespace std_ext

TORCH_LIBRARY_IMPL(std, CPU, m) { m.impl("sparse_attention", &std_ext::sparse_attention_cpu); }
