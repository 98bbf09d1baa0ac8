// The host runtime the launchers call, emulating one H100 SXM (device 0) on one in-order
// stream: device properties from one table, function attributes, the occupancy
// calculator, launches (<<<>>> through std_ext::emu::launch, and cudaLaunchKernelEx with
// the dependent launch), memset/memcpy and synchronization.
//
// A launch checks its configuration at once (the error the runtime returns) and queues
// the grid; a queued grid runs when the next launch arrives, at any synchronization or
// memory operation, or at std_ext::emu::synchronize() (the glue's C10_CUDA_CHECK). That
// one-grid delay is what lets a dependent launch (programmatic stream serialization,
// arch 90) start before its primary. Faults found while a grid runs are kept until
// synchronize() hands them over; meanwhile the runtime reports cudaErrorLaunchFailure.
#pragma once

#include "emulator/machine.h"
#include "emulator/types.h"

#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999,
};
using cudaError = cudaError_t;

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMaxRegistersPerBlock = 12,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxRegistersPerMultiprocessor = 82,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMaxBlocksPerMultiprocessor = 106,
  cudaDevAttrReservedSharedMemoryPerBlock = 111,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  size_t constSizeBytes;
  size_t localSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int ptxVersion;
  int binaryVersion;
  int cacheModeCA;
  int maxDynamicSharedSizeBytes;
  int preferredShmemCarveout;
};

enum cudaLaunchAttributeID {
  cudaLaunchAttributeIgnore = 0,
  cudaLaunchAttributeProgrammaticStreamSerialization = 5,
};

union cudaLaunchAttributeValue {
  char pad[64];
  int programmaticStreamSerializationAllowed;
};

struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  char pad[8 - sizeof(cudaLaunchAttributeID)];
  cudaLaunchAttributeValue val;
};

struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

namespace std_ext::emu {

// The emulated device, an H100 SXM: every limit the runtime answers or enforces.
struct DeviceProperties {
  int sm_count = 132;
  int smem_per_sm = 228 * 1024;
  int smem_per_block_optin = 227 * 1024;
  int smem_per_block = 48 * 1024;  // without the opt-in
  int reserved_smem_per_block = 1024;
  int smem_allocation_unit = 128;
  int regs_per_sm = 65536;
  int regs_per_block = 65536;
  int reg_allocation_unit = 256;  // registers per warp are allocated in these units
  int max_threads_per_sm = 2048;
  int max_blocks_per_sm = 32;
  int warp_size = 32;
  int max_threads_per_block = 1024;
  int max_block_dim[3] = {1024, 1024, 64};
  int max_grid_dim[3] = {2147483647, 65535, 65535};
  // Registers per thread of a kernel: g++ cannot know what ptxas would allocate. This
  // default keeps the occupancy of the project's kernels bound by shared memory and
  // threads, as it is on the hardware.
  int default_regs_per_thread = 64;
};

inline const DeviceProperties& device() {
  static const DeviceProperties properties;
  return properties;
}

struct Runtime {
  std::mutex mutex;
  std::unique_ptr<Grid> queued;
  std::string fault;  // the first fault not yet handed to synchronize()
  cudaError_t last_error = cudaSuccess;
  std::map<const void*, int> max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize
};

inline Runtime& runtime() {
  static Runtime* r = new Runtime;  // never destroyed: worker threads may outlive statics
  return *r;
}

inline cudaError_t record_error(cudaError_t err) {
  if (err != cudaSuccess) runtime().last_error = err;
  return err;
}

inline void collect_fault(Runtime& rt, Grid& g) {
  if (!g.failed.load()) return;
  if (rt.fault.empty()) rt.fault = g.fault;
  rt.last_error = cudaErrorLaunchFailure;
}

inline void run_queued(Runtime& rt) {
  if (!rt.queued) return;
  std::unique_ptr<Grid> g = std::move(rt.queued);
  run_blocks(*g, 0);
  collect_fault(rt, *g);
}

inline void enqueue(std::unique_ptr<Grid> g) {
  Runtime& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  if (g->dependent && rt.queued) {
    std::unique_ptr<Grid> primary = std::move(rt.queued);
    run_dependent_pair(*primary, *g);
    collect_fault(rt, *primary);
    collect_fault(rt, *g);
    return;
  }
  run_queued(rt);
  rt.queued = std::move(g);
}

// Runs every queued grid; returns the first fault since the last call ("" if none) and
// clears it and the error it left, so that the next operation starts clean.
inline std::string synchronize() {
  Runtime& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  run_queued(rt);
  std::string fault = std::move(rt.fault);
  rt.fault.clear();
  if (!fault.empty() && rt.last_error == cudaErrorLaunchFailure) rt.last_error = cudaSuccess;
  return fault;
}

inline cudaError_t flush() {
  Runtime& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  run_queued(rt);
  return rt.fault.empty() ? cudaSuccess : cudaErrorLaunchFailure;
}

inline int max_dynamic_smem(const void* kernel) {
  Runtime& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  const auto it = rt.max_dynamic_smem.find(kernel);
  return it == rt.max_dynamic_smem.end() ? device().smem_per_block : it->second;
}

inline cudaError_t check_launch(const void* kernel, dim3 grid, dim3 block, size_t smem) {
  const DeviceProperties& d = device();
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > static_cast<uint64_t>(d.max_threads_per_block) || block.x > unsigned(d.max_block_dim[0]) ||
      block.y > unsigned(d.max_block_dim[1]) || block.z > unsigned(d.max_block_dim[2])) {
    return cudaErrorInvalidConfiguration;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > unsigned(d.max_grid_dim[0]) ||
      grid.y > unsigned(d.max_grid_dim[1]) || grid.z > unsigned(d.max_grid_dim[2])) {
    return cudaErrorInvalidConfiguration;
  }
  if (smem > static_cast<size_t>(max_dynamic_smem(kernel))) return cudaErrorInvalidValue;
  return cudaSuccess;
}

