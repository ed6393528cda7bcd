// FP8 e4m3 operands for W1.58A8 on sm_89+: the product itself is torch._scaled_mm
// (cuBLAS / CUTLASS FP8 tensor cores with row-wise scales), called from Python.
// Our int8 mma.sync GEMM reaches ~0.4x of bf16 cuBLAS at large M, FP8 cuBLAS
// ~1.7x, and ternary weights {-1, 0, +1} are exact in e4m3, so only the
// activations change numerics (e4m3: 3 mantissa bits instead of int8's 7).
//
// ternary_to_fp8: canonical 2-bit codes [N, K/4] -> dense e4m3 [rows, ldo]
//   (-1/0/+1, zero padded). Per-row scales are applied by the GEMM (scale_b).
// quantize_rows_fp8: x [M, K] fp16/bf16 (row stride ldx) -> e4m3 [M, ldo] with
//   s[m] = the smallest power of two 2^E >= max|x_m| / 448 (E >= -126; 1 for rows whose max is 0 or not
//   finite), code = RNE_e4m3(x / s). x / s is exact in float32, so the codes are bit-identical to torch's
//   (x.float() / s).to(torch.float8_e4m3fn), and one multiplication makes each (a scale of max|x| / 448
//   took a correctly rounded division: 5 more instructions an element, and the operand kernel was bound
//   by issue). e4m3 keeps 3 mantissa bits at any exponent, so a power-of-two scale changes the codes'
//   precision only for the smallest values, which leave the normal range up to one binade sooner.
#include <cuda_fp8.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "cuda/device.cuh"
#include "kernels.h"

namespace bitkernel {
namespace fp8_detail {

// ---------------------------------------------------------------------------
// quantize_rows_fp8 helpers. The kernels' bodies exist only for sm_89+
// (cvt.rn.satfinite.e4m3x2 is an sm_89 instruction and older archs have no FP8
// GEMM to feed): there they are empty and the host refuses to launch them, see
// fp8_supported_cuda. The helpers sit in a named namespace so that the
// sm_75/80/86 passes, which never reference them, do not warn about that.

template <typename T> struct Bits16;
template <> struct Bits16<__half> {
  static __device__ __forceinline__ uint32_t raw(__half v) { return __half_as_ushort(v); }
  static __device__ __forceinline__ float to_float(uint32_t b) { return __half2float(__ushort_as_half(static_cast<unsigned short>(b))); }
  static __device__ __forceinline__ float2 pair(uint32_t w) { return __half22float2(*reinterpret_cast<const __half2*>(&w)); }
};
template <> struct Bits16<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t raw(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
  static __device__ __forceinline__ float to_float(uint32_t b) { return __uint_as_float(b << 16); }
  static __device__ __forceinline__ float2 pair(uint32_t w) { return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u)); }
};

// Divides by a scale s that is not a power of two (the folded branch's up / s, below), giving the
// correctly rounded float32 x / s (what torch computes) in 5 FMA-pipe instructions instead of the ~10 of a full
// IEEE division: y = RN(1/s) once per row, q0 = x * y, then two Markstein
// corrections q += (x - q * s) * y. Checked exhaustively over every fp16 and
// bf16 x against RN(x / s) for thousands of s on the CPU (glibc fmaf): the e4m3
// codes never differ (the float32 quotient can differ only where it is a
// float32 subnormal, far below e4m3's smallest code). The sign is copied from x
// so that -0 stays -0. Outside s in [2^-60, 2^60] (only bf16 rows of extreme
// magnitude reach it) the remainders could leave the normal range: plain division.
struct RowDivider {
  float s, y;
  bool fast;
  __device__ explicit RowDivider(float s_) {
    s = s_;
    y = __frcp_rn(s_);
    fast = s_ >= 0x1p-60f && s_ <= 0x1p60f;
  }
  __device__ __forceinline__ float operator()(float x) const {
    if (!fast) return __fdiv_rn(x, s);
    float q = __fmul_rn(x, y);
    q = __fmaf_rn(__fmaf_rn(-q, s, x), y, q);
    q = __fmaf_rn(__fmaf_rn(-q, s, x), y, q);
    return copysignf(q, x);
  }
};

