// CUDA kernel of torch.ops.std.attention_scores: the prefill score of DESIGN.md §1.
// Torch-free: raw pointers, sizes, strides, a workspace and a stream; the glue is
// csrc/cuda/attention_scores_kernel.cu.
//
// Problem, per (sequence b, KV head h): the rows are the pairs (query t, head j of h's
// group), r = t * G + j, R = T * G of them; row r sees keys 0 .. pos[t]. With
// x[r, s] = scale * log2(e) * q[t, j] . k[s, h] (log2 units, so exp2 is the exponential),
//
//     out[b, h, s] = 1 / (valid queries * G) * sum over valid rows r with s <= pos(r)
//                    of exp2(x[r, s] - lse2[r]),    lse2[r] = log2 sum_{s' <= pos(r)} exp2(x[r, s'])
//
// A row's normalizer needs all of its keys before any probability is known, so the keys
// are read twice (logits are recomputed, never stored: R x S floats would not fit):
//
//   0. setup_rows_kernel: clamped position of every row (-1 = padding, or a row past R),
//      the [min, max] position of every 64-row tile, and per sequence the last visible
//      key and the number of valid queries. Out-of-range q_pos values are clamped here
//      (>= S -> S - 1, < 0 -> padding), so nothing later can index out of bounds.
//   1. row_stats_kernel: rows are split in 128-row tiles (held in registers), the
//      visible keys of the sequence in n_chunks equal chunks (streamed through shared
//      memory). Each block runs an online softmax over its chunk and writes a partial
//      (max, sum) per row. Chunk boundaries come from the sequence's real length (read on
//      the device), so a cache with much spare capacity still spreads over all blocks.
//   2. finish_row_stats_kernel: merges the chunks' partials into lse2 per row
//      (+inf for padding rows, so their probabilities vanish).
//   3. column_scores_kernel: the transpose. A block owns 128 keys (held in registers)
//      and streams every row tile of its (b, h); the probability column sums then stay in
//      registers for the whole block, every output element is written by exactly one
//      thread, in a fixed order: no atomics, no partial buffer, bitwise deterministic.
//      Blocks past the sequence's last visible key write zeros.
//
// Both heavy kernels compute a warp's 32 x 64 fp32 logit tile with
// mma.sync.m16n8k16 (bf16 / fp16 in, fp32 accumulate): the 32 "stationary" rows (queries
// in pass 1, keys in pass 3) are A fragments kept in registers; the 64 streamed rows are
// B fragments read with ldmatrix from a shared-memory tile filled by cp.async, kStages
// tiles in flight. Tiles are stored row-major with 16-byte chunks XOR-swizzled by the row
// index (chunk ^ (row % 8)), so the 8 row addresses of every ldmatrix phase hit 8
// different bank groups. Per element, pass 1 costs ~5 FP32 ops + one ex2, pass 3 three
// (FFMA, ex2, FADD); the causal mask is applied only to tiles whose keys pass some row's
// position (a warp-uniform test against the tile's minimum position), and tiles that no
// row of the warp can see are skipped outright.
//
// Blocks are 4 warps. With head_dim 128 a block holds 32 KB of stationary rows and
// kStages x 16 KB of streamed tiles (82 KB in pass 3 with its per-tile metadata) and
// ~210 registers per thread: two blocks per H100 SM (one on an A100, whose SM has 164 KB).
// A streamed tile (16 KB) feeds 2 x 128 x 64 x 128 flops, 128 flops per byte of L2 traffic;
// the ldmatrix traffic is 4 x4-loads per 16 mma per warp and k step. Both passes do the
// R x S x D multiply-adds, so a call costs 4 R S D flops per (b, h).
//
// Garbage (NaN / Inf) in cache slots nobody may read, or in padding queries, can reach
// the accumulators; it never reaches a result because masked elements are *selected*
// away (never multiplied by 0), and every tile holding such a slot or row is masked:
// padding rows count as position -1 in the tiles' minimum position.
#pragma once

