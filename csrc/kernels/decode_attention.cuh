// Split-KV decode attention on tensor cores: the CUDA kernels behind
// torch.ops.std.dense_attention (Qn = 1 decoding, Qn = γ+1 verification) and
// torch.ops.std.sparse_attention (the draft step over a keep set). Torch-free; the glue
// in csrc/cuda/{dense,sparse}_attention_kernel.cu checks arguments and calls the
// launchers at the bottom of this file.
//
// Work split (decode_plan.h): the position list of a (sequence b, KV head h) is cut into
// 64-entry tiles, and tile t belongs to split t % num_splits. Grid = (split block, KV head
// x row group, sequence); split block x takes splits x, x + split_blocks, ... (usually
// one; more where the launched variant holds fewer blocks per SM than the splits assume,
// so the grid still fits one wave). A block stages the Qn x G query rows of its KV head
// (query-major: row r is query r / G, head r % G) and streams its splits' tiles (split,
// split + num_splits, ..., then its next split's) through shared memory with a
// multi-stage cp.async pipeline, so each K/V row is read once for all the rows of the
// group. At the end of each split it writes either the final output (one split) or a
// normalized partial output and its log2-sum-exp, which a second kernel merges, all
// splits of a row at once.
//
// Two warp layouts compute a tile (decode_plan.h, DecodeLayout):
//   kRows  warp w owns query rows 16w..16w+15 and every key of the tile;
//   kKeys  (up to 16 rows: plain decoding) the 4 warps share the rows; warp w computes
//          the logits of keys 16w..16w+15, the warps exchange row maxima and
//          probabilities through shared memory, and warp w accumulates P.V for a quarter
//          of head_dim. Four warps then share the tensor-core work that one warp would do
//          alone in kRows, where at Qn = 1 three of four warps have no rows.
//
// Row invariance and bit-exactness. Both layouts compute every row with the same
// operations in the same order (the "row recipe"):
//   * logit(row, key) = the mma chain over head_dim in 16-wide steps, times scale (an
//     explicit multiply: no contraction into later operations);
//   * tile max over the tile's 64 keys (max is exact, so the order does not matter),
//     shift and alpha = exp2(old max - shift) as below;
//   * probabilities p = exp2(logit - shift); the row sum is kept as 4 key-group x 4 lane
//     partials (keys 16k..16k+15; lane t4 holds keys 8n + 2t4, +1), each updated as
//     fma(partial, alpha, sum of its 4 new values in a fixed order);
//   * acc(row, d) = acc * alpha, then the mma chain over the tile's keys in 16-key steps,
//     one chain per 8 columns of head_dim: columns never mix, so which warp owns which
//     columns does not matter;
//   * at the end of the split, sum = (l0 + l1) + (l2 + l3) with lk = (s0 + s1) + (s2 + s3)
//     over key group k's lane partials; o = acc * (1 / sum), lse = max + log2(sum).
// mma computes each output row from that row alone, the tiles and their order are fixed
// list entries (decode_plan.h: never a function of Qn, kv_len or the capacity), and a
// key a row cannot see (causal mask, past the list) leaves its state unchanged exactly:
// alpha = exp2(0) = 1 and additions of exact zeros. So row i of a Qn = γ+1 call is bit-
// identical to a Qn = 1 call at the same position, whichever layout either call used,
// and vanilla and StD decoding agree bit for bit although their caches differ in size.
//
// Unchecked integer inputs (DESIGN.md §3) are made safe here: kv_len is clamped to
// [0, capacity], tail_start to [0, kv_len], and an index outside [0, tail_start) is skipped.
#pragma once

#include "kernels/decode_plan.h"
#include "kernels/mma_utils.cuh"

#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <cmath>

