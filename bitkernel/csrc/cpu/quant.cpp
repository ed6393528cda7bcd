// Canonical packing on the CPU. The per-row loops run in parallel; the rules
// themselves live in quant_rules.h, shared with the CUDA side.
#include "common.h"
#include "kernels.h"
#include "quant_rules.h"

namespace bitkernel {

void quantize_cpu(int fmt, const float* w, int64_t N, int64_t K, int64_t group, bool symmetric,
                  bool compute_scale, float* scale, uint8_t* zero, uint8_t* q) {
  const int64_t G = groups_per_row(K, group), gs = group == 0 ? K : group;
  const int64_t rb = packed_row_bytes(fmt, K);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* wr = w + n * K;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * gs, len = (k0 + gs <= K ? gs : K - k0);
      float& s = scale[n * G + g];
      if (compute_scale) {
        float z;
        default_group_params(fmt, symmetric, wr + k0, len, &s, &z);
        if (fmt == INT4 && !symmetric) zero[n * G + g] = static_cast<uint8_t>(z);
      }
      const float z = (fmt == INT4 && !symmetric) ? static_cast<float>(zero[n * G + g]) : 8.f;
      for (int64_t k = k0; k < k0 + len; ++k) {
        if (fmt == TERNARY) {
          uint8_t& b = q[n * rb + k / 4];
          if (k % 4 == 0) b = 0;
          b |= static_cast<uint8_t>(ternary_code(wr[k], s) << (2 * (k % 4)));
        } else if (fmt == INT8) {
          reinterpret_cast<int8_t*>(q)[n * rb + k] = int8_code(wr[k], s);
        } else {
          uint8_t& b = q[n * rb + k / 2];
          if (k % 2 == 0) b = 0;
          b |= static_cast<uint8_t>(int4_code(wr[k], s, z) << (4 * (k % 2)));
        }
      }
    }
  }
}

void dequantize_cpu(int fmt, const uint8_t* q, const float* scale, const uint8_t* zero, int64_t N,
                    int64_t K, int64_t group, void* out, int dtype) {
  const int64_t G = groups_per_row(K, group), gs = group == 0 ? K : group;
  const int64_t rb = packed_row_bytes(fmt, K);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = k / gs;
      const float s = scale[n * G + g];
      float v;
      if (fmt == TERNARY) {
        v = static_cast<float>(static_cast<int>((q[n * rb + k / 4] >> (2 * (k % 4))) & 3) - 1);
      } else if (fmt == INT8) {
        v = static_cast<float>(reinterpret_cast<const int8_t*>(q)[n * rb + k]);
      } else {
        const int u = (q[n * rb + k / 2] >> (4 * (k % 2))) & 15;
        v = static_cast<float>(u - (zero ? zero[n * G + g] : 8));
      }
      store_from_f32(out, dtype, n * K + k, v * s);
    }
  }
}

}  // namespace bitkernel
