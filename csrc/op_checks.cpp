#include "op_checks.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

namespace std_ext {
namespace {

#define STD_CHECK(cond, op, ...) TORCH_CHECK((cond), "std::", (op), ": ", __VA_ARGS__)

void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  STD_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, name,
            " must be float32, float16 or bfloat16, got ", dtype);
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref) {
  STD_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " (", t.scalar_type(),
            ") must have the same dtype as ", ref_name, " (", ref.scalar_type(), ")");
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  STD_CHECK(t.device() == ref.device(), op, name, " is on ", t.device(), " but ", ref_name,
            " is on ", ref.device(), "; all inputs must be on the same device");
}

void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank, const char* layout) {
  STD_CHECK(t.dim() == rank, op, name, " must have ", rank, " dims ", layout, ", got shape ", t.sizes());
}

void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  STD_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, name,
            " must be contiguous in its last dim (stride 1), got strides ", t.strides());
}

void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
                const char* what) {
  STD_CHECK(t.size(dim) == expected, op, name, ".size(", dim, ") must equal ", what, " (", expected,
            "), got shape ", t.sizes());
}

// An int32 tensor of a given shape on `ref`'s device.
void check_int_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                      const char* ref_name, std::initializer_list<int64_t> shape, const char* layout) {
  STD_CHECK(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
  check_same_device(op, name, t, ref_name, ref);
  check_rank(op, name, t, static_cast<int64_t>(shape.size()), layout);
  int64_t dim = 0;
  for (int64_t expected : shape) {
    STD_CHECK(t.size(dim) == expected, op, name, " must have shape ", layout, " = ",
              c10::IntArrayRef(shape), ", got ", t.sizes());
    ++dim;
  }
}

// q [B, Qn, H_q, D] against k_cache (and v_cache) [B, H_kv, S, D].
AttentionDims check_query_and_caches(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                     const at::Tensor* v_cache) {
  check_rank(op, "q", q, 4, "[B, Qn, H_q, D]");
  check_rank(op, "k_cache", k_cache, 4, "[B, H_kv, S, D]");
  check_float_dtype(op, "k_cache", k_cache);
  check_same_dtype(op, "q", q, "k_cache", k_cache);
  check_same_device(op, "q", q, "k_cache", k_cache);
  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k_cache", k_cache);
  if (v_cache != nullptr) {
    check_same_dtype(op, "v_cache", *v_cache, "k_cache", k_cache);
    check_same_device(op, "v_cache", *v_cache, "k_cache", k_cache);
    STD_CHECK(v_cache->sizes() == k_cache.sizes(), op, "v_cache shape ", v_cache->sizes(),
              " must equal k_cache shape ", k_cache.sizes());
    check_last_dim_contiguous(op, "v_cache", *v_cache);
  }
  AttentionDims dims{};
  dims.batch = k_cache.size(0);
  dims.kv_heads = k_cache.size(1);
  dims.capacity = k_cache.size(2);
  dims.head_dim = k_cache.size(3);
  dims.q_len = q.size(1);
  dims.q_heads = q.size(2);
  check_size(op, "q", q, 0, dims.batch, "k_cache.size(0), the batch");
  check_size(op, "q", q, 3, dims.head_dim, "k_cache.size(3), the head_dim");
  STD_CHECK(dims.kv_heads > 0 && dims.q_heads % dims.kv_heads == 0, op, "q has ", dims.q_heads,
            " heads, which must be a multiple of k_cache's ", dims.kv_heads, " KV heads");
  dims.group = dims.q_heads / dims.kv_heads;
  return dims;
}

at::Tensor host_copy(const at::Tensor& t) {
  return t.device().is_cpu() ? t.contiguous() : t.to(at::kCPU).contiguous();
}

}  // namespace

AttentionDims check_attention_scores_args(const at::Tensor& q, const at::Tensor& k_cache,
                                          const at::Tensor& q_pos) {
  const char* op = "attention_scores";
  AttentionDims dims = check_query_and_caches(op, q, k_cache, nullptr);
  check_int_tensor(op, "q_pos", q_pos, k_cache, "k_cache", {dims.batch, dims.q_len}, "[B, T]");
  return dims;
}

void check_topk_indices_args(const at::Tensor& scores, const at::Tensor& candidates, int64_t k) {
  const char* op = "topk_indices";
  check_rank(op, "scores", scores, 3, "[B, H, S]");
  STD_CHECK(scores.scalar_type() == at::kFloat, op, "scores must be float32, got ", scores.scalar_type());
  check_last_dim_contiguous(op, "scores", scores);
  STD_CHECK(candidates.scalar_type() == at::kBool, op, "candidates must be bool, got ",
            candidates.scalar_type());
  check_same_device(op, "candidates", candidates, "scores", scores);
  check_rank(op, "candidates", candidates, 2, "[B, S]");
  STD_CHECK(candidates.size(0) == scores.size(0) && candidates.size(1) == scores.size(2), op,
            "candidates must have shape [B, S] = [", scores.size(0), ", ", scores.size(2),
            "] to match scores ", scores.sizes(), ", got ", candidates.sizes());
  STD_CHECK(k >= 0 && k <= scores.size(2), op, "k = ", k, " must be in [0, S] where S = scores.size(2) = ",
            scores.size(2));
}