namespace std_ext::kernels {

struct DecodeAttentionParams {
  const void* q;  // [B, Qn, H_q, D], element strides below, last dim contiguous
  int64_t q_stride_b, q_stride_i, q_stride_h;
  bool q_aligned16;  // q's pointer and strides allow 16-byte loads
  const void* k;     // [B, H_kv, S, D]; 16-byte aligned rows (the glue ensures it)
  int64_t k_stride_b, k_stride_h, k_stride_s;
  const void* v;
  int64_t v_stride_b, v_stride_h, v_stride_s;
  const int32_t* kv_len;      // [B]
  const int32_t* tail_start;  // [B], or nullptr: dense attention (tail from 0, no indices)
  const int32_t* indices;     // [B, H_kv, N] with the strides below (sparse only)
  int64_t indices_stride_b, indices_stride_h;
  int num_indices;  // N
  void* out;        // [B, Qn, H_q, D] contiguous
  float* partial_out;  // [B, Qn, H_q, num_splits, D] (num_splits > 1 only)
  float* partial_lse;  // [B, Qn, H_q, num_splits], log2 domain; -inf: the split saw nothing
  int batch, q_len, q_heads, kv_heads, group, capacity;
  int num_splits;   // plan.num_splits
  int tail_offset;  // plan.tail_offset: list entry of the tail's first position
  float scale_log2;  // scale * log2(e): softmax runs on exp2
};

namespace decode_detail {

constexpr int kTileKeys = kDecodeTileKeys;
constexpr int kRowsPerWarp = kDecodeRowsPerWarp;
constexpr int kKeyGroups = kTileKeys / 16;  // 16-key groups of a tile; kKeys: one per warp
constexpr int kMergeThreads = 256;

template <int kHeadDim>
constexpr int stages() {
  return kHeadDim >= 128 ? 3 : 4;
}

template <int kHeadDim>
constexpr int exchange_bytes() {
  // kKeys: row maxima / sums [4 warps][16 rows] floats + probability fragments [4][32 lanes] x 16 B
  return kKeyGroups * kRowsPerWarp * 4 + kKeyGroups * 32 * 16;
}

template <typename T, int kHeadDim>
constexpr int smem_bytes() {
  return stages<kHeadDim>() * (2 * kTileKeys * kHeadDim * static_cast<int>(sizeof(T)) + kTileKeys * 4) +
         exchange_bytes<kHeadDim>();
}

// Rows of the tile are kHeadDim / 8 chunks of 16 bytes; chunk c of row r is stored at
// chunk c ^ (r % 8) so the 8 rows an ldmatrix reads at one logical chunk hit 8 different
// bank groups.
template <int kHeadDim>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

// Sum of key group k's four new probabilities of one row half (the row recipe's order).
__device__ __forceinline__ float group_sum(const float (&p0)[4], const float (&p1)[4], int half) {
  return __fadd_rn(__fadd_rn(__fadd_rn(p0[2 * half], p0[2 * half + 1]), p1[2 * half]), p1[2 * half + 1]);
}

// Sum of a row's four lane partials (lanes 4g..4g+3), the same in all four lanes.
__device__ __forceinline__ float quad_sum(float x) {
  x = __fadd_rn(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return __fadd_rn(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// The online-softmax step of one row half: new running max, the shift the tile's
// probabilities are taken against, and the factor that rescales the old state.
__device__ __forceinline__ void softmax_step(float& row_max, float tile_max, float& shift, float& alpha) {
  const float new_max = fmaxf(row_max, tile_max);
  // A row that has seen nothing yet keeps max -inf; shifting by 0 then avoids
  // exp2(-inf - -inf) = NaN and still gives exp2(-inf) = 0 for its masked logits.
  shift = new_max == -INFINITY ? 0.f : new_max;
  alpha = exp2f(__fsub_rn(row_max, shift));
  row_max = new_max;
}

template <typename T, int kHeadDim, int kWarps, bool kSparse, bool kKeySplit>
__global__ void __launch_bounds__(kWarps * 32)
    decode_attention_kernel(const DecodeAttentionParams p) {
  using E = mma::Element<T>;
  constexpr int kThreads = kWarps * 32;
  constexpr int kStages = stages<kHeadDim>();
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kRowStep = kThreads / kChunksPerRow;    // tile rows one pass of the block covers
  constexpr int kRowsPerThread = kTileKeys / kRowStep;  // tile rows each thread copies
  constexpr int kTileElems = kTileKeys * kHeadDim;
  constexpr int kBlockRows = kKeySplit ? kRowsPerWarp : kWarps * kRowsPerWarp;
  // Logit blocks of 8 keys and accumulator blocks of 8 columns this warp owns.
  constexpr int kLogitBlocks = kKeySplit ? 2 : kTileKeys / 8;
  constexpr int kAccBlocks = kKeySplit ? kHeadDim / 8 / kKeyGroups : kHeadDim / 8;
  static_assert(!kKeySplit || kWarps == kKeyGroups, "kKeys: one warp per key group");
  static_assert(kThreads % kChunksPerRow == 0 && kTileKeys % kRowStep == 0, "tile copy mapping");
  static_assert(kBlockRows * kHeadDim <= 2 * kTileElems, "the query tile is staged in the last pipeline stage");

  unsigned char* const smem_raw = mma::dynamic_shared_memory();
  T* const kv_smem = reinterpret_cast<T*>(smem_raw);  // stage s: K at 2s * kTileElems, V after it
  int* const vis_smem = reinterpret_cast<int*>(smem_raw + kStages * 2 * kTileElems * sizeof(T));
  float* const row_exchange = reinterpret_cast<float*>(vis_smem + kStages * kTileKeys);  // [4][16]
  uint4* const prob_exchange = reinterpret_cast<uint4*>(row_exchange + kKeyGroups * kRowsPerWarp);  // [4][32]

  const int row_groups = gridDim.y / p.kv_heads;
  const int h = blockIdx.y / row_groups;
  const int row_group = blockIdx.y % row_groups;
  const int b = blockIdx.z;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  const int rows_total = p.q_len * p.group;
  const int row_base = row_group * kBlockRows;
  // Output row of query row `row` (query row / G, head h * G + row % G) in [B, Qn, H_q].
  auto output_row = [&](int row) {
    return (static_cast<int64_t>(b) * p.q_len + row / p.group) * p.q_heads + h * p.group + row % p.group;
  };

  // This sequence's list (decode_plan.h), with unchecked values made safe.
  const int kv_len = min(max(p.kv_len[b], 0), p.capacity);
  const int tail_start = kSparse ? min(max(p.tail_start[b], 0), kv_len) : 0;
  const int num_indices = kSparse ? p.num_indices : 0;
  const int tail_offset = kSparse ? p.tail_offset : 0;
  const int list_len = decode_list_len(tail_offset, tail_start, kv_len);
  // This block's splits (blockIdx.x, + gridDim.x, ...: decode_plan.h) and their tiles, one
  // sequence that the pipeline streams without a break between splits.
  const DecodeBlockTiles block(decode_list_tiles(list_len), blockIdx.x, gridDim.x, p.num_splits);
  const int num_tiles = block.tiles;

  // A split that owns no tile of this list (most splits of a draft over a short keep set)
  // adds nothing to any row: with several splits it marks its rows empty for the merge
  // (lse = -inf, a weight of exactly 0, which the merge skips without reading the partial)
  // instead of writing a zero partial; a block with no tile at all leaves without staging
  // Q. Block-uniform. A split with no tile holds the fewest, so these are the block's last.
  if (p.num_splits > 1 && block.shorter == 0) {
    for (int i = block.longer; i < block.splits; ++i) {
      for (int r = tid; r < kBlockRows; r += kThreads) {
        const int row = row_base + r;
        if (row >= rows_total) break;
        p.partial_lse[output_row(row) * p.num_splits + block.split(i)] = -INFINITY;
      }
    }
    if (num_tiles == 0) return;
  }

  const T* const k_head = static_cast<const T*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const T* const v_head = static_cast<const T*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
  const int32_t* const index_row =
      kSparse ? p.indices + b * p.indices_stride_b + h * p.indices_stride_h : nullptr;

  const int warp_row0 = kKeySplit ? 0 : warp * kRowsPerWarp;  // first row of this warp in the block
  const bool warp_active = row_base + warp_row0 < rows_total;

  // Position of the thread's two accumulator rows (g and g + 8); -1 for padding rows,
  // which then see nothing.
  const int g = lane / 4;
  const int t4 = lane % 4;
  int row_pos[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_base + warp_row0 + g + 8 * half;
    row_pos[half] = row < rows_total ? kv_len - p.q_len + row / p.group : -1;
  }

  // K/V rows are read once per call: evict them from L2 first, so they do not push out
  // what is reused (the queries, the partials the merge reads, the next layer's weights).
  const uint64_t stream_policy = mma::l2_evict_first_policy();
  // cp.async groups per tile (issue_tile), and how many may still be in flight when the
  // loop needs tile j's K (all of tile j, in the rows layout) and, in the keys layout,
  // tile j's V after the next tile was issued.
  constexpr bool kSplitKV = kKeySplit;
  constexpr int kTileGroups = kSplitKV ? 2 : 1;
  constexpr int kPendingAtK = kTileGroups * (kStages - 2) + (kTileGroups - 1);
  constexpr int kPendingAtV = kTileGroups * (kStages - 1);

  // ---- pipeline: the thread copies chunk `copy_chunk` of tile rows copy_row0 + j * kRowStep
  const int copy_chunk = tid % kChunksPerRow;
  const int copy_row0 = tid / kChunksPerRow;
  int prefetched_index[kRowsPerThread];  // raw indices of the next tile to issue (sparse)

  // First list entry of the block's tile j; past its last tile, an entry past any list (so
  // nothing is read), which also keeps DecodeBlockTiles::tile within its range.
  auto first_entry = [&](int j) { return j < num_tiles ? block.first_entry(j) : INT_MAX - kTileKeys; };

  auto load_indices = [&](int j, int (&indices)[kRowsPerThread]) {
    if constexpr (kSparse) {
      const int base = first_entry(j);
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        const int e = base + copy_row0 + r * kRowStep;
        indices[r] = (j < num_tiles && e < num_indices) ? index_row[e] : -1;
      }
    }
  };
  auto prefetch_indices = [&](int j) { load_indices(j, prefetched_index); };

  // Issues tile j's copies (when the split has a tile j) and commits them: in the keys
  // layout as two groups, K then V, so that Q.K^T starts as soon as K has landed (a
  // draft's split often has a single tile, and nothing else to overlap its V with); in the
  // rows layout as one group (many tiles: the pipeline hides V, and its registers are
  // spent). Always commits, so every thread counts the same groups.
  auto issue_tile = [&](int j, const int (&tile_indices)[kRowsPerThread]) {
    const int stage = j % kStages;
    T* k_dst = kv_smem + 2 * stage * kTileElems;
    T* v_dst = k_dst + kTileElems;
    const int base = first_entry(j);
    int position[kRowsPerThread];  // -1: nothing to read (zero-filled)
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = copy_row0 + r * kRowStep;
      const int e = base + row;
      position[r] = -1;
      int visible_from = INT_MAX;  // smallest query position that sees this entry
      if (kSparse && e < num_indices) {
        const int index = tile_indices[r];
        if (index >= 0 && index < tail_start) {
          position[r] = index;
          visible_from = 0;
        }
      } else if (e >= tail_offset && e < list_len) {
        position[r] = tail_start + (e - tail_offset);
        visible_from = position[r];
      }
      if (j < num_tiles && copy_chunk == 0) vis_smem[stage * kTileKeys + row] = visible_from;
    }
    auto copy_rows = [&](T* dst, const T* head, int64_t stride) {
      if (j >= num_tiles) return;
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        const int row = copy_row0 + r * kRowStep;
        const bool valid = position[r] >= 0;
        mma::cp_async_16_evict_first(dst + swizzled<kHeadDim>(row, copy_chunk),
                                     head + (valid ? position[r] : 0) * stride + copy_chunk * 8, valid, stream_policy);
      }
    };
    copy_rows(k_dst, k_head, p.k_stride_s);
    if constexpr (kSplitKV) mma::cp_async_commit();
    copy_rows(v_dst, v_head, p.v_stride_s);
    mma::cp_async_commit();
  };

  float acc[kAccBlocks][4];
#pragma unroll
  for (int n = 0; n < kAccBlocks; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain, shared by the 4 lanes of a row
  // This lane's row-sum partials: [key group][row half]; kKeys keeps only its own group.
  constexpr int kSumGroups = kKeySplit ? 1 : kKeyGroups;
  float row_sum[kSumGroups][2];
#pragma unroll
  for (int k = 0; k < kSumGroups; ++k) row_sum[k][0] = row_sum[k][1] = 0.f;

  // ---- the end of a split: its row sums, then the output (one split) or the split's
  // partial; then a fresh state for the block's next split. Block-uniform (the keys layout
  // exchanges the sums through shared memory).
  auto finish_split = [&](int split) {
    float sum[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if constexpr (kKeySplit) {
        const float mine = quad_sum(row_sum[0][half]);
        if (t4 == 0) row_exchange[warp * kRowsPerWarp + g + 8 * half] = mine;
      } else {
        float group[kKeyGroups];
#pragma unroll
        for (int k = 0; k < kKeyGroups; ++k) group[k] = quad_sum(row_sum[k][half]);
        sum[half] = __fadd_rn(__fadd_rn(group[0], group[1]), __fadd_rn(group[2], group[3]));
      }
    }
    if constexpr (kKeySplit) {
      __syncthreads();
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float* l = row_exchange + g + 8 * half;
        sum[half] = __fadd_rn(__fadd_rn(l[0], l[kRowsPerWarp]), __fadd_rn(l[2 * kRowsPerWarp], l[3 * kRowsPerWarp]));
      }
    }
    if (!warp_active) return;

    const int col0 = kKeySplit ? warp * kAccBlocks * 8 : 0;  // first head_dim column of acc
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row_base + warp_row0 + g + 8 * half;
      if (row >= rows_total) continue;
      const int64_t out_row = output_row(row);
      const bool saw_something = sum[half] > 0.f;
      const float inv_sum = saw_something ? __fdiv_rn(1.f, sum[half]) : 0.f;
      if (p.num_splits == 1) {
        T* dst = static_cast<T*>(p.out) + out_row * kHeadDim + col0;
#pragma unroll
        for (int n = 0; n < kAccBlocks; ++n) {
          *reinterpret_cast<uint32_t*>(dst + n * 8 + 2 * t4) =
              E::pack(__fmul_rn(acc[n][2 * half], inv_sum), __fmul_rn(acc[n][2 * half + 1], inv_sum));
        }
      } else {
        const int64_t partial_row = out_row * p.num_splits + split;
        float* dst = p.partial_out + partial_row * kHeadDim + col0;
#pragma unroll
        for (int n = 0; n < kAccBlocks; ++n) {
          *reinterpret_cast<float2*>(dst + n * 8 + 2 * t4) =
              make_float2(__fmul_rn(acc[n][2 * half], inv_sum), __fmul_rn(acc[n][2 * half + 1], inv_sum));
        }
        if (t4 == 0 && (!kKeySplit || warp == 0)) {
          p.partial_lse[partial_row] = saw_something ? __fadd_rn(row_max[half], log2f(sum[half])) : -INFINITY;
        }
      }
    }
#pragma unroll
    for (int n = 0; n < kAccBlocks; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    row_max[0] = row_max[1] = -INFINITY;
#pragma unroll
    for (int k = 0; k < kSumGroups; ++k) row_sum[k][0] = row_sum[k][1] = 0.f;
  };

  // ---- prologue: the query rows and the first kStages - 1 tiles go out together, so their
  // DRAM round trips overlap instead of following one another (and the keep-set indices of
  // those tiles are loaded at once, not one tile's after the other's). The queries are
  // staged in the last stage, which no tile fills before the main loop's first barrier;
  // their copy is the oldest group, so waiting for it leaves the tiles in flight.
  {
    T* q_smem = kv_smem + 2 * (kStages - 1) * kTileElems;
    const T* q_base = static_cast<const T*>(p.q) + b * p.q_stride_b;
    for (int c = tid; c < kBlockRows * kChunksPerRow; c += kThreads) {
      const int r = c / kChunksPerRow;
      const int chunk = c % kChunksPerRow;
      const int row = row_base + r;
      T* dst = q_smem + swizzled<kHeadDim>(r, chunk);
      if (row >= rows_total) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);  // padding rows: zeros
        continue;
      }
      const T* src = q_base + (row / p.group) * p.q_stride_i + (h * p.group + row % p.group) * p.q_stride_h + chunk * 8;
      if (p.q_aligned16) {
        mma::cp_async_16(dst, src, true);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = src[e];
      }
    }
    mma::cp_async_commit();
  }
  {
    int first_indices[kStages - 1][kRowsPerThread];
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) load_indices(s, first_indices[s]);
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) issue_tile(s, first_indices[s]);
  }
  prefetch_indices(kStages - 1);

  mma::cp_async_wait<kTileGroups * (kStages - 1)>();  // this thread's query chunks have landed
  __syncthreads();                    // and every thread's
  uint32_t q_frag[kHeadDim / 16][4];
  if (warp_active) {
    const int m = lane / 8;
    const int r = warp_row0 + (m % 2) * 8 + lane % 8;
    const T* q_smem = kv_smem + 2 * (kStages - 1) * kTileElems;
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      mma::ldmatrix_x4(q_frag[ks], q_smem + swizzled<kHeadDim>(r, ks * 2 + m / 2));
    }
  }
  // The main loop's first barrier orders these reads before tile kStages - 1 refills the stage.

  int split_index = 0;                       // the block's split that tile j belongs to
  int split_end = block.split_tiles(0);      // the block's first tile past that split
  for (int j = 0; j < num_tiles; ++j) {
    mma::cp_async_wait<kPendingAtK>();
    // Tile j's K (rows layout: and V) has landed for every thread, and every warp is done
    // with tile j - 1, whose stage the next issue refills.
    __syncthreads();
    issue_tile(j + kStages - 1, prefetched_index);
    prefetch_indices(j + kStages);

    if (warp_active) {  // kRows only: kKeys warps are always active
      const int stage = j % kStages;
      const T* k_tile = kv_smem + 2 * stage * kTileElems;
      const T* v_tile = k_tile + kTileElems;
      const int* vis = vis_smem + stage * kTileKeys;
      const int m = lane / 8;
      // kKeys: this warp's keys start at 16 * warp.
      const int key0 = kKeySplit ? 16 * warp : 0;

      // logits[n][.]: keys key0 + 8n + 2t4 (+1), rows g (c0, c1) and g + 8 (c2, c3)
      float logits[kLogitBlocks][4];
#pragma unroll
      for (int n = 0; n < kLogitBlocks; ++n) logits[n][0] = logits[n][1] = logits[n][2] = logits[n][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kHeadDim / 16; ++ks) {
#pragma unroll
        for (int np = 0; np < kLogitBlocks / 2; ++np) {
          uint32_t kb[4];
          const int key = key0 + np * 16 + (m / 2) * 8 + lane % 8;
          mma::ldmatrix_x4(kb, k_tile + swizzled<kHeadDim>(key, ks * 2 + m % 2));
          E::mma(logits[2 * np], q_frag[ks], kb[0], kb[1]);
          E::mma(logits[2 * np + 1], q_frag[ks], kb[2], kb[3]);
        }
      }

      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < kLogitBlocks; ++n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int half = c / 2;
          const bool visible = vis[key0 + n * 8 + 2 * t4 + (c & 1)] <= row_pos[half];
          logits[n][c] = visible ? __fmul_rn(logits[n][c], p.scale_log2) : -INFINITY;
          tile_max[half] = fmaxf(tile_max[half], logits[n][c]);
        }
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) tile_max[half] = quad_max(tile_max[half]);
      if constexpr (kKeySplit) {
        // The tile max over all four warps' keys (max is exact: any order gives the same).
        if (t4 == 0) {
          row_exchange[warp * kRowsPerWarp + g] = tile_max[0];
          row_exchange[warp * kRowsPerWarp + g + 8] = tile_max[1];
        }
        // Tile j's V has landed for this thread; the barrier makes every thread's copy (and
        // the maxima) visible before P.V reads them.
        mma::cp_async_wait<kPendingAtV>();
        __syncthreads();
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
          for (int w = 0; w < kKeyGroups; ++w) {
            tile_max[half] = fmaxf(tile_max[half], row_exchange[w * kRowsPerWarp + g + 8 * half]);
          }
        }
      }
      float alpha[2], shift[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) softmax_step(row_max[half], tile_max[half], shift[half], alpha[half]);
