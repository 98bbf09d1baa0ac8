// Split-KV decode attention on tensor cores: the CUDA kernels behind
// torch.ops.std.dense_attention (Qn = 1 decoding, Qn = γ+1 verification) and
// torch.ops.std.sparse_attention (the draft step over a keep set). Torch-free; the glue
// in csrc/cuda/{dense,sparse}_attention_kernel.cu checks arguments and calls the
// launchers at the bottom of this file.
//
// One position list per (sequence b, KV head h):
//   entries [0, N)      indices[b, h, :]   (sparse only; valid iff 0 <= index < tail_start,
//                                           visible to every query of the call)
//   entries [N, L)      tail_start, tail_start + 1, ..., kv_len - 1   (visible to query i
//                                           iff position <= its own position kv_len - Qn + i)
// Dense attention is the same list with N = 0 and tail_start = 0.
//
// The list is cut into `num_splits` splits of `split_len` entries (the last split also
// takes whatever lies past num_splits * split_len). Grid = (split, KV head x row group,
// sequence). A block stages the Qn x G query rows of its KV head (up to 16 per warp,
// query-major: row r is query r / G, head r % G) and streams its split's K/V rows through
// shared memory in 64-entry tiles with a multi-stage cp.async pipeline, so each K/V row is
// read once for all the rows of the group. Warp w owns rows 16w..16w+15 and runs an online
// softmax over every tile with mma.sync for Q.K^T and P.V. A block writes either the final
// output (one split) or a normalized partial output and its log2-sum-exp; a second kernel
// merges the partials in split order.
//
// Row invariance. The arithmetic of one query row depends only on its own query, its own
// position and the list, never on Qn or on the other rows: mma computes each output row
// from that row alone, softmax statistics are per row, split and tile boundaries are fixed
// positions in the list chosen from (N, capacity, batch, KV heads, SM count) — none of
// which depends on Qn or kv_len — and a tile or split a row cannot see leaves its state
// exactly unchanged (scale by exp2(0) = 1, add exact zeros; an empty split is skipped by
// the merge). So row i of a Qn = γ+1 call is bit-identical to a Qn = 1 call at the same
// position, which is what makes verification agree exactly with plain decoding.
//
// Unchecked integer inputs (DESIGN.md §3) are made safe here: kv_len is clamped to
// [0, capacity], tail_start to [0, kv_len], and an index outside [0, tail_start) is skipped.
#pragma once

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
  int num_splits, split_len;
  float scale_log2;  // scale * log2(e): softmax runs on exp2
};

// How a list is cut: split_len entries per split (a multiple of the tile), num_splits >= 1.
struct DecodeSplitPlan {
  int num_splits;
  int split_len;
};