AttentionDims check_sparse_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                          const at::Tensor& v_cache, const at::Tensor& indices,
                                          const at::Tensor& tail_start, const at::Tensor& kv_len) {
  const char* op = "sparse_attention";
  AttentionDims dims = check_query_and_caches(op, q, k_cache, &v_cache);
  check_rank(op, "indices", indices, 3, "[B, H_kv, N]");
  check_int_tensor(op, "indices", indices, k_cache, "k_cache", {dims.batch, dims.kv_heads, indices.size(2)},
                   "[B, H_kv, N]");
  check_int_tensor(op, "tail_start", tail_start, k_cache, "k_cache", {dims.batch}, "[B]");
  check_int_tensor(op, "kv_len", kv_len, k_cache, "k_cache", {dims.batch}, "[B]");
  return dims;
}

AttentionDims check_dense_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                         const at::Tensor& v_cache, const at::Tensor& kv_len) {
  const char* op = "dense_attention";
  AttentionDims dims = check_query_and_caches(op, q, k_cache, &v_cache);
  check_int_tensor(op, "kv_len", kv_len, k_cache, "k_cache", {dims.batch}, "[B]");
  return dims;
}

bool value_checks_enabled(const at::Tensor& like) {
#ifdef STD_EXT_EMULATOR
  // The emulated CUDA ops (torch.ops.std_emulated) take CPU tensors but follow the CUDA
  // rule, so that their tests see what a GPU run would.
  (void)like;
#else
  if (like.device().is_cpu()) return true;
#endif
  const char* debug = std::getenv("STD_EXT_DEBUG");
  return debug != nullptr && std::strcmp(debug, "1") == 0;
}

void check_q_pos_values(const char* op, const at::Tensor& q_pos, int64_t capacity) {
  const at::Tensor host = host_copy(q_pos);
  const int32_t* pos = host.data_ptr<int32_t>();
  const int64_t cols = host.size(1);
  for (int64_t i = 0; i < host.numel(); ++i) {
    STD_CHECK(pos[i] >= -1 && pos[i] < capacity, op, "q_pos[", i / cols, ", ", i % cols, "] = ", pos[i],
              " must be -1 (padding) or a position in [0, S) with S = ", capacity);
  }
}

void check_kv_len_values(const char* op, const at::Tensor& kv_len, int64_t q_len, int64_t capacity) {
  const at::Tensor host = host_copy(kv_len);
  const int32_t* len = host.data_ptr<int32_t>();
  for (int64_t b = 0; b < host.numel(); ++b) {
    STD_CHECK(len[b] >= q_len && len[b] <= capacity, op, "kv_len[", b, "] = ", len[b],
              " must be in [Qn, S] = [", q_len, ", ", capacity,
              "] (it counts the queries' own K/V, stored before attending)");
  }
}

void check_tail_start_values(const char* op, const at::Tensor& tail_start, const at::Tensor& kv_len) {
  const at::Tensor start_host = host_copy(tail_start);
  const at::Tensor len_host = host_copy(kv_len);
  const int32_t* start = start_host.data_ptr<int32_t>();
  const int32_t* len = len_host.data_ptr<int32_t>();
  for (int64_t b = 0; b < start_host.numel(); ++b) {
    STD_CHECK(start[b] >= 0 && start[b] <= len[b], op, "tail_start[", b, "] = ", start[b],
              " must be in [0, kv_len[", b, "]] = [0, ", len[b], "]");
  }
}

void check_indices_values(const char* op, const at::Tensor& indices, const at::Tensor& tail_start) {
  const at::Tensor idx_host = host_copy(indices);
  const at::Tensor start_host = host_copy(tail_start);
  const int32_t* idx = idx_host.data_ptr<int32_t>();
  const int32_t* start = start_host.data_ptr<int32_t>();
  const int64_t heads = idx_host.size(1);
  const int64_t n = idx_host.size(2);
  for (int64_t b = 0; b < idx_host.size(0); ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const int32_t* row = idx + (b * heads + h) * n;
      bool padding = false;
      for (int64_t i = 0; i < n; ++i) {
        const int32_t v = row[i];
        if (v == -1) {
          padding = true;
          continue;
        }
        STD_CHECK(!padding, op, "indices[", b, ", ", h, ", ", i, "] = ", v,
                  " follows a -1: padding must come after every valid index");
        STD_CHECK(v >= 0 && v < start[b], op, "indices[", b, ", ", h, ", ", i, "] = ", v,
                  " must be -1 or a position in [0, tail_start[", b, "]) = [0, ", start[b], ")");
        STD_CHECK(i == 0 || v > row[i - 1], op, "indices[", b, ", ", h, ", ", i, "] = ", v,
                  " must be greater than the previous index ", row[i - 1],
                  " (valid indices are strictly ascending)");
      }
    }
  }
}

}  // namespace std_ext