// Running max of |x| over 8 values, on the raw 16-bit patterns: for non-negative
// fp16/bf16 the unsigned bit order is the value order (NaN above inf, as in
// torch's amax, which propagates NaN), so two halves go per integer max.
__device__ __forceinline__ uint32_t max_abs_bits(uint32_t m, uint4 v) {
  m = __vmaxu2(m, v.x & 0x7fff7fffu);
  m = __vmaxu2(m, v.y & 0x7fff7fffu);
  m = __vmaxu2(m, v.z & 0x7fff7fffu);
  return __vmaxu2(m, v.w & 0x7fff7fffu);
}

// Block-wide max of one 16-bit pattern per thread; every thread gets the result.
__device__ __forceinline__ uint32_t block_max(uint32_t v, uint32_t* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? red[lane] : 0u;
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}

// A row's scale s = 2^E and 1 / s = 2^-E, both exact. With max|x| = f 2^ex (f in [0.5, 1)) and
// 448 = 0.875 2^9, the smallest E with 2^E >= max|x| / 448 is ex - 9, or ex - 8 where f > 0.875. E stops
// at -126 so that 2^-E stays finite (rows of max|x| < 448 2^-126: codes of a larger scale than needed).
// Rows whose max is 0 (or not finite) get 1, so their codes are x / 1 (zeros for a zero row).
struct RowScale {
  float s, inv;
  __device__ __forceinline__ float operator()(float x) const { return x * inv; }  // x / s
};
template <typename T> __device__ __forceinline__ RowScale row_scale(uint32_t amax_bits) {
  const float amax = Bits16<T>::to_float(amax_bits);
  if (!(amax > 0.f && amax <= 0x1.fffffep127f)) return {1.f, 1.f};  // 0, inf or NaN
  int ex;
  const float f = frexpf(amax, &ex);
  const int e = max(ex - 9 + (f > 0.875f ? 1 : 0), -126);
  return {pow2(e), pow2(-e)};
}

// Eight values (one 16-byte load) -> eight e4m3 codes of div(x) (div: a RowScale, or a RowDivider).
template <typename T, typename Div> __device__ __forceinline__ uint2 quantize8(uint4 v, const Div& div) {
  uint32_t p[4];
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = Bits16<T>::pair(w[i]);
    p[i] = __nv_cvt_float2_to_fp8x2(make_float2(div(f.x), div(f.y)), __NV_SATFINITE, __NV_E4M3);
  }
  return make_uint2(p[0] | (p[1] << 16), p[2] | (p[3] << 16));
}

template <typename T> __device__ __forceinline__ uint4 load8(const T* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// 16 bytes global -> shared without registers (cp.async, sm_80+).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  // The "memory" clobber keeps the compiler from moving this thread's earlier reads of the slot after the copy.
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}

}  // namespace fp8_detail

