// CUDA kernel of torch.ops.std.topk_indices: per (sequence, head) row, the positions of
// the k best candidate scores, ascending, -1 padded. Torch-free: raw pointers, sizes,
// strides and a stream; the glue is csrc/cuda/topk_indices_kernel.cu.
//
// The answer must equal the CPU kernel's bit for bit, so "best" is the CPU kernel's total
// order: higher score first, NaN below every number, equal scores (-0.0 == +0.0, NaN ==
// NaN) to the lower position. The selected set is therefore unique, and it is found as:
//
//   1. Radix selection of the k-th best key. Each score maps to a 32-bit key whose
//      unsigned order is the score order (order_key). Three passes over 11/11/10-bit
//      digits, high bits first, each build a 2048-bin histogram of the keys that match the
//      digits chosen so far and pick the digit holding the k-th best. The first pass, where
//      softmax scores' few exponents send most keys to a few bins, aggregates its shared-
//      memory atomics per warp and bin. A row stops early
//      once the chosen bin holds exactly as many keys as are still needed (they are all
//      taken, no tie to break), or at once when it has at most k candidates (all taken).
//   2. Ordered compaction. The survivors are every key above the chosen prefix plus the
//      first `need` keys equal to it in position order (exactly the CPU's ties -> lower
//      position). Scanning the row in position order with a block-wide prefix sum gives
//      each survivor its output slot directly, already ascending: no sort.
//
// Two launch shapes (plan_topk_indices picks one):
//   * One block per row, everything in one launch, for many rows or short rows: the
//     rows alone fill the GPU, and the block re-reads its row per pass from L1/L2.
//   * Several blocks per row for few long rows (e.g. 112 rows x 128K on 132 SMs, or 4
//     rows x 256K): each block owns a contiguous slice of the row. One launch per digit
//     pass: blocks add their shared-memory histogram into a per-row global one, and the
//     last block of the row to arrive (an atomic ticket; no block ever waits for another,
//     so no co-residency assumption and no deadlock) picks the digit and stores the row's
//     state for the next launch. Then a counting launch (survivors above / equal per
//     slice) and a writing launch (each slice's output offset = the counts of the slices
//     before it, then the same ordered compaction). Kernel boundaries order the passes,
//     so nothing synchronizes with the host and the whole sequence is graph-capturable.
#pragma once

#include "kernels/launch.cuh"

#include <cuda_runtime.h>

#include <cstdint>