#pragma unroll
      for (int n = 0; n < kLogitBlocks; ++n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) logits[n][c] = exp2f(__fsub_rn(logits[n][c], shift[c / 2]));
      }
#pragma unroll
      for (int k = 0; k < kSumGroups; ++k) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          row_sum[k][half] = __fmaf_rn(row_sum[k][half], alpha[half], group_sum(logits[2 * k], logits[2 * k + 1], half));
        }
      }
#pragma unroll
      for (int n = 0; n < kAccBlocks; ++n) {
        acc[n][0] = __fmul_rn(acc[n][0], alpha[0]);
        acc[n][1] = __fmul_rn(acc[n][1], alpha[0]);
        acc[n][2] = __fmul_rn(acc[n][2], alpha[1]);
        acc[n][3] = __fmul_rn(acc[n][3], alpha[1]);
      }

      // P.V: the probabilities' accumulator layout is already mma's A layout (16 keys kk).
      auto probabilities = [&](int kk) {
        uint4 pa;
        pa.x = E::pack(logits[2 * kk][0], logits[2 * kk][1]);
        pa.y = E::pack(logits[2 * kk][2], logits[2 * kk][3]);
        pa.z = E::pack(logits[2 * kk + 1][0], logits[2 * kk + 1][1]);
        pa.w = E::pack(logits[2 * kk + 1][2], logits[2 * kk + 1][3]);
        return pa;
      };
      if constexpr (kKeySplit) {
        prob_exchange[warp * 32 + lane] = probabilities(0);
        __syncthreads();
      }
