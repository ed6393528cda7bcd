// One token times ternary weights in the canonical 2-bit layout (docs/FORMAT.md), on integer
// tensor cores:
//   y[n] = sum_k x[k] * (c[n, k] - 1) * s[n] (* xs) (+ bias[n]).
//
// Why. At M = 1 the modulation layer (18432 x 3072) reads 14.2 MB: ~3.3 us of streaming,
// ~4.7-5.2 us for a kernel that only reads it (bench/read_floor.cu). gemv_ternary.cu turns
// every 2 weights into a bf16 pair (one LOP3 + one HSUB2) for an m16n8k16 mma, ~1.4
// instructions per weight, and its compute does not hide under the stream (bench/NOTES.md,
// sessions 4-11). Here one LOP3 makes 4 weights and there is no subtraction (~0.3
// instructions per weight), and every load is issued before any compute.
//
// Decode. Byte b of a canonical word holds k = 4b..4b+3 at bit pairs 0..3, code c = w + 1.
// word & (0x03030303 << 2j) leaves in every byte the code of k = 4b + j times 4^j: an
// unsigned 8-bit number (at most 2 * 64), the A operand of mma.m16n8k32.u8.s8 as it is.
// The four masks j of a word feed four mma, each summing into its own int32 accumulator
// acc_j; acc_j is a multiple of 4^j, and sum_j acc_j / 4^j = sum_k c_k B_k exactly. The -1
// of c - 1 is one subtraction at the end: y = sum c x - sum x.
//
// B operand: x as integer digits. Each warp scales its range of x by a power of two 2^a with
// max|x| 2^a < 2^22, rounds, X = rint(x 2^a) (one FFMA: the float 1.5 * 2^23 + X has X + 2^22
// in its mantissa field), and splits X into three signed base-256 digits (the bytes of
// X + 0x808080, each less 128). Digit d is B column d (columns 3..7 are zero), so the products
// and their int32 sums are exact, and the epilogue forms 2^-a sum_d 256^d (sum_j acc_j[d] /
// 4^j - sum_k digit_d(x_k)) from integers below 2^24. The only roundings are X's (elements
// below 2^-14 of the largest in the warp's range lose low bits: at most 2^-23 of that
// largest each) and the fp32 combination of the three digit sums; cuBLAS's bf16 GEMM rounds
// every partial sum in fp32 instead.
//
// Slots. mma.m16n8k32: lane (g = lane / 4, t = lane % 4) holds A slots 4t..4t+3 and
// 16+4t..16+4t+3 of rows g and g + 8, and the same B slots of column g. As in
// gemv_ternary.cu, lane t owns the 16 bytes 16t..16t+15 of each row within a 256-k chunk
// (words 0..3 = k 64t + 16w + 0..15). mma (j, p) takes words 2p and 2p+1 masked with j:
// slot 4t + b is k = 64t + 32p + 4b + j, slot 16 + 4t + b is k = 64t + 32p + 16 + 4b + j.
// So B needs, per lane and chunk, 16 words: word j of unit u (= 2p + h) holds digit d of
// x[64t + 16u + 4b + j] in byte b. Each warp writes them to its own shared-memory region in
// that order (a byte transpose of 16 elements' digits) and reads them with 4 LDS.128.
//
// Order of work. The time is the stream of weights plus whatever does not overlap it, so
// each warp issues, in this order: the loads of its x (they return from L2 early; behind the
// weights' requests they would wait for those to leave the SM), the loads of all its weights
// (up to CPW chunks, held in registers), then makes the digits while the weights stream in,
// then multiplies chunk by chunk. The epilogue's scale and bias are loaded at the start too.
//
// Work split. A block owns TW 16-row tiles; its S warps take contiguous chunk ranges
// (split-K) and meet in shared memory. The host takes the largest S whose whole grid is
// resident at once (a second wave would pay the stream's latency again).
//
// H200, M = 1 (bench/results/kernels_m1_digits_s14_h200.md): mod.lin 18432 x 3072 7.5-7.8 us
// against 10.4 for gemv_ternary.cu, the other seven FLUX.1-dev shapes 18-33% faster.
// What is left above the read floor (4.7-5.2 us): ~1 us of launch, x and epilogue, and the part
// of the multiply that runs after the stream (a warp's chunk spans 32 rows, which arrive from
// DRAM in no fixed order; bench/NOTES.md, session 14).
//
// Shapes taken: M = 1, K up to 16 * CPW chunks (16384), group 0 (per-row scales), among those
// gemv_ternary_cuda takes (it checks dtype, K % 64, alignment and sm_80+ before calling this).
// Others return false (gemv_ternary.cu takes them).
#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "cuda/decode.cuh"
#include "cuda/device.cuh"
#include "kernels.h"

