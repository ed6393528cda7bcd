// Canonical packing and unpacking on the GPU. Quantization runs one thread per
// (row, scale group) so each scale is reduced in the same sequential order as
// on the CPU: packing is bit-identical across devices. It runs once per
// conversion, so its speed hardly matters; dequantization is on the hot path of
// the large-M weight-only product and is a plain bandwidth-bound stream.
#include <string>

#include "cuda/decode.cuh"
#include "cuda/device.cuh"
#include "kernels.h"
#include "quant_rules.h"

namespace bitkernel {

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return;
  std::string msg = std::string("bitkernel: CUDA error in ") + what + ": " + cudaGetErrorString(e);
  if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction)
    msg += ". This build has no kernels for this GPU: rebuild with BITKERNEL_CUDA_ARCHS set to its "
           "compute capability (e.g. BITKERNEL_CUDA_ARCHS=89 pip install ./bitkernel)";
  if (e == cudaErrorMemoryAllocation) msg += ". The GPU is out of memory";
  throw Error(msg);
}

namespace {

__global__ void quantize_kernel(int fmt, const float* w, int64_t N, int64_t K, int64_t group,
                                bool symmetric, bool compute_scale, float* scale, uint8_t* zero, uint8_t* q) {
  const int64_t G = group == 0 ? 1 : (K + group - 1) / group, gs = group == 0 ? K : group;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= N * G) return;
  const int64_t n = idx / G, g = idx % G, k0 = g * gs, len = (k0 + gs <= K ? gs : K - k0);
  const float* wr = w + n * K;
  float s = scale[idx];
  if (compute_scale) {
    float z;
    default_group_params(fmt, symmetric, wr + k0, len, &s, &z);
    if (fmt == INT4 && !symmetric) zero[idx] = static_cast<uint8_t>(z);
    scale[idx] = s;
  }
  const float z = (fmt == INT4 && !symmetric) ? static_cast<float>(zero[idx]) : 8.f;
  const int wpb = fmt == TERNARY ? 4 : fmt == INT4 ? 2 : 1;
  const int64_t rb = K / wpb;
  for (int64_t k = k0; k < k0 + len; k += wpb) {
    uint32_t b = 0;
    for (int j = 0; j < wpb && k + j < K; ++j) {
      if (fmt == TERNARY) b |= ternary_code(wr[k + j], s) << (2 * j);
      else if (fmt == INT4) b |= int4_code(wr[k + j], s, z) << (4 * j);
      else b = static_cast<uint8_t>(int8_code(wr[k + j], s));
    }
    q[n * rb + k / wpb] = static_cast<uint8_t>(b);
  }
}

template <typename T>
__global__ void dequantize_kernel(int fmt, const uint8_t* q, const float* scale, const uint8_t* zero,
                                  int64_t N, int64_t K, int64_t group, T* out) {
  const int wpb = fmt == TERNARY ? 4 : fmt == INT4 ? 2 : 1;
  const int64_t rb = K / wpb, G = group == 0 ? 1 : (K + group - 1) / group, gs = group == 0 ? K : group;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= N * rb) return;
  const int64_t n = idx / rb, k = (idx % rb) * wpb;
  const uint32_t b = q[idx];
  for (int j = 0; j < wpb; ++j) {
    const int64_t g = (k + j) / gs;
    float v;
    if (fmt == TERNARY) v = static_cast<float>(static_cast<int>((b >> (2 * j)) & 3) - 1);
    else if (fmt == INT4) v = static_cast<float>(static_cast<int>((b >> (4 * j)) & 15) - (zero ? zero[n * G + g] : 8));
    else v = static_cast<float>(static_cast<int8_t>(b));
    out[n * K + k + j] = from_f32<T>(v * scale[n * G + g]);
  }
}

// The vectorised expansion: every 16-byte piece of output (CW = 16 / sizeof(T) weights, from PB bytes of
// codes) is one chunk, and a warp's 32 * kChunksPerThread chunks are dealt to its lanes round-robin, so that
// each store instruction writes 512 contiguous bytes. (Where each thread expanded one 32-bit word into 32
// contiguous bytes, a store instruction wrote at a 32-byte lane stride: two half-filled 1 KB spans per warp
// instead of one full 512-byte span, ~2.2-3.0 TB/s on an H200.) Needs K and the group size to be multiples of CW, the
// codes PB-byte aligned and a 16-byte aligned output; dequantize_kernel serves the rest. 32-bit index
// arithmetic (the host checks it fits): 64-bit division is emulated and slow.
constexpr int kChunksPerThread = 2;

