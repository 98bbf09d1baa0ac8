// torch.ops.std.decode_split_plan: introspection of how the CUDA decode kernels
// (dense_attention, sparse_attention) cut a position list into tiles and splits. It runs
// the planner the CUDA glue runs (kernels/decode_plan.h, plain C++), so the CPU can check
// its promises: no dependence on Qn, kv_len or the capacity, every list entry in exactly
// one tile, the tail's tiles at fixed entries. Not part of the attention API.
#include "kernels/decode_plan.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <climits>
#include <tuple>

namespace std_ext {
namespace {

// Returns (tiles int32 [num_tiles, 4], plan int32 [6]).
//   tiles: one row per tile of a list with num_indices keep entries and tail_len tail
//     entries, grouped by split and in the order the split takes them: (split, order,
//     first list entry, end list entry); entries [num_indices, tail_offset) are padding.
//   plan: (num_splits, tail_offset, tile entries, layout (1 rows, 2 keys), warps per block,
//     row groups).
std::tuple<at::Tensor, at::Tensor> decode_split_plan(int64_t batch, int64_t kv_heads, int64_t q_len, int64_t group,
                                                     int64_t capacity, int64_t num_indices, int64_t tail_len,
                                                     int64_t sm_count, int64_t blocks_per_sm) {
  const char* op = "std::decode_split_plan: ";
  TORCH_CHECK(batch >= 1 && kv_heads >= 1 && q_len >= 1 && group >= 1, op,
              "batch, kv_heads, q_len and group must be >= 1, got ", batch, ", ", kv_heads, ", ", q_len, ", ", group);
  TORCH_CHECK(capacity >= 0 && num_indices >= 0 && tail_len >= 0, op,
              "capacity, num_indices and tail_len must be >= 0, got ", capacity, ", ", num_indices, ", ", tail_len);
  TORCH_CHECK(sm_count >= 1 && sm_count <= INT_MAX && blocks_per_sm >= 1 && blocks_per_sm <= INT_MAX, op,
              "sm_count and blocks_per_sm must be >= 1, got ", sm_count, ", ", blocks_per_sm);
  TORCH_CHECK(num_indices + tail_len + 2 * kernels::kDecodeTileKeys <= INT_MAX, op,
              "num_indices + tail_len exceeds the kernel's int32 range");

  kernels::DecodePlanInputs in{};
  in.batch = batch;
  in.kv_heads = kv_heads;
  in.q_len = q_len;
  in.group = group;
  in.capacity = capacity;
  in.num_indices = num_indices;
  in.sm_count = static_cast<int>(sm_count);
  in.blocks_per_sm = static_cast<int>(blocks_per_sm);
  in.layout = kernels::DecodeLayout::kAuto;
  const kernels::DecodeSplitPlan plan = kernels::plan_decode_attention(in);

  const int list_len = kernels::decode_list_len(plan.tail_offset, 0, static_cast<int>(tail_len));
  const int list_tiles = kernels::decode_list_tiles(list_len);
  at::Tensor tiles = at::empty({list_tiles, 4}, at::TensorOptions().dtype(at::kInt));
  int32_t* row = tiles.mutable_data_ptr<int32_t>();
  for (int split = 0; split < plan.num_splits; ++split) {
    const int count = kernels::decode_split_tiles(list_tiles, split, plan.num_splits);
    for (int order = 0; order < count; ++order, row += 4) {
      const int first = kernels::decode_tile_first_entry(split, order, plan.num_splits);
      row[0] = split;
      row[1] = order;
      row[2] = first;
      row[3] = first + kernels::kDecodeTileKeys < list_len ? first + kernels::kDecodeTileKeys : list_len;
    }
  }
  TORCH_CHECK(row == tiles.mutable_data_ptr<int32_t>() + 4 * int64_t{list_tiles}, op,
              "internal error: the splits do not cover the list's tiles exactly once");

  at::Tensor info = at::empty({6}, at::TensorOptions().dtype(at::kInt));
  int32_t* v = info.mutable_data_ptr<int32_t>();
  v[0] = plan.num_splits;
  v[1] = plan.tail_offset;
  v[2] = kernels::kDecodeTileKeys;
  v[3] = static_cast<int32_t>(plan.layout);
  v[4] = plan.warps;
  v[5] = plan.row_groups;
  return {tiles, info};
}

}  // namespace
}  // namespace std_ext

// No tensor arguments: CompositeExplicitAutograd is where the dispatcher finds it.
TORCH_LIBRARY_IMPL(std, CompositeExplicitAutograd, m) { m.impl("decode_split_plan", &std_ext::decode_split_plan); }
