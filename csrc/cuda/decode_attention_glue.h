// Glue shared by csrc/cuda/dense_attention_kernel.cu and sparse_attention_kernel.cu: the
// split plan (kernels/decode_plan.h, with the kernel's real occupancy), the translation of
// tensors into kernels::DecodeAttentionParams (caches 16-byte aligned, integer tensors
// dense) and the launch.
#pragma once

#include "cuda/cuda_glue.h"
#include "kernels/decode_attention.cuh"
#include "kernels/decode_plan.h"
#include "op_checks.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace std_ext::cuda {

inline void check_int_range(const char* op, const char* what, int64_t value) {
  TORCH_CHECK(value <= INT_MAX, "std::", op, ": ", what, " = ", value, " exceeds the CUDA kernel's int32 range");
}

// STD_EXT_DECODE_LAYOUT=rows|keys|auto (unset: auto) picks the decode kernel's warp
// layout. Every layout gives the same bits (decode_attention.cuh), so this is only for
// benchmarks (rows at Qn = 1 is the one-math-warp layout the keys layout replaced) and for
// tests that check the layouts agree.
inline kernels::DecodeLayout decode_layout_from_env(const char* op) {
  const char* value = std::getenv("STD_EXT_DECODE_LAYOUT");
  if (value == nullptr || *value == '\0') return kernels::DecodeLayout::kAuto;
  const bool rows = std::strcmp(value, "rows") == 0;
  const bool keys = std::strcmp(value, "keys") == 0;
  TORCH_CHECK(rows || keys || std::strcmp(value, "auto") == 0, "std::", op,
              ": STD_EXT_DECODE_LAYOUT must be auto, rows or keys, got '", value, "'");
  return rows ? kernels::DecodeLayout::kRows : keys ? kernels::DecodeLayout::kKeys : kernels::DecodeLayout::kAuto;
}

// STD_EXT_DECODE_SPLITS_PER_BLOCK=N (unset or 0: the plan's own) makes each block of the
// decode kernel take N of the splits in turn. Which block computes a split never changes
// its bits, so this too is for benchmarks (1: the verify grid as it ran before the plan
// folded its extra waves into longer blocks) and for tests that check exactly that.
inline int decode_splits_per_block_from_env(const char* op) {
  const char* value = std::getenv("STD_EXT_DECODE_SPLITS_PER_BLOCK");
  if (value == nullptr || *value == '\0') return 0;
  char* end = nullptr;
  const long n = std::strtol(value, &end, 10);
  TORCH_CHECK(*end == '\0' && n >= 0 && n <= kernels::kDecodeMaxSplits, "std::", op,
              ": STD_EXT_DECODE_SPLITS_PER_BLOCK must be an integer in [0, ", kernels::kDecodeMaxSplits, "], got '",
              value, "'");
  return static_cast<int>(n);
}