namespace std_ext::kernels {
namespace topk_detail {

constexpr int kRadixBits = 11;
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int kPasses = 3;  // 11 + 11 + 10 bits
__host__ __device__ constexpr int pass_shift(int pass) { return pass == 0 ? 21 : pass == 1 ? 10 : 0; }
__host__ __device__ constexpr uint32_t pass_digit_mask(int pass) { return pass == 2 ? 0x3FFu : 0x7FFu; }

// Block sizes. Rows up to kShortRowLength use small blocks so that many short rows pack
// an SM; the multi-block path uses 512 threads so four blocks fit an SM.
constexpr int kShortRowThreads = 256;
constexpr int kLongRowThreads = 1024;
constexpr int kSliceThreads = 512;
constexpr int64_t kShortRowLength = 4096;
// Loads each thread keeps in flight while building a histogram; memory latency is what
// bounds these kernels.
constexpr int kHistogramUnroll = 8;
// Consecutive positions per thread in the compaction: per-thread runs keep the scan in
// position order. kThreads * kCompactItems < 65536 lets one scan carry two 16-bit counts.
constexpr int kCompactItems = 8;

// Multi-block plan: a slice is never shorter than this (below it the per-block fixed
// cost of clearing and flushing 2048 bins dominates), and the grid aims at one full wave.
constexpr int64_t kMinSliceLength = 8192;
constexpr int64_t kSliceGranule = 1024;
constexpr int64_t kSliceBlocksPerSm = 2048 / kSliceThreads;

// Where a row's selection stands. `prefix` fixes the key bits under `mask` (a run of high
// bits). The top k of the row are every key whose masked bits exceed `prefix`, plus the
// first `need` keys (by position) whose masked bits equal it.
struct alignas(16) RowSelection {
  uint32_t prefix;
  uint32_t mask;
  uint32_t need;
  uint32_t resolved;  // 1: no further digit pass changes the answer
};
constexpr int64_t kRowSelectionWords = sizeof(RowSelection) / sizeof(uint32_t);

// Device scratch of the multi-block path, carved from one uint32 buffer.
struct SliceWorkspace {
  RowSelection* row_states;  // [rows]; zeroed before pass 0
  uint32_t* arrivals;        // [rows]; blocks of the row that finished the current pass; zeroed
  uint32_t* histograms;      // [rows, kRadixBins]; zeroed, and re-zeroed by each pass's last block
  uint32_t* slice_counts;    // [rows, blocks_per_row, 2]: survivors above / equal to the prefix
};

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Unsigned order of the key == the CPU kernel's order of the scores. -0.0 and +0.0 share a
// key (the CPU compares with !=, so they tie), and every NaN gets 0, below -inf's key
// (0x007FFFFF). Works on the bits alone, so compiler flags such as fast-math or
// flush-to-zero cannot change it.
__device__ __forceinline__ uint32_t order_key(float score) {
  const uint32_t bits = __float_as_uint(score);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return 0u;
  if (magnitude == 0u) return 0x80000000u;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

template <int kThreads>
struct BlockScanStorage {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most 32 of them");
  uint32_t warp_offsets[kThreads / 32];
  uint32_t total;
};

// Exclusive prefix sum over the block in thread order; every thread gets `total`. Every
// thread must call it (it synchronizes). The leading barrier lets back-to-back calls
// share `storage`: a slow thread may still be reading the previous call's offsets.
template <int kThreads>
__device__ __forceinline__ uint32_t block_exclusive_sum(uint32_t value, uint32_t& total,
                                                        BlockScanStorage<kThreads>& storage) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();
  uint32_t inclusive = value;
#pragma unroll
  for (int delta = 1; delta < 32; delta <<= 1) {
    const uint32_t other = __shfl_up_sync(0xFFFFFFFFu, inclusive, delta);
    if (lane >= delta) inclusive += other;
  }
  if (lane == 31) storage.warp_offsets[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const uint32_t warp_sum = lane < kWarps ? storage.warp_offsets[lane] : 0u;
    uint32_t warp_inclusive = warp_sum;
#pragma unroll
    for (int delta = 1; delta < 32; delta <<= 1) {
      const uint32_t other = __shfl_up_sync(0xFFFFFFFFu, warp_inclusive, delta);
      if (lane >= delta) warp_inclusive += other;
    }
    if (lane < kWarps) storage.warp_offsets[lane] = warp_inclusive - warp_sum;
    if (lane == 31) storage.total = warp_inclusive;
  }
  __syncthreads();
  total = storage.total;
  return storage.warp_offsets[warp] + inclusive - value;
}

template <int kThreads>
struct SelectStorage {
  BlockScanStorage<kThreads> scan;
  uint32_t digit;
  uint32_t count_above;  // keys in bins above `digit` (among those matching the prefix)
  uint32_t count_in_digit;
};

// Calls visit(key, allowed) for every position in [begin, end) of the row, in no
// particular order; a warp's lanes call it together. Strided by the block so that a warp's
// loads are coalesced.
template <int kThreads, typename Visit>
__device__ __forceinline__ void for_each_position_key(const float* __restrict__ row_scores,
                                                      const uint8_t* __restrict__ row_mask, int64_t begin,
                                                      int64_t end, Visit&& visit) {
  for (int64_t base = begin + threadIdx.x; base < end; base += int64_t{kThreads} * kHistogramUnroll) {
    float scores[kHistogramUnroll];
    uint8_t allowed[kHistogramUnroll];
#pragma unroll
    for (int u = 0; u < kHistogramUnroll; ++u) {
      const int64_t pos = base + int64_t{u} * kThreads;
      // Both loads are issued before either is used, so all of them are in flight at once.
      allowed[u] = pos < end ? __ldg(row_mask + pos) : uint8_t{0};
      scores[u] = pos < end ? __ldg(row_scores + pos) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kHistogramUnroll; ++u) visit(order_key(scores[u]), allowed[u] != 0);
  }
}

// Calls visit(key) for every candidate in [begin, end) of the row, in no particular order.
template <int kThreads, typename Visit>
__device__ __forceinline__ void for_each_candidate_key(const float* __restrict__ row_scores,
                                                       const uint8_t* __restrict__ row_mask, int64_t begin,
                                                       int64_t end, Visit&& visit) {
  for_each_position_key<kThreads>(row_scores, row_mask, begin, end, [&](uint32_t key, bool allowed) {
    if (allowed) visit(key);
  });
}

// The first pass's histogram (every candidate, top 11 key bits) with warp-aggregated
// atomics: softmax scores share few exponents, so most of a warp's keys land in a handful of
// bins, and one atomic per distinct bin and warp (adding the number of lanes that hit it)
// replaces up to 32 colliding ones. The lanes that reach the match together aggregate.
template <int kThreads>
__device__ __forceinline__ void accumulate_first_histogram(const float* __restrict__ row_scores,
                                                           const uint8_t* __restrict__ row_mask, int64_t begin,
                                                           int64_t end, uint32_t* histogram) {
  constexpr uint32_t kNoBin = kRadixBins;
  const int lane = threadIdx.x & 31;
  for_each_position_key<kThreads>(row_scores, row_mask, begin, end, [&](uint32_t key, bool allowed) {
    const uint32_t bin = allowed ? key >> pass_shift(0) : kNoBin;
    const unsigned peers = __match_any_sync(__activemask(), bin);
    if (bin != kNoBin && lane == __ffs(peers) - 1) atomicAdd(&histogram[bin], static_cast<uint32_t>(__popc(peers)));
  });
}

// Adds the digit of `pass` of every candidate matching `selection` into `histogram`
// (shared memory, cleared by the caller).
template <int kThreads>
__device__ __forceinline__ void accumulate_histogram(const float* __restrict__ row_scores,
                                                     const uint8_t* __restrict__ row_mask, int64_t begin,
                                                     int64_t end, const RowSelection& selection, int pass,
                                                     uint32_t* histogram) {
  if (pass == 0) {
    accumulate_first_histogram<kThreads>(row_scores, row_mask, begin, end, histogram);
    return;
  }
  const int shift = pass_shift(pass);
  const uint32_t digit_mask = pass_digit_mask(pass);
  const uint32_t prefix = selection.prefix;
  const uint32_t mask = selection.mask;
  for_each_candidate_key<kThreads>(row_scores, row_mask, begin, end, [&](uint32_t key) {
    if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & digit_mask], 1u);
  });
}

