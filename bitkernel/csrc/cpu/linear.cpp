// CPU linear: decode a block of weight rows once, then reuse it for every row
// of x. The dot products are plain loops that GCC vectorises; target_clones
// compiles them for AVX-512, AVX2 and baseline x86-64 and picks one at load
// time, so one binary is fast on any x86-64 CPU.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "kernels.h"
#include "quant_rules.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BK_CLONES __attribute__((target_clones("arch=icelake-server", "arch=haswell", "default")))
#else
#define BK_CLONES
#endif

namespace bitkernel {
namespace {

constexpr int64_t kRowBlock = 16;

BK_CLONES float dot_f32(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

BK_CLONES int32_t dot_s8(const int8_t* a, const int8_t* b, int64_t n) {
  int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += static_cast<int16_t>(a[i]) * static_cast<int16_t>(b[i]);
  return acc;
}

// Per-token int8 quantization, the same rule as the CUDA kernel: s = absmax / 127.
void quantize_rows_s8(const float* x, int64_t M, int64_t K, int8_t* xq, float* xs) {
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const float s = absmax(x + m * K, K) / 127.f;
    xs[m] = s;
    for (int64_t k = 0; k < K; ++k) xq[m * K + k] = int8_code(x[m * K + k], s);
  }
}

}  // namespace

const char* cpu_features() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni")) return "avx512vnni";
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2")) return "avx2";
  return "x86-64";
#else
  return "generic";
#endif
}

void linear_cpu(int fmt, const void* x, int dtype, int64_t M, int64_t K, const uint8_t* q,
                const float* scale, const uint8_t* zero, int64_t group, int64_t N, const void* bias,
                bool act_int8, void* y) {
  std::vector<float> xf(static_cast<size_t>(M * K));
  for (int64_t i = 0; i < M * K; ++i) xf[i] = load_as_f32(x, dtype, i);
  std::vector<int8_t> xq;
  std::vector<float> xs;
  if (act_int8) {
    xq.resize(static_cast<size_t>(M * K));
    xs.resize(static_cast<size_t>(M));
    quantize_rows_s8(xf.data(), M, K, xq.data(), xs.data());
  }
  const int64_t rb = packed_row_bytes(fmt, K);
  const int64_t nblocks = (N + kRowBlock - 1) / kRowBlock;

#pragma omp parallel
  {
    std::vector<float> wf;
    std::vector<int8_t> ws8;
    if (act_int8) ws8.resize(static_cast<size_t>(kRowBlock * K));
    else wf.resize(static_cast<size_t>(kRowBlock * K));
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t n0 = blk * kRowBlock, nb = std::min(kRowBlock, N - n0);
      if (act_int8) {
        // Only per-row scales reach here (checked by the binding): decode raw codes.
        for (int64_t j = 0; j < nb; ++j) {
          const uint8_t* row = q + (n0 + j) * rb;
          int8_t* dst = ws8.data() + j * K;
          if (fmt == TERNARY) {
            for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<int8_t>(((row[k / 4] >> (2 * (k % 4))) & 3) - 1);
          } else {
            std::copy(reinterpret_cast<const int8_t*>(row), reinterpret_cast<const int8_t*>(row) + K, dst);
          }
        }
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t j = 0; j < nb; ++j) {
            const int64_t n = n0 + j;
            float v = static_cast<float>(dot_s8(xq.data() + m * K, ws8.data() + j * K, K)) * xs[m] * scale[n];
            if (bias) v += load_as_f32(bias, dtype, n);
            store_from_f32(y, dtype, m * N + n, v);
          }
        }
      } else {
        dequantize_cpu(fmt, q + n0 * rb, scale + n0 * groups_per_row(K, group),
                       zero ? zero + n0 * groups_per_row(K, group) : nullptr, nb, K, group, wf.data(), F32);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t j = 0; j < nb; ++j) {
            const int64_t n = n0 + j;
            float v = dot_f32(xf.data() + m * K, wf.data() + j * K, K);
            if (bias) v += load_as_f32(bias, dtype, n);
            store_from_f32(y, dtype, m * N + n, v);
          }
        }
      }
    }
  }
}

}  // namespace bitkernel
