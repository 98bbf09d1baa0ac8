#include "cpu/block_math.h"

#include <algorithm>
#include <cstring>
#include <limits>

// The portable build targets baseline x86-64 (SSE2). With GCC >= 12 on x86-64 Linux
// the hot primitives are also compiled for x86-64-v3 (AVX2 + FMA + F16C, any vendor)
// and the loader picks a clone once, by CPU features. ("arch=haswell" would not do:
// it matches the CPU model, so AMD CPUs would get the baseline clone.)
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define STD_EXT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define STD_EXT_MULTIVERSION
#endif

#define STD_EXT_INLINE inline __attribute__((always_inline))

// The 32-byte vector helpers are always inlined into a clone, so no AVX vector ever
// crosses a call boundary with a mismatched ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace std_ext::cpu {
namespace {

// GCC/Clang vector extensions: 8 floats, one AVX register in the Haswell clone (two
// SSE registers in the baseline one). Register tiles are written with them explicitly
// because the auto-vectorizer spills small accumulator arrays to the stack.
typedef float Vec __attribute__((vector_size(32)));
typedef int32_t IntVec __attribute__((vector_size(32)));
typedef float UnalignedVec __attribute__((vector_size(32), aligned(4), may_alias));
constexpr int64_t kLanes = 8;

STD_EXT_INLINE Vec load(const float* p) { return *reinterpret_cast<const UnalignedVec*>(p); }
STD_EXT_INLINE void store(float* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }
STD_EXT_INLINE Vec broadcast(float x) { return Vec{} + x; }

template <typename T>
STD_EXT_INLINE void load_keys_transposed_impl(const T* base, int64_t row_stride, const int64_t* positions,
                                              int64_t n, int64_t head_dim, float* kT) {
  for (int64_t j = 0; j < n; ++j) {
    const T* row = base + positions[j] * row_stride;
    for (int64_t d = 0; d < head_dim; ++d) kT[d * kKeyBlock + j] = static_cast<float>(row[d]);
  }
  for (int64_t d = 0; d < head_dim; ++d) {
    for (int64_t j = n; j < kKeyBlock; ++j) kT[d * kKeyBlock + j] = 0.f;
  }
}

template <typename T>
STD_EXT_INLINE void load_values_impl(const T* base, int64_t row_stride, const int64_t* positions, int64_t n,
                                     int64_t head_dim, float* v) {
  for (int64_t j = 0; j < n; ++j) {
    const T* row = base + positions[j] * row_stride;
    float* dst = v + j * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<float>(row[d]);
  }
  std::memset(v + n * head_dim, 0, sizeof(float) * (kKeyBlock - n) * head_dim);
}

// exp(x) for the softmax on 8 lanes (std::exp is a libm call per element). Range
// reduction x = n ln2 + r, |r| <= ln2/2, then Cephes' degree-6 polynomial: about
// 1 ulp on [-87, 88]. Lanes below -87 (masked keys, -inf) give exactly 0; NaN stays NaN.
STD_EXT_INLINE Vec exp_for_softmax(Vec x) {
  const Vec lo = broadcast(-87.f), hi = broadcast(88.f);
  Vec c = x < lo ? lo : x;
  c = c > hi ? hi : c;
  const Vec round_magic = broadcast(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (c * 1.44269504088896341f + round_magic) - round_magic;
  const Vec r = (c - n * 0.693359375f) - n * -2.12194440e-4f;
  Vec p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const IntVec exponent = (__builtin_convertvector(n, IntVec) + 127) << 23;
  const Vec result = p * (Vec)exponent;
  return x < lo ? Vec{} : result;
}

}  // namespace

STD_EXT_MULTIVERSION void load_keys_transposed(const float* base, int64_t row_stride, const int64_t* positions,
                                               int64_t n, int64_t head_dim, float* kT) {
  load_keys_transposed_impl(base, row_stride, positions, n, head_dim, kT);
}
STD_EXT_MULTIVERSION void load_keys_transposed(const c10::Half* base, int64_t row_stride,
                                               const int64_t* positions, int64_t n, int64_t head_dim, float* kT) {
  load_keys_transposed_impl(base, row_stride, positions, n, head_dim, kT);
}
STD_EXT_MULTIVERSION void load_keys_transposed(const c10::BFloat16* base, int64_t row_stride,
                                               const int64_t* positions, int64_t n, int64_t head_dim, float* kT) {
  load_keys_transposed_impl(base, row_stride, positions, n, head_dim, kT);
}

STD_EXT_MULTIVERSION void load_values(const float* base, int64_t row_stride, const int64_t* positions, int64_t n,
                                      int64_t head_dim, float* v) {
  load_values_impl(base, row_stride, positions, n, head_dim, v);
}
STD_EXT_MULTIVERSION void load_values(const c10::Half* base, int64_t row_stride, const int64_t* positions,
                                      int64_t n, int64_t head_dim, float* v) {
  load_values_impl(base, row_stride, positions, n, head_dim, v);
}
STD_EXT_MULTIVERSION void load_values(const c10::BFloat16* base, int64_t row_stride, const int64_t* positions,
                                      int64_t n, int64_t head_dim, float* v) {
  load_values_impl(base, row_stride, positions, n, head_dim, v);
}

// Register tiles are kRowTile rows x kVecs vectors: 12 accumulators (kVecs = 3) keep
// both FMA pipes busy through the FMA latency while leaving registers for the operands.
template <int kVecs>
STD_EXT_INLINE void logits_tile(const float* q_tile, int64_t head_dim, const float* kT, float* logits, int64_t ld) {
  Vec acc[kRowTile][kVecs] = {};
  for (int64_t d = 0; d < head_dim; ++d) {
    Vec k[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) k[v] = load(kT + d * kKeyBlock + v * kLanes);
#pragma GCC unroll 4
    for (int64_t i = 0; i < kRowTile; ++i) {
      const Vec qv = broadcast(q_tile[i * head_dim + d]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[i][v] += qv * k[v];
    }
  }
#pragma GCC unroll 4
  for (int64_t i = 0; i < kRowTile; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) store(logits + i * ld + v * kLanes, acc[i][v]);
  }
}

template <int kVecs>
STD_EXT_INLINE void weighted_sum_tile(const float* p_tile, int64_t head_dim, const float* v, float* acc_tile) {
  Vec tile[kRowTile][kVecs];
#pragma GCC unroll 4
  for (int64_t i = 0; i < kRowTile; ++i) {
#pragma GCC unroll 4
    for (int w = 0; w < kVecs; ++w) tile[i][w] = load(acc_tile + i * head_dim + w * kLanes);
  }
  for (int64_t j = 0; j < kKeyBlock; ++j) {
    Vec vj[kVecs];
#pragma GCC unroll 4
    for (int w = 0; w < kVecs; ++w) vj[w] = load(v + j * head_dim + w * kLanes);
#pragma GCC unroll 4
    for (int64_t i = 0; i < kRowTile; ++i) {
      const Vec pj = broadcast(p_tile[i * kKeyBlock + j]);
#pragma GCC unroll 4
      for (int w = 0; w < kVecs; ++w) tile[i][w] += pj * vj[w];
    }
  }
#pragma GCC unroll 4
  for (int64_t i = 0; i < kRowTile; ++i) {
#pragma GCC unroll 4
    for (int w = 0; w < kVecs; ++w) store(acc_tile + i * head_dim + w * kLanes, tile[i][w]);
  }
}

STD_EXT_MULTIVERSION void block_logits(const float* q, int64_t rows, int64_t head_dim, const float* kT,
                                       float* logits, int64_t ld) {
  // Key tiles of 24, 24 and 16: each logit is a sum over d in order, whatever its tile.
  static_assert(kKeyBlock == 64, "key tiling below assumes 64-key blocks");
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    const float* q_tile = q + r0 * head_dim;
    float* out = logits + r0 * ld;
    logits_tile<3>(q_tile, head_dim, kT, out, ld);
    logits_tile<3>(q_tile, head_dim, kT + 3 * kLanes, out + 3 * kLanes, ld);
    logits_tile<2>(q_tile, head_dim, kT + 6 * kLanes, out + 6 * kLanes, ld);
  }
}

