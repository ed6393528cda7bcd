// Canonical packing and unpacking on the GPU. Quantization runs one thread per
// (row, scale group) so each scale is reduced in the same sequential order as
// on the CPU: packing is bit-identical across devices. It runs once per
// conversion, so its speed hardly matters; dequantization is on the hot path of
// the large-M weight-only product and is a plain bandwidth-bound stream.
#include <string>

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
    if (fmt == TERNARY) {
      s = absmean_scale(wr + k0, len);
    } else if (fmt == INT8) {
      s = absmax(wr + k0, len) / 127.f;
    } else if (symmetric) {
      s = absmax(wr + k0, len) / 7.f;
    } else {
      float z;
      int4_asym_params(wr + k0, len, &s, &z);
      zero[idx] = static_cast<uint8_t>(z);
    }
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
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_kernel<T><<<(total + 255) / 256, 256, 0, as_stream(stream)>>>(
        fmt, q, scale, zero, N, K, group, static_cast<T*>(out));
  });
  check_launch("dequantize");
}

}  // namespace bitkernel
