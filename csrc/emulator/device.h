// The device side of CUDA for g++: qualifiers, the built-in index variables, barriers,
// warp collectives, atomics, intrinsics, and the PTX the kernels reach through
// csrc/kernels/mma_utils.cuh (mma.sync, ldmatrix, cp.async, ex2.approx, griddepcontrol).
//
// Every collective captures its call site (__builtin_FILE / __builtin_LINE default
// arguments), so a fault names the line of the kernel (or of the helper in mma_utils.cuh
// that wraps the PTX).
#pragma once

#include "emulator/machine.h"
#include "emulator/types.h"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define __global__ __attribute__((visibility("default")))
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Block-scope thread_local is static per OS thread, and one OS thread runs one block at a
// time: each block has its own copy (machine.h poisons it at every block start).
#define __shared__ thread_local
#define __constant__

constexpr int warpSize = 32;

#define STD_EXT_EMU_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

namespace std_ext::emu {

// ---------------------------------------------------------------- built-in variables

// threadIdx, blockIdx, blockDim, gridDim are objects (not macros: cudaLaunchConfig_t has
// members named gridDim and blockDim) whose components read the running fiber when
// converted to unsigned, as the built-ins are.
enum class Builtin { kThreadIdx, kBlockIdx, kBlockDim, kGridDim };

template <Builtin kWhich>
inline const unsigned* builtin_vector() {
  const Fiber* f = self();
  if constexpr (kWhich == Builtin::kThreadIdx) return &f->tid.x;
  if constexpr (kWhich == Builtin::kBlockIdx) return &f->block->idx.x;
  if constexpr (kWhich == Builtin::kBlockDim) return &f->block->grid->block.x;
  if constexpr (kWhich == Builtin::kGridDim) return &f->block->grid->grid.x;
}

template <Builtin kWhich, int kComponent>
struct BuiltinComponent {
  operator unsigned() const { return builtin_vector<kWhich>()[kComponent]; }
};

template <Builtin kWhich>
struct BuiltinVector {
  BuiltinComponent<kWhich, 0> x;
  BuiltinComponent<kWhich, 1> y;
  BuiltinComponent<kWhich, 2> z;
  operator dim3() const {
    const unsigned* v = builtin_vector<kWhich>();
    return dim3(v[0], v[1], v[2]);
  }
};

static_assert(offsetof(uint3, y) == sizeof(unsigned) && offsetof(dim3, y) == sizeof(unsigned), "x, y, z in a row");

// ---------------------------------------------------------------- warp collectives

template <typename T>
struct ShuffleIO {
  T value;
  int source;  // lane
};

template <typename T>
void complete_shuffle(void* const* io, uint32_t mask) {
  T values[32];
  for (int lane = 0; lane < 32; ++lane) {
    if (mask >> lane & 1u) values[lane] = static_cast<ShuffleIO<T>*>(io[lane])->value;
  }
  for (int lane = 0; lane < 32; ++lane) {
    if (mask >> lane & 1u) {
      auto* mine = static_cast<ShuffleIO<T>*>(io[lane]);
      mine->value = values[mine->source];
    }
  }
}

enum class ShuffleMode { kIndex, kUp, kDown, kXor };

// PTX shfl.sync: the source lane within this lane's segment of `width` lanes; a source
// outside the segment returns the lane's own value.
template <typename T>
T shuffle(const char* name, ShuffleMode mode, uint32_t mask, T value, int b, int width, Site site) {
  static_assert(std::is_trivially_copyable_v<T>, "shuffles move trivially copyable values");
  const Fiber* f = self();
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fault(std::string(name) + " with width " + std::to_string(width) + " (a power of 2 up to 32 is required)", site);
  }
  const int lane = f->lane;
  const int min_lane = lane & ~(width - 1);
  const int max_lane = min_lane + width - 1;
  int source = lane;
  switch (mode) {
    case ShuffleMode::kIndex:
      source = min_lane + (b & (width - 1));
      break;
    case ShuffleMode::kUp:
      source = lane - b >= min_lane ? lane - b : lane;
      break;
    case ShuffleMode::kDown:
      source = lane + b <= max_lane ? lane + b : lane;
      break;
    case ShuffleMode::kXor:
      source = (lane ^ b) <= max_lane ? (lane ^ b) & 31 : lane;
      break;
  }
  if (!(mask >> source & 1u)) {
    fault(std::string(name) + " reads lane " + std::to_string(source) + ", which is not in the mask " + hex_mask(mask),
          site);
  }
  ShuffleIO<T> io{value, source};
  rendezvous(name, mask, site, &io, &complete_shuffle<T>);
  return io.value;
}

struct VoteIO {
  uint64_t key;
  uint32_t result;
};