// Given the row's full histogram for `pass`, narrows `selection` by one digit. Every thread
// must call it and gets the same result.
template <int kThreads>
__device__ __forceinline__ RowSelection choose_digit(const uint32_t* histogram, RowSelection selection, int pass,
                                                     SelectStorage<kThreads>& storage) {
  static_assert(kRadixBins % kThreads == 0, "whole bins per thread");
  constexpr int kBinsPerThread = kRadixBins / kThreads;
  // Thread t owns a run of digits in descending order, so the exclusive scan counts the
  // keys in higher bins, i.e. the keys that beat this bin.
  uint32_t counts[kBinsPerThread];
  uint32_t thread_sum = 0;
#pragma unroll
  for (int i = 0; i < kBinsPerThread; ++i) {
    counts[i] = histogram[kRadixBins - 1 - (static_cast<int>(threadIdx.x) * kBinsPerThread + i)];
    thread_sum += counts[i];
  }
  uint32_t matching = 0;
  uint32_t above = block_exclusive_sum<kThreads>(thread_sum, matching, storage.scan);
  if (matching <= selection.need) {
    // Only in pass 0: at most k candidates, all of them go out (`matching` is the same
    // in every thread, so all return here together).
    selection.resolved = 1;
    return selection;
  }
  // Exactly one non-empty bin straddles the need-th key: above < need <= above + count.
#pragma unroll
  for (int i = 0; i < kBinsPerThread; ++i) {
    if (above < selection.need && above + counts[i] >= selection.need) {
      storage.digit = static_cast<uint32_t>(kRadixBins - 1 - (static_cast<int>(threadIdx.x) * kBinsPerThread + i));
      storage.count_above = above;
      storage.count_in_digit = counts[i];
    }
    above += counts[i];
  }
  __syncthreads();
  const int shift = pass_shift(pass);
  selection.need -= storage.count_above;
  selection.prefix |= storage.digit << shift;
  selection.mask |= pass_digit_mask(pass) << shift;
  // The bin is taken whole when it holds exactly what is still needed; after the last
  // pass the key is fully known and `need` counts the ties to take by position.
  selection.resolved = (storage.count_in_digit == selection.need || pass == kPasses - 1) ? 1u : 0u;
  return selection;
}

