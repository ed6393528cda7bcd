// W8A8 and W1.58A8: y = (xq @ Wq.T) * xs[m] * ws[n] (+ bias), int32 accumulation.
//
// Activations are quantized per token by quantize_act_kernel into a buffer whose
// rows are zero-padded to a multiple of 64, so the A tiles never need bounds
// checks along K. Ternary weights are exact in int8: the 2-bit codes (w + 1) are
// widened to bytes with shifts and masks and one per-byte subtract (__vsub4),
// on their way from global memory to shared memory.
//
// Tiling: a 256-thread block computes a 128x128 tile of y with BK = 64; the 8
// warps form a 2x4 grid of 64x32 warp tiles, i.e. 4x4 mma.m16n8k32 per k32
// step. Shared rows are padded to 80 bytes: the eight rows of one ldmatrix
// 8x16-byte matrix then start in eight different 4-bank groups (80 bytes = 20
// banks), so fragment loads are conflict-free. The fragments come by ldmatrix.x4
// (six per k32 step instead of 24 32-bit loads: with those the kernel was bound by
// shared-memory instructions, ~230 TOPS on an H100). The next k-tile is prefetched
// into registers while the current one is multiplied and stored into the other of two
// shared buffers, so a k-tile costs one barrier. sm_75 has no m16n8k32 s8 mma, so
// there the same products are formed with dp4a instead.
#include "cuda/decode.cuh"
#include "cuda/device.cuh"
#include "kernels.h"
#include "quant_rules.h"

namespace bitkernel {
namespace {

constexpr int BM = 128, BN = 128, BK = 64, LDS = 80, THREADS = 256;

// Per-token int8 quantization of x [M, K]: the codes into xq [M, lda] (zero padded) or, when x16 is
// given, as 16-bit floats of x's dtype into x16 [M, K] (for the small-M ternary kernel).
__global__ void quantize_act_kernel(const void* xv, int dtype, int64_t K, int64_t lda, int8_t* xq, void* x16,
                                    float* xs) {
  __shared__ float red[32];
  const int64_t m = blockIdx.x;
  auto load = [&](int64_t k) -> float {
    if (dtype == F16) return __half2float(static_cast<const __half*>(xv)[m * K + k]);
    return __bfloat162float(static_cast<const __nv_bfloat16*>(xv)[m * K + k]);
  };
  float amax = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(load(k)));
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (threadIdx.x == 0) red[0] = v;
  }
  __syncthreads();
  const float s = red[0] / 127.f;
  if (threadIdx.x == 0) xs[m] = s;
  if (x16) {
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const float c = static_cast<float>(int8_code(load(k), s));
      if (dtype == F16) static_cast<__half*>(x16)[m * K + k] = __float2half_rn(c);
      else static_cast<__nv_bfloat16*>(x16)[m * K + k] = __float2bfloat16_rn(c);
    }
    return;
  }
  for (int64_t k = threadIdx.x; k < lda; k += blockDim.x) xq[m * lda + k] = k < K ? int8_code(load(k), s) : 0;
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
// Four 8x16-byte matrices of shared memory into the lanes' fragment registers (ldmatrix; used on sm_80+ only).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const int8_t* p) {
  const auto a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
#endif

// Four 2-bit codes (one byte) to four int8 weights in {-1, 0, 1}.
__device__ __forceinline__ uint32_t widen_ternary(uint32_t b) {
  const uint32_t spread = (b & 0x3u) | ((b & 0xcu) << 6) | ((b & 0x30u) << 12) | ((b & 0xc0u) << 18);
  return __vsub4(spread, 0x01010101u);
}

