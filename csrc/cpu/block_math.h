// Block primitives the CPU attention kernels are built from. Everything is fp32: cache
// rows of any dtype are converted to float as a block is loaded.
//
// A block is always kKeyBlock keys wide (zero-padded), and the arithmetic of one
// (query row, key) pair never depends on how many other rows or keys share the call:
// each logit is one fused multiply-add chain over d in order, each softmax step works on
// one row's full block, and each output element is one chain over the block's keys in
// order. Rows are processed in register tiles of up to kRowTile, but a row's chains are
// the same in every tile shape. That is what makes a Qn = γ+1 verification row
// bit-identical to the Qn = 1 decoding row at the same position on CPU.
//
// Each primitive has an AVX2 + FMA build and a baseline x86-64 one; the first call picks
// one by the CPU's features, once per process, so every call of a process computes alike.
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

// logits[r * ld + j] = sum_d q[r * head_dim + d] * kT[d * kKeyBlock + j], d ascending.
//   q: [rows, head_dim] (any rows); logits: rows x kKeyBlock, row stride ld.
void block_logits(const float* q, int64_t rows, int64_t head_dim, const float* kT, float* logits, int64_t ld);

// One online-softmax step per row over its block of logits (p: [rows, kKeyBlock]). Row r
// sees the first visible[r] keys of the block. A row that sees none keeps its state and
// its p row becomes zeros; otherwise p[r] becomes exp(logit - m) (0 past visible[r]) with
// m = max(row_max[r], the block's max), and row_sum[r] and acc[r * head_dim ..] are
// rescaled to m before row_sum[r] adds the block's sum.
void block_softmax(float* p, int64_t rows, const int64_t* visible, float* row_max, float* row_sum, float* acc,
                   int64_t head_dim);

// acc[r * head_dim + d] += sum_j p[r * kKeyBlock + j] * v[j * head_dim + d], j ascending.
//   p: [rows, kKeyBlock] (any rows); v: [kKeyBlock, head_dim]; acc: [rows, head_dim].
void block_weighted_sum(const float* p, int64_t rows, int64_t head_dim, const float* v, float* acc);

// x[i] = exp(x[i] - shift) for i < n; returns their sum (lane-wise partial sums over 8-key
// vectors, then the lanes in order). exp(-inf) is exactly 0.
float exp_shifted_and_sum(float* x, int64_t n, float shift);

}  // namespace std_ext::cpu
