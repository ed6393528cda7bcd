// Weight-only product for small M (M <= 16): y = x @ W.T * s (+ bias).
//
// At small M the product is bound by reading the weights, so each warp owns one
// output row and streams its packed bytes exactly once, 16 bytes per lane per
// step (64 ternary, 32 INT4 or 16 INT8 weights). The weights of one 16-byte
// chunk are decoded into registers 8 at a time and reused for every row of x;
// x itself is tiny and stays in L1/L2. Scale groups are multiples of the chunk,
// so each chunk takes one scale. A scalar path serves shapes or pointers that
// are not 16-byte aligned.
#include "cuda/device.cuh"
#include "kernels.h"

namespace bitkernel {
namespace {

template <int FMT> struct Chunk;
template <> struct Chunk<TERNARY> { static constexpr int W = 64, WPB = 4; };
template <> struct Chunk<INT4> { static constexpr int W = 32, WPB = 2; };
template <> struct Chunk<INT8> { static constexpr int W = 16, WPB = 1; };

// Decode weights 8j .. 8j+7 of a 16-byte chunk held in four words.
template <int FMT>
__device__ __forceinline__ void decode8(const uint32_t (&w)[4], int j, float z, float (&out)[8]) {
  if constexpr (FMT == TERNARY) {
    const uint32_t bits = w[j >> 1] >> ((j & 1) * 16);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = static_cast<float>(static_cast<int>((bits >> (2 * i)) & 3u) - 1);
  } else if constexpr (FMT == INT4) {
    const uint32_t bits = w[j];
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = static_cast<float>((bits >> (4 * i)) & 15u) - z;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = static_cast<float>(static_cast<int8_t>(w[2 * j + (i >> 2)] >> (8 * (i & 3))));
  }
}

template <int FMT>
__device__ __forceinline__ float decode_one(const uint8_t* row, int64_t k, float z) {
  if constexpr (FMT == TERNARY) return static_cast<float>(static_cast<int>((row[k >> 2] >> (2 * (k & 3))) & 3) - 1);
  else if constexpr (FMT == INT4) return static_cast<float>((row[k >> 1] >> (4 * (k & 1))) & 15) - z;
  else return static_cast<float>(static_cast<int8_t>(row[k]));
}

template <int FMT, typename T, int MT, bool VEC>
__global__ void __launch_bounds__(128) gemv_kernel(const T* __restrict__ x, int M, int64_t K,
                                                   const uint8_t* __restrict__ q, const float* __restrict__ scale,
                                                   const uint8_t* __restrict__ zero, int64_t group, int64_t N,
                                                   const T* __restrict__ bias, T* __restrict__ y) {
  constexpr int CW = Chunk<FMT>::W;
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * 4LL + (threadIdx.x >> 5);
  if (n >= N) return;
  const int64_t G = group == 0 ? 1 : (K + group - 1) / group, gs = group == 0 ? K : group;
  const uint8_t* row = q + n * (K / Chunk<FMT>::WPB);
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

  const int64_t nchunks = (K + CW - 1) / CW;
  for (int64_t c = lane; c < nchunks; c += 32) {
    const int64_t k0 = c * CW;
    float part[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) part[m] = 0.f;
    if constexpr (VEC) {
      const int64_t gi = n * G + k0 / gs;
      const float z = zero ? static_cast<float>(zero[gi]) : 8.f;
      const uint4 wv = __ldg(reinterpret_cast<const uint4*>(row) + c);
      const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int j = 0; j < CW / 8; ++j) {
        float w8[8];
        decode8<FMT>(words, j, z, w8);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < M) {
            const uint4 xv = *reinterpret_cast<const uint4*>(x + m * K + k0 + j * 8);
            const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
            for (int i = 0; i < 8; ++i) part[m] = fmaf(to_f32(xe[i]), w8[i], part[m]);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[m] = fmaf(part[m], scale[gi], acc[m]);
    } else {
      for (int64_t k = k0; k < k0 + CW && k < K; ++k) {
        const int64_t gi = n * G + k / gs;
        const float w = decode_one<FMT>(row, k, zero ? static_cast<float>(zero[gi]) : 8.f) * scale[gi];
#pragma unroll
        for (int m = 0; m < MT; ++m)
          if (m < M) acc[m] = fmaf(to_f32(x[m * K + k]), w, acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = acc[m];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0 && m < M) y[m * N + n] = from_f32<T>(bias ? v + to_f32(bias[n]) : v);
  }
}

template <int FMT, typename T, int MT>
void launch(const void* x, int M, int64_t K, const uint8_t* q, const float* scale, const uint8_t* zero,
            int64_t group, int64_t N, const void* bias, void* y, cudaStream_t s) {
  constexpr int CW = Chunk<FMT>::W;
  const bool vec = K % CW == 0 && (group == 0 || group % CW == 0) &&
                   reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(q) % 16 == 0;
  const dim3 grid(static_cast<unsigned>((N + 3) / 4));
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
  else if (M <= 4) launch<FMT, T, 4>(x, M, K, q, scale, zero, group, N, bias, y, s);
  else if (M <= 8) launch<FMT, T, 8>(x, M, K, q, scale, zero, group, N, bias, y, s);
  else launch<FMT, T, 16>(x, M, K, q, scale, zero, group, N, bias, y, s);
}

}  // namespace

void gemv_cuda(int fmt, const void* x, int dtype, int64_t M, int64_t K, const uint8_t* q, const float* scale,
               const uint8_t* zero, int64_t group, int64_t N, const void* bias, void* y, uintptr_t stream) {
  check(M >= 1 && M <= 16, "bitkernel: gemv_cuda takes 1 <= M <= 16");
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
