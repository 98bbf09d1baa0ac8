#include "cpu/block_math.h"

#include <cstring>
#include <limits>

// The portable build targets baseline x86-64 (SSE2). On x86-64 Linux the hot
// primitives are also compiled for Haswell-class CPUs (AVX2 + FMA + F16C) and the
// loader picks the clone once, at startup. Loops are written so the compiler can
// vectorize them: fixed-size register tiles, no reductions across vector lanes
// except where `omp simd` says so.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define STD_EXT_MULTIVERSION __attribute__((target_clones("arch=haswell", "default")))
#else
#define STD_EXT_MULTIVERSION
#endif

#define STD_EXT_INLINE inline __attribute__((always_inline))

namespace std_ext::cpu {
namespace {

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

// exp(x) for the softmax, vectorizable (std::exp is a libm call per element).
// Range reduction x = n ln2 + r, |r| <= ln2/2, then Cephes' degree-6 polynomial:
// about 1 ulp on [-87, 88]. Inputs below -87 (masked keys, -inf) give exactly 0.
STD_EXT_INLINE float exp_for_softmax(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float clamped = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float n = (clamped * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(scale));
  return x < -87.f ? 0.f : p * scale;
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

STD_EXT_MULTIVERSION void block_logits(const float* q, int64_t rows, int64_t head_dim, const float* kT,
                                       float* logits, int64_t ld) {
  // Register tile: kRowTile rows x 16 keys (two AVX vectors per row).
  constexpr int64_t kKeys = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    const float* q_tile = q + r0 * head_dim;
    for (int64_t j0 = 0; j0 < kKeyBlock; j0 += kKeys) {
      float acc[kRowTile][kKeys] = {};
      for (int64_t d = 0; d < head_dim; ++d) {
        const float* k_col = kT + d * kKeyBlock + j0;
        for (int64_t i = 0; i < kRowTile; ++i) {
          const float qv = q_tile[i * head_dim + d];
          for (int64_t j = 0; j < kKeys; ++j) acc[i][j] += qv * k_col[j];
        }
      }
      for (int64_t i = 0; i < kRowTile; ++i) {
        std::memcpy(logits + (r0 + i) * ld + j0, acc[i], sizeof(acc[i]));
      }
    }
  }
}

STD_EXT_MULTIVERSION void block_weighted_sum(const float* p, int64_t rows, int64_t head_dim, const float* v,
                                             float* acc) {
  // Register tile: kRowTile rows x 16 output dims; the tail of head_dim runs the same
  // loop with a shorter width, so any head_dim works.
  constexpr int64_t kDims = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    const float* p_tile = p + r0 * kKeyBlock;
    for (int64_t d0 = 0; d0 < head_dim; d0 += kDims) {
      if (d0 + kDims <= head_dim) {
        float tile[kRowTile][kDims];
        for (int64_t i = 0; i < kRowTile; ++i) std::memcpy(tile[i], acc + (r0 + i) * head_dim + d0, sizeof(tile[i]));
        for (int64_t j = 0; j < kKeyBlock; ++j) {
          const float* v_row = v + j * head_dim + d0;
          for (int64_t i = 0; i < kRowTile; ++i) {
            const float pj = p_tile[i * kKeyBlock + j];
            for (int64_t d = 0; d < kDims; ++d) tile[i][d] += pj * v_row[d];
          }
        }
        for (int64_t i = 0; i < kRowTile; ++i) std::memcpy(acc + (r0 + i) * head_dim + d0, tile[i], sizeof(tile[i]));
      } else {
        const int64_t width = head_dim - d0;
        for (int64_t j = 0; j < kKeyBlock; ++j) {
          const float* v_row = v + j * head_dim + d0;
          for (int64_t i = 0; i < kRowTile; ++i) {
            const float pj = p_tile[i * kKeyBlock + j];
            float* a = acc + (r0 + i) * head_dim + d0;
            for (int64_t d = 0; d < width; ++d) a[d] += pj * v_row[d];
          }
        }
      }
    }
  }
}

STD_EXT_MULTIVERSION float exp_shifted_and_sum(float* x, int64_t n, float shift) {
  for (int64_t i = 0; i < n; ++i) x[i] = exp_for_softmax(x[i] - shift);
  // Lane-wise partial sums: the grouping depends only on n, and the online softmax
  // always passes full blocks, so it stays independent of the call's other rows.
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  return sum;
}

}  // namespace std_ext::cpu
