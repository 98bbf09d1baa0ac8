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

// Returns (tiles int32 [num_tiles, 4], plan int32 [8]).
//   tiles: one row per tile of a list with num_indices keep entries and tail_len tail
//     entries, in the order the kernel's blocks take them (block 0's tiles, then block 1's,
//     ...; within a block its splits in turn, each split's tiles in order: the kernel's own
//     DecodeBlockTiles enumerates them): (split, order, first list entry, end list entry);
//     entries [num_indices, tail_offset) are padding. With one split per block this is
//     split by split.
//   plan: (num_splits, tail_offset, tile entries, layout (1 rows, 2 keys), warps per block,
//     row groups, splits per block, split blocks).
// launched_blocks_per_sm is the launched variant's occupancy (0: blocks_per_sm);
// splits_per_block > 0 forces that many, as STD_EXT_DECODE_SPLITS_PER_BLOCK does.
std::tuple<at::Tensor, at::Tensor> decode_split_plan(int64_t batch, int64_t kv_heads, int64_t q_len, int64_t group,
                                                     int64_t capacity, int64_t num_indices, int64_t tail_len,
                                                     int64_t sm_count, int64_t blocks_per_sm,
                                                     int64_t launched_blocks_per_sm, int64_t splits_per_block) {
  const char* op = "std::decode_split_plan: ";
  TORCH_CHECK(batch >= 1 && kv_heads >= 1 && q_len >= 1 && group >= 1, op,
              "batch, kv_heads, q_len and group must be >= 1, got ", batch, ", ", kv_heads, ", ", q_len, ", ", group);
  TORCH_CHECK(capacity >= 0 && num_indices >= 0 && tail_len >= 0, op,
              "capacity, num_indices and tail_len must be >= 0, got ", capacity, ", ", num_indices, ", ", tail_len);
  TORCH_CHECK(sm_count >= 1 && sm_count <= INT_MAX && blocks_per_sm >= 1 && blocks_per_sm <= INT_MAX, op,
              "sm_count and blocks_per_sm must be >= 1, got ", sm_count, ", ", blocks_per_sm);
  TORCH_CHECK(launched_blocks_per_sm >= 0 && launched_blocks_per_sm <= INT_MAX && splits_per_block >= 0 &&
                  splits_per_block <= kernels::kDecodeMaxSplits,
              op, "launched_blocks_per_sm must be >= 0 and splits_per_block in [0, ", kernels::kDecodeMaxSplits,
              "], got ", launched_blocks_per_sm, ", ", splits_per_block);
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
  in.launched_blocks_per_sm = static_cast<int>(launched_blocks_per_sm);
  in.forced_splits_per_block = static_cast<int>(splits_per_block);
  const kernels::DecodeSplitPlan plan = kernels::plan_decode_attention(in);

  const int list_len = kernels::decode_list_len(plan.tail_offset, 0, static_cast<int>(tail_len));
  const int list_tiles = kernels::decode_list_tiles(list_len);
  at::Tensor tiles = at::empty({list_tiles, 4}, at::TensorOptions().dtype(at::kInt));
  int32_t* row = tiles.mutable_data_ptr<int32_t>();
  for (int x = 0; x < plan.split_blocks; ++x) {
    const kernels::DecodeBlockTiles block(list_tiles, x, plan.split_blocks, plan.num_splits);
    for (int flat = 0; flat < block.tiles; ++flat, row += 4) {
      const kernels::DecodeBlockTiles::Tile tile = block.tile(flat);
      const int split = block.split(tile.split_index);
      const int first = block.first_entry(flat);
      TORCH_CHECK(first == kernels::decode_tile_first_entry(split, tile.order, plan.num_splits) &&
                      tile.order < kernels::decode_split_tiles(list_tiles, split, plan.num_splits),
                  op, "internal error: block ", x, "'s tile ", flat, " is not a tile of split ", split);
      row[0] = split;
      row[1] = tile.order;
      row[2] = first;
      row[3] = first + kernels::kDecodeTileKeys < list_len ? first + kernels::kDecodeTileKeys : list_len;
    }
  }
  TORCH_CHECK(row == tiles.mutable_data_ptr<int32_t>() + 4 * int64_t{list_tiles}, op,
              "internal error: the splits do not cover the list's tiles exactly once");

  at::Tensor info = at::empty({8}, at::TensorOptions().dtype(at::kInt));
  int32_t* v = info.mutable_data_ptr<int32_t>();
  v[0] = plan.num_splits;
  v[1] = plan.tail_offset;
  v[2] = kernels::kDecodeTileKeys;
  v[3] = static_cast<int32_t>(plan.layout);
  v[4] = plan.warps;
  v[5] = plan.row_groups;
  v[6] = plan.splits_per_block;
  v[7] = plan.split_blocks;
  return {tiles, info};
}

}  // namespace
}  // namespace std_ext

// No tensor arguments: CompositeExplicitAutograd is where the dispatcher finds it.
TORCH_LIBRARY_IMPL(std, CompositeExplicitAutograd, m) { m.impl("decode_split_plan", &std_ext::decode_split_plan); }
