#include "multipole/core/quant.hpp"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "multipole/core/dtype.hpp"
#include "multipole/core/error.hpp"
#include "multipole/core/simd.hpp"
#include "multipole/core/thread_pool.hpp"
#include "core/quant_gemv.hpp"

namespace multipole {

namespace {

bool is_float_type(QuantType t) {
  return t == QuantType::F32 || t == QuantType::F16 || t == QuantType::BF16;
}

// Inline F16C conversion: f16_to_f32 lives in another translation unit, and a call per
// block costs more than the block's arithmetic.
inline float load_f16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

// ---------------------------------------------------------------------------------------
// Scalar dequantisation of one block, straight from the layouts in quant.hpp.

void dequant_q4_0(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * float((qs[j] & 15) - 8);
    y[j + 16] = d * float((qs[j] >> 4) - 8);
  }
}

void dequant_q4_1(const uint8_t* b, float* y) {
  const float d = load_f16(b), m = load_f16(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * float(qs[j] & 15) + m;
    y[j + 16] = d * float(qs[j] >> 4) + m;
  }
}

// Q5 values: the nibble plus bit i of the 32-bit qh as bit 4.
void q5_values(const uint8_t* qh_bytes, const uint8_t* qs, int* q) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  for (int j = 0; j < 16; ++j) {
    q[j] = (qs[j] & 15) | int(((qh >> j) & 1) << 4);
    q[j + 16] = (qs[j] >> 4) | int(((qh >> (j + 16)) & 1) << 4);
  }
}

void dequant_q5_0(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  int q[32];
  q5_values(b + 2, b + 6, q);
  for (int j = 0; j < 32; ++j) y[j] = d * float(q[j] - 16);
}

void dequant_q5_1(const uint8_t* b, float* y) {
  const float d = load_f16(b), m = load_f16(b + 2);
  int q[32];
  q5_values(b + 4, b + 8, q);
  for (int j = 0; j < 32; ++j) y[j] = d * float(q[j]) + m;
}

void dequant_q8_0(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = d * float(qs[j]);
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block: for j < 4 the low 6
// bits of bytes j and j+4; for j >= 4 a nibble of byte j+4 plus the top 2 bits of byte j-4
// (scale) or byte j (min).
void k_scale_min(int j, const uint8_t* s, int& scale, int& min) {
  if (j < 4) {
    scale = s[j] & 63;
    min = s[j + 4] & 63;
  } else {
    scale = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q4_K, and Q5_K with the fifth bit of value l of sub-block j in bit j of qh[l].
template <bool Five>
void dequant_q45_k(const uint8_t* b, float* y) {
  const float d = load_f16(b), dmin = load_f16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + (Five ? 48 : 16);
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    k_scale_min(j, scales, sc, mn);
    const float dj = d * float(sc), mj = dmin * float(mn);
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j & 1);
    for (int l = 0; l < 32; ++l) {
      const int v = ((q[l] >> shift) & 15) | (Five ? ((qh[l] >> j) & 1) << 4 : 0);
      y[32 * j + l] = dj * float(v) - mj;
    }
  }
}

// Q6_K: the 256 values are two halves of 128; in half n, value 32k + l (k 0..3, l 0..31)
// takes 4 bits from ql[64n + l + 32 (k & 1)] (low nibble for k < 2, high for k >= 2),
// 2 bits from qh[32n + l] >> 2k, and scale scales[8n + 2k + l / 16].
void dequant_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  const float d = load_f16(b + 208);
  for (int n = 0; n < 2; ++n) {
    for (int k = 0; k < 4; ++k) {
      for (int l = 0; l < 32; ++l) {
        const int lo = (ql[64 * n + l + 32 * (k & 1)] >> (k >= 2 ? 4 : 0)) & 15;
        const int hi = (qh[32 * n + l] >> (2 * k)) & 3;
        const float ds = d * float(scales[8 * n + 2 * k + l / 16]);
        y[128 * n + 32 * k + l] = ds * float((lo | (hi << 4)) - 32);
      }
    }
  }
}