template <int FMT, typename T, bool VEC>
__global__ void __launch_bounds__(THREADS) gemm_s8_kernel(const int8_t* __restrict__ xq, const float* __restrict__ xs,
                                                          int64_t M, int64_t K, int64_t lda,
                                                          const uint8_t* __restrict__ q,
                                                          const float* __restrict__ wscale, int64_t N,
                                                          const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ __align__(16) int8_t As[2][BM * LDS];
  __shared__ __align__(16) int8_t Bs[2][BN * LDS];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM, n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t ktiles = lda / BK;

  int acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  uint4 areg[2], breg[2];
  uint2 treg;  // ternary: 8 packed bytes = 32 weights per thread

  auto load_tile = [&](int64_t kt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid * 2 + i, r = idx >> 2, c = (idx & 3) * 16;
      const int64_t gm = m0 + r;
      areg[i] = gm < M ? *reinterpret_cast<const uint4*>(xq + gm * lda + kt * BK + c) : make_uint4(0, 0, 0, 0);
    }
    if constexpr (FMT == INT8) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int idx = tid * 2 + i, r = idx >> 2, c = (idx & 3) * 16;
        const int64_t gn = n0 + r, k = kt * BK + c;
        if constexpr (VEC) {
          breg[i] = (gn < N && k < K) ? __ldg(reinterpret_cast<const uint4*>(q + gn * K + k)) : make_uint4(0, 0, 0, 0);
        } else {
          uint32_t w[4] = {0, 0, 0, 0};
          if (gn < N)
            for (int j = 0; j < 16; ++j)
              if (k + j < K) w[j >> 2] |= static_cast<uint32_t>(q[gn * K + k + j]) << (8 * (j & 3));
          breg[i] = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
    } else {
      const int r = tid >> 1, half = tid & 1;
      const int64_t gn = n0 + r, kb = kt * (BK / 4) + half * 8, rb = K / 4;
      if constexpr (VEC) {
        treg = gn < N ? __ldg(reinterpret_cast<const uint2*>(q + gn * rb + kb)) : make_uint2(0x55555555u, 0x55555555u);
      } else {
        uint32_t w[2] = {0x55555555u, 0x55555555u};  // code 1 = weight 0 beyond the edges
        if (gn < N)
          for (int j = 0; j < 8; ++j)
            if (kb + j < rb) {
              w[j >> 2] &= ~(0xffu << (8 * (j & 3)));
              w[j >> 2] |= static_cast<uint32_t>(q[gn * rb + kb + j]) << (8 * (j & 3));
            }
        treg = make_uint2(w[0], w[1]);
      }
    }
  };

  auto store_tile = [&](int buf) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid * 2 + i, r = idx >> 2, c = (idx & 3) * 16;
      *reinterpret_cast<uint4*>(As[buf] + r * LDS + c) = areg[i];
      if constexpr (FMT == INT8) *reinterpret_cast<uint4*>(Bs[buf] + r * LDS + c) = breg[i];
    }
    if constexpr (FMT == TERNARY) {
      const int r = tid >> 1, half = tid & 1;
      const uint32_t p[2] = {treg.x, treg.y};
      uint32_t w[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) w[j] = widen_ternary((p[j >> 2] >> (8 * (j & 3))) & 0xffu);
      uint4* dst = reinterpret_cast<uint4*>(Bs[buf] + r * LDS + half * 32);
      dst[0] = make_uint4(w[0], w[1], w[2], w[3]);
      dst[1] = make_uint4(w[4], w[5], w[6], w[7]);
    }
  };

  auto lds32 = [](const int8_t* base, int row, int col) { return *reinterpret_cast<const int*>(base + row * LDS + col); };

  auto compute = [&](int buf) {
    const int8_t* as = As[buf];
    const int8_t* bs = Bs[buf];
#pragma unroll
    for (int kk = 0; kk < BK; kk += 32) {
#if __CUDA_ARCH__ >= 800
      // ldmatrix.x4: lanes 8i..8i+7 address the rows of 8x16-byte matrix i, and each lane receives
      // bytes 4t..4t+3 of row g of every matrix, the mma's fragment layout. A: matrices (rows 0-7,
      // k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31), (rows 8-15, k 16-31) = a0..a3. B (rows
      // are n): (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31) = b0, b1 of
      // two n8 tiles.
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
        ldmatrix_x4(a[mt], as + (wm * 64 + mt * 16 + (lane & 15)) * LDS + kk + (lane >> 4) * 16);
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t r[4];
        ldmatrix_x4(r, bs + (wn * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + kk + ((lane >> 3) & 1) * 16);
        b[2 * np][0] = r[0];
        b[2 * np][1] = r[1];
        b[2 * np + 1][0] = r[2];
        b[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_16832_i8<false>(acc[mt][nt], a[mt], b[nt]);
#else
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = wm * 64 + mt * 16 + g + (i >> 1) * 8, c = wn * 32 + nt * 8 + t * 2 + (i & 1);
#pragma unroll
            for (int k4 = 0; k4 < 32; k4 += 4) acc[mt][nt][i] = __dp4a(lds32(as, r, kk + k4), lds32(bs, c, kk + k4), acc[mt][nt][i]);
          }
#endif
    }
  };

  // Buffer kt % 2 holds k-tile kt. Storing k-tile kt + 1 into the other buffer is safe once every warp is past
  // the barrier that ended k-tile kt - 1, the buffer's previous reader.
  load_tile(0);
  store_tile(0);
  __syncthreads();
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    if (kt + 1 < ktiles) load_tile(kt + 1);
    compute(static_cast<int>(kt & 1));
    if (kt + 1 < ktiles) store_tile(static_cast<int>((kt + 1) & 1));
    __syncthreads();
  }