// Counts this thread's share of the survivors' two kinds in [begin, end): keys above the
// prefix, and keys equal to it (the tie candidates).
template <int kThreads>
__device__ __forceinline__ void count_survivors(const float* __restrict__ row_scores,
                                                const uint8_t* __restrict__ row_mask, int64_t begin,
                                                int64_t end, const RowSelection& selection, uint32_t& above,
                                                uint32_t& equal) {
  const uint32_t prefix = selection.prefix;
  const uint32_t mask = selection.mask;
  for_each_candidate_key<kThreads>(row_scores, row_mask, begin, end, [&](uint32_t key) {
    const uint32_t masked = key & mask;
    above += masked > prefix ? 1u : 0u;
    equal += masked == prefix ? 1u : 0u;
  });
}

// Writes the survivors among positions [begin, end) to out_row, in position order.
// `above_before` / `equal_before` enter as the counts of keys above / equal to the prefix
// at positions before `begin` (in the whole row) and leave including this range. A
// survivor's slot is (keys above before it) + min(keys equal before it, need): the
// survivors fill slots 0, 1, 2, ... in position order.
template <int kThreads>
__device__ __forceinline__ void compact_survivors(const float* __restrict__ row_scores,
                                                  const uint8_t* __restrict__ row_mask, int64_t begin,
                                                  int64_t end, const RowSelection& selection, int64_t k,
                                                  int32_t* __restrict__ out_row, uint32_t& above_before,
                                                  uint32_t& equal_before, BlockScanStorage<kThreads>& scan) {
  static_assert(int64_t{kThreads} * kCompactItems < 65536, "two 16-bit counts share one scan");
  constexpr int64_t kChunk = int64_t{kThreads} * kCompactItems;
  const uint32_t prefix = selection.prefix;
  const uint32_t mask = selection.mask;
  const uint32_t need = selection.need;
  // Software pipelining: the next chunk's loads are issued before this chunk's scan, so
  // the barriers of the scan overlap the memory latency instead of adding to it.
  uint8_t next_allowed[kCompactItems];
  float next_scores[kCompactItems];
  const auto load_chunk = [&](int64_t chunk) {
    const int64_t first = chunk + int64_t{threadIdx.x} * kCompactItems;
#pragma unroll
    for (int j = 0; j < kCompactItems; ++j) {
      const int64_t pos = first + j;
      next_allowed[j] = pos < end ? __ldg(row_mask + pos) : uint8_t{0};
      next_scores[j] = pos < end ? __ldg(row_scores + pos) : 0.0f;
    }
  };
  if (begin < end) load_chunk(begin);
  // The loop bound is the same for every thread: block_exclusive_sum needs all of them.
  for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
    const int64_t first = chunk + int64_t{threadIdx.x} * kCompactItems;
    bool is_above[kCompactItems];
    bool is_equal[kCompactItems];
    uint32_t above_here = 0;
    uint32_t equal_here = 0;
#pragma unroll
    for (int j = 0; j < kCompactItems; ++j) {
      const bool allowed = next_allowed[j] != 0;
      const uint32_t masked = order_key(next_scores[j]) & mask;
      is_above[j] = allowed && masked > prefix;
      is_equal[j] = allowed && masked == prefix;
      above_here += is_above[j] ? 1u : 0u;
      equal_here += is_equal[j] ? 1u : 0u;
    }
    if (chunk + kChunk < end) load_chunk(chunk + kChunk);
    uint32_t chunk_total = 0;
    const uint32_t offsets =
        block_exclusive_sum<kThreads>((above_here << 16) | equal_here, chunk_total, scan);
    uint32_t above_count = above_before + (offsets >> 16);
    uint32_t equal_count = equal_before + (offsets & 0xFFFFu);
#pragma unroll
    for (int j = 0; j < kCompactItems; ++j) {
      const int32_t position = static_cast<int32_t>(first + j);
      if (is_above[j]) {
        const uint32_t slot = above_count + (equal_count < need ? equal_count : need);
        if (slot < static_cast<uint64_t>(k)) out_row[slot] = position;
        ++above_count;
      } else if (is_equal[j]) {
        if (equal_count < need) {
          const uint32_t slot = above_count + equal_count;
          if (slot < static_cast<uint64_t>(k)) out_row[slot] = position;
        }
        ++equal_count;
      }
    }
    above_before += chunk_total >> 16;
    equal_before += chunk_total & 0xFFFFu;
  }
}

