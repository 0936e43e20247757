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

// Types the AVX-512 VNNI GEMV handles (32-value blocks with one scale: Q4_0, Q4_1, Q8_0).
bool gemv_avx512_vnni_handles(QuantType t);

// y[r] = row r . x for r in [r0, r1) of W (rows of row_bytes bytes from `base`, `cols`
// values each), x one activation row quantised by Q8Activations:
//   xq:  [cols] int8      xd: [cols / 32] block scales      xds: [cols / 32] d * sum of q
// Four rows per pass share every activation load; the per-block scales of eight blocks are
// converted at once. Call only when use_avx512_vnni() and gemv_avx512_vnni_handles(t).
void gemv_avx512_vnni(QuantType t, const uint8_t* base, int64_t row_bytes, int64_t cols, const int8_t* xq,
                      const float* xd, const float* xds, int64_t r0, int64_t r1, float* y);

}  // namespace multipole::detail
