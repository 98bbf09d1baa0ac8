// Argument and value checks shared by every backend of the torch.ops.std operators.
//
// Argument checks (dtype, device, rank, shapes, head counts, strides) are cheap and run
// always. Value checks read the integer tensors, so they run always on CPU and on CUDA
// only when STD_EXT_DEBUG=1 (they copy to the host: a sync that would break CUDA graphs).
// Every message starts with "std::<op>: " and names the offending argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace std_ext {

// Sizes of an attention call: q [B, Qn, H_q, D], caches [B, H_kv, S, D].
struct AttentionDims {
  int64_t batch;
  int64_t q_len;     // Qn (T for attention_scores)
  int64_t q_heads;   // H_q
  int64_t kv_heads;  // H_kv
  int64_t group;     // H_q / H_kv
  int64_t capacity;  // S
  int64_t head_dim;  // D
};

AttentionDims check_attention_scores_args(const at::Tensor& q, const at::Tensor& k_cache,
                                          const at::Tensor& q_pos);
void check_topk_indices_args(const at::Tensor& scores, const at::Tensor& candidates, int64_t k);
AttentionDims check_sparse_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                          const at::Tensor& v_cache, const at::Tensor& indices,
                                          const at::Tensor& tail_start, const at::Tensor& kv_len);
AttentionDims check_dense_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                         const at::Tensor& v_cache, const at::Tensor& kv_len);

// True on CPU; on other devices only when the environment sets STD_EXT_DEBUG=1. In the
// emulator build (STD_EXT_EMULATOR) the CUDA rule holds for the CPU tensors too.
bool value_checks_enabled(const at::Tensor& like);

// Value checks. They accept tensors on any device (copied to the host first).
void check_q_pos_values(const char* op, const at::Tensor& q_pos, int64_t capacity);
void check_kv_len_values(const char* op, const at::Tensor& kv_len, int64_t q_len, int64_t capacity);
void check_tail_start_values(const char* op, const at::Tensor& tail_start, const at::Tensor& kv_len);
void check_indices_values(const char* op, const at::Tensor& indices, const at::Tensor& tail_start);

}  // namespace std_ext