#pragma unroll
      for (int kk = 0; kk < kTileKeys / 16; ++kk) {
        uint4 packed;
        if constexpr (kKeySplit) {
          packed = prob_exchange[kk * 32 + lane];
        } else {
          packed = probabilities(kk);
        }
        const uint32_t pa[4] = {packed.x, packed.y, packed.z, packed.w};
        const int key = kk * 16 + (m % 2) * 8 + lane % 8;
#pragma unroll
        for (int dl = 0; dl < kAccBlocks / 2; ++dl) {
          // kKeys: this warp's columns start at 16-column chunk warp * kAccBlocks / 2.
          const int dp = (kKeySplit ? warp * (kAccBlocks / 2) : 0) + dl;
          uint32_t vb[4];
          mma::ldmatrix_x4_trans(vb, v_tile + swizzled<kHeadDim>(key, dp * 2 + m / 2));
          E::mma(acc[2 * dl], pa, vb[0], vb[1]);
          E::mma(acc[2 * dl + 1], pa, vb[2], vb[3]);
        }
      }
    }
    // The last tile of one of the block's splits, and another follows: that split is done.
    if (j + 1 == split_end && j + 1 < num_tiles) {
      finish_split(block.split(split_index));
      ++split_index;
      split_end += block.split_tiles(split_index);
    }
  }
  mma::cp_async_wait<0>();  // no copy may outlive the block (they are all empty by now)
  // The merge (a dependent launch) may start its blocks now; it waits for this grid's
  // completion before reading anything.
  mma::launch_dependent_grids();
  finish_split(block.split(split_index));
}

