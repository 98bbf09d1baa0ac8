// CUDA glue of torch.ops.std.topk_indices: checks, device, stream, allocations. The
// kernel (and why it is shaped as it is) lives in kernels/topk_indices.cuh.
#include "cuda/cuda_glue.h"
#include "kernels/topk_indices.cuh"
#include "op_checks.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

namespace std_ext {
namespace {

at::Tensor topk_indices_cuda(const at::Tensor& scores, const at::Tensor& candidates, int64_t k) {
  check_topk_indices_args(scores, candidates, k);
  const int64_t batch = scores.size(0);
  const int64_t heads = scores.size(1);
  const int64_t length = scores.size(2);
  TORCH_CHECK(length <= std::numeric_limits<int32_t>::max(), "std::topk_indices: scores.size(2) = ", length,
              " is too long: positions are int32");

  const cuda::DeviceGuard device_guard(scores.device());
  at::Tensor out = cuda::empty({batch, heads, k}, scores.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const at::Tensor mask = candidates.contiguous();

  const kernels::TopkIndicesPlan plan = kernels::plan_topk_indices(batch * heads, length, cuda::sm_count(scores));
  // Scratch comes from the caching allocator on the current stream: no cudaMalloc, no
  // host sync, so the op can be captured in a CUDA graph. The launcher clears it itself.
  at::Tensor workspace;
  if (plan.workspace_words > 0) {
    workspace = cuda::empty({plan.workspace_words}, scores.options().dtype(at::kInt));
  }

  kernels::TopkIndicesParams params{};
  params.scores = scores.const_data_ptr<float>();
  params.score_stride_batch = scores.stride(0);
  params.score_stride_head = scores.stride(1);
  params.candidates = mask.const_data_ptr<bool>();
  params.out = out.mutable_data_ptr<int32_t>();
  params.batch = batch;
  params.heads = heads;
  params.length = length;
  params.k = k;
  uint32_t* workspace_ptr =
      workspace.defined() ? reinterpret_cast<uint32_t*>(workspace.mutable_data_ptr<int32_t>()) : nullptr;
  C10_CUDA_CHECK(kernels::launch_topk_indices(params, plan, workspace_ptr, cuda::current_stream(scores)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace std_ext

STD_EXT_CUDA_LIBRARY_IMPL(m) { m.impl("topk_indices", &std_ext::topk_indices_cuda); }
