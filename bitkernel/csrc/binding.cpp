// The Python binding: raw device pointers, shapes, dtype codes and the CUDA
// stream in, nothing out. Tensors never cross this boundary, which is why the
// module links neither libtorch nor libc10 and one build serves every torch.
// Argument validation with user-facing messages lives in the Python layer.
#include <pybind11/pybind11.h>

#include <string>

#include "common.h"
#include "kernels.h"
#ifdef BITKERNEL_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;
using namespace bitkernel;

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

namespace {

void check_format(int fmt, int64_t K, int64_t group) {
  check(fmt == TERNARY || fmt == INT8 || fmt == INT4, "bitkernel: unknown format code " + std::to_string(fmt));
  check(K % weights_per_byte(fmt) == 0, "bitkernel: K must be a multiple of the packing");
  check(group >= 0, "bitkernel: group must be >= 0");
}

py::dict info() {
  py::dict d;
  d["version"] = BITKERNEL_VERSION;
  d["cpu_features"] = cpu_features();
#ifdef BITKERNEL_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = BITKERNEL_CUDA_ARCHS;
  int rt = 0, drv = 0, count = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  d["cuda_runtime"] = rt;
  d["cuda_driver"] = drv;
  py::list gpus;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    count = 0;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    py::dict g;
    g["name"] = std::string(p.name);
    g["capability"] = py::make_tuple(p.major, p.minor);
    g["memory_bytes"] = static_cast<uint64_t>(p.totalGlobalMem);
    gpus.append(g);
  }
  d["gpus"] = gpus;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
  d["gpus"] = py::list();
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bitkernel compiled kernels (pointer-level API; use bitkernel.functional)";
  py::register_exception<Error>(m, "KernelError", PyExc_RuntimeError);
  m.def("info", &info);

