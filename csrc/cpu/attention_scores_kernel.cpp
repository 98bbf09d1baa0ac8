// CPU kernel of torch.ops.std.attention_scores: the prefill score of DESIGN.md §1.
// For each (sequence, KV head): every valid observation query t and every query head
// of the group takes a softmax over keys 0 .. q_pos[t]; the probabilities are averaged
// over those (t, head) rows. Parallel over (sequence, KV head).
#include "cpu/block_math.h"
#include "cpu/dispatch_float_types.h"
#include "op_checks.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace std_ext {
namespace {

// Logits of one chunk of rows are kept whole (rows x visible keys) so each row's
// softmax takes two passes over memory; the chunk is sized to stay near this many floats.
constexpr int64_t kLogitsBudget = int64_t{1} << 22;

template <typename T>
void attention_scores_cpu_impl(const at::Tensor& q, const at::Tensor& k_cache, const int32_t* q_pos, float scale,
                               const AttentionDims& dims, at::Tensor& out) {
  const T* q_data = q.const_data_ptr<T>();
  const T* k_data = k_cache.const_data_ptr<T>();
  float* out_data = out.mutable_data_ptr<float>();
  const int64_t D = dims.head_dim;
  at::parallel_for(0, dims.batch * dims.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_rows, logits, kT(D * cpu::kKeyBlock);
    std::vector<int64_t> row_query, block_positions(cpu::kKeyBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / dims.kv_heads;
      const int64_t h = task % dims.kv_heads;
      const int32_t* pos = q_pos + b * dims.q_len;
      // Rows are (valid query t, head j of the group).
      row_query.clear();
      int64_t visible_keys = 0;
      for (int64_t t = 0; t < dims.q_len; ++t) {
        if (pos[t] < 0) continue;
        for (int64_t j = 0; j < dims.group; ++j) row_query.push_back(t);
        visible_keys = std::max<int64_t>(visible_keys, pos[t] + 1);
      }
      const int64_t rows = static_cast<int64_t>(row_query.size());
      if (rows == 0) continue;  // out is zero-initialized
      const int64_t padded_keys = cpu::round_up(visible_keys, cpu::kKeyBlock);
      const int64_t chunk =
          std::min(cpu::round_up(rows, cpu::kRowTile),
                   std::max<int64_t>(cpu::kRowTile, kLogitsBudget / padded_keys / cpu::kRowTile * cpu::kRowTile));
      float* scores = out_data + b * out.stride(0) + h * out.stride(1);
      const T* keys = k_data + b * k_cache.stride(0) + h * k_cache.stride(1);
      const float weight = 1.f / static_cast<float>(rows);

      for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int64_t chunk_rows = std::min(chunk, rows - r0);
        q_rows.assign(chunk * D, 0.f);
        for (int64_t r = 0; r < chunk_rows; ++r) {
          const int64_t t = row_query[r0 + r];
          const int64_t head = h * dims.group + (r0 + r) % dims.group;
          const T* src = q_data + b * q.stride(0) + t * q.stride(1) + head * q.stride(2);
          for (int64_t d = 0; d < D; ++d) q_rows[r * D + d] = static_cast<float>(src[d]) * scale;
        }
        logits.resize(chunk * padded_keys);
        for (int64_t s0 = 0; s0 < visible_keys; s0 += cpu::kKeyBlock) {
          const int64_t n = std::min(cpu::kKeyBlock, visible_keys - s0);
          for (int64_t j = 0; j < n; ++j) block_positions[j] = s0 + j;
          cpu::load_keys_transposed(keys, k_cache.stride(2), block_positions.data(), n, D, kT.data());
          cpu::block_logits(q_rows.data(), chunk, D, kT.data(), logits.data() + s0, padded_keys);
        }
        for (int64_t r = 0; r < chunk_rows; ++r) {
          float* row = logits.data() + r * padded_keys;
          const int64_t seen = pos[row_query[r0 + r]] + 1;
          const float row_max = *std::max_element(row, row + seen);
          const float inv_sum = weight / cpu::exp_shifted_and_sum(row, seen, row_max);
          for (int64_t s = 0; s < seen; ++s) scores[s] += row[s] * inv_sum;
        }
      }
    }
  });
}

at::Tensor attention_scores_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& q_pos,
                                double scale) {
  const AttentionDims dims = check_attention_scores_args(q, k_cache, q_pos);
  check_q_pos_values("attention_scores", q_pos, dims.capacity);
  const at::Tensor positions = q_pos.contiguous();
  at::Tensor out = at::zeros({dims.batch, dims.kv_heads, dims.capacity}, k_cache.options().dtype(at::kFloat));
  STD_EXT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "attention_scores_cpu", [&] {
    attention_scores_cpu_impl<scalar_t>(q, k_cache, positions.const_data_ptr<int32_t>(), static_cast<float>(scale),
                                        dims, out);
  });
  return out;
}

}  // namespace
}  // namespace std_ext

TORCH_LIBRARY_IMPL(std, CPU, m) { m.impl("attention_scores", &std_ext::attention_scores_cpu); }
