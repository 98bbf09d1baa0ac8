// What the tensor-core kernels share: thin wrappers over the PTX they are built from
// (mma.sync m16n8k16 with fp32 accumulate, ldmatrix, cp.async, ex2.approx, griddepcontrol),
// the dynamic shared memory, the 16-bit element types they take, and the host-side
// shared-memory opt-in. Torch-free.
//
// Every inline PTX statement of the kernels lives here, so that the same kernel sources
// compile for the GPU (nvcc) and for the CPU emulator of the SIMT machine
// (csrc/emulator/, STD_EXT_EMULATOR), which supplies each of these operations in software.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16x16, row major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, "col"):      b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C (16x8, fp32):       c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/launch.cuh"

#ifdef STD_EXT_EMULATOR
#include "emulator/emulator.h"
#endif

#include <atomic>
#include <cstdint>

namespace std_ext::kernels::mma {

// Per element type: packing two floats into the 32-bit register mma takes, and the
// matching mma instruction. The build defines __CUDA_NO_HALF_CONVERSIONS__ etc., so every
// conversion goes through an explicit intrinsic.
template <typename T>
struct Element;

template <>
struct Element<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __float2bfloat16_rn(0.f); }
  // c += a * b
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef STD_EXT_EMULATOR
    emu::mma_m16n8k16<__nv_bfloat16>(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

template <>
struct Element<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half zero() { return __float2half_rn(0.f); }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef STD_EXT_EMULATOR
    emu::mma_m16n8k16<__half>(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The copies and loads below come in two forms: a generic pointer into shared memory, or
// its 32-bit shared-window address (smem_address) for kernels that do address arithmetic
// on it directly.

// Four 8x8 16-bit matrices; lanes 8m..8m+7 give the row addresses of matrix m, and
// register m receives this lane's part of matrix m.
__device__ __forceinline__ void ldmatrix_x4(uint32_t smem_row, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                            uint32_t& r3) {
#ifdef STD_EXT_EMULATOR
  uint32_t r[4];
  emu::ldmatrix_x4(smem_row, r, /*trans=*/false);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_row));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  ldmatrix_x4(smem_address(smem_row), r[0], r[1], r[2], r[3]);
}

// As ldmatrix_x4, each matrix transposed (lane gets column g, rows 2t and 2t+1).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#ifdef STD_EXT_EMULATOR
  emu::ldmatrix_x4(smem_address(smem_row), r, /*trans=*/true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem_row)));
#endif
}

// 16-byte global -> shared copy that bypasses L1. When !valid nothing is read and the
// destination is zero-filled, so rows past a list's end cost no traffic and hold no
// garbage (a NaN in a masked row would still poison P.V through 0 * NaN).
__device__ __forceinline__ void cp_async_16(uint32_t smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
#ifdef STD_EXT_EMULATOR
  emu::cp_async(smem, gmem, 16, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_bytes));
#endif
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  cp_async_16(smem_address(smem), gmem, valid);
}

// An L2 cache policy that evicts the lines it covers first (createpolicy, sm_80+): for data
// read once, so that it does not displace data that is read again.
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
#ifdef STD_EXT_EMULATOR
  return 0;  // a cache hint: the emulator has no cache
#else
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
#endif
}

// cp_async_16 with an L2 cache policy (l2_evict_first_policy) on the global read.
__device__ __forceinline__ void cp_async_16_evict_first(void* smem, const void* gmem, bool valid, uint64_t policy) {
  const int src_bytes = valid ? 16 : 0;
#ifdef STD_EXT_EMULATOR
  (void)policy;
  emu::cp_async(smem_address(smem), gmem, 16, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(smem_address(smem)),
               "l"(gmem), "r"(src_bytes), "l"(policy));
#endif
}

// 8 bytes global -> shared through L1 (small metadata rows).
__device__ __forceinline__ void cp_async_8(uint32_t smem, const void* gmem) {
#ifdef STD_EXT_EMULATOR
  emu::cp_async(smem, gmem, 8, 8);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem), "l"(gmem));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef STD_EXT_EMULATOR
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef STD_EXT_EMULATOR
  emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// 2^x with subnormal results flushed to zero (ex2.approx.ftz); ex2.approx(-inf) = +0,