// Slots [filled, k) of the row get -1, shared by `stride` threads starting at `first`.
__device__ __forceinline__ void pad_row(int32_t* __restrict__ out_row, int64_t filled, int64_t k, int64_t first,
                                        int64_t stride) {
  for (int64_t slot = filled + first; slot < k; slot += stride) out_row[slot] = -1;
}

struct RowPointers {
  const float* scores;
  const uint8_t* mask;
  int32_t* out;
};

}  // namespace topk_detail

// Arguments of launch_topk_indices.
struct TopkIndicesParams {
  const float* scores;          // [batch, heads, length]; last dim contiguous
  int64_t score_stride_batch;   // in elements
  int64_t score_stride_head;    // in elements
  const bool* candidates;       // [batch, length], contiguous
  int32_t* out;                 // [batch, heads, k], contiguous
  int64_t batch;
  int64_t heads;
  int64_t length;               // S, at most INT32_MAX (positions are int32)
  int64_t k;                    // 0 <= k <= length
};

// How launch_topk_indices splits the work; from plan_topk_indices.
struct TopkIndicesPlan {
  int64_t blocks_per_row;   // 1: one block per row, a single launch
  int64_t slice_length;     // positions per block when blocks_per_row > 1
  int64_t workspace_words;  // uint32 words of device scratch launch_topk_indices needs (0 if none)
};

namespace topk_detail {

__device__ __forceinline__ RowPointers row_pointers(const TopkIndicesParams& params, int64_t row) {
  const int64_t b = row / params.heads;
  const int64_t h = row - b * params.heads;
  RowPointers ptrs;
  ptrs.scores = params.scores + b * params.score_stride_batch + h * params.score_stride_head;
  ptrs.mask = reinterpret_cast<const uint8_t*>(params.candidates) + b * params.length;
  ptrs.out = params.out + row * params.k;
  return ptrs;
}

__device__ __forceinline__ RowSelection initial_selection(int64_t k) {
  return RowSelection{0u, 0u, static_cast<uint32_t>(k), 0u};
}

// One block does a whole row: digit passes, then the ordered compaction.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) topk_row_per_block_kernel(TopkIndicesParams params) {
  __shared__ uint32_t histogram[kRadixBins];
  __shared__ SelectStorage<kThreads> select_storage;
  const int64_t row = blockIdx.x;
  const RowPointers ptrs = row_pointers(params, row);

