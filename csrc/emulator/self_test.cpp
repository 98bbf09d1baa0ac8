// Self-test kernels of the emulator, behind one op of the emulated library:
//   torch.ops.std_emulated.emu_self_test(name, inputs) -> outputs
// python_tests/test_emulator.py drives them: fragment layouts of mma / ldmatrix against
// float64, cp.async delivery, shared-memory poison, the faults (deadlocks, masks,
// divergent barriers) with their source lines, launch limits, occupancy, schedules and
// the dependent launch. Each kernel goes through the same mma_utils.cuh wrappers as the
// project's kernels.
#include "kernels/mma_utils.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

// A named namespace (not an anonymous one): kernels must be exported symbols for the
// emulator to name them in its reports.
namespace std_ext::emu_self_test {

namespace mma = kernels::mma;

// One warp: A [16,16] row major, B [16,8] (k, n) and C [16,8] fp32 from global memory,
// loaded into the fragment layouts written at the top of mma_utils.cuh.
template <typename T>
__global__ void mma_kernel(const uint16_t* a, const uint16_t* b, float* c) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  auto pair = [](const uint16_t* p0, const uint16_t* p1) { return uint32_t{*p0} | uint32_t{*p1} << 16; };
  auto at = [&](int r, int k) { return a + r * 16 + k; };
  auto bt = [&](int k, int n) { return b + k * 8 + n; };
  const uint32_t fa[4] = {pair(at(g, 2 * t), at(g, 2 * t + 1)), pair(at(g + 8, 2 * t), at(g + 8, 2 * t + 1)),
                          pair(at(g, 2 * t + 8), at(g, 2 * t + 9)), pair(at(g + 8, 2 * t + 8), at(g + 8, 2 * t + 9))};
  const uint32_t b0 = pair(bt(2 * t, g), bt(2 * t + 1, g));
  const uint32_t b1 = pair(bt(2 * t + 8, g), bt(2 * t + 9, g));
  float fc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  mma::Element<T>::mma(fc, fa, b0, b1);
  c[g * 8 + 2 * t] = fc[0], c[g * 8 + 2 * t + 1] = fc[1];
  c[(g + 8) * 8 + 2 * t] = fc[2], c[(g + 8) * 8 + 2 * t + 1] = fc[3];
}

// Four 8x8 16-bit matrices staged in shared memory with a row pitch of 24 elements (so
// that row addresses are not contiguous); lane 8m + r passes row r of matrix m.
// out[lane][m] = register m.
__global__ void ldmatrix_kernel(const uint16_t* matrices, uint32_t* out, bool trans) {
  constexpr int kPitch = 24;
  uint16_t* smem = reinterpret_cast<uint16_t*>(mma::dynamic_shared_memory());
  const int lane = threadIdx.x;
  for (int i = lane; i < 4 * 8 * 8; i += 32) smem[(i / 8) * kPitch + i % 8] = matrices[i];
  __syncwarp();
  uint32_t r[4];
  const void* row = smem + lane * kPitch;
  if (trans) {
    mma::ldmatrix_x4_trans(r, row);
  } else {
    mma::ldmatrix_x4(r, row);
  }
  for (int m = 0; m < 4; ++m) out[lane * 4 + m] = r[m];
}

// Thread 0 copies src[0..3] (group 0, 16 bytes), src[4..7] (group 1, 16 bytes), zero-fills
// 4 floats (group 1, src-size 0) and copies src[8..9] (group 2, 8 bytes), reading the
// destination after each step: out rows = before any wait, after wait_group 2, 1, 0.
__global__ void cp_async_kernel(const float* src, float* out) {
  float* smem = reinterpret_cast<float*>(mma::dynamic_shared_memory());
  if (threadIdx.x != 0) return;
  auto snapshot = [&](int row) {
    for (int i = 0; i < 14; ++i) out[row * 14 + i] = smem[i];
  };
  mma::cp_async_16(smem, src, true);
  mma::cp_async_commit();
  mma::cp_async_16(smem + 4, src + 4, true);
  mma::cp_async_16(smem + 8, src, false);
  mma::cp_async_commit();
  mma::cp_async_8(mma::smem_address(smem + 12), src + 8);
  mma::cp_async_commit();
  snapshot(0);
  mma::cp_async_wait<2>();
  snapshot(1);
  mma::cp_async_wait<1>();
  snapshot(2);
  mma::cp_async_wait<0>();
  snapshot(3);
}