using DequantFn = void (*)(const uint8_t* block, float* out);

DequantFn dequant_fn(QuantType t) {
  switch (t) {
    case QuantType::Q4_0: return dequant_q4_0;
    case QuantType::Q4_1: return dequant_q4_1;
    case QuantType::Q5_0: return dequant_q5_0;
    case QuantType::Q5_1: return dequant_q5_1;
    case QuantType::Q8_0: return dequant_q8_0;
    case QuantType::Q4_K: return dequant_q45_k<false>;
    case QuantType::Q5_K: return dequant_q45_k<true>;
    case QuantType::Q6_K: return dequant_q6_k;
    default: return nullptr;
  }
}

DType float_dtype(QuantType t) {
  return t == QuantType::F32 ? DType::F32 : t == QuantType::F16 ? DType::F16 : DType::BF16;
}

// ---------------------------------------------------------------------------------------
// AVX2 dot products. Each kernel takes a stored row of `cols` values and NV activation
// rows, and unpacks every weight block to 32 int8 lanes once for all NV of them.

struct XView {
  const int8_t* q = nullptr;   // quantised activations (quantised weight types)
  const float* d = nullptr;
  const int16_t* s = nullptr;
  const float* ds = nullptr;   // d * sum of q per block of 32
  const float* f = nullptr;    // f32 activations (F32/F16/BF16 weights)
};
using DotFn = void (*)(const uint8_t* row, int64_t cols, const XView* xs, float* out);

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// 8 int32 partial sums of w * x, w unsigned (0..127 here), x signed in [-127, 127].
inline __m256i dot_u8_s8(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}
// Same for signed w: maddubs wants its first operand unsigned, so move w's sign onto x.
inline __m256i dot_s8_s8(__m256i w, __m256i x) {
  return dot_u8_s8(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
}

// The 16 bytes as 32 nibbles in value order: low nibbles (values 0..15), then high ones.
inline __m256i nibbles32(const uint8_t* qs) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(15));
}

// Byte i is 0x10 where bit i of the 32 bits at p is set (the fifth bit of Q5 values).
inline __m256i q5_high_bits(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(int(bits)),
      _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// Per activation row: vectors of partial sums plus scalar terms for weight offsets/mins.
// Consecutive blocks go to different accumulators (`Chains` of them) so that an FMA never
// waits for the previous block's: with one row the latency chain, not the arithmetic, would
// bound the speed; with 3-4 rows the rows themselves are independent chains.
template <int NV>
struct Accum {
  static constexpr int Chains = NV == 1 ? 4 : NV == 2 ? 2 : 1;
  __m256 v[Chains][NV];
  float c[Chains][NV];
  Accum() {
    for (int k = 0; k < Chains; ++k)
      for (int i = 0; i < NV; ++i) {
        v[k][i] = _mm256_setzero_ps();
        c[k][i] = 0.f;
      }
  }
  // `block` picks the chain (block % Chains). Callers unroll their block loops so that it is
  // a compile-time constant: with a run-time index the accumulators live on the stack and
  // every block waits on a store-to-load round trip.
  void add(int64_t block, int i, __m256i isum, float scale) {
    __m256& a = v[block % Chains][i];
    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(scale), a);
  }
  void add_scalar(int64_t block, int i, float x) { c[block % Chains][i] += x; }
  void store(float* out) const {
    for (int i = 0; i < NV; ++i) {
      __m256 s = v[0][i];
      float t = c[0][i];
      for (int k = 1; k < Chains; ++k) {
        s = _mm256_add_ps(s, v[k][i]);
        t += c[k][i];
      }
      out[i] = hsum(s) + t;
    }
  }
};

// Calls body(b, chain) for blocks b in [0, n), Chains blocks per iteration with chain a
// compile-time constant (the tail goes to chain 0).
template <int Chains, class Body>
inline void for_blocks(int64_t n, Body&& body) {
  int64_t b = 0;
  for (; b + Chains <= n; b += Chains)
    [&]<int... K>(std::integer_sequence<int, K...>) { (body(b + K, K), ...); }(std::make_integer_sequence<int, Chains>{});
  for (; b < n; ++b) body(b, 0);
}