inline void complete_ballot(void* const* io, uint32_t mask) {
  uint32_t bits = 0;
  for (int lane = 0; lane < 32; ++lane) {
    if ((mask >> lane & 1u) && static_cast<VoteIO*>(io[lane])->key != 0) bits |= 1u << lane;
  }
  for (int lane = 0; lane < 32; ++lane) {
    if (mask >> lane & 1u) static_cast<VoteIO*>(io[lane])->result = bits;
  }
}

inline void complete_match_any(void* const* io, uint32_t mask) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    auto* mine = static_cast<VoteIO*>(io[lane]);
    uint32_t peers = 0;
    for (int other = 0; other < 32; ++other) {
      if ((mask >> other & 1u) && static_cast<VoteIO*>(io[other])->key == mine->key) peers |= 1u << other;
    }
    mine->result = peers;
  }
}

inline void complete_nothing(void* const*, uint32_t) {}

template <typename T>
uint64_t match_key(T value) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32- or 64-bit values");
  uint64_t key = 0;
  std::memcpy(&key, &value, sizeof(T));
  return key;
}

// ---------------------------------------------------------------- mma.sync and ldmatrix

struct MmaIO {
  float* c;
  const uint32_t* a;
  uint32_t b0, b1;
};

template <typename T>
float element_value(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    return half_bits_to_float(bits);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma takes __half or __nv_bfloat16");
    return bf16_bits_to_float(bits);
  }
}

// D = C + A.B over the fragment layouts of mma_utils.cuh (g = lane / 4, t = lane % 4).
// Each product of two 16-bit values is exact in fp32; the sum over k runs in fp32, k
// ascending from 0, and is then added to C. The tensor cores' internal order and
// precision are not specified by NVIDIA: this proves layouts and indexing, not rounding.
template <typename T>
void complete_mma(void* const* io, uint32_t) {
  float a[16][16], b[16][8], c[16][8];
  auto lo = [](uint32_t r) { return element_value<T>(static_cast<uint16_t>(r & 0xffffu)); };
  auto hi = [](uint32_t r) { return element_value<T>(static_cast<uint16_t>(r >> 16)); };
  for (int lane = 0; lane < 32; ++lane) {
    const auto* m = static_cast<const MmaIO*>(io[lane]);
    const int g = lane / 4, t = lane % 4;
    a[g][2 * t] = lo(m->a[0]), a[g][2 * t + 1] = hi(m->a[0]);
    a[g + 8][2 * t] = lo(m->a[1]), a[g + 8][2 * t + 1] = hi(m->a[1]);
    a[g][2 * t + 8] = lo(m->a[2]), a[g][2 * t + 9] = hi(m->a[2]);
    a[g + 8][2 * t + 8] = lo(m->a[3]), a[g + 8][2 * t + 9] = hi(m->a[3]);
    b[2 * t][g] = lo(m->b0), b[2 * t + 1][g] = hi(m->b0);
    b[2 * t + 8][g] = lo(m->b1), b[2 * t + 9][g] = hi(m->b1);
    c[g][2 * t] = m->c[0], c[g][2 * t + 1] = m->c[1];
    c[g + 8][2 * t] = m->c[2], c[g + 8][2 * t + 1] = m->c[3];
  }
  float d[16][8];
  for (int row = 0; row < 16; ++row) {
    for (int col = 0; col < 8; ++col) {
      float sum = 0.f;
      for (int k = 0; k < 16; ++k) sum += a[row][k] * b[k][col];
      d[row][col] = c[row][col] + sum;
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto* m = static_cast<MmaIO*>(io[lane]);
    const int g = lane / 4, t = lane % 4;
    m->c[0] = d[g][2 * t], m->c[1] = d[g][2 * t + 1];
    m->c[2] = d[g + 8][2 * t], m->c[3] = d[g + 8][2 * t + 1];
  }
}

struct LdmatrixIO {
  const unsigned char* row;  // this lane's row address (lanes 8m..8m+7: rows of matrix m)
  uint32_t* r;
};

inline uint16_t load16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Register m of lane l: row l / 4 of matrix m, elements 2 (l % 4) and +1; transposed:
// column l / 4, rows 2 (l % 4) and +1.
template <bool kTrans>
void complete_ldmatrix(void* const* io, uint32_t) {
  uint32_t out[32][4];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int m = 0; m < 4; ++m) {
      auto row = [&](int r) { return static_cast<const LdmatrixIO*>(io[8 * m + r])->row; };
      if (kTrans) {
        out[lane][m] = load16(row(2 * t) + 2 * g) | static_cast<uint32_t>(load16(row(2 * t + 1) + 2 * g)) << 16;
      } else {
        std::memcpy(&out[lane][m], row(g) + 4 * t, 4);
      }
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    std::memcpy(static_cast<LdmatrixIO*>(io[lane])->r, out[lane], sizeof out[lane]);
  }
}