// One block per output row merges all num_splits partials at once: thread s takes split
// s's log2-sum-exp (block max M, weight 2^(lse_s - M)), then warp w accumulates the
// weighted partials of splits w, w + 8, ... with one vector load per lane and split, and
// the 8 warp sums are added in warp order. A split of weight 0 (it owned no tile, or the
// row saw none of its keys) is skipped without reading its partial, which an empty split
// never writes: a warp-uniform branch that changes no bit, since fma(0, o, total) = total
// for the finite partials of the others (total is never -0: it starts at +0). The split
// loop is unrolled over the most splits with predication. Deterministic, and the same for
// every Qn (num_splits is).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kMergeThreads) merge_splits_kernel(const float* __restrict__ partial_out,
                                                                      const float* __restrict__ partial_lse,
                                                                      T* __restrict__ out, int num_splits) {
  using E = mma::Element<T>;
  constexpr int kWarps = kMergeThreads / 32;
  constexpr int kPerLane = kHeadDim / 32;  // 2 or 4 contiguous columns: one 8- or 16-byte load
  static_assert(kDecodeMaxSplits <= kMergeThreads, "one split per thread");
  __shared__ float weights[kDecodeMaxSplits];
  __shared__ float warp_values[kWarps];
  __shared__ float column_sums[kWarps][kHeadDim];
  // Launched as a dependent grid, this kernel's blocks start while the attention kernel
  // drains; they wait here until its writes are complete and visible. A no-op otherwise.
  mma::wait_for_primary_grid();
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  const float lse = tid < num_splits ? partial_lse[row * num_splits + tid] : -INFINITY;
  float value = lse;
#pragma unroll
  for (int delta = 16; delta > 0; delta /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, delta));
  if (lane == 0) warp_values[warp] = value;
  __syncthreads();
  float max_lse = warp_values[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) max_lse = fmaxf(max_lse, warp_values[w]);
  // A row that saw nothing: every weight exp2(-inf) = 0 and the output 0.
  const float shift = max_lse == -INFINITY ? 0.f : max_lse;
  const float weight = exp2f(__fsub_rn(lse, shift));
  if (tid < kDecodeMaxSplits) weights[tid] = weight;
  value = weight;