// What a block finds in its shared memory before writing it: out[block] = (first word of
// the dynamic smem, first word of a static __shared__ array); then it scribbles on both.
__global__ void poison_kernel(uint32_t* out) {
  __shared__ uint32_t static_words[64];
  uint32_t* dynamic_words = reinterpret_cast<uint32_t*>(mma::dynamic_shared_memory());
  if (threadIdx.x == 0) {
    out[blockIdx.x * 2] = dynamic_words[0];
    out[blockIdx.x * 2 + 1] = static_words[0];
  }
  __syncthreads();
  static_words[threadIdx.x] = threadIdx.x;
  dynamic_words[threadIdx.x] = threadIdx.x;
}

// Lane 5 skips a shuffle that the rest of its warp waits at.
__global__ void skipped_shuffle_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int v = lane;
  if (lane != 5) v = __shfl_xor_sync(0xffffffffu, v, 1);  // line of the deadlock
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 64) {
    __syncthreads();  // line of the fault
  }
  out[threadIdx.x] = 1;
}

// Half a warp passes a mask the other half does not.
__global__ void mask_mismatch_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  const unsigned mask = lane < 16 ? 0xffffffffu : 0xffff0000u;
  out[threadIdx.x] = __shfl_sync(mask, lane, lane < 16 ? 0 : 16);  // line of the fault
}

// A thread writes one byte past the launch's dynamic shared memory.
__global__ void smem_overrun_kernel(int bytes) {
  if (threadIdx.x == 0) mma::dynamic_shared_memory()[bytes] = 1;
}

__global__ void big_smem_kernel(int* out) {
  if (threadIdx.x == 0) out[0] = 1;
}

// The order threads run in: each records (tid) before __syncwarp and (100 + tid) after.
__global__ void order_kernel(int* order, int* counter) {
  order[atomicAdd(counter, 1)] = threadIdx.x;
  __syncwarp();
  order[atomicAdd(counter, 1)] = 100 + threadIdx.x;
}

// A loop whose last round only lanes 0..n-33 of the warp enter: __activemask() there must
// answer those lanes (they are the converged ones), and a __match_any_sync over it must not
// wait for the others. out[lane] = the last round's answer.
__global__ void activemask_kernel(uint32_t* out, int n) {
  uint32_t last = 0;
  for (int i = threadIdx.x; i < n; i += 32) {
    const unsigned mask = __activemask();
    last = __match_any_sync(mask, i / 32) == mask ? mask : 0;
  }
  __syncthreads();
  out[threadIdx.x] = last;
}

__global__ void primary_kernel(int* data) { data[blockIdx.x * blockDim.x + threadIdx.x] = 1; }

// Reads the primary's output (with or without waiting for the primary grid first).
__global__ void dependent_kernel(const int* data, int* seen, bool wait) {
  if (wait) mma::wait_for_primary_grid();
  seen[blockIdx.x * blockDim.x + threadIdx.x] = data[blockIdx.x * blockDim.x + threadIdx.x];
}

void check(cudaError_t launch_error) {
  const std::string fault = emu::synchronize();
  TORCH_CHECK(fault.empty(), fault);
  TORCH_CHECK(launch_error == cudaSuccess, "emulated launch failed: ", cudaGetErrorString(launch_error));
}

cudaError_t last_error() { return cudaGetLastError(); }

at::Tensor ints(std::initializer_list<int64_t> sizes) { return at::zeros(sizes, at::TensorOptions().dtype(at::kInt)); }

template <typename... Params, typename... Args>
void run(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  kernels::launch_kernel(kernel, grid, block, smem, nullptr, std::forward<Args>(args)...);
  check(last_error());
}

