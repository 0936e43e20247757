#pragma once
// Instruction-set level of the CPU kernels (attention blocks, quantised GEMV). AVX2 + FMA +
// F16C is the baseline; AVX-512 (F, BW, DQ, VL) variants run where the CPU has them, the
// GEMV's integer dot products with AVX-512 VNNI on top. The default is the best the CPU
// has, or MULTIPOLE_SIMD=avx2|avx512|auto; tests and benchmarks switch at run time to
// compare both.
#include <string_view>

namespace multipole {

enum class SimdLevel { Avx2 = 0, Avx512 = 1 };
SimdLevel best_simd_level();
SimdLevel simd_level();
void set_simd_level(SimdLevel level);  // throws when the CPU lacks it
std::string_view simd_level_name(SimdLevel level);
// True when the level in force is Avx512 and the CPU also has AVX-512 VNNI.
bool use_avx512_vnni();

}  // namespace multipole
