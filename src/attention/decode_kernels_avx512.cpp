// AVX-512 variants of the logit and PV block kernels (see decode_kernels.cpp for the AVX2
// originals and docs/cpu-kernels.md for the design). Twice the lanes and twice the
// registers: at group size 4 the AVX2 kernel is bound by its two 256-bit FMA pipes, not by
// DRAM. Only the functions below the target pragma use AVX-512, and only they are compiled
// for it: every header is included before it, so no inline or template code shared with
// other files is ever emitted with AVX-512 instructions (which the linker could otherwise
// pick for an AVX2-only caller). decode_kernels.cpp calls these only when the CPU has them.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "attention/decode_block.hpp"
#include "multipole/core/dtype.hpp"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")
// GCC 12 reports the intrinsics' internal _mm512_undefined_* operands as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace multipole::kernels::detail {
namespace {

constexpr int kMaxDim = 1024;  // widest row split into even/odd channels (quest's [lo|hi] rows)

// 16 consecutive elements of T as f32, natural order.
template <class T>
__m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, f16>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}

// 32 bf16 as their even and odd channels in f32: a shift and a mask of the same 32-bit
// lanes, no shuffle (shuffles share a port with the second FMA pipe).
inline void split32(const bf16* p, __m512& even, __m512& odd) {
  const __m512i raw = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
}

inline __m512i even_index() { return _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30); }
inline __m512i odd_index() { return _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31); }

// 32 f32 in natural order (a = 0-15, b = 16-31) -> even and odd channels, and back.
inline void to_even_odd(__m512 a, __m512 b, __m512& even, __m512& odd) {
  even = _mm512_permutex2var_ps(a, even_index(), b);
  odd = _mm512_permutex2var_ps(a, odd_index(), b);
}
inline void from_even_odd(__m512 even, __m512 odd, float* x) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  _mm512_storeu_ps(x, _mm512_permutex2var_ps(even, lo, odd));
  _mm512_storeu_ps(x + 16, _mm512_permutex2var_ps(even, hi, odd));
}

// Logits of NG heads for n keys, NT keys at a time (NT * NG independent FMA chains, within
// the 32 zmm registers; q stays a memory operand).
//   rows: [n] key rows; q: [NG, d] (SPLIT: each 32-channel chunk as 16 even then 16 odd
//   channels); out: [NG] rows of stride ostride; bias: [n] or nullptr
// SPLIT (bf16, d % 32 == 0): keys are read 32 channels per load and split by split32.
template <class T, int NG, int NT, bool SPLIT>
void logits_tile(const T* const* rows, int n, const float* q, int d, float scale, const float* bias, float* out,
                 int64_t ostride, const Prefetch<T>& pf) {
  int t = 0;
  for (; t + NT <= n; t += NT) {
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) pf.key_row(t + j);
    __m512 acc[NT][NG];
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j)
#pragma GCC unroll 16
      for (int g = 0; g < NG; ++g) acc[j][g] = _mm512_setzero_ps();
    if constexpr (SPLIT) {
      for (int c = 0; c < d; c += 32) {
#pragma GCC unroll 16
        for (int j = 0; j < NT; ++j) {
          __m512 even, odd;
          split32(rows[t + j] + c, even, odd);
#pragma GCC unroll 16
          for (int g = 0; g < NG; ++g) {
            acc[j][g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + c), even, acc[j][g]);
            acc[j][g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + c + 16), odd, acc[j][g]);
          }
        }
      }
    } else {
      for (int c = 0; c < d; c += 16) {
#pragma GCC unroll 16
        for (int j = 0; j < NT; ++j) {
          const __m512 k = load16(rows[t + j] + c);
#pragma GCC unroll 16
          for (int g = 0; g < NG; ++g) acc[j][g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + c), k, acc[j][g]);
        }
      }
    }
    // Each accumulator folded to 8 lanes, then the AVX2 transpose-add tree, 8 at a time.
    constexpr int NA = NT * NG, NR = (NA + 7) / 8;
    alignas(32) float sums[NR * 8];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      __m256 flat[8];