std::vector<at::Tensor> self_test(const std::string& name, const std::vector<at::Tensor>& in) {
  if (name == "mma_bf16" || name == "mma_f16") {
    // in: a [16,16], b [16,8] as int16 bit patterns, c [16,8] fp32 -> c + a.b
    at::Tensor c = in[2].contiguous().clone();
    const auto* a = reinterpret_cast<const uint16_t*>(in[0].contiguous().const_data_ptr());
    const auto* b = reinterpret_cast<const uint16_t*>(in[1].contiguous().const_data_ptr());
    if (name == "mma_bf16") {
      run(mma_kernel<__nv_bfloat16>, 1, 32, 0, a, b, c.mutable_data_ptr<float>());
    } else {
      run(mma_kernel<__half>, 1, 32, 0, a, b, c.mutable_data_ptr<float>());
    }
    return {c};
  }
  if (name == "ldmatrix" || name == "ldmatrix_trans") {
    at::Tensor out = ints({32, 4});
    const at::Tensor m = in[0].contiguous();
    run(ldmatrix_kernel, 1, 32, 32 * 24 * 2, reinterpret_cast<const uint16_t*>(m.const_data_ptr()),
        reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int>()), name == "ldmatrix_trans");
    return {out};
  }
  if (name == "cp_async") {
    at::Tensor out = at::zeros({4, 14}, at::TensorOptions().dtype(at::kFloat));
    const at::Tensor src = in[0].contiguous();
    run(cp_async_kernel, 1, 32, 64, src.const_data_ptr<float>(), out.mutable_data_ptr<float>());
    return {out};
  }
  if (name == "poison") {
    at::Tensor out = ints({4, 2});
    run(poison_kernel, 4, 64, 256, reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int>()));
    return {out};
  }
  if (name == "skipped_shuffle" || name == "divergent_barrier" || name == "mask_mismatch") {
    at::Tensor out = ints({128});
    auto* kernel = name == "skipped_shuffle"     ? skipped_shuffle_kernel
                   : name == "divergent_barrier" ? divergent_barrier_kernel
                                                 : mask_mismatch_kernel;
    run(kernel, 2, 128, 0, out.mutable_data_ptr<int>());
    return {out};
  }
  if (name == "smem_overrun") {
    run(smem_overrun_kernel, 1, 32, 1000, 1000);
    return {};
  }
  if (name == "big_smem") {
    // [launch error without the opt-in, with it, with more than the opt-in allows]
    at::Tensor out = ints({1});
    at::Tensor errors = ints({3});
    int* e = errors.mutable_data_ptr<int>();
    constexpr int kBytes = 64 * 1024;
    kernels::launch_kernel(big_smem_kernel, 1, 32, kBytes, nullptr, out.mutable_data_ptr<int>());
    e[0] = last_error();
    TORCH_CHECK(cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes) == cudaSuccess);
    kernels::launch_kernel(big_smem_kernel, 1, 32, kBytes, nullptr, out.mutable_data_ptr<int>());
    e[1] = last_error();
    kernels::launch_kernel(big_smem_kernel, 1, 32, kBytes + 16, nullptr, out.mutable_data_ptr<int>());
    e[2] = last_error();
    check(cudaSuccess);
    cudaDeviceReset();  // drops the opt-in, so the test can run again in this process
    return {errors, out};
  }
  if (name == "occupancy") {
    // in[0]: [n, 2] (threads, dynamic smem) -> blocks per SM (big_smem_kernel, no opt-in),
    // then the same with a 227 KB opt-in.
    const at::Tensor cfg = in[0].to(at::kLong).contiguous();
    const int64_t n = cfg.size(0);
    at::Tensor out = ints({2, n});
    const int64_t* c = cfg.const_data_ptr<int64_t>();
    for (int pass = 0; pass < 2; ++pass) {
      if (pass == 1) cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024);
      for (int64_t i = 0; i < n; ++i) {
        int blocks = -1;
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, big_smem_kernel, static_cast<int>(c[2 * i]),
                                                      static_cast<size_t>(c[2 * i + 1]));
        out.mutable_data_ptr<int>()[pass * n + i] = blocks;
      }
    }
    cudaDeviceReset();
    return {out};
  }
  if (name == "order") {
    at::Tensor order = ints({128});
    at::Tensor counter = ints({1});
    run(order_kernel, 1, 64, 0, order.mutable_data_ptr<int>(), counter.mutable_data_ptr<int>());
    return {order};
  }
  if (name == "activemask") {
    at::Tensor out = ints({32});
    run(activemask_kernel, 1, 32, 0, reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int>()), 40);
    return {out};
  }
  if (name == "dependent" || name == "dependent_no_wait") {
    // A primary grid of 8 blocks writes 1s; the dependent grid (a programmatic dependent
    // launch) reads them. [what each dependent thread read]
    constexpr int kBlocks = 8, kThreads = 32;
    at::Tensor data = ints({kBlocks * kThreads});
    at::Tensor seen = ints({kBlocks * kThreads});
    kernels::launch_kernel(primary_kernel, kBlocks, kThreads, 0, nullptr, data.mutable_data_ptr<int>());
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(kBlocks);
    config.blockDim = dim3(kThreads);
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    check(cudaLaunchKernelEx(&config, dependent_kernel, static_cast<const int*>(data.const_data_ptr<int>()),
                             seen.mutable_data_ptr<int>(), name == "dependent"));
    return {seen};
  }
  TORCH_CHECK(false, "emu_self_test: unknown test '", name, "'");
}

}  // namespace std_ext::emu_self_test

TORCH_LIBRARY_FRAGMENT(std_emulated, m) {
  m.def("emu_self_test(str name, Tensor[] inputs) -> Tensor[]", &std_ext::emu_self_test::self_test);
}