// Q4_0 / Q5_0: sum d (q - off) dx qx = d dx (sum q qx - off sum qx).
// Q4_1 / Q5_1: sum (d q + m) dx qx = d dx sum q qx + m dx sum qx.
template <int NV, QuantType T>
void dot_q4q5(const uint8_t* row, int64_t cols, const XView* xs, float* out) {
  constexpr bool has_min = T == QuantType::Q4_1 || T == QuantType::Q5_1;
  constexpr bool five = T == QuantType::Q5_0 || T == QuantType::Q5_1;
  constexpr int bytes = detail::block32_bytes(T);
  constexpr int qs_at = detail::block32_quants_at(T);
  constexpr float offset = five ? 16.f : 8.f;
  Accum<NV> acc;
  for_blocks<Accum<NV>::Chains>(cols / 32, [&](int64_t b, int chain) {
    const uint8_t* blk = row + b * bytes;
    const float d = load_f16(blk);
    __m256i w = nibbles32(blk + qs_at);
    if constexpr (five) w = _mm256_or_si256(w, q5_high_bits(blk + (has_min ? 4 : 2)));
    const float m = has_min ? load_f16(blk + 2) : 0.f;
    for (int i = 0; i < NV; ++i) {
      const float dx = xs[i].d[b];
      acc.add(chain, i, dot_u8_s8(w, load32(xs[i].q + 32 * b)), d * dx);
      if constexpr (has_min)
        acc.add_scalar(chain, i, m * xs[i].ds[b]);
      else
        acc.add_scalar(chain, i, -offset * d * xs[i].ds[b]);
    }
  });
  acc.store(out);
}

template <int NV>
void dot_q8_0(const uint8_t* row, int64_t cols, const XView* xs, float* out) {
  Accum<NV> acc;
  for_blocks<Accum<NV>::Chains>(cols / 32, [&](int64_t b, int chain) {
    const uint8_t* blk = row + b * detail::block32_bytes(QuantType::Q8_0);
    const float d = load_f16(blk);
    const __m256i w = load32(blk + detail::block32_quants_at(QuantType::Q8_0));
    for (int i = 0; i < NV; ++i) acc.add(chain, i, dot_s8_s8(w, load32(xs[i].q + 32 * b)), d * xs[i].d[b]);
  });
  acc.store(out);
}

// Q4_K / Q5_K: sub-block j of 32 values is activation block 8 sb + j;
// sum (d sc q - dmin m) dx qx = d sc dx sum q qx - dmin m dx sum qx.
template <int NV, bool Five>
void dot_q45_k(const uint8_t* row, int64_t cols, const XView* xs, float* out) {
  constexpr int bytes = Five ? 176 : 144;
  constexpr int qs_at = Five ? 48 : 16;
  const __m256i low4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
  Accum<NV> acc;
  for (int64_t sb = 0; sb < cols / 256; ++sb, row += bytes) {
    const float d = load_f16(row), dmin = load_f16(row + 2);
    const __m256i qh = Five ? load32(row + 16) : _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = load32(row + qs_at + 32 * c);
#pragma GCC unroll 2
      for (int half = 0; half < 2; ++half) {
        const int j = 2 * c + half;
        __m256i w = _mm256_and_si256(half ? _mm256_srli_epi16(raw, 4) : raw, low4);
        if constexpr (Five)
          w = _mm256_or_si256(w, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, j), one), 4));
        int sc, mn;
        k_scale_min(j, row + 4, sc, mn);
        const float dj = d * float(sc), mj = dmin * float(mn);
        const int64_t b = 8 * sb + j;
        for (int i = 0; i < NV; ++i) {
          const float dx = xs[i].d[b];
          acc.add(j, i, dot_u8_s8(w, load32(xs[i].q + 32 * b)), dj * dx);  // j: b % Chains, constant
          acc.add_scalar(j, i, -mj * xs[i].ds[b]);
        }
      }
    }
  }
  acc.store(out);
}