#pragma GCC unroll 16
      for (int i = 0; i < 8; ++i) {
        if (r * 8 + i < NA) {
          const __m512 a = acc[(r * 8 + i) / NG][(r * 8 + i) % NG];
          flat[i] = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
        } else {
          flat[i] = _mm256_setzero_ps();
        }
      }
      _mm256_store_ps(sums + r * 8, _mm256_mul_ps(simd::hsum8(flat), _mm256_set1_ps(scale)));
    }
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) {
      const float b = bias ? bias[t + j] : 0.0f;
#pragma GCC unroll 16
      for (int g = 0; g < NG; ++g) out[g * ostride + t + j] = sums[j * NG + g] + b;
    }
  }
  if constexpr (NT > 1) {
    if (t < n)
      logits_tile<T, NG, 1, SPLIT>(rows + t, n - t, q, d, scale, bias ? bias + t : nullptr, out + t, ostride,
                                   pf.from(t));
  }
}

template <class T, bool SPLIT>
void logits_tiles(const T* const* rows, int n, const float* q, int ng, int d, float scale, const float* bias,
                  float* out, int64_t ostride, const Prefetch<T>& pf) {
  switch (ng) {
    case 1: logits_tile<T, 1, 8, SPLIT>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    case 2: logits_tile<T, 2, 4, SPLIT>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    case 3: logits_tile<T, 3, 4, SPLIT>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    case 4: logits_tile<T, 4, 4, SPLIT>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    case 5: logits_tile<T, 5, 3, SPLIT>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    case 6: logits_tile<T, 6, 2, SPLIT>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    case 7: logits_tile<T, 7, 2, SPLIT>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    default: logits_tile<T, 8, 2, SPLIT>(rows, n, q, d, scale, bias, out, ostride, pf); break;
  }
}

// One PV pass over channels [c, c + 16 NS): the NS x NG accumulators stay in registers
// across the block's tokens. SPLIT (bf16, NS even): each 32-channel pair of slices is held
// as even and odd channels, converted from/to the state's order once per pass.
template <class T, int NG, int NS, bool SPLIT>
void pv_pass(const T* const* rows, int n, const float* p, int d, float* o, int c, const Prefetch<T>& pf) {
  __m512 acc[NS][NG];
#pragma GCC unroll 16
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 16
    for (int s = 0; s < NS; s += SPLIT ? 2 : 1) {
      const float* src = o + g * d + c + 16 * s;
      if constexpr (SPLIT) to_even_odd(_mm512_loadu_ps(src), _mm512_loadu_ps(src + 16), acc[s][g], acc[s + 1][g]);
      else acc[s][g] = _mm512_loadu_ps(src);
    }
  for (int t = 0; t < n; ++t) {
    pf.value_bytes(t, c * int(sizeof(T)), (c + 16 * NS) * int(sizeof(T)));
    __m512 v[NS];
#pragma GCC unroll 16
    for (int s = 0; s < NS; s += SPLIT ? 2 : 1) {
      if constexpr (SPLIT) split32(rows[t] + c + 16 * s, v[s], v[s + 1]);
      else v[s] = load16(rows[t] + c + 16 * s);
    }
#pragma GCC unroll 16
    for (int g = 0; g < NG; ++g) {
      const __m512 pg = _mm512_set1_ps(p[g * kBlock + t]);
#pragma GCC unroll 16
      for (int s = 0; s < NS; ++s) acc[s][g] = _mm512_fmadd_ps(pg, v[s], acc[s][g]);
    }
  }
#pragma GCC unroll 16
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 16
    for (int s = 0; s < NS; s += SPLIT ? 2 : 1) {
      float* dst = o + g * d + c + 16 * s;
      if constexpr (SPLIT) from_even_odd(acc[s][g], acc[s + 1][g], dst);
      else _mm512_storeu_ps(dst, acc[s][g]);
    }
}

// Passes of NS slices while they fit, then narrower ones for the rest of the row.
template <class T, int NG, int NS>
void pv_from(const T* const* rows, int n, const float* p, int d, float* o, int c, const Prefetch<T>& pf) {
  constexpr bool SPLIT = std::is_same_v<T, bf16> && NS % 2 == 0;
  for (; c + 16 * NS <= d; c += 16 * NS) pv_pass<T, NG, NS, SPLIT>(rows, n, p, d, o, c, pf);
  if constexpr (NS > 1) pv_from<T, NG, NS / 2>(rows, n, p, d, o, c, pf);
}