#pragma unroll
  for (int delta = 16; delta > 0; delta /= 2) value = __fadd_rn(value, __shfl_xor_sync(0xffffffffu, value, delta));
  __syncthreads();  // every thread has read warp_values (the max) before it is reused
  if (lane == 0) warp_values[warp] = value;
  __syncthreads();

  float total[kPerLane] = {};
  const float* partials = partial_out + row * num_splits * int64_t{kHeadDim} + lane * kPerLane;
#pragma unroll
  for (int j = 0; j < kDecodeMaxSplits / kWarps; ++j) {
    const int s = warp + j * kWarps;
    if (s >= num_splits) break;
    const float w = weights[s];
    if (w == 0.f) continue;  // the same s, so the same branch, for every lane of the warp
    float o[kPerLane];
    if constexpr (kPerLane == 4) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(partials + int64_t{s} * kHeadDim));
      o[0] = v.x, o[1] = v.y, o[2] = v.z, o[3] = v.w;
    } else {
      const float2 v = __ldcg(reinterpret_cast<const float2*>(partials + int64_t{s} * kHeadDim));
      o[0] = v.x, o[1] = v.y;
    }
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) total[e] = __fmaf_rn(w, o[e], total[e]);
  }
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) column_sums[warp][lane * kPerLane + e] = total[e];
  float weight_sum = warp_values[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) weight_sum = __fadd_rn(weight_sum, warp_values[w]);
  __syncthreads();

  if (tid < kHeadDim / 2) {
    const float inv = weight_sum > 0.f ? __fdiv_rn(1.f, weight_sum) : 0.f;
    float pair[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float column = column_sums[0][2 * tid + e];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) column = __fadd_rn(column, column_sums[w][2 * tid + e]);
      pair[e] = __fmul_rn(column, inv);
    }
    *reinterpret_cast<uint32_t*>(out + row * kHeadDim + 2 * tid) = E::pack(pair[0], pair[1]);
  }
}