#include "kernels/mma_utils.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace std_ext::kernels {
namespace scores_detail {

// ----------------------------------------------------------------------------- shapes

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kWarpRows = 32;                          // stationary rows per warp: two m16 tiles
constexpr int kStationaryRows = kWarps * kWarpRows;    // 128: queries (pass 1) / keys (pass 3) per block
constexpr int kStreamRows = 64;                        // streamed rows per tile: eight n8 tiles
constexpr int kStages = 3;                             // streamed tiles in flight per block
constexpr int kRowTile = 64;                           // granularity of tile_range (= kStreamRows)
constexpr int kRowPadding = kStationaryRows;           // per-row arrays are padded to a multiple of this
constexpr int kKeyTile = kStreamRows;                  // keys per streamed tile in pass 1
// Pass 1 chunks shorter than this spend more on their prologue (a 128-row Q tile) and on
// the partials than on keys.
constexpr int kMinChunkKeys = 2048;
// Pass 3 per-stage metadata: lse2 [64] float, position [64] int, tile range int2, padded to 16 B.
constexpr int kMetaLseOffset = 0;
constexpr int kMetaPosOffset = kStreamRows * 4;
constexpr int kMetaRangeOffset = 2 * kStreamRows * 4;
constexpr int kMetaBytes = 2 * kStreamRows * 4 + 16;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

template <int kHeadDim>
struct TileShape {
  static_assert(kHeadDim % 64 == 0, "the swizzle needs at least 8 16-byte chunks per row");
  static constexpr int kRowBytes = kHeadDim * 2;          // 16-bit elements
  static constexpr int kChunks = kRowBytes / 16;          // 16-byte chunks per row
  static constexpr int kKSteps = kHeadDim / 16;           // k16 steps of one dot product
  static constexpr int kStationaryBytes = kStationaryRows * kRowBytes;
  static constexpr int kStreamBytes = kStreamRows * kRowBytes;
  static constexpr int kRowStatsSmem = kStationaryBytes + kStages * kStreamBytes;
  static constexpr int kColumnScoresSmem = kRowStatsSmem + kStages * kMetaBytes;
};

// floor(n / d) for 0 <= n < 2^31 without a hardware divide: with p = 31 + ceil(log2 d)
// and m = ceil(2^p / d), n * m / 2^p exceeds n / d by less than 1 / d, which never
// crosses the next integer.
struct FastDivisor {
  uint32_t divisor = 1;
  uint64_t multiplier = 1ull << 31;
  uint32_t shift = 31;

  FastDivisor() = default;
  explicit FastDivisor(uint32_t d) : divisor(d) {
    uint32_t log2_ceil = 0;
    while ((1ull << log2_ceil) < d) ++log2_ceil;
    shift = 31 + log2_ceil;
    multiplier = ((1ull << shift) + d - 1) / d;
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> shift);
  }
};

// ----------------------------------------------------------------------------- PTX wrappers

// The PTX wrappers are shared with the decode kernels (kernels/mma_utils.cuh).
using mma::cp_async_16;
using mma::cp_async_8;
using mma::cp_async_commit;
using mma::cp_async_wait;
using mma::ldmatrix_x4;
using mma::smem_address;
using mma::launch_with_dynamic_smem;
using mma::fast_exp2;

// ----------------------------------------------------------------------------- tiles

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile.
template <int kHeadDim>
__device__ __forceinline__ uint32_t swizzled_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * TileShape<kHeadDim>::kRowBytes + ((chunk ^ (row & 7)) << 4));
}

// This thread's half of one row's chunks (the two threads of a pair take alternate
// chunks, so a warp's 32 requests cover 16 whole 32-byte sectors). src == nullptr:
// zero-fill (past the end of the data).
template <int kHeadDim>
__device__ __forceinline__ void load_row_half(uint32_t tile, int row, const void* src, const void* fallback) {
  const int parity = threadIdx.x & 1;
  const char* bytes = static_cast<const char*>(src != nullptr ? src : fallback);
#pragma unroll
  for (int c = 0; c < TileShape<kHeadDim>::kChunks / 2; ++c) {
    const int chunk = parity + 2 * c;
    cp_async_16(tile + swizzled_offset<kHeadDim>(row, chunk), src != nullptr ? bytes + chunk * 16 : bytes,
                src != nullptr);
  }
}

template <int kHeadDim>
using StationaryFragments = uint32_t[2][TileShape<kHeadDim>::kKSteps][4];

// The A fragments of this warp's 32 stationary rows (two m16 tiles), for every k step.
template <int kHeadDim>
__device__ __forceinline__ void load_stationary_fragments(uint32_t tile, int warp, int lane,
                                                          StationaryFragments<kHeadDim>& a) {
  // ldmatrix.x4 matrices: (rows 0-7, k 0-7) (rows 8-15, k 0-7) (rows 0-7, k 8-15)
  // (rows 8-15, k 8-15) = a0..a3 of m16n8k16; lane L addresses row L % 8 of matrix L / 8.
  const int lane_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int lane_chunk = lane >> 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = warp * kWarpRows + i * 16 + lane_row;
#pragma unroll
    for (int ks = 0; ks < TileShape<kHeadDim>::kKSteps; ++ks) {
      ldmatrix_x4(tile + swizzled_offset<kHeadDim>(row, 2 * ks + lane_chunk), a[i][ks][0], a[i][ks][1], a[i][ks][2],
                  a[i][ks][3]);
    }
  }
}

// The pipeline both passes run: a stationary tile (issued with streamed tile 0) against
// n_tiles streamed tiles, kStages - 1 of them in flight. begin_stream issues the first
// ones, one commit group each; run_stream loads this warp's stationary fragments once
// they land, then for each tile waits for it, issues tile + kStages - 1 into the stage
// the previous tile freed, and hands it to consume(fragments, tile, stage).
template <typename Issue>
__device__ __forceinline__ void begin_stream(int n_tiles, Issue& issue) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) issue(s, s);
    cp_async_commit();
  }
}