namespace {

using namespace fp8_detail;

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------
// ternary_to_fp8 (pure integer work: no FP8 instructions, so it runs on every arch)

// prmt table: byte c holds the e4m3 encoding of weight c - 1 (0xB8 = -1, 0x00 = 0,
// 0x38 = +1); the invalid code 3 selects byte 3 = 0, i.e. weight 0.
constexpr uint32_t kTernaryToE4M3 = 0x003800B8u;

// Eight 2-bit codes (low 16 bits of w) -> eight 4-bit nibbles, nibble i = code i,
// which is exactly the selector format of __byte_perm.
__device__ __forceinline__ uint32_t codes_to_nibbles(uint32_t w) {
  w &= 0xffffu;
  w = (w | (w << 8)) & 0x00ff00ffu;
  w = (w | (w << 4)) & 0x0f0f0f0fu;
  return (w | (w << 2)) & 0x33333333u;
}

// One 32-bit word of codes (16 weights) -> 16 e4m3 bytes in weight order.
// `table` as kTernaryToE4M3, for other weight magnitudes (the folded branch's rows, below).
__device__ __forceinline__ uint4 ternary_word_to_e4m3(uint32_t w, uint32_t table = kTernaryToE4M3) {
  const uint32_t lo = codes_to_nibbles(w), hi = codes_to_nibbles(w >> 16);
  return make_uint4(__byte_perm(table, 0, lo), __byte_perm(table, 0, lo >> 16), __byte_perm(table, 0, hi),
                    __byte_perm(table, 0, hi >> 16));
}

// The word of codes (16 weights) behind output bytes k0..k0 + 15 of row n (VEC: one 32-bit load; else up to
// four byte loads with bounds); code 1 (weight 0) past the N x K codes: the GEMM's zero padding.
template <bool VEC>
__device__ __forceinline__ uint32_t code_word(const uint8_t* __restrict__ q, uint32_t N, uint32_t K, uint32_t n,
                                              uint32_t k0) {
  const uint32_t rb = K / 4;
  uint32_t w = 0x55555555u;  // code 1 everywhere = weight 0
  if (n < N && k0 < K) {
    const uint8_t* row = q + static_cast<int64_t>(n) * rb;
    if constexpr (VEC) {
      w = __ldg(reinterpret_cast<const uint32_t*>(row + k0 / 4));
    } else {
#pragma unroll
      for (uint32_t b = 0; b < 4; ++b)
        if (k0 / 4 + b < rb) w = (w & ~(0xffu << (8 * b))) | (static_cast<uint32_t>(row[k0 / 4 + b]) << (8 * b));
    }
  }
  return w;
}

// One thread per 16 output bytes: one word of codes -> one 16-byte vector.
// 32-bit index arithmetic, as in dequantize_vec_kernel: the host checks it fits.
template <bool VEC>
__device__ __forceinline__ void expand_vector(const uint8_t* __restrict__ q, uint32_t N, uint32_t K,
                                              uint32_t chunks_per_row, uint32_t total, uint8_t* __restrict__ out,
                                              int64_t ldo, uint32_t idx) {
  if (idx >= total) return;
  const uint32_t n = idx / chunks_per_row, k0 = (idx - n * chunks_per_row) * 16;
  *reinterpret_cast<uint4*>(out + static_cast<int64_t>(n) * ldo + k0) = ternary_word_to_e4m3(code_word<VEC>(q, N, K, n, k0));
}

template <bool VEC>
__global__ void ternary_to_fp8_kernel(const uint8_t* __restrict__ q, uint32_t N, uint32_t K,
                                      uint32_t chunks_per_row, uint32_t total, uint8_t* __restrict__ out,
                                      int64_t ldo) {
  expand_vector<VEC>(q, N, K, chunks_per_row, total, out, ldo, blockIdx.x * blockDim.x + threadIdx.x);
}

// Single pass: the row (K <= 8 * ITEMS * kThreads) is held in registers between
// the max and the conversion, so x is read from memory once. A block walks rows
// blockIdx.x, + gridDim.x, ... (the grid is what fits on the GPU at once) and
// has its next row copied into shared memory (cp.async) while it reduces and
// converts the current one (without the prefetch, K = 12288 streamed at ~2.8 TB/s on
// an H200; with it ~3.6). Deeper rings of staged rows were slower (fewer blocks fit):
// at K = 3072 the kernel is bound by issue, not by bytes in flight (bench/NOTES.md,
// session 13). Each thread stages and reads back only its own 16-byte pieces, so the
// stage needs no barrier. Needs K % 8 == 0, 16-byte aligned rows of x and 8-byte
// aligned rows of out, and nvec * 16 bytes of dynamic shared memory.
//
// With a folded branch (rvec > 0) the row is [x_m | t_m]: t [M, 8 rvec] (row stride ldt) is staged after x
// and quantized with the same row scale, so its codes land in columns K.. of out.
template <typename T, int ITEMS>
__device__ __forceinline__ void quantize_rows_walk(const T* __restrict__ x, int64_t ldx, int K, int64_t M,
                                                   uint8_t* __restrict__ out, int64_t ldo, float* __restrict__ scales,
                                                   int64_t first, int64_t stride, const T* __restrict__ t,
                                                   int64_t ldt, int rvec) {
#if __CUDA_ARCH__ >= 890
  extern __shared__ uint4 stage[];
  __shared__ uint32_t red[2][32];  // one per row parity: a fast warp may start the next row's max early
  const int xvec = K / 8, nvec = xvec + rvec;
  const auto fetch = [&](int64_t row) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int j = threadIdx.x + i * kThreads;
      if (j < xvec) cp_async16(&stage[j], x + row * ldx + 8 * j);
      else if (j < nvec) cp_async16(&stage[j], t + row * ldt + 8 * (j - xvec));
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  };
  int64_t m = first;
  fetch(m);
  for (int parity = 0; m < M; m += stride, parity ^= 1) {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    uint4 v[ITEMS];
    uint32_t mx = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int j = threadIdx.x + i * kThreads;
      if (j < nvec) {
        v[i] = stage[j];
        mx = max_abs_bits(mx, v[i]);
      }
    }
    // The max has consumed every piece read from the stage, so it can be refilled.
    if (m + stride < M) fetch(m + stride);
    const RowScale r = row_scale<T>(block_max(max(mx & 0xffffu, mx >> 16), red[parity]));
    if (threadIdx.x == 0) scales[m] = r.s;
    uint8_t* orow = out + m * ldo;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int j = threadIdx.x + i * kThreads;
      if (j < nvec) *reinterpret_cast<uint2*>(orow + 8 * j) = quantize8<T>(v[i], r);
    }
    for (int64_t k = 8 * nvec + threadIdx.x; k < ldo; k += kThreads) orow[k] = 0;
  }
