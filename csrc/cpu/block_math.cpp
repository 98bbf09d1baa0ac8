#include "cpu/block_math.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

// The bodies (block_math_body.h) are compiled twice: for AVX2 + FMA, and for baseline
// x86-64 (SSE2) or whatever else this is built for. The first call picks one build by the
// CPU's features, once per process. The two builds round differently (FMA contracts the
// multiply-adds), so which one runs must never vary within a process: a Qn = γ+1 verify
// and the Qn = 1 decodes it must reproduce always take the same build.
#define STD_EXT_INLINE inline __attribute__((always_inline))

// The 32-byte vector helpers are always inlined into a build's entry points, so no AVX
// vector ever crosses a call boundary with a mismatched ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) && defined(__GNUC__)
#define STD_EXT_HAS_AVX2_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace std_ext::cpu::avx2 {
#include "cpu/block_math_body.h"
}  // namespace std_ext::cpu::avx2
#pragma GCC pop_options
#else
#define STD_EXT_HAS_AVX2_BUILD 0
#endif

namespace std_ext::cpu::baseline {
#include "cpu/block_math_body.h"
}  // namespace std_ext::cpu::baseline

namespace std_ext::cpu {
namespace {

// STD_EXT_CPU_BASELINE=1 in the environment forces the baseline build, so that its tests
// can run on a machine with AVX2.
bool use_avx2() {
#if STD_EXT_HAS_AVX2_BUILD
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           std::getenv("STD_EXT_CPU_BASELINE") == nullptr;
  return avx2;
#else
  return false;
#endif
}

}  // namespace

#if STD_EXT_HAS_AVX2_BUILD
#define STD_EXT_DISPATCH(call) return use_avx2() ? avx2::call : baseline::call
#else
#define STD_EXT_DISPATCH(call) return baseline::call
#endif

#define STD_EXT_CACHE_LOADERS(T)                                                                        \
  void load_keys_transposed(const T* base, int64_t row_stride, const int64_t* positions, int64_t n,        \
                            int64_t head_dim, float* kT) {                                                  \
    STD_EXT_DISPATCH(load_keys_transposed(base, row_stride, positions, n, head_dim, kT));                  \
  }                                                                                                          \
  void load_values(const T* base, int64_t row_stride, const int64_t* positions, int64_t n, int64_t head_dim, \
                   float* v) {                                                                              \
    STD_EXT_DISPATCH(load_values(base, row_stride, positions, n, head_dim, v));                            \
  }
STD_EXT_CACHE_LOADERS(float)
STD_EXT_CACHE_LOADERS(c10::Half)
STD_EXT_CACHE_LOADERS(c10::BFloat16)
#undef STD_EXT_CACHE_LOADERS

void block_logits(const float* q, int64_t rows, int64_t head_dim, const float* kT, float* logits, int64_t ld) {
  STD_EXT_DISPATCH(block_logits(q, rows, head_dim, kT, logits, ld));
}

void block_softmax(float* p, int64_t rows, const int64_t* visible, float* row_max, float* row_sum, float* acc,
                   int64_t head_dim) {
  STD_EXT_DISPATCH(block_softmax(p, rows, visible, row_max, row_sum, acc, head_dim));
}

void block_weighted_sum(const float* p, int64_t rows, int64_t head_dim, const float* v, float* acc) {
  STD_EXT_DISPATCH(block_weighted_sum(p, rows, head_dim, v, acc));
}

float exp_shifted_and_sum(float* x, int64_t n, float shift) { STD_EXT_DISPATCH(exp_shifted_and_sum(x, n, shift)); }

}  // namespace std_ext::cpu
