#pragma once
// What the AVX2 kernels (decode_kernels.cpp) and their AVX-512 variants
// (decode_kernels_avx512.cpp) share: the block size, the next-block prefetch, the online
// softmax step, and the AVX-512 entry points the AVX2 file dispatches to.
#include <cstdint>

#include "attention/decode_kernels.hpp"
#include "attention/simd_avx2.hpp"

namespace multipole::kernels::detail {

// Tokens per block: logits of a block are computed for all G heads, then one online-softmax
// update, then the PV pass. Large enough to amortise the per-block rescale, small enough
// that the block's K and V rows (64 x 256 B each for d=128 bf16) stay in L1.
constexpr int kBlock = 64;
constexpr int kMaxGroups = 16;

// Software prefetch (into L2) of the next block's K/V rows, spread over the tokens of the
// current block: the rows of one KV head are 4 KB runs scattered over the page pool, which
// the hardware prefetchers do not follow across page boundaries. The AVX2 logit pass
// fetches keys and values; the AVX-512 one only the keys, and each AVX-512 PV pass the
// lines it reads of the next values, which keeps misses in flight through the PV time too
// (one Zen 5 core from DRAM: 28-39 -> 21.5-23.4 ns per token-head). The AVX2 kernels, short of
// registers and bound by their FMAs, ran slower with any fetch in the PV pass.
template <class T>
struct Prefetch {
  const T* const* k = nullptr;  // [n] rows of row_bytes
  const T* const* v = nullptr;  // [n] rows, or nullptr
  int n = 0;
  int row_bytes = 0;
  void token(int t) const {
    if (t >= n) return;
    for (int b = 0; b < row_bytes; b += 64) {
      simd::prefetch_l2(reinterpret_cast<const char*>(k[t]) + b);
      if (v) simd::prefetch_l2(reinterpret_cast<const char*>(v[t]) + b);
    }
  }
  void key_row(int t) const {
    if (t < n) lines(k[t], 0, row_bytes);
  }
  // The lines of value row t that start in bytes [begin, end).
  void value_bytes(int t, int begin, int end) const {
    if (v && t < n) lines(v[t], (begin + 63) & ~63, end);
  }
  static void lines(const T* row, int begin, int end) {
    for (int b = begin; b < end; b += 64) simd::prefetch_l2(reinterpret_cast<const char*>(row) + b);
  }
  // The same rows from item `first` on (for a tail handled separately).
  Prefetch from(int first) const {
    if (first >= n) return {};
    return {k + first, v ? v + first : nullptr, n - first, row_bytes};
  }
};

// Online-softmax step for one block: logits x [G] rows of stride kBlock (n valid, padded
// to a multiple of 8 with -inf) become probabilities relative to the new running max, and
// l, o are rescaled to that max.
void softmax_step(float* x, int n, SoftmaxState& s);

// True when the AVX-512 variants run for head dim d (selected level, d % 16 == 0).
bool use_avx512(int d);

// AVX-512 variants of the block kernels (same contracts as logits() and pv() in
// decode_kernels.cpp); only called when use_avx512(d).
//   rows: [n] key rows of d elements; q: [G, d]; out: [G] rows of stride ostride
//   bias: [n] or nullptr
template <class T>
void logits_avx512(const T* const* rows, int n, const float* q, int groups, int d, float scale, const float* bias,
                   float* out, int64_t ostride, const Prefetch<T>& prefetch);
//   rows: [n] value rows; p: [G] rows of stride kBlock; o: [G, d] (accumulated into)
template <class T>
void pv_avx512(const T* const* rows, int n, const float* p, int groups, int d, float* o, const Prefetch<T>& prefetch);

}  // namespace multipole::kernels::detail