#endif
}

// One 16-byte vector of the folded branch's weight columns: bytes e4m3(up[n][r] / s) for r = r0.. r0 + 15
// (zeros past R; r0 < R, R % 8 == 0 and 16-byte aligned rows of up), the quotient correctly rounded (RowDivider).
template <typename T>
__device__ __forceinline__ uint4 up_vector(const T* __restrict__ up_row, int r0, int R, const RowDivider& d) {
  const uint2 lo = quantize8<T>(load8(up_row + r0), d);  // r0 < R, R % 8 == 0
  const uint2 hi = r0 + 8 < R ? quantize8<T>(load8(up_row + r0 + 8), d) : make_uint2(0, 0);
  return make_uint4(lo.x, lo.y, hi.x, hi.y);
}

// The single-pass quantization, with the weight expansion in the same launch where
// total > 0 (the FP8 GEMM's two operands): blocks [0, qblocks) quantize x's rows,
// walking them (the grid's first part is what fits on the GPU at once); the blocks
// after them expand the ternary codes as ternary_to_fp8_kernel<true> does and fill
// the SMs as the quantization's blocks run out of rows. One launch instead of two
// saves a launch's host time and one kernel's ramp and drain on the GPU (attn.proj
// at M = 4608 on an H200: 80.5 -> 77.1 us for the whole op).
//
// With a folded low-rank branch (Fold, below) the GEMM's K grows by R: x8 rows are [x | t] with t = x @ down.T,
// and w8 rows [codes | up[n] / s[n]]; the GEMM's column scale s[n] restores up, so one FP8 GEMM gives
// x @ W.T + t @ up.T, where a separate branch writes [M, N] once more and reads it back. A row whose scale is 0
// (its weights are all 0) gets column scale 1 and zero codes instead, so that up / s stays finite: the
// kernel writes the GEMM's column scales (sw) itself. Where max|up[n]| / s[n] exceeds e4m3's 448, the row's
// column scale becomes s[n] 2^e and its codes +-2^-e (exact in e4m3 down to 2^-9), with the smallest e <= 9
// that fits; past 448 * 2^9 the quotients saturate (a branch 10^5 times the row's weights: not a calibrated
// adapter). Error: e4m3 keeps ~2^-4 of each up[n][r] / s[n] (and 2^-10 s[n] absolutely where it is
// subnormal), small next to the ternary weights' own steps of s[n].
template <typename T> struct Fold {
  const T* t;      // [M, R], row stride ldt
  int64_t ldt;
  int rvec;        // R / 8
  const T* up;     // [N, R]
  const float* s;  // the weights' row scales [N]
  float* sw;       // out: the GEMM's column scales [rows]
};

