// Weight-only product for small M (M <= kGemvMaxM): y = x @ W.T * s (+ bias).
//
// At small M the product is bound by reading the weights, so the kernel streams
// each packed byte exactly once: a warp owns ROWS output rows and lane l takes
// the 32-bit words l, l + 32, l + 64, ... of every row (16 ternary, 8 INT4 or
// 4 INT8 weights per word). Word-interleaving keeps both the weight loads (128
// contiguous bytes per warp and row) and the x loads (each lane reads the x
// slice of its word; neighbouring lanes read neighbouring slices) coalesced:
// the first version gave each lane a contiguous 64-weight chunk, which strided
// the x loads across lanes and saturated L1 (88% L1 throughput at 15% DRAM
// throughput under ncu). x is loaded and converted once per word and reused
// for the ROWS rows; UNROLL words per row are in flight before any is used.
//
// Decoding (decode.cuh) uses no int-to-float conversions. Scale groups are
// multiples of a word, so each word takes one scale. A scalar path serves
// shapes or pointers that are not aligned.
#include <string>

#include "cuda/decode.cuh"
#include "cuda/device.cuh"
#include "kernels.h"

namespace bitkernel {
namespace {

constexpr int ROWS = 4, UNROLL = 4;

template <int FMT>
__device__ __forceinline__ float decode_one(const uint8_t* row, int64_t k, float z) {
  if constexpr (FMT == TERNARY) return static_cast<float>(static_cast<int>((row[k >> 2] >> (2 * (k & 3))) & 3) - 1);
  else if constexpr (FMT == INT4) return static_cast<float>((row[k >> 1] >> (4 * (k & 1))) & 15) - z;
  else return static_cast<float>(static_cast<int8_t>(row[k]));
}

// Loads N consecutive x values as floats: 16-byte loads when N is a multiple
// of 8 (ternary, INT4 words), else 8-byte loads (INT8 words).
template <typename T, int N>
__device__ __forceinline__ void load_x(const T* p, float (&out)[N]) {
  static_assert(N % 4 == 0 && sizeof(T) == 2, "x holds 16-bit values, loaded in groups of four");
  if constexpr (N % 8 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 8) {
      const uint4 v = *reinterpret_cast<const uint4*>(p + i);
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int j = 0; j < 8; ++j) out[i + j] = to_f32(e[j]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const uint2 v = *reinterpret_cast<const uint2*>(p + i);
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int j = 0; j < 4; ++j) out[i + j] = to_f32(e[j]);
    }
  }
}

template <int FMT, typename T, int MT, bool VEC>
__global__ void __launch_bounds__(128) gemv_kernel(const T* __restrict__ x, int M, int64_t K,
                                                   const uint8_t* __restrict__ q, const float* __restrict__ scale,
                                                   const uint8_t* __restrict__ zero, int64_t group, int64_t N,
                                                   const T* __restrict__ bias, T* __restrict__ y) {
  constexpr int WPB = Codes<FMT>::WPB, WW = 4 * WPB;  // weights per byte / per word
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (blockIdx.x * 4LL + (threadIdx.x >> 5)) * ROWS;
  if (n0 >= N) return;
  const int64_t G = group == 0 ? 1 : (K + group - 1) / group, gs = group == 0 ? K : group;
  const int64_t rb = K / WPB;
  const uint8_t* rows[ROWS];
  int64_t srow[ROWS];  // first scale index of each row
  bool live[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    live[r] = n0 + r < N;
    rows[r] = q + (live[r] ? n0 + r : n0) * rb;
    srow[r] = (live[r] ? n0 + r : n0) * G;
  }
  float acc[ROWS][MT];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

  if constexpr (VEC) {
    const uint32_t nwords = static_cast<uint32_t>(K / WW);
    const uint32_t words_per_group = static_cast<uint32_t>(gs / WW);
    float s0[ROWS], off0[ROWS];  // per-row scale and offset, used when group == 0
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      s0[r] = scale[srow[r]];
      off0[r] = 8388608.f + (FMT == TERNARY ? 1.f : FMT == INT8 ? 128.f : (zero ? static_cast<float>(zero[srow[r]]) : 8.f));
    }
    for (uint32_t base = 0; base < nwords; base += 32 * UNROLL) {
      uint32_t wv[UNROLL][ROWS];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const uint32_t wi = base + u * 32 + lane;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) wv[u][r] = wi < nwords ? __ldg(reinterpret_cast<const uint32_t*>(rows[r]) + wi) : 0u;
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const uint32_t wi = base + u * 32 + lane;
        if (wi >= nwords) break;
        const int64_t k0 = static_cast<int64_t>(wi) * WW;
        const uint32_t gidx = group == 0 ? 0u : wi / words_per_group;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < M) {
            float xf[WW];
            load_x(x + m * K + k0, xf);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
              float s = s0[r], off = off0[r];
              if (group != 0) {
                s = scale[srow[r] + gidx];
                if (FMT == INT4 && zero) off = 8388608.f + static_cast<float>(zero[srow[r] + gidx]);
              }
              float w[WW];
              decode_word<FMT>(wv[u][r], off, w);
              float p = 0.f;
#pragma unroll
              for (int i = 0; i < WW; ++i) p = fmaf(xf[i], w[i], p);
              acc[r][m] = fmaf(p, s, acc[r][m]);
            }
          }
        }
      }
    }
  } else {
    constexpr int CW = 8 * WPB;
    const int64_t nchunks = (K + CW - 1) / CW;
    for (int64_t c = lane; c < nchunks; c += 32) {
      const int64_t k0 = c * CW;
      for (int64_t k = k0; k < k0 + CW && k < K; ++k) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const int64_t gi = srow[r] + k / gs;
          const float w = decode_one<FMT>(rows[r], k, zero ? static_cast<float>(zero[gi]) : 8.f) * scale[gi];
#pragma unroll
          for (int m = 0; m < MT; ++m)
            if (m < M) acc[r][m] = fmaf(to_f32(x[m * K + k]), w, acc[r][m]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0 && m < M && live[r]) y[m * N + n0 + r] = from_f32<T>(bias ? v + to_f32(bias[n0 + r]) : v);
    }
}