template <int kHeadDim, typename Issue, typename Consume>
__device__ __forceinline__ void run_stream(uint32_t stationary_tile, int warp, int lane, int n_tiles, Issue& issue,
                                           Consume& consume) {
  cp_async_wait<kStages - 2>();
  __syncthreads();
  StationaryFragments<kHeadDim> a;
  load_stationary_fragments<kHeadDim>(stationary_tile, warp, lane, a);
  for (int tile = 0; tile < n_tiles; ++tile) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile landed for every thread; every warp is done with tile - 1's stage
    const int next = tile + kStages - 1;
    if (next < n_tiles) issue(next, next % kStages);
    cp_async_commit();
    consume(a, tile, tile % kStages);
  }
  cp_async_wait<0>();
}

// acc[i][n] = the 16 x 8 block (stationary rows i*16.., streamed rows n*8..) of this warp's
// 32 x 64 logit tile, unscaled. acc[i][n][2*half + e] is (stationary row i*16 + g + 8*half,
// streamed row n*8 + 2*t + e) with g = lane / 4, t = lane % 4.
template <typename Element, int kHeadDim>
__device__ __forceinline__ void warp_logits(const StationaryFragments<kHeadDim>& a, uint32_t stream_tile, int lane,
                                            float (&acc)[2][8][4]) {
  using Shape = TileShape<kHeadDim>;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][n][e] = 0.f;
  // ldmatrix.x4 matrices over the streamed [n][k] tile: (n 0-7, k 0-7) (n 0-7, k 8-15)
  // (n 8-15, k 0-7) (n 8-15, k 8-15) = b0, b1 of n tile 2p and b0, b1 of n tile 2p + 1.
  // Every lane row is congruent to the lane mod 8, so its swizzle term is lane & 7.
  const int lane_row = (lane & 7) + ((lane >> 4) << 3);
  const uint32_t lane_chunk_xor = static_cast<uint32_t>(((lane >> 3) & 1) ^ (lane & 7));
  const uint32_t lane_base = stream_tile + static_cast<uint32_t>(lane_row * Shape::kRowBytes);
#pragma unroll
  for (int ks = 0; ks < Shape::kKSteps; ++ks) {
    uint32_t b[8][2];
#pragma unroll
    for (int pair = 0; pair < 4; ++pair) {
      const uint32_t addr =
          lane_base + static_cast<uint32_t>(pair * 16 * Shape::kRowBytes) + (((2u * ks) ^ lane_chunk_xor) << 4);
      ldmatrix_x4(addr, b[2 * pair][0], b[2 * pair][1], b[2 * pair + 1][0], b[2 * pair + 1][1]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int n = 0; n < 8; ++n) mma::Element<Element>::mma(acc[i][n], a[i][ks], b[n][0], b[n][1]);
  }
}

// ----------------------------------------------------------------------------- reductions