// expand_vector with the folded branch: output row n is [codes 2^-e | e4m3(up[n] / sc) | 0], sc = s[n] 2^e
// (or 2^e for a zero-scale row, whose codes are zeros), written to f.sw[n] by the row's first thread.
// Every thread of row n needs max |up[n]| for e. The lanes of a warp that share a row load its R values
// between them and reduce them (a warp covers one to three rows), instead of each loading all R: with one
// load per lane instead of R / 8 the fold's weight side costs about what the plain expansion does.
// The whole warp calls this (no early return: the reduction needs every lane).
template <typename T>
__device__ __forceinline__ void expand_vector_fold(const uint8_t* __restrict__ q, uint32_t N, uint32_t K,
                                                   uint32_t chunks_per_row, uint32_t total, uint8_t* __restrict__ w8,
                                                   int64_t ldw, uint32_t idx, const Fold<T>& f) {
#if __CUDA_ARCH__ >= 890
  const bool live = idx < total;
  const uint32_t n = live ? idx / chunks_per_row : 0xffffffffu, k0 = (idx - n * chunks_per_row) * 16;
  const uint32_t R = 8 * f.rvec;
  const uint32_t w = live ? code_word<true>(q, N, K, n, k0) : 0u;  // loaded first: the loads fly together
  const float s = n < N ? f.s[n] : 1.f;
  const uint32_t row = __match_any_sync(0xffffffffu, n);  // the lanes of this warp on row n
  const int rank = __popc(row & ((1u << (threadIdx.x & 31)) - 1)), width = __popc(row);
  uint32_t umax = 0;  // max |up[n]| as 16-bit patterns
  if (n < N)
    for (int j = rank; j < f.rvec; j += width) umax = max_abs_bits(umax, load8(f.up + static_cast<int64_t>(n) * R + 8 * j));
  const float amax = Bits16<T>::to_float(__reduce_max_sync(row, max(umax & 0xffffu, umax >> 16)));
  if (!live) return;
  const bool zero_row = s == 0.f;
  float sc = zero_row ? 1.f : s;
  int e = 0;
  while (e < 9 && amax > 448.f * sc) sc *= 2.f, ++e;  // exact: powers of two
  if (k0 == 0) f.sw[n] = sc;
  uint4 v;
  if (k0 < K) {
    // +-2^-e: exponent field 7 - e (bias 7) while normal, then the subnormals 4, 2, 1 (x 2^-9).
    const uint32_t mag = e <= 6 ? static_cast<uint32_t>(7 - e) << 3 : 4u >> (e - 7);
    v = ternary_word_to_e4m3(zero_row ? 0x55555555u : w, (mag << 16) | mag | 0x80u);
  } else {
    v = n < N && k0 < K + R ? up_vector<T>(f.up + static_cast<int64_t>(n) * R, static_cast<int>(k0 - K),
                                           static_cast<int>(R), RowDivider(sc))
                            : make_uint4(0, 0, 0, 0);
  }
  *reinterpret_cast<uint4*>(w8 + static_cast<int64_t>(n) * ldw + k0) = v;
#endif
}

template <typename T, int ITEMS, bool FOLD>
__global__ void __launch_bounds__(kThreads) fp8_operands_kernel(const T* __restrict__ x, int64_t ldx, int K, int64_t M,
                                                                uint8_t* __restrict__ x8, int64_t ldo,
                                                                float* __restrict__ scales, unsigned qblocks,
                                                                const uint8_t* __restrict__ q, uint32_t N,
                                                                uint32_t chunks_per_row, uint32_t total,
                                                                uint8_t* __restrict__ w8, int64_t ldw, Fold<T> f) {
  if (blockIdx.x < qblocks) {
    quantize_rows_walk<T, ITEMS>(x, ldx, K, M, x8, ldo, scales, blockIdx.x, qblocks, f.t, f.ldt, FOLD ? f.rvec : 0);
    return;
  }
  const uint32_t idx = (blockIdx.x - qblocks) * kThreads + threadIdx.x;
  if constexpr (FOLD) expand_vector_fold<T>(q, N, static_cast<uint32_t>(K), chunks_per_row, total, w8, ldw, idx, f);
  else expand_vector<true>(q, N, static_cast<uint32_t>(K), chunks_per_row, total, w8, ldw, idx);
}

