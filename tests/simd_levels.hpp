#pragma once
// Tests that run once per instruction set this CPU has (AVX2, and AVX-512 where present):
//   class MyKernels : public multipole::test::SimdLevelTest {};
//   MULTIPOLE_INSTANTIATE_SIMD_LEVELS(MyKernels);
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "multipole/core/simd.hpp"

namespace multipole::test {

// Switches to the parameter's level for the test and back afterwards.
class SimdLevelTest : public ::testing::TestWithParam<SimdLevel> {
 protected:
  void SetUp() override {
    saved_ = simd_level();
    set_simd_level(GetParam());
  }
  void TearDown() override { set_simd_level(saved_); }

 private:
  SimdLevel saved_ = SimdLevel::Avx2;
};

inline std::vector<SimdLevel> supported_simd_levels() {
  std::vector<SimdLevel> levels = {SimdLevel::Avx2};
  if (best_simd_level() == SimdLevel::Avx512) levels.push_back(SimdLevel::Avx512);
  return levels;
}

inline std::string simd_test_name(const ::testing::TestParamInfo<SimdLevel>& info) {
  return std::string(simd_level_name(info.param));
}

}  // namespace multipole::test

#define MULTIPOLE_INSTANTIATE_SIMD_LEVELS(fixture)                                                         \
  INSTANTIATE_TEST_SUITE_P(Simd, fixture, ::testing::ValuesIn(::multipole::test::supported_simd_levels()), \
                           ::multipole::test::simd_test_name)
