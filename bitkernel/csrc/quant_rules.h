// The quantization rules, written once and compiled for both the CPU and the
// GPU: the same source, IEEE division and round-half-to-even on both sides is
// what makes CPU and GPU packing bit-identical.
#pragma once
#include <cmath>
#include <cstdint>

#include "common.h"

#ifdef __CUDACC__
#define BK_HD __host__ __device__ __forceinline__
#else
#define BK_HD inline
#endif

namespace bitkernel {

BK_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Ternary: code = round(w / s) clamped to {-1, 0, 1}, stored as code + 1 in two bits.
BK_HD uint32_t ternary_code(float w, float s) {
  if (!(s > 0.f)) return 1u;
  return static_cast<uint32_t>(clampf(rintf(w / s), -1.f, 1.f) + 1.f);
}

// INT8 symmetric: q in [-127, 127].
BK_HD int8_t int8_code(float w, float s) {
  if (!(s > 0.f)) return 0;
  return static_cast<int8_t>(clampf(rintf(w / s), -127.f, 127.f));
}

// INT4: stored unsigned u in [0, 15]; the weight is (u - z) * s, z = 8 when symmetric.
BK_HD uint32_t int4_code(float w, float s, float z) {
  if (!(s > 0.f)) return static_cast<uint32_t>(z);
  return static_cast<uint32_t>(clampf(rintf(w / s) + z, 0.f, 15.f));
}

// Scale rules over one group of n weights (stride 1). Sums run sequentially in
// double so that every device computes the same float.
BK_HD float absmean_scale(const float* w, int64_t n) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += fabs(static_cast<double>(w[i]));
  return n > 0 ? static_cast<float>(acc / static_cast<double>(n)) : 0.f;
}

BK_HD float absmax(const float* w, int64_t n) {
  float m = 0.f;
  for (int64_t i = 0; i < n; ++i) m = fmaxf(m, fabsf(w[i]));
  return m;
}

// Asymmetric INT4 range: it always includes zero, so an all-equal group keeps its value.
BK_HD void int4_asym_params(const float* w, int64_t n, float* s, float* z) {
  float lo = 0.f, hi = 0.f;
  for (int64_t i = 0; i < n; ++i) { lo = fminf(lo, w[i]); hi = fmaxf(hi, w[i]); }
  *s = (hi - lo) / 15.f;
  *z = *s > 0.f ? clampf(rintf(-lo / *s), 0.f, 15.f) : 0.f;
}

// The default scale (and INT4 zero point) of one group of n weights: absmean
// for ternary, absmax / 127 for INT8, absmax / 7 or the asymmetric range for INT4.
BK_HD void default_group_params(int fmt, bool symmetric, const float* w, int64_t n, float* s, float* z) {
  *z = 8.f;
  if (fmt == TERNARY) *s = absmean_scale(w, n);
  else if (fmt == INT8) *s = absmax(w, n) / 127.f;
  else if (symmetric) *s = absmax(w, n) / 7.f;
  else int4_asym_params(w, n, s, z);
}

}  // namespace bitkernel