  RowSelection selection = initial_selection(params.k);
  for (int pass = 0; pass < kPasses; ++pass) {
    for (int bin = threadIdx.x; bin < kRadixBins; bin += kThreads) histogram[bin] = 0;
    __syncthreads();
    accumulate_histogram<kThreads>(ptrs.scores, ptrs.mask, 0, params.length, selection, pass, histogram);
    __syncthreads();
    // Every thread reads the histogram inside choose_digit before its internal barriers,
    // so the next pass may clear it right after.
    selection = choose_digit<kThreads>(histogram, selection, pass, select_storage);
    if (selection.resolved) break;
  }

  uint32_t above_before = 0;
  uint32_t equal_before = 0;
  compact_survivors<kThreads>(ptrs.scores, ptrs.mask, 0, params.length, selection, params.k, ptrs.out,
                              above_before, equal_before, select_storage.scan);
  const uint32_t ties_taken = equal_before < selection.need ? equal_before : selection.need;
  pad_row(ptrs.out, int64_t{above_before} + ties_taken, params.k, threadIdx.x, kThreads);
}

// One digit pass of the multi-block path; grid = rows * blocks_per_row, row-major.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    topk_slice_pass_kernel(TopkIndicesParams params, int64_t slice_length, int64_t blocks_per_row, int pass,
                           SliceWorkspace workspace) {
  __shared__ uint32_t histogram[kRadixBins];
  __shared__ SelectStorage<kThreads> select_storage;
  __shared__ bool is_last_block;
  const int64_t row = blockIdx.x / blocks_per_row;
  const int64_t slice = blockIdx.x - row * blocks_per_row;
  // Pass 0 starts from k itself; later passes from what the previous pass's last block stored.
  const RowSelection selection = pass == 0 ? initial_selection(params.k) : workspace.row_states[row];
  if (selection.resolved) return;  // the same for every block of the row: nobody waits on a ticket

  const RowPointers ptrs = row_pointers(params, row);
  const int64_t begin = slice * slice_length;
  const int64_t end = begin + slice_length < params.length ? begin + slice_length : params.length;
  for (int bin = threadIdx.x; bin < kRadixBins; bin += kThreads) histogram[bin] = 0;
  __syncthreads();
  accumulate_histogram<kThreads>(ptrs.scores, ptrs.mask, begin, end, selection, pass, histogram);
  __syncthreads();

  uint32_t* row_histogram = workspace.histograms + row * kRadixBins;
  for (int bin = threadIdx.x; bin < kRadixBins; bin += kThreads) {
    if (histogram[bin] != 0) atomicAdd(&row_histogram[bin], histogram[bin]);
  }
  // Publish this block's additions before taking a ticket, so the block that draws the
  // last ticket sees every block's histogram.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const uint32_t ticket = atomicAdd(&workspace.arrivals[row], 1u);
    is_last_block = ticket == static_cast<uint32_t>(blocks_per_row - 1);
  }
  __syncthreads();
  if (!is_last_block) return;

  __threadfence();
  for (int bin = threadIdx.x; bin < kRadixBins; bin += kThreads) {
    // __ldcg: read the L2 copy the other blocks' atomics updated, never a stale L1 line.
    histogram[bin] = __ldcg(&row_histogram[bin]);
    row_histogram[bin] = 0;  // clean for the next pass (it starts after this kernel ends)
  }
  __syncthreads();
  const RowSelection narrowed = choose_digit<kThreads>(histogram, selection, pass, select_storage);
  if (threadIdx.x == 0) {
    workspace.row_states[row] = narrowed;
    workspace.arrivals[row] = 0;
  }
}

// Multi-block path: per slice, how many survivors lie above / equal to the final prefix.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    topk_slice_count_kernel(TopkIndicesParams params, int64_t slice_length, int64_t blocks_per_row,
                            SliceWorkspace workspace) {
  __shared__ BlockScanStorage<kThreads> scan;
  const int64_t row = blockIdx.x / blocks_per_row;
  const int64_t slice = blockIdx.x - row * blocks_per_row;
  const RowSelection selection = workspace.row_states[row];
  const RowPointers ptrs = row_pointers(params, row);
  const int64_t begin = slice * slice_length;
  const int64_t end = begin + slice_length < params.length ? begin + slice_length : params.length;

  uint32_t above = 0;
  uint32_t equal = 0;
  count_survivors<kThreads>(ptrs.scores, ptrs.mask, begin, end, selection, above, equal);
  uint32_t above_total = 0;
  uint32_t equal_total = 0;
  block_exclusive_sum<kThreads>(above, above_total, scan);
  block_exclusive_sum<kThreads>(equal, equal_total, scan);
  if (threadIdx.x == 0) {
    uint32_t* counts = workspace.slice_counts + 2 * blockIdx.x;
    counts[0] = above_total;
    counts[1] = equal_total;
  }
}

