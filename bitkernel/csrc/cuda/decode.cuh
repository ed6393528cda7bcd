// Exact decoding of packed codes to floats without int-to-float conversions
// (a quarter-rate instruction on recent GPUs, which made the first GEMV
// compute-bound): a shift and mask put four codes in the four bytes of a word,
// one byte_perm writes a code into the low mantissa byte of the float 2^23
// (0x4B0000cc = 8388608 + c), and one subtraction of 8388608 + offset gives the
// weight exactly.
#pragma once
#include <cstdint>

#include "common.h"

namespace bitkernel {

template <int FMT> struct Codes;
template <> struct Codes<TERNARY> { static constexpr int WPB = 4, BITS = 2; static constexpr uint32_t MASK = 0x03030303u; };
template <> struct Codes<INT4> { static constexpr int WPB = 2, BITS = 4; static constexpr uint32_t MASK = 0x0f0f0f0fu; };
template <> struct Codes<INT8> { static constexpr int WPB = 1, BITS = 8; static constexpr uint32_t MASK = 0xffffffffu; };

// Byte b of t as the float 8388608 + t.byte[b].
__device__ __forceinline__ float byte_to_magic(uint32_t t, int b) {
  return __int_as_float(static_cast<int>(__byte_perm(t, 0x4B000000u, 0x7540u + b)));
}

// Decode the 4 * WPB weights of one 32-bit word; out[k] is weight k of the word.
// `off` = 8388608 + the code's offset (1 for ternary, the zero point for INT4, 128 for INT8).
template <int FMT>
__device__ __forceinline__ void decode_word(uint32_t w, float off, float (&out)[4 * Codes<FMT>::WPB]) {
  constexpr int WPB = Codes<FMT>::WPB;
  if constexpr (FMT == INT8) w ^= 0x80808080u;  // signed bytes to unsigned, offset 128
#pragma unroll
  for (int i = 0; i < WPB; ++i) {
    const uint32_t t = (w >> (Codes<FMT>::BITS * i)) & Codes<FMT>::MASK;  // bytes hold codes i, i+WPB, ...
#pragma unroll
    for (int b = 0; b < 4; ++b) out[b * WPB + i] = byte_to_magic(t, b) - off;
  }
}


}  // namespace bitkernel