// A launch of `kernel` with `args` converted to its parameter types now, as the runtime
// copies them at the launch.
template <typename... Params, typename... Args>
cudaError_t launch_grid(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, bool dependent, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "a kernel launch passes every parameter");
  const cudaError_t err = check_launch(reinterpret_cast<const void*>(kernel), grid, block, smem);
  if (err != cudaSuccess) return record_error(err);
  Schedule schedule;
  std::string schedule_error;
  const bool schedule_ok = schedule_from_env(&schedule, &schedule_error);
  auto g = std::make_unique<Grid>();
  g->name = kernel_name(reinterpret_cast<const void*>(kernel));
  g->grid = grid;
  g->block = block;
  g->smem = smem;
  g->dependent = dependent && arch() >= 90;
  g->schedule = schedule;
  g->salt = std::hash<std::string>{}(g->name);
  const uint64_t n = static_cast<uint64_t>(g->num_blocks());
  uint64_t a = splitmix64(schedule.seed ^ g->salt) | 1u;
  auto gcd = [](uint64_t x, uint64_t y) {
    while (y != 0) std::tie(x, y) = std::make_pair(y, x % y);
    return x;
  };
  while (n > 1 && gcd(a % n, n) != 1) ++a;
  g->order_multiplier = n > 0 ? a % n : 1;
  g->order_offset = n > 0 ? splitmix64(a) % n : 0;
  if (!schedule_ok) g->report("std_ext emulator: " + schedule_error);
  auto params = std::make_shared<std::tuple<std::decay_t<Params>...>>(std::forward<Args>(args)...);
  g->body = [kernel, params] { std::apply(kernel, *params); };
  enqueue(std::move(g));
  return cudaSuccess;
}

// kernel<<<grid, block, smem, stream>>>(args...), for csrc/kernels/launch.cuh.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args&&... args) {
  return launch_grid(kernel, grid, block, smem, false, std::forward<Args>(args)...);
}

// Blocks of a kernel one SM holds, from its declared resources and the H100's limits.
inline int occupancy(const void* kernel, int block_threads, size_t dynamic_smem) {
  const DeviceProperties& d = device();
  if (block_threads <= 0 || block_threads > d.max_threads_per_block) return 0;
  if (dynamic_smem > static_cast<size_t>(max_dynamic_smem(kernel))) return 0;
  const int warps = (block_threads + d.warp_size - 1) / d.warp_size;
  const int by_threads = d.max_threads_per_sm / d.warp_size / warps;
  const int regs_per_warp = (d.default_regs_per_thread * d.warp_size + d.reg_allocation_unit - 1) /
                            d.reg_allocation_unit * d.reg_allocation_unit;
  const int by_registers = d.regs_per_sm / regs_per_warp / warps;
  const size_t smem_per_block = (dynamic_smem + d.reserved_smem_per_block + d.smem_allocation_unit - 1) /
                                d.smem_allocation_unit * d.smem_allocation_unit;
  const int by_smem = static_cast<int>(d.smem_per_sm / smem_per_block);
  return std::min({d.max_blocks_per_sm, by_threads, by_registers, by_smem});
}

}  // namespace std_ext::emu

// ---------------------------------------------------------------- the CUDA runtime API

inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure (a fault under the emulator)";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "unknown error";
  }
}
inline const char* cudaGetErrorName(cudaError_t err) { return cudaGetErrorString(err); }

