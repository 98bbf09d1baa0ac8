// CPU kernel of torch.ops.std.dense_attention: query i of sequence b attends causally
// to cache positions 0 .. kv_len[b] - Qn + i.
//
// Work is split into tasks of (sequence, KV head, chunk of kDenseChunk positions), so a
// long context keeps every thread busy however few KV heads there are (3 KV heads on 2
// threads would otherwise leave one idle half the time). Each task reads its K/V blocks
// once for all Qn x G query rows of the head and leaves one online-softmax state per
// row; a second pass merges a row's chunk states in chunk order. Chunk boundaries are
// fixed absolute positions (multiples of kDenseChunk), never derived from Qn, kv_len or
// the thread count, so a row's arithmetic is the same in a Qn = γ+1 verify and a Qn = 1
// decode at its position (the chunks past its position merge as exact zeros), and the
// same on any number of threads.
#include "cpu/attend_kv_head.h"
#include "cpu/dispatch_float_types.h"
#include "op_checks.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace std_ext {
namespace {

constexpr int64_t kDenseChunk = 16 * cpu::kKeyBlock;  // 1,024 positions per task

template <typename T>
void dense_attention_cpu_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const int32_t* kv_len, float scale, const AttentionDims& dims, at::Tensor& out) {
  const int64_t group = dims.group, head_dim = dims.head_dim;
  const int64_t rows = dims.q_len * group;
  // chunk_begin[b] .. chunk_begin[b + 1]: sequence b's chunks, numbered across the batch
  std::vector<int64_t> chunk_begin(dims.batch + 1, 0);
  for (int64_t b = 0; b < dims.batch; ++b) {
    chunk_begin[b + 1] = chunk_begin[b] + std::max<int64_t>(1, (kv_len[b] + kDenseChunk - 1) / kDenseChunk);
  }
  const int64_t tasks = chunk_begin[dims.batch] * dims.kv_heads;  // task = chunk * H_kv + head
  std::vector<float> state_max(tasks * rows), state_sum(tasks * rows), state_acc(tasks * rows * head_dim);

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    cpu::AttendScratch scratch;
    std::vector<int64_t> positions;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / dims.kv_heads, h = task % dims.kv_heads;
      const int64_t b = std::upper_bound(chunk_begin.begin(), chunk_begin.end(), chunk) - chunk_begin.begin() - 1;
      const int64_t first = (chunk - chunk_begin[b]) * kDenseChunk;
      const int64_t last = std::min<int64_t>(first + kDenseChunk, kv_len[b]);
      positions.resize(std::max<int64_t>(0, last - first));
      std::iota(positions.begin(), positions.end(), first);
      const cpu::HeadViews<T> views(q, k_cache, v_cache, out, b, h);
      cpu::attend_kv_head_state<T>(views.q_view, dims.q_len, group, views.k_view, views.v_view, positions.data(),
                                   static_cast<int64_t>(positions.size()), /*always_visible_below=*/0,
                                   /*first_query_pos=*/kv_len[b] - dims.q_len, scale, head_dim, scratch);
      std::copy_n(scratch.row_max_.begin(), rows, state_max.begin() + task * rows);
      std::copy_n(scratch.row_sum_.begin(), rows, state_sum.begin() + task * rows);
      std::copy_n(scratch.acc_.begin(), rows * head_dim, state_acc.begin() + task * rows * head_dim);
    }
  });

  // Merge: out = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M), chunks in ascending order.
  // A chunk a row does not see has m = -inf, l = 0, acc = 0 and adds exact zeros.
  at::parallel_for(0, dims.batch * dims.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(head_dim);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / dims.kv_heads, h = bh % dims.kv_heads;
      const cpu::HeadViews<T> views(q, k_cache, v_cache, out, b, h);
      for (int64_t r = 0; r < rows; ++r) {
        float row_max = -std::numeric_limits<float>::infinity();
        for (int64_t c = chunk_begin[b]; c < chunk_begin[b + 1]; ++c) {
          row_max = std::max(row_max, state_max[(c * dims.kv_heads + h) * rows + r]);
        }
        float sum = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        if (row_max != -std::numeric_limits<float>::infinity()) {
          for (int64_t c = chunk_begin[b]; c < chunk_begin[b + 1]; ++c) {
            const int64_t slot = (c * dims.kv_heads + h) * rows + r;
            const float weight = std::exp(state_max[slot] - row_max);  // 0 for an unseen chunk
            sum += state_sum[slot] * weight;
            const float* part = state_acc.data() + slot * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) acc[d] += part[d] * weight;
          }
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        T* dst = views.out_view.base + (r / group) * views.out_view.query_stride + (r % group) * views.out_view.head_stride;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<T>(acc[d] * inv);
      }
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