namespace decode_detail {

constexpr int kTileKeys = 64;  // list entries per pipeline stage
constexpr int kRowsPerWarp = 16;

constexpr int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

template <int kHeadDim>
constexpr int stages() {
  return kHeadDim >= 128 ? 3 : 4;
}

template <typename T, int kHeadDim>
constexpr int smem_bytes() {
  return stages<kHeadDim>() * (2 * kTileKeys * kHeadDim * static_cast<int>(sizeof(T)) + kTileKeys * 4);
}

// Rows of the tile are kHeadDim / 8 chunks of 16 bytes; chunk c of row r is stored at
// chunk c ^ (r % 8) so the 8 rows an ldmatrix reads at one logical chunk hit 8 different
// bank groups.
template <int kHeadDim>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

template <typename T, int kHeadDim, int kWarps, bool kSparse>
__global__ void __launch_bounds__(kWarps * 32)
    decode_attention_kernel(const DecodeAttentionParams p) {
  using E = mma::Element<T>;
  constexpr int kThreads = kWarps * 32;
  constexpr int kStages = stages<kHeadDim>();
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kRowStep = kThreads / kChunksPerRow;          // tile rows one pass of the block covers
  constexpr int kRowsPerThread = kTileKeys / kRowStep;        // tile rows each thread copies
  constexpr int kTileElems = kTileKeys * kHeadDim;
  constexpr int kBlockRows = kWarps * kRowsPerWarp;
  static_assert(kThreads % kChunksPerRow == 0 && kTileKeys % kRowStep == 0, "tile copy mapping");
  static_assert(kBlockRows * kHeadDim <= 2 * kTileElems, "the query tile is staged in pipeline stage 0");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const kv_smem = reinterpret_cast<T*>(smem_raw);  // stage s: K at 2s * kTileElems, V after it
  int* const vis_smem = reinterpret_cast<int*>(smem_raw + kStages * 2 * kTileElems * sizeof(T));

  const int split = blockIdx.x;
  const int row_groups = gridDim.y / p.kv_heads;
  const int h = blockIdx.y / row_groups;
  const int row_group = blockIdx.y % row_groups;
  const int b = blockIdx.z;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  const int rows_total = p.q_len * p.group;
  const int row_base = row_group * kBlockRows;

  // This sequence's list, with unchecked values made safe.
  const int kv_len = min(max(p.kv_len[b], 0), p.capacity);
  const int tail_start = kSparse ? min(max(p.tail_start[b], 0), kv_len) : 0;
  const int num_indices = kSparse ? p.num_indices : 0;
  const int list_len = num_indices + (kv_len - tail_start);
  const int begin = split * p.split_len;
  const int end = split == p.num_splits - 1 ? list_len : min(begin + p.split_len, list_len);
  const int num_tiles = end > begin ? ceil_div(end - begin, kTileKeys) : 0;

  const T* const k_head = static_cast<const T*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const T* const v_head = static_cast<const T*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
  const int32_t* const index_row =
      kSparse ? p.indices + b * p.indices_stride_b + h * p.indices_stride_h : nullptr;

  // ---- stage the block's query rows (zeros past the last row) and load this warp's A fragments
  {
    T* q_smem = kv_smem;
    const T* q_base = static_cast<const T*>(p.q) + b * p.q_stride_b;
    for (int c = tid; c < kBlockRows * kChunksPerRow; c += kThreads) {
      const int r = c / kChunksPerRow;
      const int chunk = c % kChunksPerRow;
      const int row = row_base + r;
      T* dst = q_smem + swizzled<kHeadDim>(r, chunk);
      if (row < rows_total) {
        const int i = row / p.group;
        const int head = h * p.group + row % p.group;
        const T* src = q_base + i * p.q_stride_i + head * p.q_stride_h + chunk * 8;
        if (p.q_aligned16) {
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) dst[e] = src[e];
        }
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      }
    }
  }
  __syncthreads();

  const int warp_row0 = warp * kRowsPerWarp;
  const bool warp_active = row_base + warp_row0 < rows_total;
  uint32_t q_frag[kHeadDim / 16][4];
  if (warp_active) {
    const int m = lane / 8;
    const int r = warp_row0 + (m % 2) * 8 + lane % 8;
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      mma::ldmatrix_x4(q_frag[ks], kv_smem + swizzled<kHeadDim>(r, ks * 2 + m / 2));
    }
  }
  __syncthreads();  // stage 0 is about to receive K/V

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

  // ---- pipeline: the thread copies chunk `copy_chunk` of tile rows copy_row0 + j * kRowStep
  const int copy_chunk = tid % kChunksPerRow;
  const int copy_row0 = tid / kChunksPerRow;
  int prefetched_index[kRowsPerThread];  // raw indices of the next tile to issue (sparse)

  auto prefetch_indices = [&](int tile) {
    if constexpr (kSparse) {
#pragma unroll
      for (int j = 0; j < kRowsPerThread; ++j) {
        const int e = begin + tile * kTileKeys + copy_row0 + j * kRowStep;
        prefetched_index[j] = (tile < num_tiles && e < end && e < num_indices) ? index_row[e] : -1;
      }
    }
  };

  auto issue_tile = [&](int tile) {
    const int stage = tile % kStages;
    T* k_dst = kv_smem + 2 * stage * kTileElems;
    T* v_dst = k_dst + kTileElems;
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int r = copy_row0 + j * kRowStep;
      const int e = begin + tile * kTileKeys + r;
      int position = -1;
      int visible_from = INT_MAX;  // smallest query position that sees this entry
      if (e < end) {
        if (kSparse && e < num_indices) {
          const int index = prefetched_index[j];
          if (index >= 0 && index < tail_start) {
            position = index;
            visible_from = 0;
          }
        } else {
          position = tail_start + (e - num_indices);
          visible_from = position;
        }
      }
      const bool valid = position >= 0;
      const int64_t row_offset = valid ? position : 0;
      mma::cp_async_16(k_dst + swizzled<kHeadDim>(r, copy_chunk), k_head + row_offset * p.k_stride_s + copy_chunk * 8,
                       valid);
      mma::cp_async_16(v_dst + swizzled<kHeadDim>(r, copy_chunk), v_head + row_offset * p.v_stride_s + copy_chunk * 8,
                       valid);
      if (copy_chunk == 0) vis_smem[stage * kTileKeys + r] = visible_from;
    }
  };

  float acc[kHeadDim / 8][4];