// Q6_K: each 32 values (activation block b) has two int8 scales, one per 16; they are
// applied in integers (madd of the pair sums), the -32 offset through the 16-value sums.
template <int NV>
void dot_q6_k(const uint8_t* row, int64_t cols, const XView* xs, float* out) {
  const __m256i low4 = _mm256_set1_epi8(15), low2 = _mm256_set1_epi8(3);
  Accum<NV> acc;
  for (int64_t sb = 0; sb < cols / 256; ++sb, row += 210) {
    const int8_t* scales = reinterpret_cast<const int8_t*>(row + 192);
    const float d = load_f16(row + 208);
#pragma GCC unroll 2
    for (int n = 0; n < 2; ++n) {
      const __m256i qh = load32(row + 128 + 32 * n);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const __m256i raw = load32(row + 64 * n + 32 * (k & 1));
        const __m256i lo = _mm256_and_si256(k >= 2 ? _mm256_srli_epi16(raw, 4) : raw, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), low2);
        const __m256i w = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
        const int s0 = scales[8 * n + 2 * k], s1 = scales[8 * n + 2 * k + 1];
        const __m256i sv = _mm256_set_m128i(_mm_set1_epi16(int16_t(s1)), _mm_set1_epi16(int16_t(s0)));
        const int64_t b = 8 * sb + 4 * n + k;
        for (int i = 0; i < NV; ++i) {
          const float dd = d * xs[i].d[b];
          const __m256i pairs = _mm256_maddubs_epi16(w, load32(xs[i].q + 32 * b));
          acc.add(4 * n + k, i, _mm256_madd_epi16(pairs, sv), dd);  // b % Chains, constant
          acc.add_scalar(4 * n + k, i, -32.f * dd * float(s0 * xs[i].s[2 * b] + s1 * xs[i].s[2 * b + 1]));
        }
      }
    }
  }
  acc.store(out);
}

// F32 / F16 / BF16 rows with f32 activations (any cols).
template <QuantType T>
inline __m256 load8_float(const uint8_t* row, int64_t i) {
  if constexpr (T == QuantType::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i));
    if constexpr (T == QuantType::F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}
template <QuantType T>
inline float load1_float(const uint8_t* row, int64_t i) {
  if constexpr (T == QuantType::F32) {
    float f;
    std::memcpy(&f, row + 4 * i, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, row + 2 * i, 2);
    return T == QuantType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
  }
}

template <int NV, QuantType T>
void dot_float(const uint8_t* row, int64_t cols, const XView* xs, float* out) {
  __m256 acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= cols; k += 8) {
    const __m256 w = load8_float<T>(row, k);
    for (int i = 0; i < NV; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs[i].f + k), acc[i]);
  }
  for (int i = 0; i < NV; ++i) {
    float s = hsum(acc[i]);
    for (int64_t t = k; t < cols; ++t) s += load1_float<T>(row, t) * xs[i].f[t];
    out[i] = s;
  }
}