// NS: slices per pass, as many as the registers allow (NS NG accumulators + NS values + a
// broadcast <= 32), so that small groups still have 8+ independent FMA chains.
template <class T, int NG>
void pv_tile(const T* const* rows, int n, const float* p, int d, float* o, const Prefetch<T>& pf) {
  constexpr int NS = NG <= 2 ? 8 : NG <= 6 ? 4 : 2;
  pv_from<T, NG, NS>(rows, n, p, d, o, 0, pf);
}

}  // namespace

template <class T>
void logits_avx512(const T* const* rows, int n, const float* q, int groups, int d, float scale, const float* bias,
                   float* out, int64_t ostride, const Prefetch<T>& prefetch) {
  // Tiles of at most 8 heads keep the accumulators in registers; the second tile re-reads
  // the keys from L1.
  const int tile = groups <= 8 ? groups : (groups + 1) / 2;
  if constexpr (std::is_same_v<T, bf16>) {
    if (d % 32 == 0 && d <= kMaxDim) {
      alignas(64) float qsplit[8 * kMaxDim];
      for (int g0 = 0; g0 < groups; g0 += tile) {
        const int ng = std::min(tile, groups - g0);
        const float* qt = q + int64_t(g0) * d;
        for (int i = 0; i < ng * d; i += 32) {
          __m512 even, odd;
          to_even_odd(_mm512_loadu_ps(qt + i), _mm512_loadu_ps(qt + i + 16), even, odd);
          _mm512_store_ps(qsplit + i, even);
          _mm512_store_ps(qsplit + i + 16, odd);
        }
        logits_tiles<T, true>(rows, n, qsplit, ng, d, scale, bias, out + g0 * ostride, ostride,
                              g0 == 0 ? prefetch : Prefetch<T>{});
      }
      return;
    }
  }
  for (int g0 = 0; g0 < groups; g0 += tile)
    logits_tiles<T, false>(rows, n, q + int64_t(g0) * d, std::min(tile, groups - g0), d, scale, bias,
                           out + g0 * ostride, ostride, g0 == 0 ? prefetch : Prefetch<T>{});
}

template <class T>
void pv_avx512(const T* const* rows, int n, const float* p, int groups, int d, float* o, const Prefetch<T>& prefetch) {
  const int tile = groups <= 8 ? groups : (groups + 1) / 2;
  for (int g0 = 0; g0 < groups; g0 += tile) {
    const int ng = std::min(tile, groups - g0);
    const float* pt = p + g0 * kBlock;
    float* ot = o + int64_t(g0) * d;
    const Prefetch<T> pf = g0 == 0 ? prefetch : Prefetch<T>{};  // the second tile re-reads the rows
    switch (ng) {
      case 1: pv_tile<T, 1>(rows, n, pt, d, ot, pf); break;
      case 2: pv_tile<T, 2>(rows, n, pt, d, ot, pf); break;
      case 3: pv_tile<T, 3>(rows, n, pt, d, ot, pf); break;
      case 4: pv_tile<T, 4>(rows, n, pt, d, ot, pf); break;
      case 5: pv_tile<T, 5>(rows, n, pt, d, ot, pf); break;
      case 6: pv_tile<T, 6>(rows, n, pt, d, ot, pf); break;
      case 7: pv_tile<T, 7>(rows, n, pt, d, ot, pf); break;
      default: pv_tile<T, 8>(rows, n, pt, d, ot, pf); break;
    }
  }
}

#define MULTIPOLE_AVX512_KERNELS(T)                                                                              \
  template void logits_avx512<T>(const T* const*, int, const float*, int, int, float, const float*, float*, int64_t, \
                                 const Prefetch<T>&);                                                            \
  template void pv_avx512<T>(const T* const*, int, const float*, int, int, float*, const Prefetch<T>&);
MULTIPOLE_AVX512_KERNELS(float)
MULTIPOLE_AVX512_KERNELS(f16)
MULTIPOLE_AVX512_KERNELS(bf16)
#undef MULTIPOLE_AVX512_KERNELS

}  // namespace multipole::kernels::detail

#pragma GCC diagnostic pop
#pragma GCC pop_options