#pragma unroll
  for (int n = 0; n < kHeadDim / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain, shared by the 4 lanes of a row
  float row_sum[2] = {0.f, 0.f};              // this lane's part of the row's sum

  prefetch_indices(0);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) issue_tile(s);
    prefetch_indices(s + 1);
    mma::cp_async_commit();
  }

  for (int tile = 0; tile < num_tiles; ++tile) {
    if (tile + kStages - 1 < num_tiles) issue_tile(tile + kStages - 1);
    prefetch_indices(tile + kStages);
    mma::cp_async_commit();
    mma::cp_async_wait<kStages - 1>();
    __syncthreads();

    if (warp_active) {
      const int stage = tile % kStages;
      const T* k_tile = kv_smem + 2 * stage * kTileElems;
      const T* v_tile = k_tile + kTileElems;
      const int* vis = vis_smem + stage * kTileKeys;

      // logits[n][.]: keys 8n + 2t4 (+1), rows g (c0, c1) and g + 8 (c2, c3)
      float logits[kTileKeys / 8][4];
#pragma unroll
      for (int n = 0; n < kTileKeys / 8; ++n) logits[n][0] = logits[n][1] = logits[n][2] = logits[n][3] = 0.f;
      {
        const int m = lane / 8;
#pragma unroll
        for (int ks = 0; ks < kHeadDim / 16; ++ks) {
#pragma unroll
          for (int np = 0; np < kTileKeys / 16; ++np) {
            uint32_t kb[4];
            const int key = np * 16 + (m / 2) * 8 + lane % 8;
            mma::ldmatrix_x4(kb, k_tile + swizzled<kHeadDim>(key, ks * 2 + m % 2));
            E::mma(logits[2 * np], q_frag[ks], kb[0], kb[1]);
            E::mma(logits[2 * np + 1], q_frag[ks], kb[2], kb[3]);
          }
        }
      }

      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < kTileKeys / 8; ++n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int half = c / 2;
          const bool visible = vis[n * 8 + 2 * t4 + (c & 1)] <= row_pos[half];
          logits[n][c] = visible ? logits[n][c] * p.scale_log2 : -INFINITY;
          tile_max[half] = fmaxf(tile_max[half], logits[n][c]);
        }
      }
      float alpha[2], shift[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 1));
        tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 2));
        const float new_max = fmaxf(row_max[half], tile_max[half]);
        // A row that has seen nothing yet keeps max -inf; shifting by 0 then avoids
        // exp2(-inf - -inf) = NaN and still gives exp2(-inf) = 0 for its masked logits.
        shift[half] = new_max == -INFINITY ? 0.f : new_max;
        alpha[half] = exp2f(row_max[half] - shift[half]);
        row_max[half] = new_max;
      }
      float tile_sum[2] = {0.f, 0.f};
#pragma unroll
      for (int n = 0; n < kTileKeys / 8; ++n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          logits[n][c] = exp2f(logits[n][c] - shift[c / 2]);
          tile_sum[c / 2] += logits[n][c];
        }
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) row_sum[half] = row_sum[half] * alpha[half] + tile_sum[half];
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n) {
        acc[n][0] *= alpha[0];
        acc[n][1] *= alpha[0];
        acc[n][2] *= alpha[1];
        acc[n][3] *= alpha[1];
      }

      // P.V: the probabilities' accumulator layout is already mma's A layout.
      const int m = lane / 8;