namespace bitkernel {
namespace {

constexpr int CHUNK_K = 256;   // k per chunk: 4 lanes x 16 bytes of a row
constexpr int MAX_SPLIT = 16;  // warps per block
constexpr int TW = 2;          // 16-row tiles per block (and per warp)
constexpr int CPW = 4;         // chunks per warp at most: their weights are held in registers
constexpr int UPL = CPW / 2;   // units of 16 x elements per lane (a chunk has 16)
constexpr int DIGITS = 3;      // base-256 digits of x 2^a, |x 2^a| < 2^22

// Warp-wide max or sum (one instruction on sm_80+).
template <bool MAX, typename V>
__device__ __forceinline__ V warp_reduce(V v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the kernel is compiled for every architecture, launched on sm_80+ only (the host checks)
  return v;
#else
  return MAX ? __reduce_max_sync(0xffffffffu, v) : __reduce_add_sync(0xffffffffu, v);
#endif
}

// Byte offset of 16-byte unit u (0..3) of digit d for lane t in chunk c of a warp's region. The
// unit index is XOR-ed with t so that the 8 lanes of a quarter-warp's 16-byte loads (digits 0,
// 1 of lanes t = 0..3) hit distinct banks.
__device__ __forceinline__ int digit_offset(int c, int t, int d, int u) {
  return (((c * 4 + t) * DIGITS + d) * 4 + (u ^ t)) * 16;
}

// Element e of a unit of 16 x elements held as two uint4, as a float.
template <typename T>
__device__ __forceinline__ float unit_elem(const uint4 (&r)[2], int e) {
  return to_f32(reinterpret_cast<const T*>(&r[e >> 3])[e & 7]);
}

template <typename T>
__global__ void __launch_bounds__(32 * MAX_SPLIT)
    gemv_ternary_digits_kernel(const T* __restrict__ x, int K, const uint8_t* __restrict__ q,
                               const float* __restrict__ scale, int N, const T* __restrict__ bias,
                               const float* __restrict__ xs, T* __restrict__ y, int cpw) {
  constexpr int ROWS = 16 * TW;
  extern __shared__ __align__(16) uint8_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int region_bytes = cpw * DIGITS * 256;
  uint8_t* region = smem + warp * region_bytes;  // this warp's digits, later its partial sums
  const int n0 = blockIdx.x * ROWS;
  const int nch = (K + CHUNK_K - 1) / CHUNK_K;
  const int cbeg = warp * cpw, nloc = min(cpw, nch - cbeg);

  // The epilogue's operands, loaded now by the threads that use them (warp 0, one row each):
  // after the block's barrier their latency would add to the call.
  const int en = n0 + threadIdx.x;
  const bool eon = threadIdx.x < ROWS && en < N;
  float escale = 0.f, ebias = 0.f;
  if (eon) {
    escale = scale[en] * (xs ? *xs : 1.f);
    if (bias) ebias = to_f32(bias[en]);
  }

  // The warp's range of x, in units of 16 elements, lane-strided (a warp reads contiguous
  // 32-byte spans). Elements past K are zeros.
  const int k0 = cbeg * CHUNK_K, units = nloc * 16;
  uint4 xr[UPL][2];
#pragma unroll
  for (int r = 0; r < UPL; ++r) {
    const int u = lane + 32 * r, k = k0 + 16 * u;
    xr[r][0] = xr[r][1] = make_uint4(0, 0, 0, 0);
    if (u < units && k < K) {
      const uint4* p = reinterpret_cast<const uint4*>(x + k);
      xr[r][0] = __ldg(p);
      xr[r][1] = __ldg(p + 1);
    }
  }

  // Every weight load of the warp: the lane's 16 bytes of each of its chunks in rows g and g + 8
  // of each tile (rows clamped: loads stay in bounds, stores are skipped), chunk by chunk: the
  // first chunk's requests go first and tend to return first, so its multiply overlaps the rest
  // of the stream (issued row by row, mod.lin took 8.3-8.8 us instead of 7.5-7.8). Lanes past K in a
  // short last chunk load nothing: their digits are zero, so any weight adds nothing.
  const uint8_t* wp[TW][2];
#pragma unroll
  for (int i = 0; i < TW; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      wp[i][h] = q + static_cast<int64_t>(min(n0 + 16 * i + 8 * h + g, N - 1)) * (K / 4) + 16 * t + 64 * cbeg;
  uint4 wbuf[CPW][TW][2];
#pragma unroll
  for (int c = 0; c < CPW; ++c)
#pragma unroll
    for (int i = 0; i < TW; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        wbuf[c][i][h] =
            c < nloc && (cbeg + c) * CHUNK_K + 64 * t < K ? load_weights(wp[i][h] + 64 * c) : make_uint4(0, 0, 0, 0);

  // The scale: max|x| over the range from the float bits (NaN and inf sort above every finite
  // value). max|x| < 2^(E - 126) for its biased exponent E (1 for subnormals), so a = 148 - E
  // keeps max|x| 2^a < 2^22; capped at 126 (a range whose max is below 2^-104 keeps fewer
  // bits), 0 for an all-zero range.
  uint32_t mbits = 0;
#pragma unroll
  for (int r = 0; r < UPL; ++r)
#pragma unroll
    for (int e = 0; e < 16; ++e) mbits = max(mbits, __float_as_uint(unit_elem<T>(xr[r], e)) & 0x7fffffffu);
  mbits = warp_reduce<true>(mbits);
  const int a = mbits == 0 ? 0 : min(148 - max(static_cast<int>(mbits >> 23), 1), 126);
  const float sc = pow2(a);
  const float inv = mbits >= 0x7f800000u ? __int_as_float(0x7fc00000) : pow2(-a);  // NaN for inf / NaN in x

  // The digits and their sums.
  int dsum[DIGITS] = {};
#pragma unroll
  for (int r = 0; r < UPL; ++r) {
    const int u = lane + 32 * r;
    if (u >= units) break;
    uint32_t Y[16];  // X + 0x808080: the float's bits less 0x4b400000, plus the digits' offsets
#pragma unroll
    for (int e = 0; e < 16; ++e) Y[e] = __float_as_uint(fmaf(unit_elem<T>(xr[r], e), sc, 12582912.f)) + (0x808080u - 0x4b400000u);
    uint32_t W[DIGITS][4];  // word (d, j): digit d of elements j, 4 + j, 8 + j, 12 + j
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t t0 = __byte_perm(Y[j], Y[4 + j], 0x5140), t2 = __byte_perm(Y[8 + j], Y[12 + j], 0x5140);
      const uint32_t u0 = __byte_perm(Y[j], Y[4 + j], 0x0062), u2 = __byte_perm(Y[8 + j], Y[12 + j], 0x0062);
      W[0][j] = __byte_perm(t0, t2, 0x5410) ^ 0x80808080u;
      W[1][j] = __byte_perm(t0, t2, 0x7632) ^ 0x80808080u;
      W[2][j] = __byte_perm(u0, u2, 0x5410) ^ 0x80808080u;
    }
    const int c = u >> 4, tt = (u >> 2) & 3, uu = u & 3;  // the chunk, lane t and unit it belongs to
#pragma unroll
    for (int d = 0; d < DIGITS; ++d) {
#pragma unroll
      for (int j = 0; j < 4; ++j) dsum[d] = __dp4a(static_cast<int>(W[d][j]), 0x01010101, dsum[d]);
      *reinterpret_cast<uint4*>(region + digit_offset(c, tt, d, uu)) = make_uint4(W[d][0], W[d][1], W[d][2], W[d][3]);
    }
  }
#pragma unroll
  for (int d = 0; d < DIGITS; ++d) dsum[d] = warp_reduce<false>(dsum[d]);
  __syncwarp();

  // B column g is digit g; columns 3..7 are zero.
  int acc[TW][4][4] = {};  // [tile][mask j][fragment]
#pragma unroll
  for (int c = 0; c < CPW; ++c) {
    if (c >= nloc) break;
    uint32_t xb[16] = {};  // word j of unit u at xb[4u + j]
    if (g < DIGITS) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const uint4 v = *reinterpret_cast<const uint4*>(region + digit_offset(c, t, g, u));
        xb[4 * u] = v.x;
        xb[4 * u + 1] = v.y;
        xb[4 * u + 2] = v.z;
        xb[4 * u + 3] = v.w;
      }
    }
#pragma unroll
    for (int i = 0; i < TW; ++i)
#pragma unroll
      for (int p = 0; p < 2; ++p)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t mask = 0x03030303u << (2 * j);
          const uint32_t a4[4] = {word_of(wbuf[c][i][0], 2 * p) & mask, word_of(wbuf[c][i][1], 2 * p) & mask,
                                  word_of(wbuf[c][i][0], 2 * p + 1) & mask, word_of(wbuf[c][i][1], 2 * p + 1) & mask};
          const uint32_t b[2] = {xb[4 * (2 * p) + j], xb[4 * (2 * p + 1) + j]};
          mma_16832_i8<true>(acc[i][j], a4, b);
        }
  }