__device__ __forceinline__ int warp_min(int v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ int warp_max(int v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// (max, sum) of exp2 partials: sum is relative to max; max = -inf means empty.
__device__ __forceinline__ void merge_softmax(float& max_value, float& sum, float other_max, float other_sum) {
  if (other_max == neg_inf()) return;
  if (other_max > max_value) {
    sum = sum * exp2f(max_value - other_max) + other_sum;  // max_value = -inf: sum is 0
    max_value = other_max;
  } else {
    sum += other_sum * exp2f(other_max - max_value);
  }
}

// ----------------------------------------------------------------------------- parameters

template <typename Element>
struct ScoresParams {
  const Element* q;        // [B, T, H_q, D], last dim contiguous
  const Element* k_cache;  // [B, H_kv, S, D], last dim contiguous
  const int32_t* q_pos;    // [B, T]
  float* out;              // [B, H_kv, S], contiguous
  int64_t q_stride_b, q_stride_t, q_stride_h;
  int64_t k_stride_b, k_stride_h, k_stride_s;
  int64_t pos_stride_b, pos_stride_t;
  int batch, kv_heads, group, q_len, capacity;
  int rows;         // T * G
  int rows_padded;  // rows rounded up to kRowPadding
  int n_chunks;     // pass 1 key chunks per (b, h)
  float scale_log2;
  FastDivisor group_divisor;
  // workspace (see AttentionScoresPlan)
  int* row_pos;        // [B, rows_padded]      clamped position, -1 = padding / past R
  int2* tile_range;    // [B, rows_padded / 64] (min, max) position of each 64-row tile
  int2* seq_info;      // [B]                   (last visible key, valid queries)
  float2* partials;    // [B*H_kv, n_chunks, rows_padded] (max, sum) per chunk
  float* lse;          // [B*H_kv, rows_padded] lse2, +inf for padding rows
};

__device__ __forceinline__ int clamp_position(int32_t p, int capacity) { return p < 0 ? -1 : min(p, capacity - 1); }

// ----------------------------------------------------------------------------- kernel 0

// Grid: B * rows_padded / 64 blocks of 64 threads, one thread per row.
template <typename Element>
__global__ void __launch_bounds__(kRowTile) setup_rows_kernel(const ScoresParams<Element> p) {
  __shared__ int reduce_min[2], reduce_max[2], reduce_count[2];
  const int n_tiles = p.rows_padded / kRowTile;
  const int tile = blockIdx.x % n_tiles;
  const int b = blockIdx.x / n_tiles;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int32_t* q_pos = p.q_pos + b * p.pos_stride_b;

  const int r = tile * kRowTile + tid;
  int pos = -1;
  if (r < p.rows) pos = clamp_position(q_pos[p.group_divisor.div(r) * p.pos_stride_t], p.capacity);
  p.row_pos[static_cast<int64_t>(b) * p.rows_padded + r] = pos;

  int lo = warp_min(pos), hi = warp_max(pos);
  if (lane == 0) reduce_min[warp] = lo, reduce_max[warp] = hi;
  __syncthreads();
  if (tid == 0) {
    p.tile_range[static_cast<int64_t>(b) * n_tiles + tile] =
        make_int2(min(reduce_min[0], reduce_min[1]), max(reduce_max[0], reduce_max[1]));
  }

  if (tile != 0) return;  // block-uniform
  int last = -1, count = 0;
  for (int t = tid; t < p.q_len; t += kRowTile) {
    const int position = clamp_position(q_pos[t * p.pos_stride_t], p.capacity);
    last = max(last, position);
    count += position >= 0;
  }
  last = warp_max(last);
  count = warp_sum(count);
  __syncthreads();  // reduce_max is reused
  if (lane == 0) reduce_max[warp] = last, reduce_count[warp] = count;
  __syncthreads();
  if (tid == 0) p.seq_info[b] = make_int2(max(reduce_max[0], reduce_max[1]), reduce_count[0] + reduce_count[1]);
}

// ----------------------------------------------------------------------------- kernel 1

// One key tile of the online softmax for this thread's 4 rows (m tile i, half): keys of
// this thread are key0 + n*8 + 2t + e. kMasked: keys past a row's position are dropped.
template <bool kMasked>
__device__ __forceinline__ void online_softmax_update(float (&acc)[2][8][4], float scale_log2, int key0,
                                                      const int (&pos)[2][2], float (&row_max)[2][2],
                                                      float (&row_sum)[2][2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float tile_max = neg_inf();
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = acc[i][n][2 * half + e] * scale_log2;
          if (kMasked) x = key0 + n * 8 + e <= pos[i][half] ? x : neg_inf();
          acc[i][n][2 * half + e] = x;
          tile_max = fmaxf(tile_max, x);
        }
      }
      const float new_max = fmaxf(row_max[i][half], tile_max);
      // A row that has seen only masked keys keeps max -inf; subtracting 0 then keeps
      // exp2(-inf - ref) = 0 instead of NaN.
      const float ref = new_max == neg_inf() ? 0.f : new_max;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) sum += fast_exp2(acc[i][n][2 * half + e] - ref);
      row_sum[i][half] = row_sum[i][half] * fast_exp2(row_max[i][half] - ref) + sum;
      row_max[i][half] = new_max;
    }
  }
}

