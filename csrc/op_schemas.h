// The schemas of the attention operators, defined once for every library that offers
// them: torch.ops.std (csrc/registration.cpp) and torch.ops.std_emulated, the CUDA glue
// built against the CPU emulator (csrc/emulator/). Semantics: ../shared/DESIGN.md §3.
#pragma once

#include <torch/library.h>

#include <vector>

namespace std_ext {

inline void define_attention_op_schemas(torch::Library& m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("attention_scores(Tensor q, Tensor k_cache, Tensor q_pos, float scale) -> Tensor", tags);
  m.def("topk_indices(Tensor scores, Tensor candidates, int k) -> Tensor", tags);
  m.def(
      "sparse_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, Tensor tail_start, "
      "Tensor kv_len, float scale) -> Tensor",
      tags);
  m.def("dense_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_len, float scale) -> Tensor",
        tags);
}

}  // namespace std_ext
