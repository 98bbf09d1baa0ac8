// How dense_attention / sparse_attention cut their work on the GPU: the split plan of
// csrc/kernels/decode_attention.cuh. Plain C++ (no CUDA, no torch), so that the CPU
// introspection op std::decode_split_plan (csrc/cpu/decode_split_plan.cpp) runs the very
// code the CUDA glue runs, and a CPU test can check its promises.
//
// The position list of one (sequence, KV head) is
//   entries [0, N)                     the keep set indices[b, h, :] (sparse only)
//   entries [N, tail_offset)           nothing (padding up to a tile boundary)
//   entries [tail_offset, list_len)    tail_start, tail_start + 1, ..., kv_len - 1
// with tail_offset = N rounded up to a tile; dense attention is N = 0, tail_start = 0.
// The list is cut into tiles of kDecodeTileKeys entries, and tile t belongs to split
// t % num_splits, which takes its tiles in ascending order: round-robin striping.
//
// Why this shape. Everything that orders the floating-point reduction of a query row
// (which tiles form a split, their order, how splits merge) must be the same in every
// call whose results have to agree bit for bit: a Qn = γ+1 verification and the Qn = 1
// decode at the same position, vanilla and StD decoding (whose caches differ in
// capacity by γ+1), consecutive steps (kv_len grows). So the plan reads none of Qn,
// kv_len or the capacity: tile boundaries are fixed list entries (fixed positions of
// the tail), and num_splits depends on the batch, the KV heads and the GPU alone. A
// longer list only appends tiles, each to a fixed split; a split whose tiles a row cannot
// see leaves that row's state exactly as it was. The striping also balances any list
// length over all splits at once (no split holds more than one tile more than another),
// so the generated tail of a draft spreads over splits of its own instead of lengthening
// one. num_splits x batch x KV heads blocks of the keys layout (plain decoding) fit in at
// most one wave of the GPU (floor(SMs x its blocks per SM / (batch x KV heads)) splits,
// so a wave may be partly idle). A call whose variant is less resident than the keys
// layout (the rows layout's eight-warp variant) or that needs several row groups gives
// each block several splits in turn (splits_per_block), so it too is one wave where one
// split per (sequence, KV head, row group) block fits at all.
//
// Which warps compute what (the layout) may depend on Qn x G: every layout computes each
// row in the same order (see decode_attention.cuh), so it never changes a bit.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define STD_EXT_HOST_DEVICE __host__ __device__
#else
#define STD_EXT_HOST_DEVICE
#endif