  // Lane (g, t) holds columns 2t, 2t + 1 of rows g and g + 8: digits 0, 1 (t = 0), 2 and a
  // zero (t = 1), zeros (t = 2, 3). Lanes t = 0 and 1 add their parts.
  __syncwarp();  // the region's digits are read: it takes the partial sums now
  float* mine = reinterpret_cast<float*>(region);
  const float sa = static_cast<float>(t == 0 ? dsum[0] : t == 1 ? dsum[2] : 0);
  const float sb = static_cast<float>(t == 0 ? dsum[1] : 0);
  const float wa = t == 0 ? 1.f : 65536.f, wb = 256.f;  // 256^d of the two columns
#pragma unroll
  for (int i = 0; i < TW; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v[2];
#pragma unroll
      for (int e = 0; e < 2; ++e)  // sum_j acc_j / 4^j: an integer below 2^24, exact
        v[e] = ((static_cast<float>(acc[i][0][2 * h + e]) + 0.25f * static_cast<float>(acc[i][1][2 * h + e])) +
                0.0625f * static_cast<float>(acc[i][2][2 * h + e])) +
               0.015625f * static_cast<float>(acc[i][3][2 * h + e]);
      float part = (v[0] - sa) * wa + (v[1] - sb) * wb;
      part += __shfl_xor_sync(0xffffffffu, part, 1);
      if (t == 0) mine[16 * i + 8 * h + g] = part * inv;
    }
  __syncthreads();
  if (eon) {
    float v = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w)
      v += reinterpret_cast<const float*>(smem + w * region_bytes)[threadIdx.x];
    y[en] = from_f32<T>(fmaf(v, escale, ebias));
  }
}