// Grid: (rows_padded / 128 row tiles) x n_chunks x (B * H_kv), row tile fastest so the
// blocks sharing a key chunk run together and read it from L2.
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 2) row_stats_kernel(const ScoresParams<Element> p) {
  using Shape = TileShape<kHeadDim>;
  unsigned char* const smem = mma::dynamic_shared_memory();
  const uint32_t stationary_tile = smem_address(smem);
  const uint32_t stream_tiles = stationary_tile + Shape::kStationaryBytes;

  const int n_row_tiles = p.rows_padded / kStationaryRows;
  const int row_tile = blockIdx.x % n_row_tiles;
  const int chunk = (blockIdx.x / n_row_tiles) % p.n_chunks;
  const int bh = blockIdx.x / n_row_tiles / p.n_chunks;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int row0 = row_tile * kStationaryRows;

  // Chunks split the keys the sequence can see, [0, last + 1), not the capacity.
  const int n_tiles64 = p.rows_padded / kRowTile;
  const int2* ranges = p.tile_range + static_cast<int64_t>(b) * n_tiles64 + row0 / kRowTile;
  const int block_last = max(ranges[0].y, ranges[1].y);
  const int seq_keys = p.seq_info[b].x + 1;
  int chunk_keys = (seq_keys + p.n_chunks - 1) / p.n_chunks;
  chunk_keys = max(kMinChunkKeys, (chunk_keys + kKeyTile - 1) / kKeyTile * kKeyTile);
  const int64_t chunk_begin = static_cast<int64_t>(chunk) * chunk_keys;
  const int64_t chunk_end = min(chunk_begin + chunk_keys, static_cast<int64_t>(block_last) + 1);

  float2* partials = p.partials + (static_cast<int64_t>(bh) * p.n_chunks + chunk) * p.rows_padded + row0;
  if (chunk_end <= chunk_begin) {  // block-uniform: no row of this tile sees this chunk
    partials[tid] = make_float2(neg_inf(), 0.f);
    return;
  }
  const int key_begin = static_cast<int>(chunk_begin);
  const int n_tiles = static_cast<int>((chunk_end - chunk_begin + kKeyTile - 1) / kKeyTile);

  // Stationary operand: the tile's 128 (query, head) rows; rows past R are zero.
  const Element* q_seq = p.q + b * p.q_stride_b;
#pragma unroll
  for (int k = 0; k < kStationaryRows / kStreamRows; ++k) {
    const int local = (tid >> 1) + k * kStreamRows;
    const int r = row0 + local;
    const Element* src = nullptr;
    if (r < p.rows) {
      const int t = static_cast<int>(p.group_divisor.div(r));
      const int j = r - t * p.group;
      src = q_seq + t * p.q_stride_t + static_cast<int64_t>(h * p.group + j) * p.q_stride_h;
    }
    load_row_half<kHeadDim>(stationary_tile, local, src, p.q);
  }
  const Element* k_head = p.k_cache + b * p.k_stride_b + h * p.k_stride_h;
  auto issue_keys = [&](int tile, int stage) {
    const int key = key_begin + tile * kKeyTile + (tid >> 1);
    const Element* src = key < p.capacity ? k_head + key * p.k_stride_s : nullptr;
    load_row_half<kHeadDim>(stream_tiles + stage * Shape::kStreamBytes, tid >> 1, src, p.k_cache);
  };
  begin_stream(n_tiles, issue_keys);

  // This thread's rows: (i, half) -> warp*32 + i*16 + g + 8*half.
  const int g = lane >> 2;
  const int t4 = lane & 3;
  const int* row_pos = p.row_pos + static_cast<int64_t>(b) * p.rows_padded + row0 + warp * kWarpRows + g;
  int pos[2][2];
  int lo = 0x7fffffff, hi = -1;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      pos[i][half] = row_pos[i * 16 + half * 8];
      lo = min(lo, pos[i][half]);
      hi = max(hi, pos[i][half]);
    }
  const int warp_lo = warp_min(lo);  // lanes of equal g hold equal rows; this covers all 32
  const int warp_hi = warp_max(hi);

  float row_max[2][2], row_sum[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) row_max[i][half] = neg_inf(), row_sum[i][half] = 0.f;

  auto update_rows = [&](const StationaryFragments<kHeadDim>& a, int tile, int stage) {
    const int tile_key0 = key_begin + tile * kKeyTile;
    if (tile_key0 > warp_hi) return;  // warp-uniform: no row of this warp sees these keys
    float acc[2][8][4];
    warp_logits<Element, kHeadDim>(a, stream_tiles + stage * Shape::kStreamBytes, lane, acc);
    const int key0 = tile_key0 + 2 * t4;
    if (tile_key0 + kKeyTile - 1 > warp_lo) {
      online_softmax_update<true>(acc, p.scale_log2, key0, pos, row_max, row_sum);
    } else {
      online_softmax_update<false>(acc, p.scale_log2, key0, pos, row_max, row_sum);
    }
  };
  run_stream<kHeadDim>(stationary_tile, warp, lane, n_tiles, issue_keys, update_rows);

  // The 4 lanes of a quad hold disjoint keys of the same rows.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int offset = 1; offset < 4; offset <<= 1) {
        const float other_max = __shfl_xor_sync(0xffffffffu, row_max[i][half], offset);
        const float other_sum = __shfl_xor_sync(0xffffffffu, row_sum[i][half], offset);
        merge_softmax(row_max[i][half], row_sum[i][half], other_max, other_sum);
      }
      if (t4 == 0) {
        partials[warp * kWarpRows + i * 16 + half * 8 + g] = make_float2(row_max[i][half], row_sum[i][half]);
      }
    }
}

// ----------------------------------------------------------------------------- kernel 2

constexpr int kFinishRows = 64;
constexpr int kFinishSlices = 4;  // threads per row, each merging every 4th chunk

// Grid: (rows_padded / 64) x (B * H_kv) blocks of 256 threads.
template <typename Element>
__global__ void __launch_bounds__(kFinishRows* kFinishSlices) finish_row_stats_kernel(const ScoresParams<Element> p) {
  const int n_tiles = p.rows_padded / kFinishRows;
  const int tile = blockIdx.x % n_tiles;
  const int bh = blockIdx.x / n_tiles;
  const int b = bh / p.kv_heads;
  const int slice = threadIdx.x % kFinishSlices;
  const int r = tile * kFinishRows + threadIdx.x / kFinishSlices;

  const bool valid = p.row_pos[static_cast<int64_t>(b) * p.rows_padded + r] >= 0;
  float max_value = neg_inf(), sum = 0.f;
  if (valid) {
    const float2* partials = p.partials + static_cast<int64_t>(bh) * p.n_chunks * p.rows_padded + r;
#pragma unroll 4
    for (int c = slice; c < p.n_chunks; c += kFinishSlices) {
      const float2 part = partials[static_cast<int64_t>(c) * p.rows_padded];
      merge_softmax(max_value, sum, part.x, part.y);
    }
  }
#pragma unroll
  for (int offset = 1; offset < kFinishSlices; offset <<= 1) {
    const float other_max = __shfl_xor_sync(0xffffffffu, max_value, offset);
    const float other_sum = __shfl_xor_sync(0xffffffffu, sum, offset);
    merge_softmax(max_value, sum, other_max, other_sum);
  }
  if (slice == 0) {
    // +inf: exp2(x - lse2) = 0 for padding rows (pass 3 masks them anyway).
    const float lse2 = valid && sum > 0.f ? max_value + log2f(sum) : pos_inf();
    p.lse[static_cast<int64_t>(bh) * p.rows_padded + r] = lse2;
  }
}

