#pragma once
// Small AVX2/FMA/F16C helpers shared by the CPU attention kernels: 8-lane loads from any
// K/V storage type (converted to f32), horizontal sums, and a vectorised e^x.
#include <immintrin.h>

#include <cstdint>

#include "multipole/core/dtype.hpp"

namespace multipole::simd {

// 8 consecutive elements of storage type T as f32. T: float, f16, bf16.
template <class T> inline __m256 load8(const T* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<f16>(const f16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <> inline __m256 load8<bf16>(const bf16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 16 bf16 as two f32 vectors in lane order: lo = elements 0-3 and 8-11, hi = 4-7 and
// 12-15 (one load and two unpacks instead of two widening loads and two shifts).
inline void unpack16(const bf16* p, __m256& lo, __m256& hi) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
}
// 16 f32 in natural order -> the lane order of unpack16, and back.
inline void permute16(const float* x, __m256& lo, __m256& hi) {
  const __m256 a = _mm256_loadu_ps(x), b = _mm256_loadu_ps(x + 8);
  lo = _mm256_permute2f128_ps(a, b, 0x20);
  hi = _mm256_permute2f128_ps(a, b, 0x31);
}
inline void permute16(const float* x, float* out) {
  __m256 lo, hi;
  permute16(x, lo, hi);
  _mm256_storeu_ps(out, lo);
  _mm256_storeu_ps(out + 8, hi);
}
inline void unpermute16(__m256 lo, __m256 hi, float* x) {
  _mm256_storeu_ps(x, _mm256_permute2f128_ps(lo, hi, 0x20));
  _mm256_storeu_ps(x + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Prefetch into L2. Inline asm because GCC deletes loops whose only statements are
// __builtin_prefetch / _mm_prefetch (they have no side effects to it).
inline void prefetch_l2(const void* p) { asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p))); }

// Lane i of the result = horizontal sum of a[i], for 8 vectors (one transpose-add tree).
inline __m256 hsum8(const __m256 a[8]) {
  __m256 h0 = _mm256_hadd_ps(a[0], a[1]), h1 = _mm256_hadd_ps(a[2], a[3]);
  __m256 h2 = _mm256_hadd_ps(a[4], a[5]), h3 = _mm256_hadd_ps(a[6], a[7]);
  __m256 s0 = _mm256_hadd_ps(h0, h1), s1 = _mm256_hadd_ps(h2, h3);
  // s0 = [a0 a1 a2 a3 | a0 a1 a2 a3] halves (low/high 128-bit partial sums); same for s1.
  __m256 lo = _mm256_permute2f128_ps(s0, s1, 0x20), hi = _mm256_permute2f128_ps(s0, s1, 0x31);
  return _mm256_add_ps(lo, hi);
}

// e^x per lane: range reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial (Cephes
// expf coefficients), 2^n applied as two factors so n in [-150, 128] needs no special case.
// e^-inf = 0 (and anything below -104 underflows to 0), x > 88.72 gives +inf, NaN stays NaN.
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.72283935546875f), lo = _mm256_set1_ps(-104.0f);
  __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i ni = _mm256_cvtps_epi32(n);
  __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

}  // namespace multipole::simd