// Quantised rows against f32 activations (xs[i].f), for products that must not round the
// activations. for_sub32 walks a row's 32-value sub-blocks: value l of sub-block b is
// a0 * w_l + c0 for l < 16 and a1 * w_l + c1 for l >= 16, w the int8 lanes (the same
// unpacking as the integer kernels above, with the scales, offsets and mins as floats).
template <QuantType T, class Fn>
inline void for_sub32(const uint8_t* row, int64_t cols, Fn&& fn) {
  if constexpr (T == QuantType::Q4_K || T == QuantType::Q5_K) {
    constexpr bool five = T == QuantType::Q5_K;
    const __m256i low4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    for (int64_t sb = 0; sb < cols / 256; ++sb, row += five ? 176 : 144) {
      const float d = load_f16(row), dmin = load_f16(row + 2);
      const __m256i qh = five ? load32(row + 16) : _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        const __m256i raw = load32(row + (five ? 48 : 16) + 32 * (j / 2));
        __m256i w = _mm256_and_si256((j & 1) ? _mm256_srli_epi16(raw, 4) : raw, low4);
        if constexpr (five) w = _mm256_or_si256(w, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, j), one), 4));
        int sc, mn;
        k_scale_min(j, row + 4, sc, mn);
        const float a = d * float(sc), c = -dmin * float(mn);
        fn(8 * sb + j, w, a, c, a, c);
      }
    }
  } else if constexpr (T == QuantType::Q6_K) {
    const __m256i low4 = _mm256_set1_epi8(15), low2 = _mm256_set1_epi8(3);
    for (int64_t sb = 0; sb < cols / 256; ++sb, row += 210) {
      const int8_t* scales = reinterpret_cast<const int8_t*>(row + 192);
      const float d = load_f16(row + 208);
      for (int n = 0; n < 2; ++n) {
        const __m256i qh = load32(row + 128 + 32 * n);
        for (int k = 0; k < 4; ++k) {
          const __m256i raw = load32(row + 64 * n + 32 * (k & 1));
          const __m256i lo = _mm256_and_si256(k >= 2 ? _mm256_srli_epi16(raw, 4) : raw, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), low2);
          const float a0 = d * float(scales[8 * n + 2 * k]), a1 = d * float(scales[8 * n + 2 * k + 1]);
          fn(8 * sb + 4 * n + k, _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), a0, -32.f * a0, a1, -32.f * a1);
        }
      }
    }
  } else {
    constexpr bool has_min = T == QuantType::Q4_1 || T == QuantType::Q5_1;
    constexpr bool five = T == QuantType::Q5_0 || T == QuantType::Q5_1;
    constexpr int bytes = detail::block32_bytes(T), qs_at = detail::block32_quants_at(T);
    for (int64_t b = 0; b < cols / 32; ++b) {
      const uint8_t* blk = row + b * bytes;
      const float d = load_f16(blk);
      if constexpr (T == QuantType::Q8_0) {
        fn(b, load32(blk + qs_at), d, 0.f, d, 0.f);
      } else {
        __m256i w = nibbles32(blk + qs_at);
        if constexpr (five) w = _mm256_or_si256(w, q5_high_bits(blk + (has_min ? 4 : 2)));
        const float c = has_min ? load_f16(blk + 2) : -(five ? 16.f : 8.f) * d;
        fn(b, w, d, c, d, c);
      }
    }
  }
}

template <int NV, QuantType T>
void dot_sub32_f32(const uint8_t* row, int64_t cols, const XView* xs, float* out) {
  __m256 acc[2][NV];
  for (int k = 0; k < 2; ++k)
    for (int i = 0; i < NV; ++i) acc[k][i] = _mm256_setzero_ps();
  for_sub32<T>(row, cols, [&](int64_t b, __m256i w, float a0, float c0, float a1, float c1) {
    const __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; ++k) {
      const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[k]));
      const __m256 v = k < 2 ? _mm256_fmadd_ps(q, _mm256_set1_ps(a0), _mm256_set1_ps(c0))
                             : _mm256_fmadd_ps(q, _mm256_set1_ps(a1), _mm256_set1_ps(c1));
      for (int i = 0; i < NV; ++i) acc[k & 1][i] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xs[i].f + 32 * b + 8 * k), acc[k & 1][i]);
    }
  });
  for (int i = 0; i < NV; ++i) out[i] = hsum(_mm256_add_ps(acc[0][i], acc[1][i]));
}