namespace std_ext::kernels {

constexpr int kDecodeTileKeys = 64;   // list entries per tile (one pipeline stage)
constexpr int kDecodeMaxSplits = 256;  // the merge keeps one weight per split in shared memory
constexpr int kDecodeRowsPerWarp = 16;

// Which warps compute a tile.
enum class DecodeLayout : int {
  kAuto = 0,
  // One warp per 16 query rows, every key of the tile (4 warps: up to 64 rows, 8: 128).
  kRows = 1,
  // Up to 16 rows (Qn = 1 decoding): 4 warps share the rows and each takes 16 keys of
  // the tile for Q.K^T and a quarter of head_dim for P.V.
  kKeys = 2,
};

struct DecodePlanInputs {
  int64_t batch;
  int64_t kv_heads;
  int64_t q_len;        // Qn
  int64_t group;        // H_q / H_kv
  int64_t capacity;     // cache positions: deliberately unused (see above); a test checks it
  int64_t num_indices;  // N (0: dense)
  int sm_count;         // multiprocessors of the device
  int blocks_per_sm;    // resident blocks of the kKeys kernel per SM (occupancy API)
  DecodeLayout layout;  // kAuto: kKeys for up to 16 rows, else kRows
  // Resident blocks per SM of the variant the plan launches (its layout and warps); 0: the
  // same as blocks_per_sm. Sets only how many splits one block takes in turn.
  int launched_blocks_per_sm = 0;
  // > 0: take this many splits per block (tests and benchmarks; any value gives the same bits).
  int forced_splits_per_block = 0;
};

struct DecodeSplitPlan {
  int num_splits;   // splits per (sequence, KV head); 1: the kernel writes the output itself
  int tail_offset;  // list entry of the tail's first position
  DecodeLayout layout;
  int warps;        // per block
  int block_rows;   // query rows (Qn x G) per block
  int row_groups;   // blocks per (split, KV head) along the rows
  // Splits one block takes in turn (its pipeline runs on from one into the next): block x
  // of the grid's first dimension takes splits x, x + split_blocks, ... Enough that the
  // grid fits the launched variant in one wave where the keys layout's splits would need
  // more (the eight-warp rows variant holds fewer blocks per SM). Which block computes a
  // split never changes its bits, so this may depend on Qn.
  int splits_per_block;
  int split_blocks;  // the grid's first dimension: ceil(num_splits / splits_per_block)
};

constexpr int64_t decode_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits per (sequence, KV head): as many blocks of the keys-layout kernel as the GPU holds
// at once (blocks_per_sm is its occupancy), floored, and at most kDecodeMaxSplits.
inline int decode_num_splits(int64_t batch, int64_t kv_heads, int sm_count, int blocks_per_sm) {
  const int64_t heads = batch * kv_heads;
  const int64_t slots = int64_t{sm_count > 0 ? sm_count : 1} * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  int64_t splits = heads > 0 ? slots / heads : 1;
  if (splits < 1) splits = 1;
  if (splits > kDecodeMaxSplits) splits = kDecodeMaxSplits;
  return static_cast<int>(splits);
}

inline DecodeSplitPlan plan_decode_attention(const DecodePlanInputs& in) {
  DecodeSplitPlan plan{};
  plan.num_splits = decode_num_splits(in.batch, in.kv_heads, in.sm_count, in.blocks_per_sm);
  plan.tail_offset = static_cast<int>(decode_ceil_div(in.num_indices, kDecodeTileKeys) * kDecodeTileKeys);
  const int64_t rows = in.q_len * in.group;
  DecodeLayout layout = in.layout;
  if (layout == DecodeLayout::kAuto) layout = rows <= kDecodeRowsPerWarp ? DecodeLayout::kKeys : DecodeLayout::kRows;
  if (layout == DecodeLayout::kKeys && rows > kDecodeRowsPerWarp) layout = DecodeLayout::kRows;
  plan.layout = layout;
  if (layout == DecodeLayout::kKeys) {
    plan.warps = 4;
    plan.block_rows = kDecodeRowsPerWarp;
  } else {
    plan.warps = rows <= 4 * kDecodeRowsPerWarp ? 4 : 8;
    plan.block_rows = plan.warps * kDecodeRowsPerWarp;
  }
  plan.row_groups = rows > 0 ? static_cast<int>(decode_ceil_div(rows, plan.block_rows)) : 1;

  // The fewest splits per block that fit the grid in one wave of the launched variant (all
  // of them when even that does not fit: fewer, longer blocks then).
  const int launched = in.launched_blocks_per_sm > 0 ? in.launched_blocks_per_sm : in.blocks_per_sm;
  const int64_t slots = int64_t{in.sm_count > 0 ? in.sm_count : 1} * (launched > 0 ? launched : 1);
  const int64_t blocks_per_split = in.batch * in.kv_heads * plan.row_groups;
  int per_block = 1;
  while (per_block < plan.num_splits && decode_ceil_div(plan.num_splits, per_block) * blocks_per_split > slots) {
    ++per_block;
  }
  if (in.forced_splits_per_block > 0) per_block = in.forced_splits_per_block;
  if (per_block > plan.num_splits) per_block = plan.num_splits;
  plan.split_blocks = static_cast<int>(decode_ceil_div(plan.num_splits, per_block));
  // The same block count with the splits spread as evenly as it allows.
  plan.splits_per_block = static_cast<int>(decode_ceil_div(plan.num_splits, plan.split_blocks));
  return plan;
}

// The list's length: keep entries and padding, then the tail tail_start .. kv_len - 1.
STD_EXT_HOST_DEVICE inline int decode_list_len(int tail_offset, int tail_start, int kv_len) {
  return tail_offset + (kv_len - tail_start);
}

STD_EXT_HOST_DEVICE inline int decode_list_tiles(int list_len) {
  return list_len > 0 ? (list_len + kDecodeTileKeys - 1) / kDecodeTileKeys : 0;
}

// How many tiles split `split` takes of a list of list_tiles tiles.
STD_EXT_HOST_DEVICE inline int decode_split_tiles(int list_tiles, int split, int num_splits) {
  return split < list_tiles ? (list_tiles - split + num_splits - 1) / num_splits : 0;
}

// First list entry of the order-th tile of split `split` (its tiles in ascending order).
STD_EXT_HOST_DEVICE inline int decode_tile_first_entry(int split, int order, int num_splits) {
  return (split + order * num_splits) * kDecodeTileKeys;
}

// The tiles of one block of the grid's first dimension, which takes splits first_split,
// first_split + split_blocks, ... (below num_splits) in turn, as one sequence numbered
// 0 .. tiles - 1: the block's splits one after the other, each one's tiles in order.
// Splits below list_tiles % num_splits hold one tile more than the others, so the block's
// first `longer` splits hold `shorter + 1` tiles and the rest `shorter`.
struct DecodeBlockTiles {
  int first_split, split_blocks, num_splits;
  int splits;   // splits of this block
  int shorter;  // tiles of its shorter splits: list_tiles / num_splits
  int longer;   // how many of its splits (the first ones) hold shorter + 1
  int tiles;    // all its tiles

  STD_EXT_HOST_DEVICE DecodeBlockTiles(int list_tiles, int first, int blocks, int num)
      : first_split(first), split_blocks(blocks), num_splits(num) {
    splits = first < num ? (num - first + blocks - 1) / blocks : 0;
    shorter = list_tiles / num;
    const int extra = list_tiles % num;  // splits 0 .. extra - 1 hold one tile more
    longer = first < extra ? (extra - first + blocks - 1) / blocks : 0;
    if (longer > splits) longer = splits;
    tiles = longer * (shorter + 1) + (splits - longer) * shorter;
  }
  // The i-th split of the block and how many tiles it holds.
  STD_EXT_HOST_DEVICE int split(int i) const { return first_split + i * split_blocks; }
  STD_EXT_HOST_DEVICE int split_tiles(int i) const { return shorter + (i < longer ? 1 : 0); }

  struct Tile {
    int split_index;  // i: the block's i-th split
    int order;        // the tile's place in that split
  };
  // flat in [0, tiles).
  STD_EXT_HOST_DEVICE Tile tile(int flat) const {
    if (splits == 1) return {0, flat};
    const int long_tiles = longer * (shorter + 1);
    if (flat < long_tiles) return {flat / (shorter + 1), flat % (shorter + 1)};
    const int rest = flat - long_tiles;
    return {longer + rest / shorter, rest % shorter};
  }
  STD_EXT_HOST_DEVICE int first_entry(int flat) const {
    const Tile t = tile(flat);
    return decode_tile_first_entry(split(t.split_index), t.order, num_splits);
  }
};

}  // namespace std_ext::kernels
