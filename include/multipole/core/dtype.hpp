#pragma once
// Storage types and conversions. Storage may be f16/bf16; arithmetic is always f32.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace multipole {

enum class DType : uint8_t { F32, F16, BF16 };

constexpr size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }
std::string_view dtype_name(DType t);
// Parses "f32", "f16", "bf16" (also "float32", "float16", "bfloat16"); throws naming `what`.
DType parse_dtype(std::string_view text, std::string_view what = "dtype");

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float bf16_to_f32(uint16_t bits) {
  uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays NaN (quiet).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t bits);
uint16_t f32_to_f16(float f);

// Bulk conversions (SIMD). src/dst hold n elements of the given storage type.
void convert_to_f32(const void* src, DType type, float* dst, size_t n);
void convert_from_f32(const float* src, DType type, void* dst, size_t n);

}  // namespace multipole
