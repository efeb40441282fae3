// CPU instruction-set levels shared by every CPU kernel in csrc/ (see offload/kernels/cpu.py).
//
// A kernel is called with the highest level it may use (the Python side passes the level that
// $OFFLOAD_CPU_ISA selects, or the best one) and runs the best path it has at or below that
// level, so every path the CPU can execute is reachable from tests:
//   0  scalar   portable C++
//   1  avx2     AVX2 + FMA + F16C + BMI2 (Haswell, Zen 1 and newer)
//   2  avx512   AVX-512 F + BW + VL + VBMI2 (Ice Lake, Sapphire Rapids, Zen 4 and newer); older
//               AVX-512 CPUs (Skylake-X, Cascade Lake) run the avx2 level
#pragma once

namespace offload_isa {

constexpr int SCALAR = 0;
constexpr int AVX2 = 1;
constexpr int AVX512 = 2;

inline int best() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2"))
    return AVX2;
#endif
  return SCALAR;
}

// The level a call runs at: what it asked for, capped by what this CPU has.
inline int effective(int asked) {
  static const int have = best();
  return asked < have ? asked : have;
}

}  // namespace offload_isa
