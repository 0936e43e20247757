#include "multipole/core/simd.hpp"

#include <atomic>
#include <cstdlib>

#include "multipole/core/error.hpp"

namespace multipole {

namespace {
// -1: not chosen yet (MULTIPOLE_SIMD or the best the CPU has), else a SimdLevel.
std::atomic<int> selected_level{-1};
}  // namespace

SimdLevel best_simd_level() {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return avx512 ? SimdLevel::Avx512 : SimdLevel::Avx2;
}

SimdLevel simd_level() {
  int level = selected_level.load(std::memory_order_relaxed);
  if (level < 0) {
    SimdLevel chosen = best_simd_level();
    if (const char* env = std::getenv("MULTIPOLE_SIMD")) {
      const std::string_view want(env);
      MP_CHECK(want == "avx2" || want == "avx512" || want == "auto",
               "MULTIPOLE_SIMD: '{}' is not one of avx2, avx512, auto", want);
      if (want == "avx2") chosen = SimdLevel::Avx2;
      MP_CHECK(want != "avx512" || chosen == SimdLevel::Avx512,
               "MULTIPOLE_SIMD: avx512 asked for, but this CPU lacks AVX-512 (F, BW, DQ, VL)");
    }
    level = int(chosen);
    selected_level.store(level, std::memory_order_relaxed);
  }
  return SimdLevel(level);
}

void set_simd_level(SimdLevel level) {
  MP_CHECK(level == SimdLevel::Avx2 || best_simd_level() == SimdLevel::Avx512,
           "simd level avx512 asked for, but this CPU lacks AVX-512 (F, BW, DQ, VL)");
  selected_level.store(int(level), std::memory_order_relaxed);
}

std::string_view simd_level_name(SimdLevel level) { return level == SimdLevel::Avx512 ? "avx512" : "avx2"; }

bool use_avx512_vnni() {
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  return vnni && simd_level() == SimdLevel::Avx512;
}

}  // namespace multipole
