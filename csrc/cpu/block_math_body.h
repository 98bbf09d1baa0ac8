// The bodies of the block primitives (block_math.h), written once and compiled twice by
// block_math.cpp: inside `namespace avx2` under `#pragma GCC target("avx2,fma")`, and inside
// `namespace baseline` for any x86-64. Not a header to include anywhere else: it has no
// include guard and expects block_math.cpp's includes and macros.
//
// (target_clones on the entry points would not do: the always-inline vector helpers are
// then compiled for the baseline target first, and GCC lowers a scalar broadcast into a
// chain of vinsertps, one per FMA operand of the register tiles: half the FMA rate.)

// GCC/Clang vector extensions: 8 floats, one AVX register in the AVX2 build (two SSE
// registers in the baseline one). Register tiles are written with them explicitly
// because the auto-vectorizer spills small accumulator arrays to the stack.
typedef float Vec __attribute__((vector_size(32)));
typedef int32_t IntVec __attribute__((vector_size(32)));
typedef uint32_t UIntVec __attribute__((vector_size(32)));
typedef float UnalignedVec __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint16_t UnalignedHalfWords __attribute__((vector_size(16), aligned(2), may_alias));
constexpr int64_t kLanes = 8;
constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

STD_EXT_INLINE Vec load(const float* p) { return *reinterpret_cast<const UnalignedVec*>(p); }
STD_EXT_INLINE void store(float* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }
// x - 0 is x for every x (x + 0 is not, for -0), so this folds into one vbroadcastss.
STD_EXT_INLINE Vec broadcast(float x) { return x - Vec{}; }

// 8 consecutive cache elements as floats (all three conversions are exact).
STD_EXT_INLINE Vec load8(const float* p) { return load(p); }
STD_EXT_INLINE Vec load8(const c10::BFloat16* p) {
  const UnalignedHalfWords bits = *reinterpret_cast<const UnalignedHalfWords*>(p);
  return reinterpret_cast<Vec>(__builtin_convertvector(bits, UIntVec) << 16);  // bf16 is fp32's top half
}
STD_EXT_INLINE Vec load8(const c10::Half* p) {
  Vec x;
  for (int i = 0; i < kLanes; ++i) x[i] = static_cast<float>(p[i]);
  return x;
}

// Two-vector lane shuffle (Clang and GCC >= 12 spell it __builtin_shufflevector; GCC
// before 12 only knows __builtin_shuffle with a mask vector).
#if defined(__clang__) || __GNUC__ >= 12
#define STD_EXT_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define STD_EXT_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, IntVec{__VA_ARGS__})
#endif