// Whether the merge kernel's code on the current device was compiled for sm_90+ (PTX
// >= 9.0), i.e. contains the griddepcontrol.wait that makes a dependent launch safe (sm_80
// code JIT-run on a Hopper GPU does not). Asked once per device: a property of the binary
// and the device, which a device reset does not change.
template <typename T, int kHeadDim>
bool merge_compiled_for_sm90() {
  static std::atomic<uint64_t> asked{0}, answer{0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= 64) return false;
  const uint64_t bit = uint64_t{1} << device;
  if ((asked.load() & bit) == 0) {
    cudaFuncAttributes attributes{};
    const bool yes = cudaFuncGetAttributes(&attributes, merge_splits_kernel<T, kHeadDim>) == cudaSuccess &&
                     attributes.ptxVersion >= 90;
    if (yes) answer.fetch_or(bit);
    asked.fetch_or(bit);
  }
  return (answer.load() & bit) != 0;
}

// Whether a dependent launch may go to `stream` now. Under stream capture it becomes a
// programmatic graph edge, which CUDA graphs support from CUDA 12.3 (runtime and driver);
// an older one, or a stream whose capture state cannot be read, gets a plain launch.
inline bool dependent_launch_allowed(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    cudaGetLastError();  // e.g. the legacy stream while another stream captures
    return false;
  }
  if (status == cudaStreamCaptureStatusNone) return true;
  static const bool graphs_take_it = [] {
    int runtime = 0, driver = 0;
    const bool known = cudaRuntimeGetVersion(&runtime) == cudaSuccess && cudaDriverGetVersion(&driver) == cudaSuccess;
    if (!known) cudaGetLastError();
    return known && runtime >= 12030 && driver >= 12030;
  }();
  return status == cudaStreamCaptureStatusActive && graphs_take_it;
}

template <typename T, int kHeadDim, int kWarps, bool kSparse, bool kKeySplit>
constexpr auto decode_kernel = decode_attention_kernel<T, kHeadDim, kWarps, kSparse, kKeySplit>;

