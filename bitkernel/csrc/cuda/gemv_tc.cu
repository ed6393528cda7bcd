// Small-M weight-only product on tensor cores for INT4 weights with 16-bit
// activations: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias), M <= 16. (Ternary
// weights have their own kernel, gemv_ternary.cu, which also explains the
// tensor-core choice at M = 1.)
//
// The weight matrix is the mma's A operand (16 weight rows x 16 k) and x^T its B
// operand (16 k x 8 tokens), so one mma.m16n8k16 consumes 256 weights; the
// padding of M up to 8 tokens is free because the kernel is bound by reading the
// weights, not by tensor-core math.
//
// Decoding is exact and conversion-free: a code u (0..15) OR-ed into the
// mantissa of the 16-bit constant MAGIC (bf16 128.0 = 0x4300, fp16 1024.0 =
// 0x6400) is the number MAGIC + u, and one packed subtraction of MAGIC + z gives
// the weight u - z exactly.
//
// Fragment ownership (PTX m16n8k16, g = lane / 4, t = lane % 4): A registers
// are {row g, k 2t..2t+1}, {row g+8, k 2t..2t+1}, {row g, k 2t+8..}, {row g+8, k
// 2t+8..}; B registers {k 2t..2t+1, token g}, {k 2t+8.., token g}; C is {row
// g, tokens 2t, 2t+1}, {row g+8, tokens 2t, 2t+1}. An INT4 row holds 8 k per
// word, so each lane shifts its two codes out of the words that hold k 0..7
// and k 8..15 of the step.
//
// Work split: a block owns 16 weight rows; its KSPLIT warps take interleaved
// 64-k chunks of K (two 16-byte loads per row per lane and chunk) and the
// partial sums meet in shared memory. Scale groups (multiples of 64) are
// applied per chunk.
#include "cuda/decode.cuh"
#include "cuda/device.cuh"
#include "kernels.h"

namespace bitkernel {
namespace {

constexpr int KSPLIT = 8, CHUNK_K = 64;

template <typename T> struct Magic;
template <> struct Magic<__nv_bfloat16> {
  static constexpr uint32_t MAGIC = 0x43004300u;  // bf16 128.0 in both halves
  static constexpr float BASE = 128.f;
  static __device__ __forceinline__ uint32_t sub(uint32_t a, float v) {
    const __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a), __float2bfloat162_rn(v));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
};
template <> struct Magic<__half> {
  static constexpr uint32_t MAGIC = 0x64006400u;  // fp16 1024.0 in both halves
  static constexpr float BASE = 1024.f;
  static __device__ __forceinline__ uint32_t sub(uint32_t a, float v) {
    const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&a), __float2half2_rn(v));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
};

// The two A registers (k 2t..2t+1 and k 2t+8..2t+9) of one weight row for one k16
// step, as MAGIC + code pairs. `lo` / `hi` are the row's packed words that hold k
// 0..7 and k 8..15 of the step; k i at bits 4i.
__device__ __forceinline__ void codes_to_pairs(uint32_t lo, uint32_t hi, int t, uint32_t magic, uint32_t& a_lo,
                                               uint32_t& a_hi) {
  const uint32_t v = lo >> (8 * t), w = hi >> (8 * t);
  a_lo = (v & 0xfu) | ((v << 12) & 0xf0000u) | magic;
  a_hi = (w & 0xfu) | ((w << 12) & 0xf0000u) | magic;
}