// Two passes over the row (the second mostly hits L2): any K, any alignment
// (VEC = the 16-byte-load layout of the single pass, else element loads).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) quantize_rows_fp8_2pass(const T* __restrict__ x, int64_t ldx, int64_t K,
                                                                    uint8_t* __restrict__ out, int64_t ldo,
                                                                    float* __restrict__ scales) {
#if __CUDA_ARCH__ >= 890
  __shared__ uint32_t red[32];
  const int64_t m = blockIdx.x;
  const T* xr = x + m * ldx;
  uint8_t* orow = out + m * ldo;
  uint32_t mx = 0;
  if constexpr (VEC) {
    for (int64_t j = threadIdx.x; j < K / 8; j += kThreads) mx = max_abs_bits(mx, load8(xr + 8 * j));
    mx = max(mx & 0xffffu, mx >> 16);
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kThreads) mx = max(mx, Bits16<T>::raw(xr[k]) & 0x7fffu);
  }
  const RowScale r = row_scale<T>(block_max(mx, red));
  if (threadIdx.x == 0) scales[m] = r.s;
  if constexpr (VEC) {
    for (int64_t j = threadIdx.x; j < K / 8; j += kThreads)
      *reinterpret_cast<uint2*>(orow + 8 * j) = quantize8<T>(load8(xr + 8 * j), r);
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kThreads)
      orow[k] = __nv_cvt_float_to_fp8(r(Bits16<T>::to_float(Bits16<T>::raw(xr[k]))), __NV_SATFINITE, __NV_E4M3);
  }
  for (int64_t k = K + threadIdx.x; k < ldo; k += kThreads) orow[k] = 0;
#endif
}

// Blocks of fp8_operands_kernel that fit on the GPU at once, counted with the largest stage ITEMS allows:
// the quantization's grid, whose blocks then walk rows.
template <typename T, int ITEMS, bool FOLD> unsigned resident_blocks() {
  static std::atomic<int> cache[kMaxDevices] = {};
  const DeviceInfo d = current_device();
  return static_cast<unsigned>(
      blocks_per_sm(cache, d.index, fp8_operands_kernel<T, ITEMS, FOLD>, kThreads, 16 * ITEMS * kThreads, 1) * d.sms);
}

template <typename T, int ITEMS, bool FOLD>
void launch_operands(const T* x, int64_t M, int64_t K, int64_t ldx, uint8_t* x8, int64_t ldo, float* scales,
                     const uint8_t* q, int64_t N, uint8_t* w8, int64_t ldw, uint32_t total, const Fold<T>& f,
                     cudaStream_t s) {
  const unsigned qblocks = static_cast<unsigned>(std::min<int64_t>(M, resident_blocks<T, ITEMS, FOLD>()));
  const unsigned eblocks = (total + kThreads - 1) / kThreads;
  const size_t smem = static_cast<size_t>(K / 8 + f.rvec) * 16;  // the staged row
  fp8_operands_kernel<T, ITEMS, FOLD><<<qblocks + eblocks, kThreads, smem, s>>>(
      x, ldx, static_cast<int>(K), M, x8, ldo, scales, qblocks, q, static_cast<uint32_t>(N),
      static_cast<uint32_t>(ldw / 16), total, w8, ldw, f);
}