// ----------------------------------------------------------------------------- kernel 3

// One streamed row tile's contribution to this thread's 4 key columns (m tile i, half);
// its rows are n*8 + 2t + e of the tile. kMasked: rows whose position is before the key drop out.
template <bool kMasked>
__device__ __forceinline__ void accumulate_columns(const float (&acc)[2][8][4], float scale_log2, const float* tile_lse,
                                                   const int* tile_pos, int key0, int t4, float (&column)[2][2]) {
  float2 lse[8];
  int2 pos[8];
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    lse[n] = reinterpret_cast<const float2*>(tile_lse)[n * 4 + t4];
    if (kMasked) pos[n] = reinterpret_cast<const int2*>(tile_pos)[n * 4 + t4];
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = key0 + i * 16 + half * 8;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const float p0 = fast_exp2(fmaf(acc[i][n][2 * half], scale_log2, -lse[n].x));
        const float p1 = fast_exp2(fmaf(acc[i][n][2 * half + 1], scale_log2, -lse[n].y));
        if (kMasked) {
          sum += key <= pos[n].x ? p0 : 0.f;
          sum += key <= pos[n].y ? p1 : 0.f;
        } else {
          sum += p0 + p1;
        }
      }
      column[i][half] += sum;
    }
  }
}

// Grid: ceil(S / 128) key blocks x (B * H_kv), key block fastest so concurrent blocks
// share (b, h)'s query rows in L2.
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 2) column_scores_kernel(const ScoresParams<Element> p) {
  using Shape = TileShape<kHeadDim>;
  unsigned char* const smem = mma::dynamic_shared_memory();
  const uint32_t stationary_tile = smem_address(smem);
  const uint32_t stream_tiles = stationary_tile + Shape::kStationaryBytes;
  unsigned char* meta = smem + Shape::kStationaryBytes + kStages * Shape::kStreamBytes;
  const uint32_t meta_tiles = smem_address(meta);

  const int n_key_blocks = (p.capacity + kStationaryRows - 1) / kStationaryRows;
  const int key_block = blockIdx.x % n_key_blocks;
  const int bh = blockIdx.x / n_key_blocks;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int key_block0 = key_block * kStationaryRows;

  float* out = p.out + static_cast<int64_t>(bh) * p.capacity;
  const int2 info = p.seq_info[b];  // (last visible key, valid queries)
  if (key_block0 > info.x) {        // block-uniform: nobody sees these keys
    const int key = key_block0 + tid;
    if (key < p.capacity) out[key] = 0.f;
    return;
  }

  // Stationary operand: the block's 128 keys; keys past S are zero.
  const Element* k_head = p.k_cache + b * p.k_stride_b + h * p.k_stride_h;
#pragma unroll
  for (int k = 0; k < kStationaryRows / kStreamRows; ++k) {
    const int local = (tid >> 1) + k * kStreamRows;
    const int key = key_block0 + local;
    const Element* src = key < p.capacity ? k_head + key * p.k_stride_s : nullptr;
    load_row_half<kHeadDim>(stationary_tile, local, src, p.k_cache);
  }

  const int n_tiles = (p.rows + kStreamRows - 1) / kStreamRows;
  const Element* q_seq = p.q + b * p.q_stride_b;
  const float* lse_rows = p.lse + static_cast<int64_t>(bh) * p.rows_padded;
  const int* pos_rows = p.row_pos + static_cast<int64_t>(b) * p.rows_padded;
  const int2* ranges = p.tile_range + static_cast<int64_t>(b) * (p.rows_padded / kRowTile);
  auto issue_rows = [&](int tile, int stage) {
    const int r = tile * kStreamRows + (tid >> 1);
    const Element* src = nullptr;
    if (r < p.rows) {
      const int t = static_cast<int>(p.group_divisor.div(r));
      const int j = r - t * p.group;
      src = q_seq + t * p.q_stride_t + static_cast<int64_t>(h * p.group + j) * p.q_stride_h;
    }
    load_row_half<kHeadDim>(stream_tiles + stage * Shape::kStreamBytes, tid >> 1, src, p.q);
    const uint32_t stage_meta = meta_tiles + stage * kMetaBytes;
    const int row0 = tile * kStreamRows;
    if (tid < 16) {
      cp_async_16(stage_meta + kMetaLseOffset + tid * 16, lse_rows + row0 + tid * 4, true);
    } else if (tid < 32) {
      cp_async_16(stage_meta + kMetaPosOffset + (tid - 16) * 16, pos_rows + row0 + (tid - 16) * 4, true);
    } else if (tid == 32) {
      cp_async_8(stage_meta + kMetaRangeOffset, ranges + tile);
    }
  };
  begin_stream(n_tiles, issue_rows);

  const int g = lane >> 2;
  const int t4 = lane & 3;
  const int warp_key0 = key_block0 + warp * kWarpRows;
  float column[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

  auto accumulate = [&](const StationaryFragments<kHeadDim>& a, int tile, int stage) {
    const unsigned char* stage_meta = meta + stage * kMetaBytes;
    const int2 range = *reinterpret_cast<const int2*>(stage_meta + kMetaRangeOffset);
    if (warp_key0 > range.y) return;  // warp-uniform: no row of the tile sees these keys
    float acc[2][8][4];
    warp_logits<Element, kHeadDim>(a, stream_tiles + stage * Shape::kStreamBytes, lane, acc);
    const float* tile_lse = reinterpret_cast<const float*>(stage_meta + kMetaLseOffset);
    const int* tile_pos = reinterpret_cast<const int*>(stage_meta + kMetaPosOffset);
    if (warp_key0 + kWarpRows - 1 > range.x) {
      accumulate_columns<true>(acc, p.scale_log2, tile_lse, tile_pos, warp_key0 + g, t4, column);
    } else {
      accumulate_columns<false>(acc, p.scale_log2, tile_lse, tile_pos, warp_key0 + g, t4, column);
    }
  };
  run_stream<kHeadDim>(stationary_tile, warp, lane, n_tiles, issue_rows, accumulate);

  // The 4 lanes of a quad hold disjoint rows of the same keys; the fixed shuffle order
  // keeps the result deterministic.
  const float norm = 1.f / (static_cast<float>(info.y) * static_cast<float>(p.group));
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float sum = column[i][half];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int key = warp_key0 + i * 16 + half * 8 + g;
      if (t4 == 0 && key < p.capacity) out[key] = sum * norm;
    }
}

}  // namespace scores_detail