// Resident warps per SM of the kernel on a device, by its registers (one-warp blocks).
template <typename T>
int warps_per_sm(int dev) {
  static std::atomic<int> cache[kMaxDevices] = {};
  return blocks_per_sm(cache, dev, gemv_ternary_digits_kernel<T>, 32, 0, 16);
}

template <typename T>
bool launch(const void* x, int K, const uint8_t* q, const float* scale, int N, const void* bias, const float* xs,
            void* y, cudaStream_t s, int dev, int sms) {
  constexpr int ROWS = 16 * TW;
  const int tiles = (N + ROWS - 1) / ROWS;
  const int nch = (K + CHUNK_K - 1) / CHUNK_K;
  const int smin = (nch + CPW - 1) / CPW;  // warps per block that leave each at most CPW chunks
  if (smin > MAX_SPLIT) return false;
  // The most warps per block for which the whole grid is resident at once; smin if none is.
  const int wps = warps_per_sm<T>(dev);
  int cpw = (nch + smin - 1) / smin;
  for (int s2 = std::min(MAX_SPLIT, nch); s2 > smin; --s2) {
    const int c2 = (nch + s2 - 1) / s2, s3 = (nch + c2 - 1) / c2;
    if (static_cast<int64_t>(tiles) <= static_cast<int64_t>(std::max(sms, 1)) * (wps / s3)) {
      cpw = c2;
      break;
    }
  }
  const int S = (nch + cpw - 1) / cpw;
  const size_t smem = static_cast<size_t>(S) * cpw * DIGITS * 256;  // <= 48 KB: CPW * 16 * 768
  gemv_ternary_digits_kernel<T><<<tiles, 32 * S, smem, s>>>(static_cast<const T*>(x), K, q, scale, N,
                                                            static_cast<const T*>(bias), xs, static_cast<T*>(y), cpw);
  return true;
}

bool enabled() {  // BITKERNEL_TERNARY_DIGITS=0 turns this kernel off (A/B measurements)
  static const bool on = [] {
    const char* v = std::getenv("BITKERNEL_TERNARY_DIGITS");
    return !(v && v[0] == '0');
  }();
  return on;
}

}  // namespace

bool gemv_ternary_digits_cuda(const void* x, int dtype, int64_t M, int64_t K, const uint8_t* q, const float* scale,
                              int64_t group, int64_t N, const void* bias, const float* xs, void* y, uintptr_t stream,
                              int dev, int sms) {
  if (!enabled() || M != 1 || group != 0 || K > MAX_SPLIT * CPW * CHUNK_K) return false;
  const cudaStream_t s = as_stream(stream);
  const int n = static_cast<int>(N), k = static_cast<int>(K);
  const bool ok = dtype == F16 ? launch<__half>(x, k, q, scale, n, bias, xs, y, s, dev, sms)
                               : launch<__nv_bfloat16>(x, k, q, scale, n, bias, xs, y, s, dev, sms);
  if (ok) check_launch("gemv_ternary_digits");
  return ok;
}

}  // namespace bitkernel