// Multi-block path: each slice writes its survivors at the offset the slices before it
// fill, and pads its share of the row's -1 tail.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    topk_slice_write_kernel(TopkIndicesParams params, int64_t slice_length, int64_t blocks_per_row,
                            SliceWorkspace workspace) {
  __shared__ BlockScanStorage<kThreads> scan;
  __shared__ uint32_t slice_above_before;
  __shared__ uint32_t slice_equal_before;
  const int64_t row = blockIdx.x / blocks_per_row;
  const int64_t slice = blockIdx.x - row * blocks_per_row;
  const RowSelection selection = workspace.row_states[row];
  const RowPointers ptrs = row_pointers(params, row);

  // Thread t holds slice t's counts (the plan keeps blocks_per_row <= kThreads).
  const uint32_t* row_counts = workspace.slice_counts + 2 * row * blocks_per_row;
  const bool holds_slice = threadIdx.x < blocks_per_row;
  const uint32_t above = holds_slice ? row_counts[2 * threadIdx.x] : 0u;
  const uint32_t equal = holds_slice ? row_counts[2 * threadIdx.x + 1] : 0u;
  uint32_t above_total = 0;
  uint32_t equal_total = 0;
  const uint32_t above_before = block_exclusive_sum<kThreads>(above, above_total, scan);
  const uint32_t equal_before = block_exclusive_sum<kThreads>(equal, equal_total, scan);
  if (threadIdx.x == slice) {
    slice_above_before = above_before;
    slice_equal_before = equal_before;
  }
  __syncthreads();
  uint32_t above_running = slice_above_before;
  uint32_t equal_running = slice_equal_before;

  const int64_t begin = slice * slice_length;
  const int64_t end = begin + slice_length < params.length ? begin + slice_length : params.length;
  compact_survivors<kThreads>(ptrs.scores, ptrs.mask, begin, end, selection, params.k, ptrs.out, above_running,
                              equal_running, scan);
  const uint32_t ties_taken = equal_total < selection.need ? equal_total : selection.need;
  pad_row(ptrs.out, int64_t{above_total} + ties_taken, params.k, slice * kThreads + threadIdx.x,
          blocks_per_row * kThreads);
}

}  // namespace topk_detail

// Chooses the launch shape for `rows` rows of `length` positions on a GPU with
// `sm_count` multiprocessors (see the top of this file). Host-only, no CUDA calls.
inline TopkIndicesPlan plan_topk_indices(int64_t rows, int64_t length, int sm_count) {
  using namespace topk_detail;
  TopkIndicesPlan plan{1, length, 0};
  if (rows <= 0 || length <= 0) return plan;
  const int64_t wanted_blocks = int64_t{sm_count > 0 ? sm_count : 1} * kSliceBlocksPerSm;
  int64_t blocks_per_row = length / kMinSliceLength;
  if (wanted_blocks / rows < blocks_per_row) blocks_per_row = wanted_blocks / rows;
  if (kSliceThreads < blocks_per_row) blocks_per_row = kSliceThreads;
  if (blocks_per_row < 2) return plan;
  const int64_t slice_length = ceil_div(ceil_div(length, blocks_per_row), kSliceGranule) * kSliceGranule;
  blocks_per_row = ceil_div(length, slice_length);  // rounding the slices up may free a block
  if (blocks_per_row < 2) return plan;
  plan.blocks_per_row = blocks_per_row;
  plan.slice_length = slice_length;
  plan.workspace_words = rows * (kRowSelectionWords + 1 + kRadixBins) + rows * blocks_per_row * 2;
  return plan;
}

