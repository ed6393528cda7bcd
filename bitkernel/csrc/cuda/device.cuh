// Device helpers shared by the CUDA kernels: element conversion and launch checks.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>

#include "common.h"

namespace bitkernel {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }

// The power of two 2^e as a float, e in [-126, 127] (exponent bits only: exact, no libm).
__device__ __forceinline__ float pow2(int e) { return __uint_as_float(static_cast<uint32_t>(e + 127) << 23); }

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// The current device, its compute capability and SM count: the attributes are read from the
// runtime once per device, not on every launch.
struct DeviceInfo {
  int index = 0, major = 0, minor = 0, sms = 0;
  bool has_mma16816() const { return major >= 8; }  // the mma.m16n8k16 kernels (sm_80+)
};
// Devices with per-device caches of launch parameters (a larger index is queried every call).
constexpr int kMaxDevices = 64;
inline DeviceInfo current_device() {
  static std::atomic<int> major[kMaxDevices], minor[kMaxDevices], sms[kMaxDevices];  // major 0: not read yet
  DeviceInfo d;
  cudaGetDevice(&d.index);
  const bool cached = d.index >= 0 && d.index < kMaxDevices;
  if (cached && (d.major = major[d.index].load(std::memory_order_acquire)) > 0) {
    d.minor = minor[d.index].load(std::memory_order_relaxed);
    d.sms = sms[d.index].load(std::memory_order_relaxed);
    return d;
  }
  cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, d.index);
  cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, d.index);
  cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, d.index);
  if (cached) {
    minor[d.index].store(d.minor, std::memory_order_relaxed);
    sms[d.index].store(d.sms, std::memory_order_relaxed);
    major[d.index].store(d.major, std::memory_order_release);
  }
  return d;
}

// Blocks of `kernel` (`threads` threads, `smem` bytes of dynamic shared memory) resident per SM of device dev,
// or `fallback` where the runtime cannot say. The answer is kept in `cache`, one array per kernel instantiation
// (its caller's static), per device: the occupancy query is host work on every launch otherwise.
template <typename Kernel>
int blocks_per_sm(std::atomic<int> (&cache)[kMaxDevices], int dev, Kernel kernel, int threads, size_t smem,
                  int fallback) {
  std::atomic<int>* slot = dev >= 0 && dev < kMaxDevices ? &cache[dev] : nullptr;
  if (slot) {
    const int v = slot->load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) != cudaSuccess) {
    cudaGetLastError();  // an answer, not a failure of the caller's launch
    blocks = 0;
  }
  const int v = blocks > 0 ? blocks : fallback;
  if (slot) slot->store(v, std::memory_order_relaxed);
  return v;
}

// Calls f(T{}) with T the device type of a dtype code.
template <typename F> void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case F16: f(__half{}); break;
    case BF16: f(__nv_bfloat16{}); break;
    case F32: f(float{}); break;
    default: throw Error("bitkernel: unknown dtype code");
  }
}

}  // namespace bitkernel
