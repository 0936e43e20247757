#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "multipole/core/dtype.hpp"
#include "multipole/core/error.hpp"

using namespace multipole;

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even one (1.0).
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-std::numeric_limits<float>::infinity())), -std::numeric_limits<float>::infinity());
}

TEST(DType, F16KnownValues) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
}

TEST(DType, BulkConversionMatchesScalar) {
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  for (size_t n : {0u, 1u, 7u, 8u, 9u, 63u, 1000u}) {
    std::vector<float> x(n), back(n);
    for (auto& v : x) v = dist(rng);
    for (DType t : {DType::F32, DType::F16, DType::BF16}) {
      std::vector<uint16_t> half(n);
      std::vector<float> full(n);
      void* storage = t == DType::F32 ? static_cast<void*>(full.data()) : static_cast<void*>(half.data());
      convert_from_f32(x.data(), t, storage, n);
      convert_to_f32(storage, t, back.data(), n);
      for (size_t i = 0; i < n; ++i) {
        float expect = t == DType::F32 ? x[i] : t == DType::F16 ? f16_to_f32(f32_to_f16(x[i])) : bf16_to_f32(f32_to_bf16(x[i]));
        ASSERT_EQ(back[i], expect) << dtype_name(t) << " n=" << n << " i=" << i;
        ASSERT_NEAR(back[i], x[i], std::abs(x[i]) * (t == DType::BF16 ? 4e-3 : 1e-3) + 1e-6);
      }
    }
  }
}

TEST(DType, ParseNamesAndRejectsUnknown) {
  EXPECT_EQ(parse_dtype("bf16"), DType::BF16);
  EXPECT_EQ(parse_dtype("float16"), DType::F16);
  EXPECT_THROW(parse_dtype("int8", "--kv-dtype"), Error);
  try {
    parse_dtype("int8", "--kv-dtype");
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--kv-dtype"), std::string::npos);
  }
}