#pragma unroll
      for (int kk = 0; kk < kTileKeys / 16; ++kk) {
        const uint32_t pa[4] = {E::pack(logits[2 * kk][0], logits[2 * kk][1]),
                                E::pack(logits[2 * kk][2], logits[2 * kk][3]),
                                E::pack(logits[2 * kk + 1][0], logits[2 * kk + 1][1]),
                                E::pack(logits[2 * kk + 1][2], logits[2 * kk + 1][3])};
        const int key = kk * 16 + (m % 2) * 8 + lane % 8;
#pragma unroll
        for (int dp = 0; dp < kHeadDim / 16; ++dp) {
          uint32_t vb[4];
          mma::ldmatrix_x4_trans(vb, v_tile + swizzled<kHeadDim>(key, dp * 2 + m / 2));
          E::mma(acc[2 * dp], pa, vb[0], vb[1]);
          E::mma(acc[2 * dp + 1], pa, vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // the next iteration refills this stage
  }
  mma::cp_async_wait<0>();  // no copy may outlive the block (they are all empty by now)

  if (!warp_active) return;

  // ---- epilogue: full row sums, then the output (one split) or the split's partial
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 1);
    row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 2);
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_base + warp_row0 + g + 8 * half;
    if (row >= rows_total) continue;
    const int i = row / p.group;
    const int head = h * p.group + row % p.group;
    const int64_t out_row = (static_cast<int64_t>(b) * p.q_len + i) * p.q_heads + head;
    const float inv_sum = row_sum[half] > 0.f ? 1.f / row_sum[half] : 0.f;
    if (p.num_splits == 1) {
      T* dst = static_cast<T*>(p.out) + out_row * kHeadDim;
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n) {
        *reinterpret_cast<uint32_t*>(dst + n * 8 + 2 * t4) =
            E::pack(acc[n][2 * half] * inv_sum, acc[n][2 * half + 1] * inv_sum);
      }
    } else {
      const int64_t partial_row = out_row * p.num_splits + split;
      float* dst = p.partial_out + partial_row * kHeadDim;
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n) {
        *reinterpret_cast<float2*>(dst + n * 8 + 2 * t4) =
            make_float2(acc[n][2 * half] * inv_sum, acc[n][2 * half + 1] * inv_sum);
      }
      if (t4 == 0) {
        p.partial_lse[partial_row] = row_sum[half] > 0.f ? row_max[half] + log2f(row_sum[half]) : -INFINITY;
      }
    }
  }
}

// One warp per output row: out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), splits in
// order; splits the row never saw (lse = -inf) are skipped, a row that saw nothing is 0.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(128) merge_splits_kernel(const float* __restrict__ partial_out,
                                                            const float* __restrict__ partial_lse, T* __restrict__ out,
                                                            int64_t num_rows, int num_splits) {
  using E = mma::Element<T>;
  constexpr int kPerLane = kHeadDim / 32;  // 2 or 4 contiguous elements
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched as a dependent grid, this kernel's blocks start while the attention kernel
  // drains; they wait here until its writes are complete and visible. A no-op otherwise.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  if (row >= num_rows) return;
  const int lane = threadIdx.x % 32;
  const float* lse = partial_lse + row * num_splits;
  float max_lse = -INFINITY;
  for (int s = 0; s < num_splits; ++s) max_lse = fmaxf(max_lse, lse[s]);
  float total[kPerLane] = {};
  float weight_sum = 0.f;
  if (max_lse != -INFINITY) {
    for (int s = 0; s < num_splits; ++s) {
      if (lse[s] == -INFINITY) continue;
      const float w = exp2f(lse[s] - max_lse);
      weight_sum += w;
      const float* o = partial_out + (row * num_splits + s) * kHeadDim + lane * kPerLane;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) total[e] += w * o[e];
    }
  }
  const float inv = weight_sum > 0.f ? 1.f / weight_sum : 0.f;
  T* dst = out + row * kHeadDim + lane * kPerLane;
#pragma unroll
  for (int e = 0; e < kPerLane; e += 2) {
    *reinterpret_cast<uint32_t*>(dst + e) = E::pack(total[e] * inv, total[e + 1] * inv);
  }
}

// Whether the merge kernel's code on the current device was compiled for sm_90+ (PTX
// >= 9.0), i.e. contains the griddepcontrol.wait that makes a dependent launch safe (sm_80
// code JIT-run on a Hopper GPU does not). Asked once per device.
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

