// Shared definitions of the canonical weight formats (docs/FORMAT.md) and the
// dtype codes the Python layer passes. Everything crosses the binding as raw
// pointers and integers so that the module never links libtorch.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace bitkernel {

// Element types of activations, outputs and dequantized weights.
enum DType : int { F16 = 0, BF16 = 1, F32 = 2 };

// Weight formats. The integer values are part of the Python contract.
enum Format : int { TERNARY = 0, INT8 = 1, INT4 = 2 };

// Weights per packed byte of each format.
inline int weights_per_byte(int fmt) { return fmt == TERNARY ? 4 : fmt == INT4 ? 2 : 1; }

// Bytes of one packed row holding K weights (K must be a multiple of weights_per_byte).
inline int64_t packed_row_bytes(int fmt, int64_t K) { return K / weights_per_byte(fmt); }

// Number of scale groups per row: group == 0 means one scale for the whole row.
inline int64_t groups_per_row(int64_t K, int64_t group) { return group == 0 ? 1 : (K + group - 1) / group; }

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void check(bool ok, const std::string& msg) {
  if (!ok) throw Error(msg);
}

// Host-side fp16/bf16 conversions (round to nearest even), used by the CPU kernels.
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; --exp; }
      u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (au >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow to inf
  if (au < 0x38800000u) {  // subnormal or zero in fp16
    float a;
    std::memcpy(&a, &au, 4);
    // Adding 0.5 (2^-1) shifts the value so the FPU's own round-to-nearest-even does the work.
    float t = a + 0.5f;
    uint32_t tu;
    std::memcpy(&tu, &t, 4);
    return static_cast<uint16_t>(sign | (tu - 0x3f000000u));
  }
  uint32_t mant_odd = (au >> 13) & 1u;
  au += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return static_cast<uint16_t>(sign | (au >> 13));
}

inline float load_as_f32(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store_from_f32(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    case BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

}  // namespace bitkernel