// The single pass for rows of K + R <= 64 * kThreads (K % 8 == 0), with `total` 16-byte vectors of expanded
// weights (0: the quantization alone) and, where f.rvec > 0, the folded branch.
template <typename T>
void launch_single_pass(const T* x, int64_t M, int64_t K, int64_t ldx, uint8_t* x8, int64_t ldo, float* scales,
                        const uint8_t* q, int64_t N, uint8_t* w8, int64_t ldw, uint32_t total, const Fold<T>& f,
                        cudaStream_t s) {
  const int64_t nvec = K / 8 + f.rvec;
  const auto run = [&](auto fold) {
    constexpr bool FOLD = decltype(fold)::value;
    if (nvec <= 2 * kThreads) launch_operands<T, 2, FOLD>(x, M, K, ldx, x8, ldo, scales, q, N, w8, ldw, total, f, s);
    else if (nvec <= 4 * kThreads) launch_operands<T, 4, FOLD>(x, M, K, ldx, x8, ldo, scales, q, N, w8, ldw, total, f, s);
    else launch_operands<T, 8, FOLD>(x, M, K, ldx, x8, ldo, scales, q, N, w8, ldw, total, f, s);
  };
  if (f.rvec > 0) run(std::true_type{});
  else run(std::false_type{});
}

template <typename T>
void launch_quantize_rows(const T* x, int64_t M, int64_t K, int64_t ldx, uint8_t* out, int64_t ldo, float* scales,
                          cudaStream_t s) {
  const bool vec = K % 8 == 0 && ldx % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && ldo % 8 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 8 == 0;
  const unsigned grid = static_cast<unsigned>(M);
  if (vec && K / 8 <= 8 * kThreads) launch_single_pass(x, M, K, ldx, out, ldo, scales, nullptr, 0, nullptr, 16, 0u, Fold<T>{}, s);
  else if (vec) quantize_rows_fp8_2pass<T, true><<<grid, kThreads, 0, s>>>(x, ldx, K, out, ldo, scales);
  else quantize_rows_fp8_2pass<T, false><<<grid, kThreads, 0, s>>>(x, ldx, K, out, ldo, scales);
}

}  // namespace

bool fp8_supported_cuda() {
  // One answer per device (the build's kernel image for it does not change).
  // Asking the runtime which PTX the kernel was compiled from catches both a
  // GPU older than sm_89 (no compatible image: error) and a build without an
  // sm_89+ target, where the driver runs sm_80/86 code (empty bodies) on it.
  static std::atomic<int> cache[kMaxDevices];  // 0 unknown, 1 no, 2 yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (dev < kMaxDevices && cache[dev].load() != 0) return cache[dev].load() == 2;
  cudaFuncAttributes a{};
  bool ok = cudaFuncGetAttributes(&a, fp8_operands_kernel<__half, 2, false>) == cudaSuccess && a.ptxVersion >= 89;
  cudaGetLastError();  // clear an error of the query above: it is an answer, not a failure
  if (dev < kMaxDevices) cache[dev].store(ok ? 2 : 1);
  return ok;
}

void ternary_to_fp8_cuda(const uint8_t* q, int64_t N, int64_t K, int64_t rows, uint8_t* out, int64_t ldo,
                         uintptr_t stream) {
  check(ldo % 16 == 0 && ldo >= K, "bitkernel: ternary_to_fp8 needs an output row stride >= K and a multiple of 16");
  check(rows >= N, "bitkernel: ternary_to_fp8 needs at least N output rows");
  check(reinterpret_cast<uintptr_t>(out) % 16 == 0, "bitkernel: ternary_to_fp8 needs a 16-byte aligned output");
  const int64_t total = rows * (ldo / 16);
  if (total == 0) return;
  check(total < (1LL << 32) - kThreads && K < (1LL << 32), "bitkernel: weight too large for ternary_to_fp8");
  const unsigned blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  const cudaStream_t s = as_stream(stream);
  const auto n = static_cast<uint32_t>(N), k = static_cast<uint32_t>(K), cpr = static_cast<uint32_t>(ldo / 16),
             t = static_cast<uint32_t>(total);
  if (K % 16 == 0 && reinterpret_cast<uintptr_t>(q) % 4 == 0)
    ternary_to_fp8_kernel<true><<<blocks, kThreads, 0, s>>>(q, n, k, cpr, t, out, ldo);
  else
    ternary_to_fp8_kernel<false><<<blocks, kThreads, 0, s>>>(q, n, k, cpr, t, out, ldo);
  check_launch("ternary_to_fp8");
}