// ---------------------------------------------------------------- the hooks of mma_utils.cuh

template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, STD_EXT_EMU_SITE) {
  MmaIO io{c, a, b0, b1};
  rendezvous(std::is_same_v<T, __half> ? "mma.sync.m16n8k16.f16" : "mma.sync.m16n8k16.bf16", 0xffffffffu,
             Site{file, line}, &io, &complete_mma<T>);
}

inline void ldmatrix_x4(uint32_t smem_addr, uint32_t (&r)[4], bool trans, STD_EXT_EMU_SITE) {
  const Site site{file, line};
  const char* name = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
  if (smem_addr % 16 != 0) fault(std::string(name) + ": row address " + hex_mask(smem_addr) + " is not 16-byte aligned", site);
  LdmatrixIO io{shared_pointer(smem_addr, 16, name, site), r};
  rendezvous(name, 0xffffffffu, site, &io, trans ? &complete_ldmatrix<true> : &complete_ldmatrix<false>);
}

inline unsigned char* dynamic_shared_memory() { return self()->block->smem; }

// The destination is poisoned (0xFF: NaN in every float type) now and receives the data
// only when the cp.async.wait_group that retires its group runs, so a missing or short
// wait reads NaN. The source is read at that wait, too.
inline void cp_async(uint32_t smem_addr, const void* gmem, int bytes, int src_bytes, STD_EXT_EMU_SITE) {
  const Site site{file, line};
  if (bytes != 4 && bytes != 8 && bytes != 16) fault("cp.async of " + std::to_string(bytes) + " bytes", site);
  if (src_bytes < 0 || src_bytes > bytes) fault("cp.async with src-size " + std::to_string(src_bytes), site);
  if (smem_addr % static_cast<uint32_t>(bytes) != 0) {
    fault("cp.async destination " + hex_mask(smem_addr) + " is not aligned to its " + std::to_string(bytes) + " bytes",
          site);
  }
  unsigned char* dst = shared_pointer(smem_addr, bytes, "cp.async destination", site);
  if (reinterpret_cast<uintptr_t>(gmem) % static_cast<uintptr_t>(bytes) != 0) {
    fault("cp.async source is not aligned to its " + std::to_string(bytes) + " bytes", site);
  }
  std::memset(dst, 0xFF, bytes);
  self()->copies.push_back(PendingCopy{dst, static_cast<const unsigned char*>(gmem), bytes, src_bytes, -1});
}

inline void cp_async_commit() {
  Fiber* f = self();
  for (PendingCopy& c : f->copies) {
    if (c.group < 0) c.group = f->committed;
  }
  ++f->committed;
}

// Retires (delivers, in issue order) every committed group but the newest `pending`.
inline void cp_async_wait(int pending) {
  Fiber* f = self();
  const int64_t last_retired = f->committed - 1 - pending;
  size_t kept = 0;
  for (size_t i = 0; i < f->copies.size(); ++i) {
    const PendingCopy& c = f->copies[i];
    if (c.group >= 0 && c.group <= last_retired) {
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
    } else {
      f->copies[kept++] = c;
    }
  }
  f->copies.resize(kept);
}

// ex2.approx.ftz.f32: subnormal inputs and results flushed to zero. The hardware's
// approximation error (about 2 ulp) is not modelled: exp2f is correctly rounded here.
inline float ex2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

// Starting the dependents earlier than the hardware would changes nothing: the emulator
// already starts them before the primary runs at all (machine.h, run_dependent_pair).
inline void griddepcontrol_launch_dependents() {}

inline void griddepcontrol_wait() {
  Fiber* f = self();
  if (f->block->grid->primary_done.load()) return;
  f->wait = WaitKind::kDependency;
  f->what = "griddepcontrol.wait";
  f->site = Site{"griddepcontrol.wait", 0};
  yield(f);
}

}  // namespace std_ext::emu

// ---------------------------------------------------------------- CUDA built-ins

inline constexpr std_ext::emu::BuiltinVector<std_ext::emu::Builtin::kThreadIdx> threadIdx{};
inline constexpr std_ext::emu::BuiltinVector<std_ext::emu::Builtin::kBlockIdx> blockIdx{};
inline constexpr std_ext::emu::BuiltinVector<std_ext::emu::Builtin::kBlockDim> blockDim{};
inline constexpr std_ext::emu::BuiltinVector<std_ext::emu::Builtin::kGridDim> gridDim{};

inline void __syncthreads(STD_EXT_EMU_SITE) { std_ext::emu::block_barrier({file, line}); }

inline void __syncwarp(unsigned mask = 0xffffffffu, STD_EXT_EMU_SITE) {
  std_ext::emu::rendezvous("__syncwarp", mask, {file, line}, nullptr, &std_ext::emu::complete_nothing);
}