template <int FMT, typename T, int MT>
void launch(const void* x, int M, int64_t K, const uint8_t* q, const float* scale, const uint8_t* zero,
            int64_t group, int64_t N, const void* bias, void* y, cudaStream_t s) {
  constexpr int WW = 4 * Codes<FMT>::WPB;
  const bool vec = K % WW == 0 && (group == 0 || group % WW == 0) && K / WW < (1LL << 31) &&
                   reinterpret_cast<uintptr_t>(x) % (WW % 8 == 0 ? 16 : 8) == 0 && reinterpret_cast<uintptr_t>(q) % 4 == 0;
  const dim3 grid(static_cast<unsigned>((N + 4 * ROWS - 1) / (4 * ROWS)));
  auto* xt = static_cast<const T*>(x);
  auto* bt = static_cast<const T*>(bias);
  auto* yt = static_cast<T*>(y);
  if (vec) gemv_kernel<FMT, T, MT, true><<<grid, 128, 0, s>>>(xt, M, K, q, scale, zero, group, N, bt, yt);
  else gemv_kernel<FMT, T, MT, false><<<grid, 128, 0, s>>>(xt, M, K, q, scale, zero, group, N, bt, yt);
}

template <int FMT, typename T>
void launch_m(const void* x, int M, int64_t K, const uint8_t* q, const float* scale, const uint8_t* zero,
              int64_t group, int64_t N, const void* bias, void* y, cudaStream_t s) {
  if (M <= 1) launch<FMT, T, 1>(x, M, K, q, scale, zero, group, N, bias, y, s);
  else if (M <= 2) launch<FMT, T, 2>(x, M, K, q, scale, zero, group, N, bias, y, s);
  else launch<FMT, T, 4>(x, M, K, q, scale, zero, group, N, bias, y, s);
}

}  // namespace

void gemv_cuda(int fmt, const void* x, int dtype, int64_t M, int64_t K, const uint8_t* q, const float* scale,
               const uint8_t* zero, int64_t group, int64_t N, const void* bias, void* y, uintptr_t stream) {
  check(M >= 1 && M <= kGemvMaxM, "bitkernel: gemv_cuda takes 1 <= M <= " + std::to_string(kGemvMaxM));
  check(dtype == F16 || dtype == BF16, "bitkernel: CUDA linear takes float16 or bfloat16 activations");
  if (N == 0) return;
  const cudaStream_t s = as_stream(stream);
  const int m = static_cast<int>(M);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (fmt == TERNARY) launch_m<TERNARY, T>(x, m, K, q, scale, zero, group, N, bias, y, s);
    else if (fmt == INT4) launch_m<INT4, T>(x, m, K, q, scale, zero, group, N, bias, y, s);
    else launch_m<INT8, T>(x, m, K, q, scale, zero, group, N, bias, y, s);
  };
  if (dtype == F16) run(__half{});
  else run(__nv_bfloat16{});
  check_launch("gemv");
}

}  // namespace bitkernel