template <typename T, int NT, bool GROUPED>
__global__ void __launch_bounds__(32 * KSPLIT) gemv_tc_kernel(const T* __restrict__ x, int M, int64_t K,
                                                              const uint8_t* __restrict__ q,
                                                              const float* __restrict__ scale,
                                                              const uint8_t* __restrict__ zero, int64_t group,
                                                              int64_t N, const T* __restrict__ bias, T* __restrict__ y) {
  using Op = Magic<T>;
  constexpr int CHUNK_BYTES = 32;  // bytes of one row per 64-k chunk
  __shared__ float red[KSPLIT][16][8 * NT];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * 16;
  const int64_t rA = min(n0 + g, N - 1), rB = min(n0 + g + 8, N - 1);  // clamped: loads stay in bounds
  const int64_t rb = K / 2;
  const uint8_t* pA = q + rA * rb;
  const uint8_t* pB = q + rB * rb;
  const int64_t G = group == 0 ? 1 : (K + group - 1) / group;
  const uint32_t chunks_per_group = group == 0 ? 1u : static_cast<uint32_t>(group / CHUNK_K);

  // Offsets subtracted from MAGIC + code: the zero point (8 when symmetric).
  float offA = 8.f, offB = 8.f;
  if (zero && !GROUPED) { offA = zero[rA * G]; offB = zero[rB * G]; }

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;

  const uint32_t nchunks = static_cast<uint32_t>(K / CHUNK_K);
  constexpr int WORDS = CHUNK_BYTES / 16;  // uint4 loads per row and chunk
  constexpr int UNROLL = 1;  // chunks in flight; more (2, 4) measured slower on an H200 (fewer resident warps)
  for (uint32_t base = warp; base < nchunks; base += KSPLIT * UNROLL) {
    // Issue every load of UNROLL chunks before using any: at M = 1 the kernel is
    // bound by bytes in flight.
    uint4 wa[UNROLL][WORDS], wb[UNROLL][WORDS];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const uint32_t c = base + u * KSPLIT;
#pragma unroll
      for (int i = 0; i < WORDS; ++i) {
        wa[u][i] = c < nchunks ? __ldg(reinterpret_cast<const uint4*>(pA + static_cast<int64_t>(c) * CHUNK_BYTES) + i)
                               : make_uint4(0, 0, 0, 0);
        wb[u][i] = c < nchunks ? __ldg(reinterpret_cast<const uint4*>(pB + static_cast<int64_t>(c) * CHUNK_BYTES) + i)
                               : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const uint32_t c = base + u * KSPLIT;
      if (c >= nchunks) break;
      if constexpr (GROUPED) {
        if (zero) {
          const uint32_t gi = c / chunks_per_group;
          offA = zero[rA * G + gi];
          offB = zero[rB * G + gi];
        }
      }
      const uint32_t* WA = reinterpret_cast<const uint32_t*>(wa[u]);
      const uint32_t* WB = reinterpret_cast<const uint32_t*>(wb[u]);
      float part[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[j][i] = 0.f;
#pragma unroll
      for (int s = 0; s < CHUNK_K / 16; ++s) {
        uint32_t a[4];
        codes_to_pairs(WA[2 * s], WA[2 * s + 1], t, Op::MAGIC, a[0], a[2]);
        codes_to_pairs(WB[2 * s], WB[2 * s + 1], t, Op::MAGIC, a[1], a[3]);
        a[0] = Op::sub(a[0], Op::BASE + offA);
        a[2] = Op::sub(a[2], Op::BASE + offA);
        a[1] = Op::sub(a[1], Op::BASE + offB);
        a[3] = Op::sub(a[3], Op::BASE + offB);
        const int64_t k = static_cast<int64_t>(c) * CHUNK_K + s * 16 + 2 * t;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int tok = j * 8 + g;
          uint32_t b[2] = {0u, 0u};
          if (tok < M) {
            b[0] = *reinterpret_cast<const uint32_t*>(x + tok * K + k);
            b[1] = *reinterpret_cast<const uint32_t*>(x + tok * K + k + 8);
          }
          mma_16816<T>(GROUPED ? part[j] : acc[j], a, b);
        }
      }
      if constexpr (GROUPED) {
        const uint32_t gi = c / chunks_per_group;
        const float sA = scale[rA * G + gi], sB = scale[rB * G + gi];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          acc[j][0] = fmaf(part[j][0], sA, acc[j][0]);
          acc[j][1] = fmaf(part[j][1], sA, acc[j][1]);
          acc[j][2] = fmaf(part[j][2], sB, acc[j][2]);
          acc[j][3] = fmaf(part[j][3], sB, acc[j][3]);
        }
      }
    }
  }

#pragma unroll
  for (int j = 0; j < NT; ++j) {
    red[warp][g][j * 8 + 2 * t] = acc[j][0];
    red[warp][g][j * 8 + 2 * t + 1] = acc[j][1];
    red[warp][g + 8][j * 8 + 2 * t] = acc[j][2];
    red[warp][g + 8][j * 8 + 2 * t + 1] = acc[j][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * 8 * NT; i += blockDim.x) {
    const int row = i / (8 * NT), tok = i % (8 * NT);
    const int64_t n = n0 + row;
    if (n >= N || tok >= M) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < KSPLIT; ++w) v += red[w][row][tok];
    if (!GROUPED) v *= scale[n * G];
    if (bias) v += to_f32(bias[n]);
    y[tok * N + n] = from_f32<T>(v);
  }
}

template <typename T, int NT>
void launch(const void* x, int M, int64_t K, const uint8_t* q, const float* scale, const uint8_t* zero, int64_t group,
            int64_t N, const void* bias, void* y, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((N + 15) / 16));
  auto* xt = static_cast<const T*>(x);
  auto* bt = static_cast<const T*>(bias);
  auto* yt = static_cast<T*>(y);
  if (group) gemv_tc_kernel<T, NT, true><<<grid, 32 * KSPLIT, 0, s>>>(xt, M, K, q, scale, zero, group, N, bt, yt);
  else gemv_tc_kernel<T, NT, false><<<grid, 32 * KSPLIT, 0, s>>>(xt, M, K, q, scale, zero, group, N, bt, yt);
}

}  // namespace

bool gemv_tc_cuda(int fmt, const void* x, int dtype, int64_t M, int64_t K, const uint8_t* q, const float* scale,
                  const uint8_t* zero, int64_t group, int64_t N, const void* bias, void* y, uintptr_t stream) {
  // Shapes this kernel takes; the caller falls back to another path otherwise.
  if (fmt != INT4 || (dtype != F16 && dtype != BF16) || M < 1 || M > 16 || N == 0 ||
      K % CHUNK_K != 0 || (group != 0 && group % CHUNK_K != 0) || K / CHUNK_K >= (1LL << 31) ||
      reinterpret_cast<uintptr_t>(q) % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 4 != 0)
    return false;
  if (!current_device().has_mma16816()) return false;
  const cudaStream_t s = as_stream(stream);
  const int m = static_cast<int>(M);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (m <= 8) launch<T, 1>(x, m, K, q, scale, zero, group, N, bias, y, s);
    else launch<T, 2>(x, m, K, q, scale, zero, group, N, bias, y, s);
  };
  if (dtype == F16) run(__half{});
  else run(__nv_bfloat16{});
  check_launch("gemv_tc");
  return true;
}

}  // namespace bitkernel