// The dot kernel of type t for nv activation rows. f32: the activations stay f32 (x.f) also
// for quantised rows; else quantised rows take Q8Activations.
template <int NV>
DotFn dot_kernel_nv(QuantType t, bool f32) {
  switch (t) {
    case QuantType::F32: return dot_float<NV, QuantType::F32>;
    case QuantType::F16: return dot_float<NV, QuantType::F16>;
    case QuantType::BF16: return dot_float<NV, QuantType::BF16>;
    case QuantType::Q4_0: return f32 ? dot_sub32_f32<NV, QuantType::Q4_0> : dot_q4q5<NV, QuantType::Q4_0>;
    case QuantType::Q4_1: return f32 ? dot_sub32_f32<NV, QuantType::Q4_1> : dot_q4q5<NV, QuantType::Q4_1>;
    case QuantType::Q5_0: return f32 ? dot_sub32_f32<NV, QuantType::Q5_0> : dot_q4q5<NV, QuantType::Q5_0>;
    case QuantType::Q5_1: return f32 ? dot_sub32_f32<NV, QuantType::Q5_1> : dot_q4q5<NV, QuantType::Q5_1>;
    case QuantType::Q8_0: return f32 ? dot_sub32_f32<NV, QuantType::Q8_0> : dot_q8_0<NV>;
    case QuantType::Q4_K: return f32 ? dot_sub32_f32<NV, QuantType::Q4_K> : dot_q45_k<NV, false>;
    case QuantType::Q5_K: return f32 ? dot_sub32_f32<NV, QuantType::Q5_K> : dot_q45_k<NV, true>;
    case QuantType::Q6_K: return f32 ? dot_sub32_f32<NV, QuantType::Q6_K> : dot_q6_k<NV>;
  }
  fail("quant: no dot kernel for type {}", uint32_t(t));
}

constexpr int kMaxVectors = 4;

DotFn dot_kernel(QuantType t, int nv, bool f32_activations = false) {
  switch (nv) {
    case 1: return dot_kernel_nv<1>(t, f32_activations);
    case 2: return dot_kernel_nv<2>(t, f32_activations);
    case 3: return dot_kernel_nv<3>(t, f32_activations);
    default: return dot_kernel_nv<4>(t, f32_activations);
  }
}

void check_matrix(const QuantMatrix& w, std::string_view what) {
  MP_CHECK(w.rows >= 0, "{}: rows = {} is negative", what, w.rows);
  quant_row_bytes(w.type, w.cols);
  MP_CHECK(w.data != nullptr || w.rows == 0, "{}: weight data is null for {} rows", what, w.rows);
}

}  // namespace

// -----------------------------------------------------------------------------------------

QuantTraits quant_traits(QuantType t) {
  switch (t) {
    case QuantType::F32: return {"F32", 1, 4};
    case QuantType::F16: return {"F16", 1, 2};
    case QuantType::BF16: return {"BF16", 1, 2};
    case QuantType::Q4_0: return {"Q4_0", 32, 18};
    case QuantType::Q4_1: return {"Q4_1", 32, 20};
    case QuantType::Q5_0: return {"Q5_0", 32, 22};
    case QuantType::Q5_1: return {"Q5_1", 32, 24};
    case QuantType::Q8_0: return {"Q8_0", 32, 34};
    case QuantType::Q4_K: return {"Q4_K", 256, 144};
    case QuantType::Q5_K: return {"Q5_K", 256, 176};
    case QuantType::Q6_K: return {"Q6_K", 256, 210};
  }
  fail("quant: unknown quant type {}", uint32_t(t));
}

std::optional<QuantType> quant_type_from_ggml(uint32_t ggml_type) {
  switch (ggml_type) {
    case 0: case 1: case 2: case 3: case 6: case 7: case 8: case 12: case 13: case 14: case 30:
      return QuantType(ggml_type);
    default:
      return std::nullopt;
  }
}

int64_t quant_row_bytes(QuantType t, int64_t cols) {
  const QuantTraits tr = quant_traits(t);
  MP_CHECK(cols > 0 && cols % tr.block_size == 0,
           "quant: a {} row needs a positive multiple of {} values, got cols = {}", tr.name,
           tr.block_size, cols);
  return cols / tr.block_size * tr.block_bytes;
}

void dequantize_row(QuantType t, const void* row, float* out, int64_t n) {
  const int64_t bytes = quant_row_bytes(t, n);
  if (is_float_type(t)) {
    convert_to_f32(row, float_dtype(t), out, size_t(n));
    return;
  }
  const QuantTraits tr = quant_traits(t);
  const DequantFn fn = dequant_fn(t);
  const uint8_t* p = static_cast<const uint8_t*>(row);
  for (int64_t off = 0; off < bytes; off += tr.block_bytes, out += tr.block_size) fn(p + off, out);
}

