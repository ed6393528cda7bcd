"""Quantize, dequantize and the quantized linear product, on CPU and CUDA tensors.

`linear` is the torch custom op `bitkernel::linear` (with a fake implementation,
so it traces under torch.compile and can be captured in CUDA graphs: it never
synchronises and allocates only through torch).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._lib import C, require_cuda
from .formats import (
    DTYPE_CODES,
    FORMAT_CODES,
    WEIGHTS_PER_BYTE,
    QuantizedWeight,
    check_shape,
    num_groups,
)

# Up to this many rows (tokens) the product is bound by reading the weights.
SMALL_M = 16
# From this many rows on, the CPU path expands the weights and uses torch's BLAS.
CPU_DENSE_M = 64
_FORMAT_NAMES = {v: k for k, v in FORMAT_CODES.items()}


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def quantize(
    weight: torch.Tensor,
    fmt: str,
    group_size: int = 0,
    symmetric: bool = True,
    scale: Optional[torch.Tensor] = None,
    zero: Optional[torch.Tensor] = None,
) -> QuantizedWeight:
    """Packs a [N, K] weight into `fmt` ("ternary", "int8" or "int4").

    Without `scale`, the format's default rule sets it: absmean per group for
    ternary, absmax / 127 for int8, absmax / 7 (symmetric) or min/max with a
    zero point (asymmetric) for int4. With `scale` (float32 [N, groups], from a
    calibration method) only the codes are computed. CPU and CUDA give
    bit-identical results.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
    n, k = weight.shape
    check_shape(fmt, k, group_size)
    if fmt != "int4" and not symmetric:
        raise ValueError(f"the {fmt} format is symmetric only")
    dev = weight.device
    w = weight.detach().to(torch.float32).contiguous()
    g = num_groups(k, group_size)
    compute = scale is None
    if compute:
        scale = torch.empty(n, g, dtype=torch.float32, device=dev)
        zero = None if symmetric else torch.empty(n, g, dtype=torch.uint8, device=dev)
    else:
        scale = scale.to(device=dev, dtype=torch.float32).reshape(n, g).contiguous().clone()
        if not symmetric:
            if zero is None:
                raise ValueError("asymmetric int4 with a given scale needs its zero points too")
            zero = zero.to(device=dev, dtype=torch.uint8).reshape(n, g).contiguous().clone()
    qweight = torch.empty(n, k // WEIGHTS_PER_BYTE[fmt], dtype=torch.uint8, device=dev)
    args = (FORMAT_CODES[fmt], _ptr(w), n, k, group_size, symmetric, compute, _ptr(scale), _ptr(zero), _ptr(qweight))
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            require_cuda().quantize_cuda(*args, _stream(dev))
    elif dev.type == "cpu":
        C.quantize_cpu(*args)
    else:
        raise ValueError(f"bitkernel runs on CPU and CUDA tensors, got device {dev}")
    if fmt == "int8":
        qweight = qweight.view(torch.int8)
    return QuantizedWeight(fmt, qweight, scale, zero, k, group_size)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight a QuantizedWeight stands for, in `dtype`."""
    qw.validate()
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dequantize gives float16, bfloat16 or float32, not {dtype}")
    dev = qw.qweight.device
    out = torch.empty(qw.out_features, qw.in_features, dtype=dtype, device=dev)
    args = (
        FORMAT_CODES[qw.fmt],
        _ptr(qw.qweight),
        _ptr(qw.scale),
        _ptr(qw.zero),
        qw.out_features,
        qw.in_features,
        qw.group_size,
        _ptr(out),
        DTYPE_CODES[dtype],
    )
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            require_cuda().dequantize_cuda(*args, _stream(dev))
    else:
        C.dequantize_cpu(*args)
    return out


def _check_linear(x, qweight, scale, zero, bias, fmt, group_size, act_int8) -> tuple[str, int, int]:
    if fmt not in _FORMAT_NAMES:
        raise ValueError(f"unknown format code {fmt}")
    name = _FORMAT_NAMES[fmt]
    k = x.shape[-1]
    qw = QuantizedWeight(name, qweight, scale, zero, k, group_size)
    try:
        qw.validate()
    except ValueError as exc:
        raise ValueError(f"bitkernel.linear: x has {k} features but the weight does not match: {exc}") from None
    if x.device != qweight.device:
        raise ValueError(
            f"bitkernel.linear: x is on {x.device} but the weight is on {qweight.device}; move them together"
        )
    allowed = (torch.float16, torch.bfloat16) if x.device.type == "cuda" else tuple(DTYPE_CODES)
    if x.dtype not in allowed:
        raise TypeError(
            f"bitkernel.linear: x must be {' or '.join(str(d) for d in allowed)} on {x.device.type}, got {x.dtype}"
        )
    if bias is not None and (
        bias.dtype != x.dtype or bias.device != x.device or tuple(bias.shape) != (qw.out_features,)
    ):
        raise ValueError(
            f"bitkernel.linear: bias must be {x.dtype} of shape ({qw.out_features},) on {x.device}, "
            f"got {bias.dtype} {tuple(bias.shape)} on {bias.device}"
        )
    if act_int8 and (name == "int4" or group_size):
        raise ValueError("int8 activations need ternary or int8 weights with one scale per row (group_size=0)")
    return name, k, qw.out_features


@torch.library.custom_op("bitkernel::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    fmt: int,
    group_size: int,
    act_int8: bool,
) -> torch.Tensor:
    _, k, n = _check_linear(x, qweight, scale, zero, bias, fmt, group_size, act_int8)
    x2 = x.reshape(-1, k).contiguous()  # non-contiguous inputs are copied, never rejected
    m = x2.shape[0]
    dt = DTYPE_CODES[x.dtype]
    dev = x.device
    # The arguments every product kernel takes first (C++ order: x, then the weight, then the bias).
    common = (fmt, _ptr(x2), dt, m, k, _ptr(qweight), _ptr(scale), _ptr(zero), group_size, n, _ptr(bias))
    if dev.type != "cuda":
        if m >= CPU_DENSE_M and not act_int8:
            # Compute-bound on the CPU too: expand the weights once and let torch's BLAS multiply.
            w = dequantize(QuantizedWeight(_FORMAT_NAMES[fmt], qweight, scale, zero, k, group_size))
            y = torch.nn.functional.linear(x2.float(), w, None if bias is None else bias.float())
            return y.to(x.dtype).reshape(*x.shape[:-1], n)
        y = torch.empty(m, n, dtype=x.dtype, device=dev)
        C.linear_cpu(*common, act_int8, _ptr(y))
        return y.reshape(*x.shape[:-1], n)
    lib = require_cuda()
    with torch.cuda.device(dev):
        stream = _stream(dev)
        y = torch.empty(m, n, dtype=x.dtype, device=dev)
        if act_int8:
            xq = torch.empty(m, -(-k // 64) * 64, dtype=torch.int8, device=dev)
            xs = torch.empty(m, dtype=torch.float32, device=dev)
            lib.quantize_act_cuda(_ptr(x2), dt, m, k, _ptr(xq), _ptr(xs), stream)
            lib.gemm_s8_cuda(
                fmt, _ptr(xq), _ptr(xs), m, k, _ptr(qweight), _ptr(scale), n, _ptr(bias), dt, _ptr(y), stream
            )
        elif 0 < m <= SMALL_M and lib.gemv_tc_cuda(*common, _ptr(y), stream):
            pass  # memory-bound: packed weights streamed once into tensor cores
        elif 0 < m <= lib.GEMV_MAX_M:
            lib.gemv_cuda(*common, _ptr(y), stream)  # formats and shapes the tensor-core kernel does not take
        else:  # compute-bound: expand the weights to 16 bits for cuBLAS
            w = torch.empty(n, k, dtype=x.dtype, device=dev)
            lib.dequantize_cuda(fmt, _ptr(qweight), _ptr(scale), _ptr(zero), n, k, group_size, _ptr(w), dt, stream)
            y = torch.nn.functional.linear(x2, w, bias)
    return y.reshape(*x.shape[:-1], n)


@_linear_op.register_fake
def _linear_fake(x, qweight, scale, zero, bias, fmt, group_size, act_int8):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def linear(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
    act_int8: bool = False,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x [..., K] in float16 or bfloat16 (float32 too on CPU).

    `act_int8` quantizes each row of x to int8 inside the op (W8A8, W1.58A8);
    it needs ternary or int8 weights with one scale per row. x may be
    non-contiguous (it is copied); the result has x's dtype and device.
    """
    return _linear_op(x, qw.qweight, qw.scale, qw.zero, bias, FORMAT_CODES[qw.fmt], qw.group_size, act_int8)
