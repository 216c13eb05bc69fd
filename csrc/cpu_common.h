// What the CPU kernel files share: the instruction-set clones of the inner loops, bfloat16 <-> float32
// conversions and the element type -> accumulation type traits (uint16_t always means bfloat16 bits).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define XMC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define XMC_CLONES
#endif
#define XMC_INLINE inline __attribute__((always_inline))

namespace xmc {
namespace cpu {

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <typename E>
struct Elem;
template <>
struct Elem<float> {
  using Acc = float;
  static float load(float v) { return v; }
  static float store(float a) { return a; }
};
template <>
struct Elem<double> {
  using Acc = double;
  static double load(double v) { return v; }
  static double store(double a) { return a; }
};
template <>
struct Elem<uint16_t> {
  using Acc = float;
  static float load(uint16_t v) { return bf16_to_float(v); }
  static uint16_t store(float a) { return float_to_bf16(a); }
};

inline int clamp_threads(int n) { return n < 1 ? 1 : n; }

}  // namespace cpu
}  // namespace xmc