// r[i][k] -> r[k][i] for an 8 x 8 tile (unpack, 2-lane shuffles, 128-bit halves).
STD_EXT_INLINE void transpose8(Vec r[8]) {
  Vec t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = STD_EXT_SHUFFLE(r[2 * i], r[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[2 * i + 1] = STD_EXT_SHUFFLE(r[2 * i], r[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3, then rows 4-7
    Vec* tt = t + 4 * h;
    Vec* uu = u + 4 * h;
    uu[0] = STD_EXT_SHUFFLE(tt[0], tt[2], 0, 1, 8, 9, 4, 5, 12, 13);
    uu[1] = STD_EXT_SHUFFLE(tt[0], tt[2], 2, 3, 10, 11, 6, 7, 14, 15);
    uu[2] = STD_EXT_SHUFFLE(tt[1], tt[3], 0, 1, 8, 9, 4, 5, 12, 13);
    uu[3] = STD_EXT_SHUFFLE(tt[1], tt[3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = STD_EXT_SHUFFLE(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = STD_EXT_SHUFFLE(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

template <typename T>
STD_EXT_INLINE void load_keys_transposed_impl(const T* base, int64_t row_stride, const int64_t* positions,
                                              int64_t n, int64_t head_dim, float* kT) {
  const int64_t whole = head_dim / kLanes * kLanes;
  for (int64_t j0 = 0; j0 < kKeyBlock; j0 += kLanes) {
    const int64_t present = std::clamp<int64_t>(n - j0, 0, kLanes);
    const T* rows[kLanes];
    for (int64_t i = 0; i < present; ++i) rows[i] = base + positions[j0 + i] * row_stride;
    for (int64_t d0 = 0; d0 < whole; d0 += kLanes) {
      Vec tile[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) tile[i] = i < present ? load8(rows[i] + d0) : Vec{};
      transpose8(tile);
      for (int64_t i = 0; i < kLanes; ++i) store(kT + (d0 + i) * kKeyBlock + j0, tile[i]);
    }
    for (int64_t d = whole; d < head_dim; ++d) {
      for (int64_t i = 0; i < kLanes; ++i) kT[d * kKeyBlock + j0 + i] = i < present ? static_cast<float>(rows[i][d]) : 0.f;
    }
  }
}

template <typename T>
STD_EXT_INLINE void load_values_impl(const T* base, int64_t row_stride, const int64_t* positions, int64_t n,
                                     int64_t head_dim, float* v) {
  const int64_t whole = head_dim / kLanes * kLanes;
  for (int64_t j = 0; j < n; ++j) {
    const T* row = base + positions[j] * row_stride;
    float* dst = v + j * head_dim;
    for (int64_t d = 0; d < whole; d += kLanes) store(dst + d, load8(row + d));
    for (int64_t d = whole; d < head_dim; ++d) dst[d] = static_cast<float>(row[d]);
  }
  std::memset(v + n * head_dim, 0, sizeof(float) * (kKeyBlock - n) * head_dim);
}

// exp(x) for the softmax on 8 lanes (std::exp is a libm call per element). Range
// reduction x = n ln2 + r, |r| <= ln2/2, then Cephes' degree-6 polynomial: about
// 1 ulp on [-87, 88]. Lanes below -87 (masked keys, -inf) give exactly 0; NaN stays NaN.
STD_EXT_INLINE Vec exp_for_softmax(Vec x) {
  const Vec lo = broadcast(-87.f), hi = broadcast(88.f);
  Vec c = x < lo ? lo : x;
  c = c > hi ? hi : c;
  const Vec round_magic = broadcast(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (c * 1.44269504088896341f + round_magic) - round_magic;
  const Vec r = (c - n * 0.693359375f) - n * -2.12194440e-4f;
  Vec p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const IntVec exponent = (__builtin_convertvector(n, IntVec) + 127) << 23;
  const Vec result = p * (Vec)exponent;
  return x < lo ? Vec{} : result;
}

// The register tile both products are made of: c[i][w] (+)= sum_s a[i][s] * b[s][w] for
// kRows rows i and kVecs vectors w, s ascending, one multiply-add chain per element:
// a[i][s] = a[i * a_stride + s], b[s][w] = b + s * b_stride + w * kLanes, rows of c c_stride
// apart. Up to 12 accumulators keep both FMA pipes busy through the FMA latency while
// leaving registers for the operands.
template <int kRows, int kVecs, bool kAccumulate>
STD_EXT_INLINE void fma_tile(const float* a, int64_t a_stride, const float* b, int64_t b_stride, int64_t steps,
                             float* c, int64_t c_stride) {
  Vec acc[kRows][kVecs] = {};
  if constexpr (kAccumulate) {
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 8
      for (int w = 0; w < kVecs; ++w) acc[i][w] = load(c + i * c_stride + w * kLanes);
    }
  }
  for (int64_t s = 0; s < steps; ++s) {
    Vec bs[kVecs];
#pragma GCC unroll 8
    for (int w = 0; w < kVecs; ++w) bs[w] = load(b + s * b_stride + w * kLanes);
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) {
      const Vec ai = broadcast(a[i * a_stride + s]);
#pragma GCC unroll 8
      for (int w = 0; w < kVecs; ++w) acc[i][w] += ai * bs[w];
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 8
    for (int w = 0; w < kVecs; ++w) store(c + i * c_stride + w * kLanes, acc[i][w]);
  }
}

// logits[i][j] = sum_d q[i][d] * kT[d][j] for kVecs vectors of keys j.
template <int kRows, int kVecs>
STD_EXT_INLINE void logits_tile(const float* q_tile, int64_t head_dim, const float* kT, float* logits, int64_t ld) {
  fma_tile<kRows, kVecs, false>(q_tile, head_dim, kT, kKeyBlock, head_dim, logits, ld);
}

// All kKeyBlock keys for kRows rows, in key tiles as wide as the register budget allows.
template <int kRows>
STD_EXT_INLINE void logits_rows(const float* q_tile, int64_t head_dim, const float* kT, float* logits, int64_t ld) {
  static_assert(kKeyBlock == 8 * kLanes, "key tiling below assumes 64-key blocks");
  if constexpr (kRows >= 4) {  // 24 + 24 + 16 keys
    logits_tile<kRows, 3>(q_tile, head_dim, kT, logits, ld);
    logits_tile<kRows, 3>(q_tile, head_dim, kT + 3 * kLanes, logits + 3 * kLanes, ld);
    logits_tile<kRows, 2>(q_tile, head_dim, kT + 6 * kLanes, logits + 6 * kLanes, ld);
  } else if constexpr (kRows >= 2) {  // 32 + 32 keys
    logits_tile<kRows, 4>(q_tile, head_dim, kT, logits, ld);
    logits_tile<kRows, 4>(q_tile, head_dim, kT + 4 * kLanes, logits + 4 * kLanes, ld);
  } else {
    logits_tile<kRows, 8>(q_tile, head_dim, kT, logits, ld);
  }
}

// acc[i][d] += sum_j p[i][j] * v[j][d] for kVecs vectors of output dims d.
template <int kRows, int kVecs>
STD_EXT_INLINE void weighted_sum_tile(const float* p_tile, int64_t head_dim, const float* v, float* acc_tile) {
  fma_tile<kRows, kVecs, true>(p_tile, kKeyBlock, v, head_dim, kKeyBlock, acc_tile, head_dim);
}

// The last `vecs` (< kVecs + 1) whole vectors of output dims from d0 on, in one tile.
template <int kRows, int kVecs>
STD_EXT_INLINE void weighted_sum_last_tile(int64_t vecs, const float* p_tile, int64_t head_dim, const float* v,
                                           float* acc_tile) {
  if constexpr (kVecs > 0) {
    if (vecs == kVecs) {
      weighted_sum_tile<kRows, kVecs>(p_tile, head_dim, v, acc_tile);
    } else {
      weighted_sum_last_tile<kRows, kVecs - 1>(vecs, p_tile, head_dim, v, acc_tile);
    }
  }
}

template <int kRows>
STD_EXT_INLINE void weighted_sum_block_rows(const float* p_tile, int64_t head_dim, const float* v,
                                            float* acc_tile) {
  // Output-dim tiles of kWide vectors, one narrower tile, then a scalar tail: any head_dim.
  constexpr int kWide = kRows >= 4 ? 3 : (kRows >= 2 ? 4 : 8);
  int64_t d0 = 0;
  for (; d0 + kWide * kLanes <= head_dim; d0 += kWide * kLanes) {
    weighted_sum_tile<kRows, kWide>(p_tile, head_dim, v + d0, acc_tile + d0);
  }
  const int64_t vecs = (head_dim - d0) / kLanes;
  weighted_sum_last_tile<kRows, kWide - 1>(vecs, p_tile, head_dim, v + d0, acc_tile + d0);
  d0 += vecs * kLanes;
  for (int i = 0; i < kRows; ++i) {
    for (int64_t j = 0; j < kKeyBlock; ++j) {
      const float pj = p_tile[i * kKeyBlock + j];
      for (int64_t d = d0; d < head_dim; ++d) acc_tile[i * head_dim + d] += pj * v[j * head_dim + d];
    }
  }
}

// Full tiles of kRowTile rows, then one tile of the remaining 1-3 rows.
template <typename FullTile, typename R3, typename R2, typename R1>
STD_EXT_INLINE void for_row_tiles(int64_t rows, FullTile full, R3 three, R2 two, R1 one) {
  static_assert(kRowTile == 4, "the remainder cases below assume 4-row tiles");
  int64_t r0 = 0;
  for (; r0 + kRowTile <= rows; r0 += kRowTile) full(r0);
  switch (rows - r0) {
    case 3: three(r0); break;
    case 2: two(r0); break;
    case 1: one(r0); break;
    default: break;
  }
}

STD_EXT_INLINE float exp_shifted_and_sum_impl(float* x, int64_t n, float shift) {
  // Lane-wise partial sums, then the lanes in order: the grouping depends only on n.
  Vec sum = {};
  const Vec shift_v = broadcast(shift);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vec e = exp_for_softmax(load(x + i) - shift_v);
    store(x + i, e);
    sum += e;
  }
  if (i < n) {  // the tail goes through the same vector code, padded with -inf (exp -> 0)
    float tail[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) tail[j] = i + j < n ? x[i + j] : kMinusInf;
    const Vec e = exp_for_softmax(load(tail) - shift_v);
    store(tail, e);
    for (int64_t j = 0; i + j < n; ++j) x[i + j] = tail[j];
    sum += e;
  }
  float total = 0.f;
  for (int64_t lane = 0; lane < kLanes; ++lane) total += sum[lane];
  return total;
}

STD_EXT_INLINE float horizontal_max(Vec max) {
  float result = max[0];
  for (int64_t lane = 1; lane < kLanes; ++lane) result = std::max(result, max[lane]);
  return result;
}

// The online-softmax step (block_math.h: block_softmax) of kRows rows that each see at
// least one key of the block, in lockstep so that the rows' dependency chains (max, exp,
// sum) overlap. Each row's arithmetic is the same whatever kRows: the max and the sum use
// the same lanes and order for every row, lane-wise over the block's 8-key vectors, then
// the lanes in order.
template <int kRows>
STD_EXT_INLINE void softmax_rows(float* p, const int64_t* visible, float* row_max, float* row_sum, float* acc,
                                 int64_t head_dim) {
  const Vec minus_inf = broadcast(kMinusInf);
  const IntVec lane_index = {0, 1, 2, 3, 4, 5, 6, 7};
  Vec max[kRows], shift[kRows], sum[kRows];
  float new_max[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) max[r] = minus_inf;
  for (int64_t j = 0; j < kKeyBlock; j += kLanes) {
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      float* pr = p + r * kKeyBlock;
      Vec x = load(pr + j);
      if (j + kLanes > visible[r]) {
        x = lane_index + static_cast<int32_t>(j) >= static_cast<int32_t>(visible[r]) ? minus_inf : x;
        store(pr + j, x);
      }
      max[r] = x > max[r] ? x : max[r];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    new_max[r] = std::max(row_max[r], horizontal_max(max[r]));
    shift[r] = broadcast(new_max[r]);
    sum[r] = Vec{};
  }
  for (int64_t j = 0; j < kKeyBlock; j += kLanes) {
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      float* pr = p + r * kKeyBlock;
      const Vec e = exp_for_softmax(load(pr + j) - shift[r]);
      store(pr + j, e);
      sum[r] += e;
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    float block_sum = 0.f;
    for (int64_t lane = 0; lane < kLanes; ++lane) block_sum += sum[r][lane];
    if (new_max[r] != row_max[r]) {
      const float alpha = std::exp(row_max[r] - new_max[r]);  // 0 on the first visible block
      float* acc_r = acc + r * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) acc_r[d] *= alpha;
      row_sum[r] *= alpha;
    }
    row_sum[r] += block_sum;
    row_max[r] = new_max[r];
  }
}

// ---- the entry points of this build ----

#define STD_EXT_CACHE_LOADERS(T)                                                                        \
  void load_keys_transposed(const T* base, int64_t row_stride, const int64_t* positions, int64_t n,        \
                            int64_t head_dim, float* kT) {                                                  \
    load_keys_transposed_impl(base, row_stride, positions, n, head_dim, kT);                               \
  }                                                                                                          \
  void load_values(const T* base, int64_t row_stride, const int64_t* positions, int64_t n, int64_t head_dim, \
                   float* v) {                                                                              \
    load_values_impl(base, row_stride, positions, n, head_dim, v);                                         \
  }
STD_EXT_CACHE_LOADERS(float)
STD_EXT_CACHE_LOADERS(c10::Half)
STD_EXT_CACHE_LOADERS(c10::BFloat16)
#undef STD_EXT_CACHE_LOADERS

void block_logits(const float* q, int64_t rows, int64_t head_dim, const float* kT, float* logits, int64_t ld) {
  for_row_tiles(
      rows, [&](int64_t r0) { logits_rows<4>(q + r0 * head_dim, head_dim, kT, logits + r0 * ld, ld); },
      [&](int64_t r0) { logits_rows<3>(q + r0 * head_dim, head_dim, kT, logits + r0 * ld, ld); },
      [&](int64_t r0) { logits_rows<2>(q + r0 * head_dim, head_dim, kT, logits + r0 * ld, ld); },
      [&](int64_t r0) { logits_rows<1>(q + r0 * head_dim, head_dim, kT, logits + r0 * ld, ld); });
}

void block_softmax(float* p, int64_t rows, const int64_t* visible, float* row_max, float* row_sum, float* acc,
                   int64_t head_dim) {
  const auto one_row = [&](int64_t r) {
    if (visible[r] == 0) {  // the state stays; the row adds nothing to acc
      std::fill(p + r * kKeyBlock, p + (r + 1) * kKeyBlock, 0.f);
    } else {
      softmax_rows<1>(p + r * kKeyBlock, visible + r, row_max + r, row_sum + r, acc + r * head_dim, head_dim);
    }
  };
  int64_t r = 0;
  for (; r + kRowTile <= rows; r += kRowTile) {
    if (std::all_of(visible + r, visible + r + kRowTile, [](int64_t n) { return n > 0; })) {
      softmax_rows<kRowTile>(p + r * kKeyBlock, visible + r, row_max + r, row_sum + r, acc + r * head_dim, head_dim);
    } else {
      for (int64_t i = r; i < r + kRowTile; ++i) one_row(i);
    }
  }
  for (; r < rows; ++r) one_row(r);
}

float exp_shifted_and_sum(float* x, int64_t n, float shift) { return exp_shifted_and_sum_impl(x, n, shift); }

void block_weighted_sum(const float* p, int64_t rows, int64_t head_dim, const float* v, float* acc) {
  for_row_tiles(
      rows,
      [&](int64_t r0) { weighted_sum_block_rows<4>(p + r0 * kKeyBlock, head_dim, v, acc + r0 * head_dim); },
      [&](int64_t r0) { weighted_sum_block_rows<3>(p + r0 * kKeyBlock, head_dim, v, acc + r0 * head_dim); },
      [&](int64_t r0) { weighted_sum_block_rows<2>(p + r0 * kKeyBlock, head_dim, v, acc + r0 * head_dim); },
      [&](int64_t r0) { weighted_sum_block_rows<1>(p + r0 * kKeyBlock, head_dim, v, acc + r0 * head_dim); });
}
#undef STD_EXT_SHUFFLE
