#pragma once
// Matrix-vector kernels of quant.cpp that live in their own translation units (compiled for
// an instruction set the baseline build does not assume).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "multipole/core/quant.hpp"

namespace multipole::detail {

// A GEMV task is a short run of rows, too short for the hardware prefetcher to get ahead of
// it: without help each row waits on DRAM. The kernels fetch the rows kPrefetchRows ahead
// (rows [from, to) clipped to the task's end `last`).
inline constexpr int64_t kPrefetchRows = 8;
inline void prefetch_rows(const uint8_t* base, int64_t row_bytes, int64_t from, int64_t to, int64_t last) {
  const uint8_t* end = base + std::min(to, last) * row_bytes;
  for (const uint8_t* p = base + from * row_bytes; p < end; p += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// Formats of 32-value blocks (layouts in quant.hpp): bytes per block, and where the packed
// quants start (after the f16 scale, the min and the Q5 high bits).
constexpr int block32_bytes(QuantType t) {
  return t == QuantType::Q4_0 ? 18 : t == QuantType::Q4_1 ? 20 : t == QuantType::Q5_0 ? 22 : t == QuantType::Q5_1 ? 24 : 34;
}
constexpr int block32_quants_at(QuantType t) { return t == QuantType::Q8_0 ? 2 : block32_bytes(t) - 16; }

// y[r] = row r . x for r in [r0, r1) of W (rows of row_bytes bytes from `base`, `cols`
// values each), x one activation row quantised by Q8Activations:
//   xq:  [cols] int8      xd: [cols / 32] block scales      xds: [cols / 32] d * sum of q
// Four rows per pass share every activation load; the per-block scales of eight blocks are
// converted at once. Call only when use_avx512_vnni(). Returns false (and computes nothing)
// for types other than Q4_0, Q4_1 and Q8_0.
bool gemv_avx512_vnni(QuantType t, const uint8_t* base, int64_t row_bytes, int64_t cols, const int8_t* xq,
                      const float* xd, const float* xds, int64_t r0, int64_t r1, float* y);

}  // namespace multipole::detail