inline cudaError_t cudaGetLastError() {
  std_ext::emu::Runtime& rt = std_ext::emu::runtime();
  const cudaError_t err = rt.last_error;
  rt.last_error = cudaSuccess;
  return err;
}
inline cudaError_t cudaPeekAtLastError() { return std_ext::emu::runtime().last_error; }

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : std_ext::emu::record_error(cudaErrorInvalidDevice);
}
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return std_ext::emu::record_error(cudaErrorInvalidDevice);
  const std_ext::emu::DeviceProperties& d = std_ext::emu::device();
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = d.max_threads_per_block; break;
    case cudaDevAttrMaxBlockDimX: *value = d.max_block_dim[0]; break;
    case cudaDevAttrMaxBlockDimY: *value = d.max_block_dim[1]; break;
    case cudaDevAttrMaxBlockDimZ: *value = d.max_block_dim[2]; break;
    case cudaDevAttrMaxGridDimX: *value = d.max_grid_dim[0]; break;
    case cudaDevAttrMaxGridDimY: *value = d.max_grid_dim[1]; break;
    case cudaDevAttrMaxGridDimZ: *value = d.max_grid_dim[2]; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = d.smem_per_block; break;
    case cudaDevAttrWarpSize: *value = d.warp_size; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = d.regs_per_block; break;
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = d.max_threads_per_sm; break;
    case cudaDevAttrComputeCapabilityMajor: *value = std_ext::emu::arch() / 10; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.smem_per_sm; break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = d.regs_per_sm; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_per_block_optin; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = d.max_blocks_per_sm; break;
    case cudaDevAttrReservedSharedMemoryPerBlock: *value = d.reserved_smem_per_block; break;
    default: return std_ext::emu::record_error(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;  // a hint elsewhere
  if (value < 0 || value > std_ext::emu::device().smem_per_block_optin) {
    return std_ext::emu::record_error(cudaErrorInvalidValue);
  }
  std_ext::emu::Runtime& rt = std_ext::emu::runtime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  rt.max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// Static shared memory is not known per kernel (every __shared__ variable of the library
// lives in one thread-local block): sharedSizeBytes is 0. numRegs is the table's default.
template <typename T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, T* kernel) {
  const std_ext::emu::DeviceProperties& d = std_ext::emu::device();
  *attributes = cudaFuncAttributes{};
  attributes->maxThreadsPerBlock = d.max_threads_per_block;
  attributes->numRegs = d.default_regs_per_thread;
  attributes->ptxVersion = std_ext::emu::arch();
  attributes->binaryVersion = std_ext::emu::arch();
  attributes->maxDynamicSharedSizeBytes = std_ext::emu::max_dynamic_smem(reinterpret_cast<const void*>(kernel));
  return cudaSuccess;
}

template <typename T>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T* kernel, int block_threads,
                                                          size_t dynamic_smem) {
  *blocks = std_ext::emu::occupancy(reinterpret_cast<const void*>(kernel), block_threads, dynamic_smem);
  return cudaSuccess;
}

inline cudaError_t cudaDeviceReset() {
  std_ext::emu::synchronize();
  std_ext::emu::Runtime& rt = std_ext::emu::runtime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  rt.max_dynamic_smem.clear();
  rt.last_error = cudaSuccess;
  return cudaSuccess;
}

inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}

inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return std_ext::emu::record_error(std_ext::emu::flush()); }
inline cudaError_t cudaDeviceSynchronize() { return std_ext::emu::record_error(std_ext::emu::flush()); }

// Memory operations are ordered after the queued grid, as on the stream.
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t = nullptr) {
  std_ext::emu::flush();
  std::memset(ptr, value, count);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind, cudaStream_t = nullptr) {
  std_ext::emu::flush();
  std::memmove(dst, src, count);
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  *ptr = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  return *ptr != nullptr || bytes == 0 ? cudaSuccess : std_ext::emu::record_error(cudaErrorMemoryAllocation);
}
inline cudaError_t cudaFree(void* ptr) {
  std_ext::emu::flush();
  std::free(ptr);
  return cudaSuccess;
}

template <typename... ExpTypes, typename... ActTypes>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(ExpTypes...), ActTypes&&... args) {
  bool dependent = false;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttribute& a = config->attrs[i];
    if (a.id == cudaLaunchAttributeProgrammaticStreamSerialization) {
      dependent = a.val.programmaticStreamSerializationAllowed != 0;
    }
  }
  return std_ext::emu::launch_grid(kernel, config->gridDim, config->blockDim, config->dynamicSmemBytes, dependent,
                                   std::forward<ActTypes>(args)...);
}
