// AVX-512 VNNI GEMV for the formats of 32-value blocks with one f16 scale (Q4_0, Q4_1, Q8_0):
// decode spends most of its time here. Against the AVX2 kernels of quant.cpp, per weight
// block: one vpdpbusd instead of maddubs + madd, the f16 scales (and mins) of eight blocks
// converted by one gather + vcvtph2ps instead of two scalar conversions per block, and four
// rows per pass sharing each activation block and the final horizontal sums.
// Only the functions below the target pragma are compiled for AVX-512 (256-bit EVEX
// forms): nothing inline from the headers is emitted here with those instructions.
#include <immintrin.h>

#include <algorithm>

#include "core/quant_gemv.hpp"

namespace multipole::detail {

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")

namespace {

// int32 sums of 4 products per lane: weights of one block times the activation block x.
template <QuantType T>
inline __m256i block_dot(const uint8_t* blk, __m256i x) {
  constexpr int at = block32_quants_at(T);
  if constexpr (T == QuantType::Q8_0) {
    // vpdpbusd wants unsigned times signed: move w's sign onto x (exact, unlike w + 128).
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + at));
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
  } else {
    // Low nibbles are values 0..15, high nibbles 16..31 (0..15 each, unsigned).
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + at));
    const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(15));
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
  }
}

// R rows starting at `row` (stride row_bytes) against x; out[r] = the R dots.
// Q4_1: sum (d q + m) dx qx = d dx sum q qx + m (dx sum qx).
// Q4_0: sum d (q - 8) dx qx = d dx sum q qx - 8 d (dx sum qx).   Q8_0: d dx sum q qx.
template <QuantType T, int R>
void dot_rows(const uint8_t* row, int64_t row_bytes, int64_t nblocks, const int8_t* xq, const float* xd,
              const float* xds, float* out) {
  constexpr int bytes = block32_bytes(T);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  // Byte offsets of 8 consecutive blocks; the gathered word holds d (and m for Q4_1).
  const __m256i offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bytes));
  alignas(32) float scale[R][8];
  for (int64_t b0 = 0; b0 < nblocks; b0 += 8) {
    const int n = int(std::min<int64_t>(8, nblocks - b0));
    const __mmask8 live = __mmask8((1u << n) - 1);
    const __m256 dx = _mm256_maskz_loadu_ps(live, xd + b0);
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = row + r * row_bytes + b0 * bytes;
      const __m256i word = _mm256_mmask_i32gather_epi32(_mm256_setzero_si256(), live, offsets, blk, 1);
      const __m256 d = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(word));
      _mm256_store_ps(scale[r], _mm256_mul_ps(d, dx));
      if constexpr (T != QuantType::Q8_0) {
        const __m256 ds = _mm256_maskz_loadu_ps(live, xds + b0);
        const __m256 m = T == QuantType::Q4_1 ? _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(word, 16)))
                                              : _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
        acc[r] = _mm256_fmadd_ps(m, ds, acc[r]);  // every lane is summed in the end
      }
    }
    for (int k = 0; k < n; ++k) {
      const int64_t b = b0 + k;
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * b));
      for (int r = 0; r < R; ++r) {
        const __m256i isum = block_dot<T>(row + r * row_bytes + b * bytes, x);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_broadcast_ss(&scale[r][k]), acc[r]);
      }
    }
  }
  if constexpr (R == 4) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  } else {
    for (int r = 0; r < R; ++r) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      out[r] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
  }
}

template <QuantType T>
void gemv_rows(const uint8_t* base, int64_t row_bytes, int64_t cols, const int8_t* xq, const float* xd,
               const float* xds, int64_t r0, int64_t r1, float* y) {
  const int64_t nblocks = cols / 32;
  int64_t r = r0;
  prefetch_rows(base, row_bytes, r0, r0 + kPrefetchRows, r1);
  for (; r + 4 <= r1; r += 4) {
    prefetch_rows(base, row_bytes, r + kPrefetchRows, r + kPrefetchRows + 4, r1);
    dot_rows<T, 4>(base + r * row_bytes, row_bytes, nblocks, xq, xd, xds, y + r);
  }
  for (; r < r1; ++r) dot_rows<T, 1>(base + r * row_bytes, row_bytes, nblocks, xq, xd, xds, y + r);
}

}  // namespace

bool gemv_avx512_vnni(QuantType t, const uint8_t* base, int64_t row_bytes, int64_t cols, const int8_t* xq,
                      const float* xd, const float* xds, int64_t r0, int64_t r1, float* y) {
  switch (t) {
    case QuantType::Q4_0: gemv_rows<QuantType::Q4_0>(base, row_bytes, cols, xq, xd, xds, r0, r1, y); return true;
    case QuantType::Q4_1: gemv_rows<QuantType::Q4_1>(base, row_bytes, cols, xq, xd, xds, r0, r1, y); return true;
    case QuantType::Q8_0: gemv_rows<QuantType::Q8_0>(base, row_bytes, cols, xq, xd, xds, r0, r1, y); return true;
    default: return false;
  }
}

#pragma GCC pop_options

}  // namespace multipole::detail