void Q8Activations::quantize(const float* x, int64_t rows, int64_t cols) {
  MP_CHECK(cols > 0 && cols % 32 == 0, "Q8Activations: cols = {} is not a positive multiple of 32", cols);
  MP_CHECK(rows >= 0, "Q8Activations: rows = {} is negative", rows);
  rows_ = rows;
  cols_ = cols;
  q_.resize(size_t(rows * cols));
  d_.resize(size_t(rows * cols / 32));
  sums_.resize(size_t(rows * cols / 16));
  dsum_.resize(size_t(rows * cols / 32));
  const __m256 sign = _mm256_set1_ps(-0.f), inf = _mm256_set1_ps(INFINITY);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < rows * cols / 32; ++b) {
    const float* xb = x + 32 * b;
    __m256 v[4], amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      v[k] = _mm256_loadu_ps(xb + 8 * k);
      const __m256 a = _mm256_andnot_ps(sign, v[k]);
      amax = _mm256_max_ps(amax, a);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // inf or NaN
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float mx = _mm_cvtss_f32(m);
    if (_mm256_movemask_ps(bad) != 0) {
      for (int k = 0; k < 32; ++k)
        MP_CHECK(std::isfinite(xb[k]), "Q8Activations: activation {} of row {} is {}, not finite",
                 (32 * b + k) % cols, 32 * b / cols, xb[k]);
    }
    const float d = mx / 127.f;
    const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
    __m256i i32[4];
    for (int k = 0; k < 4; ++k) i32[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv));  // nearest-even
    // packs interleave the 128-bit lanes; the permute puts the 8 groups of 4 back in order.
    const __m256i i16a = _mm256_packs_epi32(i32[0], i32[1]), i16b = _mm256_packs_epi32(i32[2], i32[3]);
    const __m256i i8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i16a, i16b), order);
    int8_t* qb = q_.data() + 32 * b;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), i8);
    d_[size_t(b)] = d;
    for (int h = 0; h < 2; ++h) {
      int s = 0;
      for (int k = 0; k < 16; ++k) s += qb[16 * h + k];
      sums_[size_t(2 * b + h)] = int16_t(s);
    }
    dsum_[size_t(b)] = d * float(sums_[size_t(2 * b)] + sums_[size_t(2 * b + 1)]);
  }
}

float dot_row(QuantType t, const void* row, const Q8Activations& x, int64_t xrow) {
  MP_CHECK(!is_float_type(t), "dot_row: {} rows take f32 activations (use dot_row_f32)", quant_traits(t).name);
  MP_CHECK(xrow >= 0 && xrow < x.rows(), "dot_row: activation row {} out of range [0, {})", xrow, x.rows());
  quant_row_bytes(t, x.cols());
  const XView v{x.q(xrow), x.d(xrow), x.sums(xrow), x.dsum(xrow), nullptr};
  float out;
  dot_kernel(t, 1)(static_cast<const uint8_t*>(row), x.cols(), &v, &out);
  return out;
}

float dot_row_f32(QuantType t, const void* row, const float* x, int64_t cols) {
  quant_row_bytes(t, cols);  // checks cols against the block size
  XView v;
  v.f = x;
  float out;
  dot_kernel(t, 1, true)(static_cast<const uint8_t*>(row), cols, &v, &out);
  return out;
}

void gemv(const QuantMatrix& w, const float* x, float* y, ThreadPool* pool, Q8Activations* scratch,
          ActivationPrecision precision) {
  gemm(w, x, 1, y, pool, scratch, precision);
}

void gemm(const QuantMatrix& w, const float* x, int64_t n, float* y, ThreadPool* pool,
          Q8Activations* scratch, ActivationPrecision precision) {
  const GemmOutput one{w, y};
  gemm_group({&one, 1}, x, n, pool, scratch, precision);
}

