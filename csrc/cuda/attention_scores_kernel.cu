// CUDA glue of torch.ops.std.attention_scores: checks, device, stream, allocations,
// dtype / head_dim dispatch. The kernels (and why they are shaped as they are) live in
// kernels/attention_scores.cuh.
#include "cuda/cuda_glue.h"
#include "kernels/attention_scores.cuh"
#include "op_checks.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

namespace std_ext {
namespace {

constexpr const char* kOp = "attention_scores";

template <typename Element>
void launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& q_pos, float scale,
            const AttentionDims& dims, at::Tensor& out) {
  kernels::AttentionScoresShape shape{};
  shape.batch = static_cast<int>(dims.batch);
  shape.kv_heads = static_cast<int>(dims.kv_heads);
  shape.group = static_cast<int>(dims.group);
  shape.q_len = static_cast<int>(dims.q_len);
  shape.capacity = static_cast<int>(dims.capacity);

  const kernels::AttentionScoresPlan plan = kernels::plan_attention_scores(shape, cuda::sm_count(q));
  // Scratch from the caching allocator on the current stream: no cudaMalloc, no host
  // sync (graph-capturable). Every byte the kernels read they write first.
  at::Tensor workspace = cuda::empty({static_cast<int64_t>(plan.workspace_bytes)}, q.options().dtype(at::kByte));

  kernels::AttentionScoresArgs<Element> args{};
  args.q = reinterpret_cast<const Element*>(q.const_data_ptr());
  args.k_cache = reinterpret_cast<const Element*>(k_cache.const_data_ptr());
  args.q_pos = q_pos.const_data_ptr<int32_t>();
  args.out = out.mutable_data_ptr<float>();
  args.q_stride_b = q.stride(0);
  args.q_stride_t = q.stride(1);
  args.q_stride_h = q.stride(2);
  args.k_stride_b = k_cache.stride(0);
  args.k_stride_h = k_cache.stride(1);
  args.k_stride_s = k_cache.stride(2);
  args.pos_stride_b = q_pos.stride(0);
  args.pos_stride_t = q_pos.stride(1);
  args.scale = scale;

  const cudaStream_t stream = cuda::current_stream(q);
  void* workspace_ptr = workspace.mutable_data_ptr();
  STD_EXT_HEAD_DIM_SWITCH(dims.head_dim, kHeadDim, [&] {
    C10_CUDA_CHECK((kernels::launch_attention_scores<Element, kHeadDim>(shape, plan, args, workspace_ptr, stream)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor attention_scores_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& q_pos,
                                 double scale) {
  const AttentionDims dims = check_attention_scores_args(q, k_cache, q_pos);
  cuda::check_half_dtype(kOp, q);
  cuda::check_head_dim(kOp, dims.head_dim);
  // Key and row indices are int inside the kernels; blocks of 128 keys must not overflow.
  constexpr int64_t kIntLimit = std::numeric_limits<int32_t>::max() / 2;
  TORCH_CHECK(dims.capacity <= kIntLimit, "std::", kOp, ": k_cache.size(2) = ", dims.capacity, " exceeds ",
              kIntLimit);
  // Grids are 1-D over (tile, batch x KV head): their block counts must fit a grid.
  const int64_t heads_total = dims.batch * dims.kv_heads;
  const int64_t key_blocks = (dims.capacity + 127) / 128;
  const int64_t row_tiles = (dims.q_len * dims.group + 63) / 64;
  TORCH_CHECK(dims.q_len * dims.group <= kIntLimit / 2 && heads_total * key_blocks <= kIntLimit &&
                  heads_total * row_tiles <= kIntLimit,
              "std::", kOp, ": q of shape ", q.sizes(), " against k_cache of shape ", k_cache.sizes(),
              " is too large for the CUDA kernel");
  if (value_checks_enabled(q)) check_q_pos_values(kOp, q_pos, dims.capacity);

  const cuda::DeviceGuard device_guard(q.device());
  const auto out_options = k_cache.options().dtype(at::kFloat);
  if (dims.batch * dims.kv_heads * dims.capacity == 0 || dims.q_len * dims.group == 0) {
    return at::zeros({dims.batch, dims.kv_heads, dims.capacity}, out_options);  // no query: all 0
  }
  at::Tensor out = cuda::empty({dims.batch, dims.kv_heads, dims.capacity}, out_options);
  const at::Tensor q_rows = cuda::with_aligned_rows(q);
  const at::Tensor k_rows = cuda::with_aligned_rows(k_cache);
  const float scale_f = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16) {
    launch<__nv_bfloat16>(q_rows, k_rows, q_pos, scale_f, dims, out);
  } else {
    launch<__half>(q_rows, k_rows, q_pos, scale_f, dims, out);
  }
  return out;
}

}  // namespace
}  // namespace std_ext

STD_EXT_CUDA_LIBRARY_IMPL(m) { m.impl("attention_scores", &std_ext::attention_scores_cuda); }