template <int FMT, typename T>
__global__ void dequantize_vec_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale,
                                      const uint8_t* __restrict__ zero, uint32_t K, uint32_t group, uint32_t chunks,
                                      T* __restrict__ out) {
  constexpr int CW = 16 / sizeof(T), PB = CW * Codes<FMT>::BITS / 8, WORDS = PB < 4 ? 1 : PB / 4;
  const uint32_t G = group == 0 ? 1u : (K + group - 1) / group;
  const uint32_t first = ((blockIdx.x * blockDim.x + threadIdx.x) & ~31u) * kChunksPerThread + (threadIdx.x & 31);
#pragma unroll
  for (int c = 0; c < kChunksPerThread; ++c) {
    const uint32_t chunk = first + 32 * c;
    if (chunk >= chunks) return;
    const uint32_t e = chunk * CW, n = e / K, k0 = e - n * K;
    const uint32_t gi = n * G + (group == 0 ? 0u : k0 / group);
    const float off = 8388608.f + (FMT == TERNARY ? 1.f : FMT == INT8 ? 128.f : (zero ? static_cast<float>(zero[gi]) : 8.f));
    const float s = scale[gi];
    uint32_t w[WORDS];
    if constexpr (PB == 1) w[0] = q[chunk];
    else if constexpr (PB == 2) w[0] = reinterpret_cast<const uint16_t*>(q)[chunk];
    else if constexpr (PB == 4) w[0] = reinterpret_cast<const uint32_t*>(q)[chunk];
    else {
      const uint2 v = reinterpret_cast<const uint2*>(q)[chunk];
      w[0] = v.x, w[1] = v.y;
    }
    alignas(16) T o[CW];
#pragma unroll
    for (int i = 0; i < WORDS; ++i) {
      float f[4 * Codes<FMT>::WPB];
      decode_word<FMT>(w[i], off, f);  // a word's weights past the chunk's CW are never used
#pragma unroll
      for (int j = 0; j < 4 * Codes<FMT>::WPB && i * 4 * Codes<FMT>::WPB + j < CW; ++j)
        o[i * 4 * Codes<FMT>::WPB + j] = from_f32<T>(f[j] * s);
    }
    *reinterpret_cast<uint4*>(out + e) = *reinterpret_cast<const uint4*>(o);
  }
}

template <int FMT>
bool try_dequantize_vec(const uint8_t* q, const float* scale, const uint8_t* zero, int64_t N, int64_t K, int64_t group,
                        void* out, int dtype, cudaStream_t s) {
  bool done = false;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int CW = 16 / sizeof(T), PB = CW * Codes<FMT>::BITS / 8;
    const int64_t chunks = N * K / CW;
    if (K % CW || (group && group % CW) || reinterpret_cast<uintptr_t>(q) % PB ||
        reinterpret_cast<uintptr_t>(out) % 16 || N * K >= (1LL << 32) - 256 * kChunksPerThread * CW)
      return;
    const int64_t per_block = 256 * kChunksPerThread;
    dequantize_vec_kernel<FMT, T><<<static_cast<unsigned>((chunks + per_block - 1) / per_block), 256, 0, s>>>(
        q, scale, zero, static_cast<uint32_t>(K), static_cast<uint32_t>(group), static_cast<uint32_t>(chunks),
        static_cast<T*>(out));
    done = true;
  });
  return done;
}

}  // namespace

void quantize_cuda(int fmt, const float* w, int64_t N, int64_t K, int64_t group, bool symmetric,
                   bool compute_scale, float* scale, uint8_t* zero, uint8_t* q, uintptr_t stream) {
  const int64_t total = N * groups_per_row(K, group);
  if (total == 0) return;
  quantize_kernel<<<(total + 127) / 128, 128, 0, as_stream(stream)>>>(fmt, w, N, K, group, symmetric,
                                                                      compute_scale, scale, zero, q);
  check_launch("quantize");
}

void dequantize_cuda(int fmt, const uint8_t* q, const float* scale, const uint8_t* zero, int64_t N,
                     int64_t K, int64_t group, void* out, int dtype, uintptr_t stream) {
  const int64_t total = N * packed_row_bytes(fmt, K);
  if (total == 0) return;
  const cudaStream_t s = as_stream(stream);
  const bool done = fmt == TERNARY ? try_dequantize_vec<TERNARY>(q, scale, zero, N, K, group, out, dtype, s)
                    : fmt == INT4  ? try_dequantize_vec<INT4>(q, scale, zero, N, K, group, out, dtype, s)
                                   : try_dequantize_vec<INT8>(q, scale, zero, N, K, group, out, dtype, s);
  if (!done) dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_kernel<T><<<(total + 255) / 256, 256, 0, s>>>(
        fmt, q, scale, zero, N, K, group, static_cast<T*>(out));
  });
  check_launch("dequantize");
}

}  // namespace bitkernel