void quantize_rows_fp8_cuda(const void* x, int dtype, int64_t M, int64_t K, int64_t ldx, uint8_t* out, int64_t ldo,
                            float* scales, uintptr_t stream) {
  check(dtype == F16 || dtype == BF16, "bitkernel: quantize_rows_fp8 takes float16 or bfloat16 activations");
  check(ldo >= K && ldx >= 0, "bitkernel: quantize_rows_fp8 needs an output row stride >= K");
  check(M <= 0x7fffffffLL, "bitkernel: M too large for one launch");
  if (M == 0) return;
  check(fp8_supported_cuda(),
        "bitkernel: the FP8 kernels need a GPU of compute capability 8.9 or newer and a build that includes "
        "such an architecture (BITKERNEL_CUDA_ARCHS with 89, 90 or later)");
  const cudaStream_t s = as_stream(stream);
  if (dtype == F16) launch_quantize_rows(static_cast<const __half*>(x), M, K, ldx, out, ldo, scales, s);
  else launch_quantize_rows(static_cast<const __nv_bfloat16*>(x), M, K, ldx, out, ldo, scales, s);
  check_launch("quantize_rows_fp8");
}

bool fp8_operands_cuda(const void* x, int dtype, int64_t M, int64_t K, int64_t ldx, uint8_t* x8, int64_t ldo,
                       float* scales, const uint8_t* q, int64_t N, int64_t rows, uint8_t* w8, int64_t ldw,
                       const void* t, int64_t R, int64_t ldt, const void* up, const float* s, float* sw,
                       uintptr_t stream) {
  const auto aligned = [](const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; };
  const int64_t total = rows * (ldw / 16);
  const bool fold = t != nullptr;
  // What the one launch takes: both kernels' vector layouts, a row that fits the single-pass stage, and the
  // arguments the separate entry points would accept (anything else goes to them, which say what is wrong).
  const bool one_launch = (dtype == F16 || dtype == BF16) && M > 0 && M <= 0x7fffffffLL && N > 0 && K % 16 == 0 &&
                          K / 8 <= 8 * kThreads && ldx >= 0 && ldx % 8 == 0 && aligned(x, 16) && ldo >= K &&
                          ldo % 8 == 0 && aligned(x8, 8) && aligned(q, 4) && rows >= N && ldw >= K && ldw % 16 == 0 &&
                          aligned(w8, 16) && total > 0 && total < (1LL << 32) - kThreads && fp8_supported_cuda();
  // The folded branch (Fold): only in the one launch, with t's rows in 16-byte pieces and room for K + R.
  const bool foldable = one_launch && R > 0 && R % 8 == 0 && (K + R) / 8 <= 8 * kThreads && ldt >= R &&
                        ldt % 8 == 0 && aligned(t, 16) && aligned(up, 16) && s != nullptr && sw != nullptr &&
                        ldo >= K + R && ldw >= K + R;
  if (fold && !foldable) return false;  // the caller runs the branch on its own
  if (!one_launch) {
    quantize_rows_fp8_cuda(x, dtype, M, K, ldx, x8, ldo, scales, stream);
    ternary_to_fp8_cuda(q, N, K, rows, w8, ldw, stream);
    return true;
  }
  const cudaStream_t st = as_stream(stream);
  const auto tt = static_cast<uint32_t>(total);
  const auto go = [&](auto tag) {
    using T = decltype(tag);
    const Fold<T> f = fold ? Fold<T>{static_cast<const T*>(t), ldt, static_cast<int>(R / 8), static_cast<const T*>(up), s, sw}
                           : Fold<T>{};
    launch_single_pass(static_cast<const T*>(x), M, K, ldx, x8, ldo, scales, q, N, w8, ldw, tt, f, st);
  };
  if (dtype == F16) go(__half{});
  else go(__nv_bfloat16{});
  check_launch("fp8_operands");
  return true;
}

}  // namespace bitkernel