// which the attention kernels' masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef STD_EXT_EMULATOR
  return emu::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

// The block's dynamic shared memory (the launch's dynamicSmemBytes), 128-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
#ifdef STD_EXT_EMULATOR
  return emu::dynamic_shared_memory();
#else
  extern __shared__ __align__(128) unsigned char dynamic_smem[];
  return dynamic_smem;
#endif
}

// Programmatic dependent launch (sm_90+): a primary grid lets the grid launched after it
// start early, and that dependent grid waits for the primary's completion (and memory)
// before it reads anything the primary wrote. Both are no-ops on older architectures,
// where the dependent grid simply starts after the primary has finished.
__device__ __forceinline__ void launch_dependent_grids() {
#ifdef STD_EXT_EMULATOR
  if (emu::arch() >= 90) emu::griddepcontrol_launch_dependents();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_primary_grid() {
#ifdef STD_EXT_EMULATOR
  if (emu::arch() >= 90) emu::griddepcontrol_wait();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Opts kKernel into kBytes of dynamic shared memory (past the default 48 KB) once per
// device, so that calls after the first (e.g. under CUDA-graph capture) make no runtime
// call besides the launches. A device reset (cudaDeviceReset) drops the setting but not
// this flag: launch_with_dynamic_smem below notices and sets it again.
template <auto kKernel, int kBytes>
cudaError_t allow_dynamic_smem(bool force = false) {
  static std::atomic<uint64_t> configured_devices{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (!force && bit != 0 && (configured_devices.load(std::memory_order_relaxed) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (err == cudaSuccess) configured_devices.fetch_or(bit, std::memory_order_relaxed);
  return err;
}

// Runs `launch` (which launches kKernel with kBytes of dynamic shared memory) and returns
// its launch error. A launch refused after a device reset, whose fresh context no longer
// has the opt-in, sets the attribute again and is retried once; the common path costs
// nothing beyond the launch.
template <auto kKernel, int kBytes, typename Launch>
cudaError_t launch_with_dynamic_smem(Launch&& launch) {
  cudaError_t err = allow_dynamic_smem<kKernel, kBytes>();
  if (err != cudaSuccess) return err;
  launch();
  err = cudaGetLastError();
  if (err == cudaSuccess || kBytes <= 48 * 1024) return err;
  if (allow_dynamic_smem<kKernel, kBytes>(/*force=*/true) != cudaSuccess) return err;
  launch();
  return cudaGetLastError();
}

// Blocks of kKernel (kThreads threads, kBytes of dynamic shared memory) that one SM of
// `device` (the current device: the caller's guard made it so) holds at once, from the
// occupancy API; asked once per device (a property of the code and the device, which a
// device reset does not change). At least 1. A failed query answers 1 and that answer is
// kept too: callers size work splits by it, and a split count that changed from one call
// to the next would change the order of their reductions. The device is the caller's
// (the tensor's), never asked of the runtime here, so no failure of that question can
// make two calls on one device answer differently.
template <auto kKernel, int kThreads, int kBytes>
int resident_blocks_per_sm(int device) {
  static std::atomic<int> answers[64] = {};
  const bool cached = device >= 0 && device < 64;
  if (cached) {
    const int known = answers[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int blocks = 0;
  // The opt-in first: above 48 KB the occupancy calculator counts only what the kernel may use.
  if (allow_dynamic_smem<kKernel, kBytes>() != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kKernel, kThreads, kBytes) != cudaSuccess) {
    cudaGetLastError();  // the launch reports any real problem
    blocks = 1;
  }
  if (blocks < 1) blocks = 1;
  if (cached) {
    int expected = 0;  // the first answer stays, whatever a racing thread found
    if (!answers[device].compare_exchange_strong(expected, blocks, std::memory_order_relaxed)) blocks = expected;
  }
  return blocks;
}

}  // namespace std_ext::kernels::mma
