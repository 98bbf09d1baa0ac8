// One KV head's worth of decode/verify attention on CPU: the Qn x G query rows of a
// GQA group attend to a list of cache positions with an online softmax, one
// kKeyBlock-wide block at a time, so each K/V row is converted once for the group.
// sparse_attention and dense_attention differ only in the position list they pass.
#pragma once

#include "cpu/block_math.h"

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace std_ext::cpu {

// Strided views of one (sequence, KV head): rows are base + i * stride_i + j * stride_j.
template <typename T>
struct QueryGroupView {
  T* base;             // query 0, head 0 of the group, element 0
  int64_t query_stride;  // between queries i and i + 1
  int64_t head_stride;   // between heads j and j + 1 of the group
};

template <typename T>
struct CacheHeadView {
  const T* base;       // position 0, element 0
  int64_t row_stride;  // between positions s and s + 1
};

// Asks for the cache rows of the block after the current one while the current one is
// computed: a verify's rows take long enough that its K/V reads then cost almost nothing.
template <typename T>
inline void prefetch_rows(const CacheHeadView<T>& view, const int64_t* positions, int64_t n, int64_t head_dim) {
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per 64-byte cache line
  for (int64_t j = 0; j < n; ++j) {
    const T* row = view.base + positions[j] * view.row_stride;
    for (int64_t d = 0; d < head_dim; d += kLine) __builtin_prefetch(row + d);
  }
}

// Scratch buffers of one thread, reused across the (sequence, KV head) tasks it runs.
class AttendScratch {
 public:
  void resize(int64_t rows, int64_t head_dim) {
    q_.assign(rows * head_dim, 0.f);
    acc_.assign(rows * head_dim, 0.f);
    p_.assign(rows * kKeyBlock, 0.f);
    kT_.resize(head_dim * kKeyBlock);
    v_.resize(kKeyBlock * head_dim);
    visible_.resize(rows);
    row_max_.assign(rows, -std::numeric_limits<float>::infinity());
    row_sum_.assign(rows, 0.f);
  }

  std::vector<float> q_, acc_, p_, kT_, v_, row_max_, row_sum_;
  std::vector<int64_t> visible_;
};

// The queries of one group attend to `positions` (ascending, each at most once), and
// the online-softmax state is left in `scratch`: per row r, row_max_[r], row_sum_[r] and
// the unnormalized acc_[r * head_dim ..]. Row r = i * group + j is query i, head j. Query
// i sits at position first_query_pos + i and sees a listed position s when
// s < always_visible_below or s <= its own position. A row that sees nothing keeps
// max -inf, sum 0 and acc 0.
template <typename T>
void attend_kv_head_state(const QueryGroupView<const T>& q, int64_t q_len, int64_t group, const CacheHeadView<T>& k,
                          const CacheHeadView<T>& v, const int64_t* positions, int64_t total,
                          int64_t always_visible_below, int64_t first_query_pos, float scale, int64_t head_dim,
                          AttendScratch& scratch) {
  const int64_t rows = q_len * group;
  scratch.resize(rows, head_dim);
  for (int64_t i = 0; i < q_len; ++i) {
    for (int64_t j = 0; j < group; ++j) {
      const T* src = q.base + i * q.query_stride + j * q.head_stride;
      float* dst = scratch.q_.data() + (i * group + j) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<float>(src[d]) * scale;
    }
  }

  for (int64_t start = 0; start < total; start += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, total - start);
    const int64_t* block = positions + start;
    // Every K/V row of the block is converted once and serves all Qn x G query rows.
    load_keys_transposed(k.base, k.row_stride, block, n, head_dim, scratch.kT_.data());
    load_values(v.base, v.row_stride, block, n, head_dim, scratch.v_.data());
    if (start + kKeyBlock < total) {
      const int64_t next = std::min(kKeyBlock, total - start - kKeyBlock);
      prefetch_rows(k, block + kKeyBlock, next, head_dim);
      prefetch_rows(v, block + kKeyBlock, next, head_dim);
    }
    block_logits(scratch.q_.data(), rows, head_dim, scratch.kT_.data(), scratch.p_.data(), kKeyBlock);
    for (int64_t r = 0; r < rows; ++r) {
      // Positions ascend, so the ones row r sees form a prefix of the block.
      const int64_t own_pos = first_query_pos + r / group;
      const int64_t last_visible = std::max(always_visible_below - 1, own_pos);
      scratch.visible_[r] = std::upper_bound(block, block + n, last_visible) - block;
    }
    block_softmax(scratch.p_.data(), rows, scratch.visible_.data(), scratch.row_max_.data(),
                  scratch.row_sum_.data(), scratch.acc_.data(), head_dim);
    block_weighted_sum(scratch.p_.data(), rows, head_dim, scratch.v_.data(), scratch.acc_.data());
  }
}

// attend_kv_head_state, then each row normalized into `out` (zeros for a row that sees nothing).
template <typename T>
void attend_kv_head(const QueryGroupView<const T>& q, int64_t q_len, int64_t group, const CacheHeadView<T>& k,
                    const CacheHeadView<T>& v, const std::vector<int64_t>& positions, int64_t always_visible_below,
                    int64_t first_query_pos, float scale, int64_t head_dim, const QueryGroupView<T>& out,
                    AttendScratch& scratch) {
  attend_kv_head_state<T>(q, q_len, group, k, v, positions.data(), static_cast<int64_t>(positions.size()),
                          always_visible_below, first_query_pos, scale, head_dim, scratch);
  for (int64_t i = 0; i < q_len; ++i) {
    for (int64_t j = 0; j < group; ++j) {
      const int64_t r = i * group + j;
      const float sum = scratch.row_sum_[r];
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      const float* acc = scratch.acc_.data() + r * head_dim;
      T* dst = out.base + i * out.query_stride + j * out.head_stride;
      for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<T>(acc[d] * inv);
    }
  }
}

// The views of sequence b, KV head h of an op's tensors: q and out [B, Qn, H_q, D] (out
// contiguous or not), caches [B, H_kv, S, D], all with a contiguous last dim.
template <typename T>
struct HeadViews {
  HeadViews(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& out, int64_t b,
            int64_t h)
      : group(q.size(2) / k_cache.size(1)),
        q_view{q.const_data_ptr<T>() + b * q.stride(0) + h * group * q.stride(2), q.stride(1), q.stride(2)},
        k_view{k_cache.const_data_ptr<T>() + b * k_cache.stride(0) + h * k_cache.stride(1), k_cache.stride(2)},
        v_view{v_cache.const_data_ptr<T>() + b * v_cache.stride(0) + h * v_cache.stride(1), v_cache.stride(2)},
        out_view{out.mutable_data_ptr<T>() + b * out.stride(0) + h * group * out.stride(2), out.stride(1),
                 out.stride(2)} {}

  int64_t group;
  QueryGroupView<const T> q_view;
  CacheHeadView<T> k_view, v_view;
  QueryGroupView<T> out_view;
};

// attend_kv_head for sequence b, KV head h of an op's tensors (HeadViews' layouts).
template <typename T>
void attend_kv_head(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& out,
                    int64_t b, int64_t h, const std::vector<int64_t>& positions, int64_t always_visible_below,
                    int64_t first_query_pos, float scale, AttendScratch& scratch) {
  const HeadViews<T> views(q, k_cache, v_cache, out, b, h);
  attend_kv_head<T>(views.q_view, q.size(1), views.group, views.k_view, views.v_view, positions, always_visible_below,
                    first_query_pos, scale, q.size(3), views.out_view, scratch);
}

}  // namespace std_ext::cpu