template <typename T, int kHeadDim, int kWarps, bool kSparse>
cudaError_t launch_decode_attention_variant(const DecodeAttentionParams& p, int row_groups, cudaStream_t stream) {
  constexpr auto kernel = decode_attention_kernel<T, kHeadDim, kWarps, kSparse>;
  constexpr int kSmem = smem_bytes<T, kHeadDim>();
  cudaError_t err = mma::allow_dynamic_smem<kernel, kSmem>();
  if (err != cudaSuccess) return err;
  const dim3 grid(p.num_splits, p.kv_heads * row_groups, p.batch);
  kernel<<<grid, kWarps * 32, kSmem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.q_len * p.q_heads;
  // The merge is tiny and latency-bound; on sm_90 its launch overlaps the attention
  // kernel's tail (programmatic dependent launch) instead of waiting for it to finish.
  // Only where the merge kernel was compiled for sm_90+ (PTX >= 9.0), i.e. contains the
  // griddepcontrol.wait that makes this safe: sm_80 code JIT-run on a Hopper GPU does not.
  const bool merge_waits_on_grid = merge_compiled_for_sm90<T, kHeadDim>();
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>((rows + 3) / 4));
  config.blockDim = dim3(128);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute dependent_launch[1];
  dependent_launch[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent_launch[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = dependent_launch;
  config.numAttrs = merge_waits_on_grid ? 1 : 0;
  return cudaLaunchKernelEx(&config, merge_splits_kernel<T, kHeadDim>, static_cast<const float*>(p.partial_out),
                            static_cast<const float*>(p.partial_lse), static_cast<T*>(p.out), rows, p.num_splits);
}

// Blocks the launch aims for: one per SM. A block keeps kStages x 32 KB of K/V in flight,
// more than an SM needs to saturate its share of HBM, and fewer splits keep the partials
// (written and read once more by the merge) small next to the K/V bytes.
inline int target_splits(int batch, int kv_heads, int sm_count) {
  const long long heads = static_cast<long long>(batch) * kv_heads;
  return heads <= 0 ? 1 : ceil_div(sm_count > 0 ? sm_count : 1, heads);
}

}  // namespace decode_detail

// Split plan of dense_attention: a function of the cache capacity, never of kv_len or Qn,
// so every call on the same cache cuts a row's keys at the same positions.
inline DecodeSplitPlan plan_dense_splits(int capacity, int batch, int kv_heads, int sm_count) {
  using namespace decode_detail;
  constexpr int kMinSplit = 2 * kTileKeys;  // short contexts: more blocks beat deeper pipelines
  const int wanted = target_splits(batch, kv_heads, sm_count);
  int split_len = ceil_div(ceil_div(capacity > 0 ? capacity : 1, wanted), kTileKeys) * kTileKeys;
  if (split_len < kMinSplit) split_len = kMinSplit;
  const int num_splits = ceil_div(capacity > 0 ? capacity : 1, split_len);
  return {num_splits < 1 ? 1 : num_splits, split_len};
}

// Split plan of sparse_attention: a function of the keep-set width N; the tail (positions
// tail_start .. kv_len - 1, usually the generated tokens) goes to the last split.
inline DecodeSplitPlan plan_sparse_splits(int num_indices, int batch, int kv_heads, int sm_count) {
  using namespace decode_detail;
  constexpr int kMinSplit = kTileKeys;  // keep sets are short: latency, not bandwidth
  const int wanted = target_splits(batch, kv_heads, sm_count);
  int split_len = ceil_div(ceil_div(num_indices > 0 ? num_indices : 1, wanted), kTileKeys) * kTileKeys;
  if (split_len < kMinSplit) split_len = kMinSplit;
  const int num_splits = ceil_div(num_indices, split_len);
  return {num_splits < 1 ? 1 : num_splits, split_len};
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
// Up to 64 rows (Qn x G) run on 4 warps, up to 128 on 8; beyond that further row groups
// serve the rest and read the K/V rows again.
template <typename T, int kHeadDim, bool kSparse>
cudaError_t launch_decode_attention(const DecodeAttentionParams& p, cudaStream_t stream) {
  using namespace decode_detail;
  const int rows = p.q_len * p.group;
  if (p.batch == 0 || rows == 0) return cudaSuccess;
  if (rows <= 4 * kRowsPerWarp) {
    return launch_decode_attention_variant<T, kHeadDim, 4, kSparse>(p, 1, stream);
  }
  return launch_decode_attention_variant<T, kHeadDim, 8, kSparse>(p, ceil_div(rows, 8 * kRowsPerWarp), stream);
}

}  // namespace std_ext::kernels
