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

// One thread per 32-bit word of packed codes: decodes 4 * WPB weights and
// writes them with vector stores. Needs K and the group size to be multiples of
// 4 * WPB and 16-byte aligned outputs; dequantize_kernel serves the rest.
template <int FMT, typename T>
__global__ void dequantize_vec_kernel(const uint32_t* q, const float* scale, const uint8_t* zero, int64_t N,
                                      int64_t K, int64_t group, T* out) {
  constexpr int WW = 4 * Codes<FMT>::WPB;
  // 32-bit index arithmetic (the host checks it fits): 64-bit division is emulated and slow.
  const uint32_t wpr = static_cast<uint32_t>(K / WW), G = group == 0 ? 1u : static_cast<uint32_t>((K + group - 1) / group);
  const uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= static_cast<uint32_t>(N) * wpr) return;
  const uint32_t n = idx / wpr, k0 = (idx - n * wpr) * WW;
  const int64_t gi = static_cast<int64_t>(n) * G + (group == 0 ? 0u : k0 / static_cast<uint32_t>(group));
  const float off = 8388608.f + (FMT == TERNARY ? 1.f : FMT == INT8 ? 128.f : (zero ? static_cast<float>(zero[gi]) : 8.f));
  const float s = scale[gi];
  float w[WW];
  decode_word<FMT>(q[idx], off, w);
  alignas(16) T o[WW];
#pragma unroll
  for (int i = 0; i < WW; ++i) o[i] = from_f32<T>(w[i] * s);
  constexpr int VECS = WW * sizeof(T) / 16;
  if constexpr (VECS >= 1) {
#pragma unroll
    for (int v = 0; v < VECS; ++v) reinterpret_cast<uint4*>(out + static_cast<int64_t>(n) * K + k0)[v] = reinterpret_cast<const uint4*>(o)[v];
  } else {
#pragma unroll
    for (int i = 0; i < WW; ++i) out[static_cast<int64_t>(n) * K + k0 + i] = o[i];
  }
}

template <int FMT>
bool try_dequantize_vec(const uint8_t* q, const float* scale, const uint8_t* zero, int64_t N, int64_t K, int64_t group,
                        void* out, int dtype, cudaStream_t s) {
  constexpr int WW = 4 * Codes<FMT>::WPB;
  const int64_t total = N * K / WW;
  if (K % WW || (group && group % WW) || reinterpret_cast<uintptr_t>(q) % 4 || reinterpret_cast<uintptr_t>(out) % 16 ||
      total >= (1LL << 32) - 256)
    return false;
  const unsigned blocks = static_cast<unsigned>((total + 255) / 256);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_vec_kernel<FMT, T><<<blocks, 256, 0, s>>>(reinterpret_cast<const uint32_t*>(q), scale, zero, N, K,
                                                         group, static_cast<T*>(out));
  });
  return true;
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
