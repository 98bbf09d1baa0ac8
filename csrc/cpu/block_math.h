// Block primitives the CPU attention kernels are built from. Everything is fp32: cache
// rows of any dtype are converted to float as a block is loaded.
//
// A block is always kKeyBlock keys wide (zero-padded) and a row tile is always
// kRowTile query rows (zero-padded), so the arithmetic of one (query row, key) pair
// never depends on how many other rows or keys share the call. That is what makes a
// Qn = γ+1 verification row bit-identical to the Qn = 1 decoding row at the same
// position on CPU.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace std_ext::cpu {

constexpr int64_t kKeyBlock = 64;
constexpr int64_t kRowTile = 4;

constexpr int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// kT[d * kKeyBlock + j] = float(row_j[d]) with row_j = base + positions[j] * row_stride,
// for j < n; zero for n <= j < kKeyBlock.   kT: [head_dim, kKeyBlock]
void load_keys_transposed(const float* base, int64_t row_stride, const int64_t* positions, int64_t n,
                          int64_t head_dim, float* kT);
void load_keys_transposed(const c10::Half* base, int64_t row_stride, const int64_t* positions, int64_t n,
                          int64_t head_dim, float* kT);
void load_keys_transposed(const c10::BFloat16* base, int64_t row_stride, const int64_t* positions, int64_t n,
                          int64_t head_dim, float* kT);

// v[j * head_dim + d] = float(row_j[d]), zero rows for n <= j < kKeyBlock.   v: [kKeyBlock, head_dim]
void load_values(const float* base, int64_t row_stride, const int64_t* positions, int64_t n, int64_t head_dim,
                 float* v);
void load_values(const c10::Half* base, int64_t row_stride, const int64_t* positions, int64_t n,
                 int64_t head_dim, float* v);
void load_values(const c10::BFloat16* base, int64_t row_stride, const int64_t* positions, int64_t n,
                 int64_t head_dim, float* v);

// logits[r * ld + j] = sum_d q[r * head_dim + d] * kT[d * kKeyBlock + j]
//   q: [rows, head_dim] with rows a multiple of kRowTile; logits: rows x kKeyBlock, row stride ld.
void block_logits(const float* q, int64_t rows, int64_t head_dim, const float* kT, float* logits, int64_t ld);

// acc[r * head_dim + d] += sum_j p[r * kKeyBlock + j] * v[j * head_dim + d]
//   p: [rows, kKeyBlock] with rows a multiple of kRowTile; v: [kKeyBlock, head_dim]; acc: [rows, head_dim].
void block_weighted_sum(const float* p, int64_t rows, int64_t head_dim, const float* v, float* acc);

// Sets logits[j] = -inf for visible <= j < kKeyBlock; returns the max of logits[0, visible)
// (-inf when visible == 0).   logits: [kKeyBlock]
float mask_and_max(float* logits, int64_t visible);

// x[i] = exp(x[i] - shift) for i < n; returns their sum. exp(-inf) is exactly 0.
float exp_shifted_and_sum(float* x, int64_t n, float shift);

}  // namespace std_ext::cpu
