// Runtime head_dim / dtype -> compile-time template parameters, for the CUDA kernel
// launchers in csrc/kernels/. Torch-free: usable from any host code. Only the values
// listed here are instantiated, which keeps builds short.
//
//   STD_EXT_HEAD_DIM_SWITCH(head_dim, kHeadDim, [&] { launch<kHeadDim>(...); });
#pragma once

#include <stdexcept>
#include <string>

namespace std_ext::kernels {

// Head dims the CUDA kernels are compiled for; the CPU kernels accept any.
inline bool is_supported_head_dim(long long head_dim) { return head_dim == 64 || head_dim == 128; }

}  // namespace std_ext::kernels

#define STD_EXT_HEAD_DIM_SWITCH(HEAD_DIM, CONST_NAME, ...)                                              \
  [&] {                                                                                               \
    if ((HEAD_DIM) == 64) {                                                                           \
      constexpr int CONST_NAME = 64;                                                                  \
      return __VA_ARGS__();                                                                           \
    } else if ((HEAD_DIM) == 128) {                                                                   \
      constexpr int CONST_NAME = 128;                                                                 \
      return __VA_ARGS__();                                                                           \
    }                                                                                                 \
    throw std::invalid_argument("std_ext CUDA kernels support head_dim 64 and 128, got " +           \
                                std::to_string(static_cast<long long>(HEAD_DIM)));                    \
  }()