// Runs the decode kernel for q/k/v (and, for sparse_attention, indices/tail_start),
// writing a fresh contiguous [B, Qn, H_q, D] output. Each op's file instantiates only its
// own variant (kSparse), which halves its build time.
template <bool kSparse>
at::Tensor run_decode_attention(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& kv_len, const at::Tensor* indices,
                                const at::Tensor* tail_start, double scale, const AttentionDims& dims) {
  const int64_t num_indices = kSparse ? indices->size(2) : 0;
  check_int_range(op, "the cache capacity", dims.capacity);
  check_int_range(op, "Qn x H_q", dims.q_len * dims.q_heads);
  // List entries are int32 in the kernel: keep set (rounded up to a tile) + tail + a tile.
  check_int_range(op, "indices.size(2) + the cache capacity",
                  num_indices + kernels::kDecodeTileKeys + dims.capacity + kernels::kDecodeTileKeys);
  at::Tensor out = cuda::empty({dims.batch, dims.q_len, dims.q_heads, dims.head_dim}, q.options());
  if (out.numel() == 0) return out;
  const at::Tensor k = with_aligned_rows(k_cache);
  const at::Tensor v = with_aligned_rows(v_cache);
  // The kernel reads the integer tensors as dense arrays (any layout is accepted).
  const at::Tensor lens = kv_len.contiguous();
  const at::Tensor starts = kSparse ? tail_start->contiguous() : at::Tensor();
  const at::Tensor keep = kSparse ? indices->contiguous() : at::Tensor();
  const kernels::DecodeLayout layout = decode_layout_from_env(op);
  const int forced_splits_per_block = decode_splits_per_block_from_env(op);
  const int sms = sm_count(q);
  const cudaStream_t stream = current_stream(q);

  auto run = [&](auto element_tag, auto head_dim_tag) {
    using T = decltype(element_tag);
    constexpr int kHeadDim = decltype(head_dim_tag)::value;
    kernels::DecodePlanInputs in{};
    in.batch = dims.batch;
    in.kv_heads = dims.kv_heads;
    in.q_len = dims.q_len;
    in.group = dims.group;
    in.capacity = dims.capacity;
    in.num_indices = num_indices;
    in.sm_count = sms;
    in.blocks_per_sm = kernels::decode_blocks_per_sm<T, kHeadDim, kSparse>(q.device().index());
    in.layout = layout;
    in.forced_splits_per_block = forced_splits_per_block;
    // The variant depends on the plan's layout, and how many splits a block takes on the
    // variant's occupancy: plan once for the layout, then with it.
    in.launched_blocks_per_sm = kernels::decode_launched_blocks_per_sm<T, kHeadDim, kSparse>(
        kernels::plan_decode_attention(in), q.device().index());
    const kernels::DecodeSplitPlan plan = kernels::plan_decode_attention(in);

    // Grid: (split blocks, KV heads x row groups, batch); the merge: one block per output row.
    TORCH_CHECK(dims.batch <= 65535 && dims.kv_heads * plan.row_groups <= 65535, "std::", op,
                ": the CUDA kernel takes at most 65535 sequences and 65535 x ", plan.block_rows,
                " query rows (Qn x H_q) per call, got B = ", dims.batch, ", Qn = ", dims.q_len, ", H_q = ",
                dims.q_heads);
    TORCH_CHECK(plan.num_splits == 1 || dims.batch * dims.q_len * dims.q_heads <= INT_MAX, "std::", op,
                ": the CUDA kernel takes at most 2^31 - 1 output rows (B x Qn x H_q) per call, got ",
                dims.batch * dims.q_len * dims.q_heads);

    kernels::DecodeAttentionParams p{};
    p.q = q.const_data_ptr();
    p.q_stride_b = q.stride(0);
    p.q_stride_i = q.stride(1);
    p.q_stride_h = q.stride(2);
    p.q_aligned16 = rows_16_byte_aligned(q);
    p.k = k.const_data_ptr();
    p.k_stride_b = k.stride(0);
    p.k_stride_h = k.stride(1);
    p.k_stride_s = k.stride(2);
    p.v = v.const_data_ptr();
    p.v_stride_b = v.stride(0);
    p.v_stride_h = v.stride(1);
    p.v_stride_s = v.stride(2);
    p.kv_len = lens.const_data_ptr<int32_t>();
    if constexpr (kSparse) {
      p.tail_start = starts.const_data_ptr<int32_t>();
      p.indices = keep.const_data_ptr<int32_t>();
      p.indices_stride_b = keep.stride(0);
      p.indices_stride_h = keep.stride(1);
      p.num_indices = static_cast<int>(num_indices);
    }
    p.out = out.mutable_data_ptr();
    p.batch = static_cast<int>(dims.batch);
    p.q_len = static_cast<int>(dims.q_len);
    p.q_heads = static_cast<int>(dims.q_heads);
    p.kv_heads = static_cast<int>(dims.kv_heads);
    p.group = static_cast<int>(dims.group);
    p.capacity = static_cast<int>(dims.capacity);
    p.num_splits = plan.num_splits;
    p.tail_offset = plan.tail_offset;
    p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

    at::Tensor partial_out, partial_lse;
    const int64_t partial_rows = kernels::decode_partial_rows(p);
    if (partial_rows > 0) {
      partial_out = cuda::empty({partial_rows, dims.head_dim}, q.options().dtype(at::kFloat));
      partial_lse = cuda::empty({partial_rows}, q.options().dtype(at::kFloat));
      p.partial_out = partial_out.mutable_data_ptr<float>();
      p.partial_lse = partial_lse.mutable_data_ptr<float>();
    }
    C10_CUDA_CHECK((kernels::launch_decode_attention<T, kHeadDim, kSparse>(p, plan, stream)));
  };

  STD_EXT_HEAD_DIM_SWITCH(dims.head_dim, kHeadDim, [&] {
    using HeadDim = std::integral_constant<int, kHeadDim>;
    if (q.scalar_type() == at::kBFloat16) {
      run(__nv_bfloat16{}, HeadDim{});
    } else {
      run(__half{}, HeadDim{});
    }
  });
  return out;
}

}  // namespace std_ext::cuda
