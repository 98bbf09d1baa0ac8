// The one way the kernels are launched. nvcc gets the <<<grid, block, smem, stream>>>
// launch; the CPU emulator of the SIMT machine (csrc/emulator/, STD_EXT_EMULATOR), which a
// host compiler builds and which has no <<<>>> syntax, gets its own. So the same kernel
// sources compile for both with no source transform. Torch-free.
#pragma once

#include <cuda_runtime.h>

#ifdef STD_EXT_EMULATOR
#include "emulator/emulator.h"
#endif

#include <cstddef>
#include <utility>

namespace std_ext::kernels {

// Launches `kernel` with `args` on `stream`. As with <<<>>>, nothing is returned: a bad
// configuration (too many threads, shared memory past the kernel's limit) is reported by
// the next cudaGetLastError / cudaPeekAtLastError.
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                          cudaStream_t stream, Args&&... args) {
#ifdef STD_EXT_EMULATOR
  (void)emu::launch(kernel, grid, block, dynamic_smem_bytes, stream, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, dynamic_smem_bytes, stream>>>(std::forward<Args>(args)...);
#endif
}

}  // namespace std_ext::kernels
