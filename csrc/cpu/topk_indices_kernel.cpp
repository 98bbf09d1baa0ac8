// CPU kernel of torch.ops.std.topk_indices: per (sequence, head), the positions of the
// k best candidate scores, ascending, -1 padded. "Best" is a total order (higher score;
// NaN below every number; then lower position), so the selected set is unique.
#include "op_checks.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace std_ext {
namespace {

at::Tensor topk_indices_cpu(const at::Tensor& scores, const at::Tensor& candidates, int64_t k) {
  check_topk_indices_args(scores, candidates, k);
  const int64_t batch = scores.size(0);
  const int64_t heads = scores.size(1);
  const int64_t length = scores.size(2);
  const at::Tensor mask = candidates.contiguous();
  const bool* mask_data = mask.const_data_ptr<bool>();
  const float* score_data = scores.const_data_ptr<float>();
  at::Tensor out = at::empty({batch, heads, k}, scores.options().dtype(at::kInt));
  int32_t* out_data = out.mutable_data_ptr<int32_t>();

  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> pool;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads;
      const int64_t h = task % heads;
      const float* row = score_data + b * scores.stride(0) + h * scores.stride(1);
      const bool* allowed = mask_data + b * length;
      pool.clear();
      for (int64_t s = 0; s < length; ++s) {
        if (allowed[s]) pool.push_back(static_cast<int32_t>(s));
      }
      if (static_cast<int64_t>(pool.size()) > k) {
        const auto better = [row](int32_t a, int32_t b) {
          const float sa = row[a], sb = row[b];
          const bool a_nan = std::isnan(sa), b_nan = std::isnan(sb);
          if (a_nan != b_nan) return b_nan;
          if (!a_nan && sa != sb) return sa > sb;
          return a < b;
        };
        std::nth_element(pool.begin(), pool.begin() + k, pool.end(), better);
        pool.resize(k);
        std::sort(pool.begin(), pool.end());
      }
      int32_t* dst = out_data + task * k;
      std::copy(pool.begin(), pool.end(), dst);  // candidates are gathered in ascending order
      std::fill(dst + pool.size(), dst + k, -1);
    }
  });
  return out;
}

}  // namespace
}  // namespace std_ext

TORCH_LIBRARY_IMPL(std, CPU, m) { m.impl("topk_indices", &std_ext::topk_indices_cpu); }