void gemm_group(std::span<const GemmOutput> outs, const float* x, int64_t n, ThreadPool* pool,
                Q8Activations* scratch, ActivationPrecision precision) {
  MP_CHECK(n >= 0, "gemm: n = {} activation rows is negative", n);
  MP_CHECK(outs.size() <= kMaxGroupMatrices, "gemm_group: {} matrices, at most {}", outs.size(), kMaxGroupMatrices);
  if (n == 0 || outs.empty()) return;
  const int64_t cols = outs[0].w.cols;
  const bool f32_activations = precision == ActivationPrecision::F32;
  bool quantised = false;
  // Tiles of all matrices in one index space: matrix i owns tiles [first[i], first[i + 1]).
  // A tile of rows is reused for every group of activation rows while it sits in L1/L2.
  const int64_t tile = n == 1 ? 32 : 16;
  int64_t first[kMaxGroupMatrices + 1] = {0}, row_bytes[kMaxGroupMatrices], bytes = 0;
  for (size_t i = 0; i < outs.size(); ++i) {
    const QuantMatrix& w = outs[i].w;
    check_matrix(w, "gemm");
    MP_CHECK(w.cols == cols, "gemm_group: matrix {} has {} columns, matrix 0 has {}", i, w.cols, cols);
    quantised |= !is_float_type(w.type) && !f32_activations;
    first[i + 1] = first[i] + (w.rows + tile - 1) / tile;
    row_bytes[i] = quant_row_bytes(w.type, cols);
    bytes += w.rows * row_bytes[i];
  }
  Q8Activations local;
  Q8Activations& xa = scratch ? *scratch : local;
  if (quantised) xa.quantize(x, n, cols);
  const bool vnni = n == 1 && !f32_activations && use_avx512_vnni();

  auto rows_of = [&](size_t m, int64_t r0, int64_t r1) {
    const QuantMatrix& w = outs[m].w;
    float* y = outs[m].y;
    const int64_t rb = row_bytes[m];
    const uint8_t* base = static_cast<const uint8_t*>(w.data);
    if (vnni && detail::gemv_avx512_vnni(w.type, base, rb, cols, xa.q(0), xa.d(0), xa.dsum(0), r0, r1, y)) return;
    for (int64_t t = 0; t < n; t += kMaxVectors) {
      const int nv = int(std::min<int64_t>(kMaxVectors, n - t));
      XView xs[kMaxVectors];
      for (int i = 0; i < nv; ++i) {
        if (is_float_type(w.type) || f32_activations)
          xs[i].f = x + (t + i) * cols;
        else
          xs[i] = {xa.q(t + i), xa.d(t + i), xa.sums(t + i), xa.dsum(t + i), nullptr};
      }
      const DotFn fn = dot_kernel(w.type, nv, f32_activations);
      float out[kMaxVectors];
      if (t == 0) detail::prefetch_rows(base, rb, r0, r0 + detail::kPrefetchRows, r1);
      for (int64_t r = r0; r < r1; ++r) {
        if (t == 0) detail::prefetch_rows(base, rb, r + detail::kPrefetchRows, r + detail::kPrefetchRows + 1, r1);
        fn(base + r * rb, cols, xs, out);
        for (int i = 0; i < nv; ++i) y[(t + i) * w.rows + r] = out[i];
      }
    }
  };
  const int64_t tiles = first[outs.size()];
  // Small products stay on the calling thread, where waking the pool would cost more.
  if (pool == nullptr || pool->size() == 1 || bytes < (64 << 10) || tiles == 1) {
    for (size_t m = 0; m < outs.size(); ++m) rows_of(m, 0, outs[m].w.rows);
    return;
  }
  pool->parallel_for(tiles, [&](int64_t t, int) {
    size_t m = 0;
    while (t >= first[m + 1]) ++m;
    const int64_t r0 = (t - first[m]) * tile;
    rows_of(m, r0, std::min(outs[m].w.rows, r0 + tile));
  });
}

}  // namespace multipole