// Top-k candidate positions per row, ascending, -1 padded; the answer of the CPU kernel.
//
// Parameters
// ----------
// params : TopkIndicesParams
//     scores float32 [batch, heads, length] (strides score_stride_batch/head on dims 0-1,
//     contiguous last dim); candidates bool [batch, length], contiguous; out int32
//     [batch, heads, k], contiguous, fully written (positions ascending, then -1).
// plan : TopkIndicesPlan
//     plan_topk_indices(batch * heads, length, sm_count) for the same sizes.
// workspace : uint32_t*
//     plan.workspace_words words of device memory (16-byte aligned), or nullptr when that
//     is 0. Contents on entry do not matter; they are cleared on `stream`.
// stream : cudaStream_t
//     Every launch and the clearing go here; nothing synchronizes with the host.
//
// Returns
// -------
// cudaError_t
//     The first launch error, cudaErrorInvalidValue for sizes or a plan it cannot run, else
//     cudaSuccess. k == 0 or no rows: nothing is launched.
inline cudaError_t launch_topk_indices(const TopkIndicesParams& params, const TopkIndicesPlan& plan,
                                       uint32_t* workspace, cudaStream_t stream) {
  using namespace topk_detail;
  const int64_t rows = params.batch * params.heads;
  if (params.batch < 0 || params.heads < 0 || params.length < 0 || params.length > INT32_MAX ||
      params.k < 0 || params.k > params.length) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || params.k == 0) return cudaSuccess;

  if (plan.blocks_per_row <= 1) {
    if (rows > INT32_MAX) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned int>(rows));
    if (params.length <= kShortRowLength) {
      launch_kernel(topk_row_per_block_kernel<kShortRowThreads>, grid, kShortRowThreads, 0, stream, params);
    } else {
      launch_kernel(topk_row_per_block_kernel<kLongRowThreads>, grid, kLongRowThreads, 0, stream, params);
    }
    return cudaGetLastError();
  }

  const int64_t blocks_per_row = plan.blocks_per_row;
  const int64_t expected_words = rows * (kRowSelectionWords + 1 + kRadixBins) + rows * blocks_per_row * 2;
  if (workspace == nullptr || blocks_per_row > kSliceThreads || plan.slice_length <= 0 ||
      plan.slice_length * blocks_per_row < params.length || plan.workspace_words < expected_words ||
      rows * blocks_per_row > INT32_MAX || reinterpret_cast<uintptr_t>(workspace) % alignof(RowSelection) != 0) {
    return cudaErrorInvalidValue;
  }
  SliceWorkspace slices;
  slices.row_states = reinterpret_cast<RowSelection*>(workspace);
  slices.arrivals = workspace + rows * kRowSelectionWords;
  slices.histograms = slices.arrivals + rows;
  slices.slice_counts = slices.histograms + rows * kRadixBins;
  const size_t cleared_bytes = static_cast<size_t>(rows * (kRowSelectionWords + 1 + kRadixBins)) * sizeof(uint32_t);
  cudaError_t status = cudaMemsetAsync(workspace, 0, cleared_bytes, stream);
  if (status != cudaSuccess) return status;

  const dim3 grid(static_cast<unsigned int>(rows * blocks_per_row));
  for (int pass = 0; pass < kPasses; ++pass) {
    launch_kernel(topk_slice_pass_kernel<kSliceThreads>, grid, kSliceThreads, 0, stream, params, plan.slice_length,
                  blocks_per_row, pass, slices);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  launch_kernel(topk_slice_count_kernel<kSliceThreads>, grid, kSliceThreads, 0, stream, params, plan.slice_length,
                blocks_per_row, slices);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  launch_kernel(topk_slice_write_kernel<kSliceThreads>, grid, kSliceThreads, 0, stream, params, plan.slice_length,
                blocks_per_row, slices);
  return cudaGetLastError();
}

}  // namespace std_ext::kernels