// ----------------------------------------------------------------------------- host API

// Sizes of one call (int: the glue checks the ranges).
struct AttentionScoresShape {
  int batch;     // B
  int kv_heads;  // H_kv
  int group;     // G = H_q / H_kv
  int q_len;     // T
  int capacity;  // S
};

// Grid split and workspace layout; a pure function of the shape and the SM count.
struct AttentionScoresPlan {
  int rows = 0;          // T * G
  int rows_padded = 0;   // multiple of 128
  int n_chunks = 1;      // pass 1 key chunks per (b, h)
  size_t row_pos_offset = 0, tile_range_offset = 0, seq_info_offset = 0, partials_offset = 0, lse_offset = 0;
  size_t workspace_bytes = 0;
};

inline AttentionScoresPlan plan_attention_scores(const AttentionScoresShape& shape, int sm_count) {
  using namespace scores_detail;
  AttentionScoresPlan plan;
  plan.rows = shape.q_len * shape.group;
  plan.rows_padded = (plan.rows + kRowPadding - 1) / kRowPadding * kRowPadding;
  const int64_t bh = static_cast<int64_t>(shape.batch) * shape.kv_heads;
  // Pass 1 aims at about 4 waves of equal blocks (2 resident per SM): enough to even out
  // the unequal tiles, and rounded down so that the last wave is nearly full.
  const int64_t blocks_per_chunk = static_cast<int64_t>(plan.rows_padded / kStationaryRows) * bh;
  const int64_t target_blocks = 8 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  int64_t chunks = target_blocks / blocks_per_chunk;
  const int64_t max_chunks = (static_cast<int64_t>(shape.capacity) + kMinChunkKeys - 1) / kMinChunkKeys;
  chunks = chunks < 1 ? 1 : chunks > max_chunks ? max_chunks : chunks;
  plan.n_chunks = static_cast<int>(chunks < 1 ? 1 : chunks);

  auto carve = [&](size_t bytes) {
    const size_t offset = plan.workspace_bytes;
    plan.workspace_bytes += (bytes + 255) / 256 * 256;
    return offset;
  };
  const size_t rows_total = static_cast<size_t>(shape.batch) * plan.rows_padded;
  plan.row_pos_offset = carve(rows_total * sizeof(int));
  plan.tile_range_offset = carve(rows_total / kRowTile * sizeof(int2));
  plan.seq_info_offset = carve(static_cast<size_t>(shape.batch) * sizeof(int2));
  plan.partials_offset = carve(static_cast<size_t>(bh) * plan.n_chunks * plan.rows_padded * sizeof(float2));
  plan.lse_offset = carve(static_cast<size_t>(bh) * plan.rows_padded * sizeof(float));
  return plan;
}