  m.def("quantize_cpu", [](int fmt, uintptr_t w, int64_t N, int64_t K, int64_t group, bool sym, bool compute,
                           uintptr_t scale, uintptr_t zero, uintptr_t q) {
    check_format(fmt, K, group);
    quantize_cpu(fmt, ptr<const float>(w), N, K, group, sym, compute, ptr<float>(scale), ptr<uint8_t>(zero), ptr<uint8_t>(q));
  }, py::call_guard<py::gil_scoped_release>());
  m.def("dequantize_cpu", [](int fmt, uintptr_t q, uintptr_t scale, uintptr_t zero, int64_t N, int64_t K,
                             int64_t group, uintptr_t out, int dtype) {
    check_format(fmt, K, group);
    dequantize_cpu(fmt, ptr<const uint8_t>(q), ptr<const float>(scale), ptr<const uint8_t>(zero), N, K, group, ptr<void>(out), dtype);
  }, py::call_guard<py::gil_scoped_release>());
  m.def("linear_cpu", [](int fmt, uintptr_t x, int dtype, int64_t M, int64_t K, uintptr_t q, uintptr_t scale,
                         uintptr_t zero, int64_t group, int64_t N, uintptr_t bias, bool act_int8, uintptr_t y) {
    check_format(fmt, K, group);
    linear_cpu(fmt, ptr<const void>(x), dtype, M, K, ptr<const uint8_t>(q), ptr<const float>(scale),
               ptr<const uint8_t>(zero), group, N, ptr<const void>(bias), act_int8, ptr<void>(y));
  }, py::call_guard<py::gil_scoped_release>());

#ifdef BITKERNEL_WITH_CUDA
  m.def("quantize_cuda", [](int fmt, uintptr_t w, int64_t N, int64_t K, int64_t group, bool sym, bool compute,
                            uintptr_t scale, uintptr_t zero, uintptr_t q, uintptr_t stream) {
    check_format(fmt, K, group);
    quantize_cuda(fmt, ptr<const float>(w), N, K, group, sym, compute, ptr<float>(scale), ptr<uint8_t>(zero), ptr<uint8_t>(q), stream);
  });
  m.def("dequantize_cuda", [](int fmt, uintptr_t q, uintptr_t scale, uintptr_t zero, int64_t N, int64_t K,
                              int64_t group, uintptr_t out, int dtype, uintptr_t stream) {
    check_format(fmt, K, group);
    dequantize_cuda(fmt, ptr<const uint8_t>(q), ptr<const float>(scale), ptr<const uint8_t>(zero), N, K, group, ptr<void>(out), dtype, stream);
  });
  m.attr("GEMV_MAX_M") = kGemvMaxM;
  m.def("gemv_cuda", [](int fmt, uintptr_t x, int dtype, int64_t M, int64_t K, uintptr_t q, uintptr_t scale,
                        uintptr_t zero, int64_t group, int64_t N, uintptr_t bias, uintptr_t y, uintptr_t stream) {
    check_format(fmt, K, group);
    gemv_cuda(fmt, ptr<const void>(x), dtype, M, K, ptr<const uint8_t>(q), ptr<const float>(scale),
              ptr<const uint8_t>(zero), group, N, ptr<const void>(bias), ptr<void>(y), stream);
  });
  // Small M (<= 16) on tensor cores: ternary through gemv_ternary_cuda (every M, canonical layout
  // decoded in registers), INT4 through gemv_tc_cuda. xi, xs (ternary only, 0 for none): W1.58A8,
  // x quantized per token into them first (gemv_ternary_cuda). False: not taken, nothing launched,
  // the caller falls back (gemv_cuda for M <= GEMV_MAX_M, else the dense path).
  m.def("gemv_tc_cuda", [](int fmt, uintptr_t x, int dtype, int64_t M, int64_t K, uintptr_t q, uintptr_t scale,
                           uintptr_t zero, int64_t group, int64_t N, uintptr_t bias, uintptr_t xi, uintptr_t xs,
                           uintptr_t y, uintptr_t stream) {
    check_format(fmt, K, group);
    if (fmt == TERNARY)
      return gemv_ternary_cuda(fmt, ptr<const void>(x), dtype, M, K, ptr<const uint8_t>(q), ptr<const float>(scale),
                               ptr<const uint8_t>(zero), group, N, ptr<const void>(bias), ptr<void>(xi),
                               ptr<float>(xs), ptr<void>(y), stream);
    check(xs == 0, "bitkernel: activation quantization in the small-M kernel is for ternary weights only");
    return gemv_tc_cuda(fmt, ptr<const void>(x), dtype, M, K, ptr<const uint8_t>(q), ptr<const float>(scale),
                        ptr<const uint8_t>(zero), group, N, ptr<const void>(bias), ptr<void>(y), stream);
  });
  m.def("quantize_act_cuda", [](uintptr_t x, int dtype, int64_t M, int64_t K, uintptr_t xq, uintptr_t xs, uintptr_t stream) {
    quantize_act_cuda(ptr<const void>(x), dtype, M, K, ptr<int8_t>(xq), nullptr, ptr<float>(xs), stream);
  });
  m.def("gemm_s8_cuda", [](int fmt, uintptr_t xq, uintptr_t xs, int64_t M, int64_t K, uintptr_t q, uintptr_t scale,
                           int64_t N, uintptr_t bias, int dtype, uintptr_t y, uintptr_t stream) {
    check_format(fmt, K, 0);
    gemm_s8_cuda(fmt, ptr<const int8_t>(xq), ptr<const float>(xs), M, K, ptr<const uint8_t>(q), ptr<const float>(scale),
                 N, ptr<const void>(bias), dtype, ptr<void>(y), stream);
  });
#ifdef BITKERNEL_WITH_SM90A
  m.def("gemm_ternary_sm90_workspace_bytes", &gemm_ternary_sm90_workspace_bytes);
  m.attr("SM90_COUNT_BYTES_PER_SM") = kSm90CountBytesPerSm;
  m.def("gemm_ternary_sm90_cuda", [](uintptr_t x, int dtype, int64_t M, int64_t K, uintptr_t q, uintptr_t scale,
                                     int64_t N, uintptr_t bias, bool accumulate, uintptr_t y, uintptr_t workspace,
                                     int64_t workspace_bytes, double min_ktiles, uintptr_t stream) {
    return gemm_ternary_sm90_cuda(ptr<const void>(x), dtype, M, K, ptr<const uint8_t>(q), ptr<const float>(scale), N,
                                  ptr<const void>(bias), accumulate, ptr<void>(y), ptr<void>(workspace),
                                  workspace_bytes, min_ktiles, stream);
  });
#endif
  m.def("fp8_supported", &fp8_supported_cuda);
  m.def("ternary_to_fp8_cuda", [](uintptr_t q, int64_t N, int64_t K, int64_t rows, uintptr_t out, int64_t ldo,
                                  uintptr_t stream) {
    check_format(TERNARY, K, 0);
    ternary_to_fp8_cuda(ptr<const uint8_t>(q), N, K, rows, ptr<uint8_t>(out), ldo, stream);
  });
  m.def("quantize_rows_fp8_cuda", [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t ldx, uintptr_t out,
                                     int64_t ldo, uintptr_t scales, uintptr_t stream) {
    quantize_rows_fp8_cuda(ptr<const void>(x), dtype, M, K, ldx, ptr<uint8_t>(out), ldo, ptr<float>(scales), stream);
  });
  m.def("fp8_operands_cuda", [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t ldx, uintptr_t x8, int64_t ldo,
                                uintptr_t scales, uintptr_t q, int64_t N, int64_t rows, uintptr_t w8, int64_t ldw,
                                uintptr_t t, int64_t R, int64_t ldt, uintptr_t up, uintptr_t s, uintptr_t sw,
                                uintptr_t stream) {
    check_format(TERNARY, K, 0);
    return fp8_operands_cuda(ptr<const void>(x), dtype, M, K, ldx, ptr<uint8_t>(x8), ldo, ptr<float>(scales),
                             ptr<const uint8_t>(q), N, rows, ptr<uint8_t>(w8), ldw, ptr<const void>(t), R, ldt,
                             ptr<const void>(up), ptr<const float>(s), ptr<float>(sw), stream);
  });
#endif
}