template <typename T, int kHeadDim, int kWarps, bool kSparse, bool kKeySplit>
cudaError_t launch_decode_attention_variant(const DecodeAttentionParams& p, const DecodeSplitPlan& plan,
                                            cudaStream_t stream) {
  constexpr auto kernel = decode_kernel<T, kHeadDim, kWarps, kSparse, kKeySplit>;
  constexpr int kSmem = smem_bytes<T, kHeadDim>();
  const dim3 grid(plan.split_blocks, p.kv_heads * plan.row_groups, p.batch);
  cudaError_t err = mma::launch_with_dynamic_smem<kernel, kSmem>(
      [&] { launch_kernel(kernel, grid, kWarps * 32, kSmem, stream, p); });
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.q_len * p.q_heads;
  // The merge is small and latency-bound; on sm_90 its launch overlaps the attention
  // kernel's tail (programmatic dependent launch) instead of waiting for it to finish.
  // Only where the merge kernel was compiled for sm_90+ (PTX >= 9.0), i.e. contains the
  // griddepcontrol.wait that makes this safe: sm_80 code JIT-run on a Hopper GPU does not.
  const bool dependent = merge_compiled_for_sm90<T, kHeadDim>() && dependent_launch_allowed(stream);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(rows));  // the glue bounds rows by the grid limit
  config.blockDim = dim3(kMergeThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute dependent_launch[1];
  dependent_launch[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent_launch[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = dependent_launch;
  config.numAttrs = dependent ? 1 : 0;
  return cudaLaunchKernelEx(&config, merge_splits_kernel<T, kHeadDim>, static_cast<const float*>(p.partial_out),
                            static_cast<const float*>(p.partial_lse), static_cast<T*>(p.out), p.num_splits);
}

}  // namespace decode_detail

// Resident blocks per SM of the kKeys kernel, the plan's blocks_per_sm: the same for every
// Qn (the split count must not depend on it), and the layout that runs plain decoding.
template <typename T, int kHeadDim, bool kSparse>
int decode_blocks_per_sm(int device) {
  using namespace decode_detail;
  return mma::resident_blocks_per_sm<decode_kernel<T, kHeadDim, 4, kSparse, true>, 4 * 32,
                                     smem_bytes<T, kHeadDim>()>(device);
}

// Resident blocks per SM of the variant a plan launches (its layout and warps): the plan's
// launched_blocks_per_sm, which sets how many splits a block takes in turn.
template <typename T, int kHeadDim, bool kSparse>
int decode_launched_blocks_per_sm(const DecodeSplitPlan& plan, int device) {
  using namespace decode_detail;
  constexpr int kSmem = smem_bytes<T, kHeadDim>();
  if (plan.layout == DecodeLayout::kKeys) return decode_blocks_per_sm<T, kHeadDim, kSparse>(device);
  if (plan.warps == 4) return mma::resident_blocks_per_sm<decode_kernel<T, kHeadDim, 4, kSparse, false>, 4 * 32, kSmem>(device);
  return mma::resident_blocks_per_sm<decode_kernel<T, kHeadDim, 8, kSparse, false>, 8 * 32, kSmem>(device);
}

// Shapes of the partial buffers a plan needs (none when num_splits == 1).
inline int64_t decode_partial_rows(const DecodeAttentionParams& p) {
  return p.num_splits > 1 ? static_cast<int64_t>(p.batch) * p.q_len * p.q_heads * p.num_splits : 0;
}

// Launches the attention kernel (and the merge when num_splits > 1) on `stream`.
//   q [B, Qn, H_q, D], caches [B, H_kv, S, D], out [B, Qn, H_q, D] contiguous;
//   partial_out [B * Qn * H_q * num_splits, D] and partial_lse [B * Qn * H_q * num_splits]
//   fp32, both only when num_splits > 1. T is __nv_bfloat16 or __half; kHeadDim 64 or 128;
//   kSparse: p.indices and p.tail_start are set (sparse_attention), else dense_attention.
//   p.num_splits / p.tail_offset and `plan` come from plan_decode_attention (decode_plan.h).
// kRows: up to 64 rows (Qn x G) run on 4 warps, up to 128 on 8; beyond that further row
// groups serve the rest and read the K/V rows again.
template <typename T, int kHeadDim, bool kSparse>
cudaError_t launch_decode_attention(const DecodeAttentionParams& p, const DecodeSplitPlan& plan,
                                    cudaStream_t stream) {
  using namespace decode_detail;
  if (p.batch == 0 || p.q_len * p.group == 0) return cudaSuccess;
  if (plan.layout == DecodeLayout::kKeys) {
    return launch_decode_attention_variant<T, kHeadDim, 4, kSparse, true>(p, plan, stream);
  }
  if (plan.warps == 4) {
    return launch_decode_attention_variant<T, kHeadDim, 4, kSparse, false>(p, plan, stream);
  }
  return launch_decode_attention_variant<T, kHeadDim, 8, kSparse, false>(p, plan, stream);
}

}  // namespace std_ext::kernels