// Inputs of one call. Strides are in elements.
template <typename Element>
struct AttentionScoresArgs {
  const Element* q;        // [B, T, H_q, D]: rows 16-byte aligned (strides of dims 0-2 multiples of 8)
  const Element* k_cache;  // [B, H_kv, S, D]: same alignment
  const int32_t* q_pos;    // [B, T]
  float* out;              // [B, H_kv, S], contiguous; every element is written
  int64_t q_stride_b, q_stride_t, q_stride_h;
  int64_t k_stride_b, k_stride_h, k_stride_s;
  int64_t pos_stride_b, pos_stride_t;
  float scale;
};

// Computes
//
//     out[b, h, s] = mean over valid t (q_pos[b, t] >= 0) and j in [0, G) of
//                    softmax_{s' <= q_pos[b, t]}(scale * q[b, t, h*G + j] . k_cache[b, h, s'])[s]
//
// (0 where s > q_pos[b, t]; a row of out is 0 where no valid query sees the key, and all
// 0 without valid queries). q_pos values >= S are clamped to S - 1, values < 0 are padding.
//
// Parameters
// ----------
// shape     : B, H_kv, G, T, S with B * H_kv, T * G >= 1 and S >= 1
// plan      : plan_attention_scores(shape, SM count of the device)
// args      : pointers and strides; Element is __nv_bfloat16 or __half, kHeadDim 64 or 128
// workspace : plan.workspace_bytes bytes of device memory, 256-byte aligned, any contents
// stream    : every launch goes there; nothing synchronizes with the host
//
// Returns the first launch error (cudaSuccess otherwise).
template <typename Element, int kHeadDim>
cudaError_t launch_attention_scores(const AttentionScoresShape& shape, const AttentionScoresPlan& plan,
                                    const AttentionScoresArgs<Element>& args, void* workspace, cudaStream_t stream) {
  using namespace scores_detail;
  using Shape = TileShape<kHeadDim>;
  ScoresParams<Element> p{};
  p.q = args.q;
  p.k_cache = args.k_cache;
  p.q_pos = args.q_pos;
  p.out = args.out;
  p.q_stride_b = args.q_stride_b;
  p.q_stride_t = args.q_stride_t;
  p.q_stride_h = args.q_stride_h;
  p.k_stride_b = args.k_stride_b;
  p.k_stride_h = args.k_stride_h;
  p.k_stride_s = args.k_stride_s;
  p.pos_stride_b = args.pos_stride_b;
  p.pos_stride_t = args.pos_stride_t;
  p.batch = shape.batch;
  p.kv_heads = shape.kv_heads;
  p.group = shape.group;
  p.q_len = shape.q_len;
  p.capacity = shape.capacity;
  p.rows = plan.rows;
  p.rows_padded = plan.rows_padded;
  p.n_chunks = plan.n_chunks;
  p.scale_log2 = args.scale * 1.4426950408889634f;
  p.group_divisor = FastDivisor(static_cast<uint32_t>(shape.group));
  char* base = static_cast<char*>(workspace);
  p.row_pos = reinterpret_cast<int*>(base + plan.row_pos_offset);
  p.tile_range = reinterpret_cast<int2*>(base + plan.tile_range_offset);
  p.seq_info = reinterpret_cast<int2*>(base + plan.seq_info_offset);
  p.partials = reinterpret_cast<float2*>(base + plan.partials_offset);
  p.lse = reinterpret_cast<float*>(base + plan.lse_offset);

  const int64_t bh = static_cast<int64_t>(shape.batch) * shape.kv_heads;
  cudaError_t err;

  const int64_t setup_blocks = static_cast<int64_t>(shape.batch) * (plan.rows_padded / kRowTile);
  launch_kernel(setup_rows_kernel<Element>, static_cast<unsigned>(setup_blocks), kRowTile, 0, stream, p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  constexpr auto row_stats = row_stats_kernel<Element, kHeadDim>;
  const int64_t row_stats_blocks = static_cast<int64_t>(plan.rows_padded / kStationaryRows) * plan.n_chunks * bh;
  err = launch_with_dynamic_smem<row_stats, Shape::kRowStatsSmem>([&] {
    launch_kernel(row_stats, static_cast<unsigned>(row_stats_blocks), kThreads, Shape::kRowStatsSmem, stream, p);
  });
  if (err != cudaSuccess) return err;

  const int64_t finish_blocks = static_cast<int64_t>(plan.rows_padded / kFinishRows) * bh;
  launch_kernel(finish_row_stats_kernel<Element>, static_cast<unsigned>(finish_blocks), kFinishRows * kFinishSlices, 0,
                stream, p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  constexpr auto column_scores = column_scores_kernel<Element, kHeadDim>;
  const int64_t key_blocks = (static_cast<int64_t>(shape.capacity) + kStationaryRows - 1) / kStationaryRows;
  return launch_with_dynamic_smem<column_scores, Shape::kColumnScoresSmem>([&] {
    launch_kernel(column_scores, static_cast<unsigned>(key_blocks * bh), kThreads, Shape::kColumnScoresSmem, stream, p);
  });
}

}  // namespace std_ext::kernels