STD_EXT_MULTIVERSION void block_weighted_sum(const float* p, int64_t rows, int64_t head_dim, const float* v,
                                             float* acc) {
  // Output-dim tiles of 24, then 16 / 8, then a scalar tail: any head_dim works.
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    const float* p_tile = p + r0 * kKeyBlock;
    float* acc_tile = acc + r0 * head_dim;
    int64_t d0 = 0;
    for (; d0 + 3 * kLanes <= head_dim; d0 += 3 * kLanes) weighted_sum_tile<3>(p_tile, head_dim, v + d0, acc_tile + d0);
    if (d0 + 2 * kLanes <= head_dim) {
      weighted_sum_tile<2>(p_tile, head_dim, v + d0, acc_tile + d0);
      d0 += 2 * kLanes;
    }
    if (d0 + kLanes <= head_dim) {
      weighted_sum_tile<1>(p_tile, head_dim, v + d0, acc_tile + d0);
      d0 += kLanes;
    }
    for (int64_t i = 0; i < kRowTile; ++i) {
      for (int64_t j = 0; j < kKeyBlock; ++j) {
        const float pj = p_tile[i * kKeyBlock + j];
        for (int64_t d = d0; d < head_dim; ++d) acc_tile[i * head_dim + d] += pj * v[j * head_dim + d];
      }
    }
  }
}

STD_EXT_MULTIVERSION float mask_and_max(float* logits, int64_t visible) {
  const Vec minus_inf = broadcast(-std::numeric_limits<float>::infinity());
  Vec max = minus_inf;
  for (int64_t j = 0; j < kKeyBlock; j += kLanes) {
    Vec x = load(logits + j);
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      if (j + lane >= visible) x[lane] = minus_inf[lane];
    }
    store(logits + j, x);
    max = x > max ? x : max;
  }
  float result = max[0];
  for (int64_t lane = 1; lane < kLanes; ++lane) result = std::max(result, max[lane]);
  return result;
}

STD_EXT_MULTIVERSION float exp_shifted_and_sum(float* x, int64_t n, float shift) {
  // Lane-wise partial sums, then the lanes in order: the grouping depends only on n,
  // and the online softmax always passes full blocks.
  Vec sum = {};
  const Vec shift_v = broadcast(shift);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vec e = exp_for_softmax(load(x + i) - shift_v);
    store(x + i, e);
    sum += e;
  }
  if (i < n) {  // the tail goes through the same vector code, padded with -inf (exp -> 0)
    float tail[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) tail[j] = i + j < n ? x[i + j] : -std::numeric_limits<float>::infinity();
    const Vec e = exp_for_softmax(load(tail) - shift_v);
    store(tail, e);
    for (int64_t j = 0; i + j < n; ++j) x[i + j] = tail[j];
    sum += e;
  }
  float total = 0.f;
  for (int64_t lane = 0; lane < kLanes; ++lane) total += sum[lane];
  return total;
}

}  // namespace std_ext::cpu
