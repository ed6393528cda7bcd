// Exact decoding of packed codes without int-to-float conversions (a
// quarter-rate instruction on recent GPUs, which made the first GEMV
// compute-bound), and the tensor-core helpers the kernels share.
//
// fp32 (gemv.cu): a shift and mask put four codes in the four bytes of a word,
// one byte_perm writes a code into the low mantissa byte of the float 2^23
// (0x4B0000cc = 8388608 + c), and one subtraction of 8388608 + offset gives the
// weight exactly.
//
// 16-bit pairs (gemv_ternary.cu, gemv_tc.cu): a code c OR-ed into the mantissa
// of a power of two whose ulp is 1 is the number MAGIC + c, so one LOP3
// (shifted word & mask | MAGIC in both halves) makes a half2 / bfloat162 pair
// and one packed subtraction of MAGIC + offset gives both weights exactly.
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda/device.cuh"

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

// a - b on two packed 16-bit floats held in 32-bit registers (one HADD2 / HFMA2.BF16).
template <typename T> __device__ __forceinline__ uint32_t hsub2_bits(uint32_t a, uint32_t b);
template <> __device__ __forceinline__ uint32_t hsub2_bits<__half>(uint32_t a, uint32_t b) {
  const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}
template <> __device__ __forceinline__ uint32_t hsub2_bits<__nv_bfloat16>(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // no packed bf16 arithmetic before sm_80; the kernels using it are never launched there
  return 0u;
#else
  const __nv_bfloat162 r =
      __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
#endif
}

// 16 bytes of weights, read once: no L1 allocation, L2 prefetches the enclosing 256 bytes.
__device__ __forceinline__ uint4 load_weights(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// Word j (0..3) of 16 loaded bytes.
__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// d += A (16 x 16, row) * B (16 x 8, col) with fp32 accumulation: mma.sync.m16n8k16 (sm_80+).
// Fragments (g = lane / 4, t = lane % 4): a = {row g, k 2t..2t+1}, {row g+8, k 2t..2t+1},
// {row g, k 2t+8..2t+9}, {row g+8, k 2t+8..2t+9}; b = {k 2t..2t+1, col g}, {k 2t+8..2t+9, col g};
// d = {row g, cols 2t, 2t+1}, {row g+8, cols 2t, 2t+1}. In each 32-bit register the lower
// 16 bits hold the lower k (or col) of the two.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched there: the hosts check for sm_80
#else
  if constexpr (std::is_same_v<T, __half>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d += A (16 x 32, row) * B (32 x 8 s8, col) with int32 accumulation: mma.sync.m16n8k32 (sm_80+),
// A signed (s8) or unsigned (u8). Fragments as for mma_16816 with four 8-bit k per register:
// a = {row g, k 4t..4t+3}, {row g+8, k 4t..4t+3}, {row g, k 16+4t..}, {row g+8, k 16+4t..};
// b = {k 4t..4t+3, col g}, {k 16+4t..16+4t+3, col g}; d as for mma_16816.
template <bool UNSIGNED_A>
__device__ __forceinline__ void mma_16832_i8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched there: the hosts check for sm_80
#else
  if constexpr (UNSIGNED_A)
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

}  // namespace bitkernel