// The lanes of the warp converged at this call (machine.h, converge()).
inline unsigned __activemask(STD_EXT_EMU_SITE) { return std_ext::emu::converge({file, line}); }

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, STD_EXT_EMU_SITE) {
  return std_ext::emu::shuffle("__shfl_sync", std_ext::emu::ShuffleMode::kIndex, mask, var, src_lane, width,
                               {file, line});
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, STD_EXT_EMU_SITE) {
  return std_ext::emu::shuffle("__shfl_up_sync", std_ext::emu::ShuffleMode::kUp, mask, var, static_cast<int>(delta),
                               width, {file, line});
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, STD_EXT_EMU_SITE) {
  return std_ext::emu::shuffle("__shfl_down_sync", std_ext::emu::ShuffleMode::kDown, mask, var,
                               static_cast<int>(delta), width, {file, line});
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, STD_EXT_EMU_SITE) {
  return std_ext::emu::shuffle("__shfl_xor_sync", std_ext::emu::ShuffleMode::kXor, mask, var, lane_mask, width,
                               {file, line});
}

inline unsigned __ballot_sync(unsigned mask, int predicate, STD_EXT_EMU_SITE) {
  std_ext::emu::VoteIO io{predicate != 0 ? 1u : 0u, 0};
  std_ext::emu::rendezvous("__ballot_sync", mask, {file, line}, &io, &std_ext::emu::complete_ballot);
  return io.result;
}
inline int __all_sync(unsigned mask, int predicate, STD_EXT_EMU_SITE) {
  std_ext::emu::VoteIO io{predicate != 0 ? 1u : 0u, 0};
  std_ext::emu::rendezvous("__all_sync", mask, {file, line}, &io, &std_ext::emu::complete_ballot);
  return io.result == mask;
}
inline int __any_sync(unsigned mask, int predicate, STD_EXT_EMU_SITE) {
  std_ext::emu::VoteIO io{predicate != 0 ? 1u : 0u, 0};
  std_ext::emu::rendezvous("__any_sync", mask, {file, line}, &io, &std_ext::emu::complete_ballot);
  return io.result != 0;
}
template <typename T>
unsigned __match_any_sync(unsigned mask, T value, STD_EXT_EMU_SITE) {
  std_ext::emu::VoteIO io{std_ext::emu::match_key(value), 0};
  std_ext::emu::rendezvous("__match_any_sync", mask, {file, line}, &io, &std_ext::emu::complete_match_any);
  return io.result;
}

inline size_t __cvta_generic_to_shared(const void* p, STD_EXT_EMU_SITE) {
  return std_ext::emu::shared_address(p, {file, line});
}

// Blocks run on several OS threads: global memory needs real atomics and fences.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}

template <typename T>
T atomicAdd(T* address, T value) {
  if constexpr (std::is_floating_point_v<T>) {
    T old = __atomic_load_n(address, __ATOMIC_RELAXED);
    T desired;
    do {
      desired = old + value;
    } while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return old;
  } else {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
  }
}
template <typename T>
T atomicSub(T* address, T value) {
  return __atomic_fetch_sub(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicExch(T* address, T value) {
  T old;
  __atomic_exchange(address, &value, &old, __ATOMIC_SEQ_CST);
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  __atomic_compare_exchange(address, &compare, &value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
template <typename T>
T atomicMax(T* address, T value) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < value && !__atomic_compare_exchange(address, &old, &value, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (value < old && !__atomic_compare_exchange(address, &old, &value, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
T atomicOr(T* address, T value) {
  return __atomic_fetch_or(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicAnd(T* address, T value) {
  return __atomic_fetch_and(address, value, __ATOMIC_SEQ_CST);
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}

// SSE arithmetic rounds each operation to nearest even; the library is built with
// -ffp-contract=off, so nothing is fused behind the kernel's back.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline unsigned __float_as_uint(float f) { return std_ext::emu::float_bits(f); }
inline float __uint_as_float(unsigned u) { return std_ext::emu::bits_float(u); }
inline int __float_as_int(float f) { return static_cast<int>(std_ext::emu::float_bits(f)); }
inline float __int_as_float(int i) { return std_ext::emu::bits_float(static_cast<uint32_t>(i)); }

// CUDA's device min/max overloads (the kernels call them unqualified).
#define STD_EXT_EMU_MIN_MAX(T)                    \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
STD_EXT_EMU_MIN_MAX(int)
STD_EXT_EMU_MIN_MAX(unsigned)
STD_EXT_EMU_MIN_MAX(long)
STD_EXT_EMU_MIN_MAX(unsigned long)
STD_EXT_EMU_MIN_MAX(long long)
STD_EXT_EMU_MIN_MAX(unsigned long long)
#undef STD_EXT_EMU_MIN_MAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
