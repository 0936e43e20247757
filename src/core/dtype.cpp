#include "multipole/core/dtype.hpp"

#include <immintrin.h>

#include "multipole/core/error.hpp"

namespace multipole {

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
  }
  return "?";
}

DType parse_dtype(std::string_view text, std::string_view what) {
  if (text == "f32" || text == "float32" || text == "F32") return DType::F32;
  if (text == "f16" || text == "float16" || text == "F16") return DType::F16;
  if (text == "bf16" || text == "bfloat16" || text == "BF16") return DType::BF16;
  fail("{}: unknown dtype '{}' (expected f32, f16 or bf16)", what, text);
}

float f16_to_f32(uint16_t bits) { return _cvtsh_ss(bits); }
uint16_t f32_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

void convert_to_f32(const void* src, DType type, float* dst, size_t n) {
  if (n == 0) return;  // empty vectors may hand us null pointers; memcpy must not see them
  size_t i = 0;
  if (type == DType::F32) {
    std::memcpy(dst, src, n * 4);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  if (type == DType::BF16) {
    for (; i + 8 <= n; i += 8) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(w));
    }
    for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  } else {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    for (; i < n; ++i) dst[i] = f16_to_f32(s[i]);
  }
}

void convert_from_f32(const float* src, DType type, void* dst, size_t n) {
  if (n == 0) return;
  if (type == DType::F32) {
    std::memcpy(dst, src, n * 4);
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst);
  size_t i = 0;
  if (type == DType::F16) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) d[i] = f32_to_f16(src[i]);
  } else {
    for (; i < n; ++i) d[i] = f32_to_bf16(src[i]);
  }
}

}  // namespace multipole