#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t row = m0 + wm * 64 + mt * 16 + g + (i >> 1) * 8;
        const int64_t col = n0 + wn * 32 + nt * 8 + t * 2 + (i & 1);
        if (row < M && col < N) {
          float v = static_cast<float>(acc[mt][nt][i]) * xs[row] * wscale[col];
          if (bias) v += to_f32(bias[col]);
          y[row * N + col] = from_f32<T>(v);
        }
      }
}

}  // namespace

void quantize_act_cuda(const void* x, int dtype, int64_t M, int64_t K, int8_t* xq, void* x16, float* xs,
                       uintptr_t stream) {
  check(dtype == F16 || dtype == BF16, "bitkernel: CUDA linear takes float16 or bfloat16 activations");
  if (M == 0) return;
  const int64_t lda = (K + BK - 1) / BK * BK;
  quantize_act_kernel<<<static_cast<unsigned>(M), 256, 0, as_stream(stream)>>>(x, dtype, K, lda, xq, x16, xs);
  check_launch("quantize_act");
}

void gemm_s8_cuda(int fmt, const int8_t* xq, const float* xs, int64_t M, int64_t K, const uint8_t* q,
                  const float* scale, int64_t N, const void* bias, int dtype, void* y, uintptr_t stream) {
  check(fmt == TERNARY || fmt == INT8, "bitkernel: int8 activations need ternary or INT8 weights");
  check(dtype == F16 || dtype == BF16, "bitkernel: CUDA linear takes float16 or bfloat16 activations");
  if (M == 0 || N == 0) return;
  check(M <= 65535LL * BM, "bitkernel: M too large for one launch");
  const int64_t lda = (K + BK - 1) / BK * BK;
  const dim3 grid(static_cast<unsigned>((N + BN - 1) / BN), static_cast<unsigned>((M + BM - 1) / BM));
  const cudaStream_t s = as_stream(stream);
  const uintptr_t qa = reinterpret_cast<uintptr_t>(q);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto* b = static_cast<const T*>(bias);
    auto* yt = static_cast<T*>(y);
    if (fmt == INT8) {
      if (K % 16 == 0 && qa % 16 == 0) gemm_s8_kernel<INT8, T, true><<<grid, THREADS, 0, s>>>(xq, xs, M, K, lda, q, scale, N, b, yt);
      else gemm_s8_kernel<INT8, T, false><<<grid, THREADS, 0, s>>>(xq, xs, M, K, lda, q, scale, N, b, yt);
    } else {
      if (K % 64 == 0 && qa % 8 == 0) gemm_s8_kernel<TERNARY, T, true><<<grid, THREADS, 0, s>>>(xq, xs, M, K, lda, q, scale, N, b, yt);
      else gemm_s8_kernel<TERNARY, T, false><<<grid, THREADS, 0, s>>>(xq, xs, M, K, lda, q, scale, N, b, yt);
    }
  };
  if (dtype == F16) run(__half{});
  else run(__nv_bfloat16{});
  check_launch("gemm_s8");
}

}  // namespace bitkernel
