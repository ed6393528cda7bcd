// Entry points of the CPU and CUDA kernels. Shapes: x [M, K] row-major, packed
// weights [N, K / weights_per_byte], scale float32 [N, groups], zero uint8
// [N, groups] (asymmetric INT4 only, else null), y [M, N]. group == 0 means one
// scale per output row. The binding validates arguments before calling these.
#pragma once
#include <cstdint>

namespace bitkernel {

// Writes the canonical packed weights; with compute_scale the format's default
// scale rule (absmean for ternary, absmax for INT8/INT4) fills scale (and zero).
void quantize_cpu(int fmt, const float* w, int64_t N, int64_t K, int64_t group, bool symmetric,
                  bool compute_scale, float* scale, uint8_t* zero, uint8_t* q);
void dequantize_cpu(int fmt, const uint8_t* q, const float* scale, const uint8_t* zero, int64_t N,
                    int64_t K, int64_t group, void* out, int dtype);
// y = x @ W.T (+ bias); act_int8 quantizes each row of x to int8 first (W8A8 / W1.58A8).
void linear_cpu(int fmt, const void* x, int dtype, int64_t M, int64_t K, const uint8_t* q,
                const float* scale, const uint8_t* zero, int64_t group, int64_t N, const void* bias,
                bool act_int8, void* y);
const char* cpu_features();

#ifdef BITKERNEL_WITH_CUDA
void quantize_cuda(int fmt, const float* w, int64_t N, int64_t K, int64_t group, bool symmetric,
                   bool compute_scale, float* scale, uint8_t* zero, uint8_t* q, uintptr_t stream);
void dequantize_cuda(int fmt, const uint8_t* q, const float* scale, const uint8_t* zero, int64_t N,
                     int64_t K, int64_t group, void* out, int dtype, uintptr_t stream);
// Weight-only product for M <= kGemvMaxM on CUDA cores: streams the packed weights once.
// Serves INT8 and the ternary / INT4 shapes the tensor-core kernels below do not take.
constexpr int kGemvMaxM = 4;
void gemv_cuda(int fmt, const void* x, int dtype, int64_t M, int64_t K, const uint8_t* q,
               const float* scale, const uint8_t* zero, int64_t group, int64_t N, const void* bias,
               void* y, uintptr_t stream);
// Weight-only products for M <= 16 on tensor cores (sm_80+, K a multiple of 64, group 0
// or a multiple of 64), one per format (the binding's gemv_tc_cuda picks by format). Each
// returns false, doing nothing, for shapes it does not take; the caller then falls back to
// gemv_cuda (M <= kGemvMaxM) or the dense path.
// Ternary in the canonical layout, decoded in registers (cuda/gemv_ternary.cu):
// With xs (W1.58A8), x is first quantized per token: codes into xi [M, K] (x's dtype), scales
// into xs [M], multiplied into y; null xs and xi for 16-bit activations.
bool gemv_ternary_cuda(int fmt, const void* x, int dtype, int64_t M, int64_t K, const uint8_t* q,
                       const float* scale, const uint8_t* zero, int64_t group, int64_t N, const void* bias,
                       void* xi, float* xs, void* y, uintptr_t stream);
// The same product for M = 1 (group 0, K <= 16384) on integer tensor cores, x as integer
// digits (cuda/gemv_ternary_digits.cu); gemv_ternary_cuda tries it first, on arguments it has
// validated, on device dev with sms SMs. x is what the kernel reads (the codes xi with xs).
bool gemv_ternary_digits_cuda(const void* x, int dtype, int64_t M, int64_t K, const uint8_t* q, const float* scale,
                              int64_t group, int64_t N, const void* bias, const float* xs, void* y, uintptr_t stream,
                              int dev, int sms);
// INT4 (cuda/gemv_tc.cu):
bool gemv_tc_cuda(int fmt, const void* x, int dtype, int64_t M, int64_t K, const uint8_t* q,
                  const float* scale, const uint8_t* zero, int64_t group, int64_t N, const void* bias,
                  void* y, uintptr_t stream);
// Per-token int8 quantization of x [M, K]: scales into xs [M], the codes into xq [M, round_up(K, 64)]
// (zero padded) or, with xq null, as 16-bit floats of x's dtype into x16 [M, K] (for gemv_ternary_cuda).
void quantize_act_cuda(const void* x, int dtype, int64_t M, int64_t K, int8_t* xq, void* x16, float* xs,
                       uintptr_t stream);
// INT8 tensor-core product of quantized activations and ternary or INT8 weights.
void gemm_s8_cuda(int fmt, const int8_t* xq, const float* xs, int64_t M, int64_t K,
                  const uint8_t* q, const float* scale, int64_t N, const void* bias, int dtype,
                  void* y, uintptr_t stream);
// Ternary (group 0) times 16-bit x at large M on sm_90 (cuda/gemm_ternary_sm90.cu, built where the arch list
// has 90): the codes are decoded in registers into wgmma's A operand, no expanded copy of the weights. With
// accumulate, the product is added to y's contents. workspace: gemm_ternary_sm90_workspace_bytes(SM count)
// bytes: kSm90CountBytesPerSm of counts per SM, zero before the launch and left zero by it, then 128 KB of
// partial sums per SM. Launches sharing a workspace must not overlap. Returns false, having done nothing, for
// devices, dtypes or shapes it does not take, and where its busiest CTA would get fewer than min_ktiles
// k-tiles of 64 (the caller then expands the weights for cuBLAS); throws on a CUDA error.
#ifdef BITKERNEL_WITH_SM90A
constexpr int64_t kSm90CountBytesPerSm = 16;
int64_t gemm_ternary_sm90_workspace_bytes(int sms);
bool gemm_ternary_sm90_cuda(const void* x, int dtype, int64_t M, int64_t K, const uint8_t* q, const float* scale,
                            int64_t N, const void* bias, bool accumulate, void* y, void* workspace,
                            int64_t workspace_bytes, double min_ktiles, uintptr_t stream);
#endif
// FP8 e4m3 operands for torch._scaled_mm (W1.58A8 at large M on sm_89+, see cuda/fp8.cu).
// Whether this build has FP8 kernels for the current device (sm_89+ code in the image).
bool fp8_supported_cuda();
// Canonical ternary codes [N, K / 4] -> e4m3 {-1, 0, +1} [rows, ldo] (rows >= N, ldo >= K a
// multiple of 16, out 16-byte aligned); the padding rows and columns are zeros. No scales.
void ternary_to_fp8_cuda(const uint8_t* q, int64_t N, int64_t K, int64_t rows, uint8_t* out, int64_t ldo,
                         uintptr_t stream);
// Per-token e4m3 quantization of x [M, K] (row stride ldx elements) into out [M, ldo]
// (columns >= K zeroed) and scales [M]: s = max|x_m| / 448 (1 if 0), code = e4m3(x / s).
// Throws unless fp8_supported_cuda().
void quantize_rows_fp8_cuda(const void* x, int dtype, int64_t M, int64_t K, int64_t ldx, uint8_t* out, int64_t ldo,
                            float* scales, uintptr_t stream);
// Both of the above in one launch where the shapes and alignments allow (FLUX.1-dev's all do), else as the
// two calls: x8 [M, ldo] and scales from x, e4m3 weights [rows, ldw] from the codes of an N x K matrix.
// With t (non-null) a low-rank branch t @ up.T is folded into the GEMM's K (see cuda/fp8.cu, Fold): t [M, R]
// (row stride ldt) and up [N, R] in x's dtype, s the weights' row scales [N]; sw [rows] receives the GEMM's
// column scales. Returns false, having done nothing, where the fold does not apply (the caller then runs the
// branch separately); true otherwise.
bool fp8_operands_cuda(const void* x, int dtype, int64_t M, int64_t K, int64_t ldx, uint8_t* x8, int64_t ldo,
                       float* scales, const uint8_t* q, int64_t N, int64_t rows, uint8_t* w8, int64_t ldw,
                       const void* t, int64_t R, int64_t ldt, const void* up, const float* s, float* sw,
                       uintptr_t stream);
// Throws bitkernel::Error naming the CUDA error after a launch.
void check_launch(const char* what);
#endif

}  // namespace bitkernel
