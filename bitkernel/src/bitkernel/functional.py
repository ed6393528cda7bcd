"""Quantize, dequantize and the quantized linear product, on CPU and CUDA tensors.

`linear` is the torch op `bitkernel::linear` (with a fake implementation, so it
traces under torch.compile and can be captured in CUDA graphs: it never
synchronises and allocates only through torch; no backward: a gradient through
it is an error). Eagerly, on plain tensors that need no gradient, `linear` calls
the op's implementation without the dispatcher, whose host time a FLUX step pays
~500 times.

W1.58A8 on sm_89+ (Ada, Hopper and newer) with at least FP8_MIN_M rows runs as
an FP8 e4m3 GEMM (`torch._scaled_mm` with row-wise scales): ternary weights are
exact in e4m3 and FP8 tensor cores are ~4x faster than our int8 kernel there.
The activations then carry e4m3's 3 mantissa bits instead of int8's 7 (see
`linear`). `BITKERNEL_FP8=0` in the environment (read at import) or
`bitkernel.functional.FP8 = False` selects the int8 kernel everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
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

# Up to this many rows (tokens) the product is bound by reading the weights. It covers the
# CUDA-core GEMV's GEMV_MAX_M (4), which serves what the tensor-core kernel does not take.
SMALL_M = 16
# From this many rows on, the CPU path expands the weights and uses torch's BLAS.
CPU_DENSE_M = 64
_FORMAT_NAMES = {v: k for k, v in FORMAT_CODES.items()}

# W1.58A8 as FP8 on sm_89+ (module docstring). A switch for A/B measurements and a way out.
FP8: bool = os.environ.get("BITKERNEL_FP8", "1").strip().lower() not in ("0", "false", "off", "no")
# W1.58A8's FP8 path folds a low-rank branch of rank 8, 16, 24, ... into its GEMM (see _linear_fp8). A switch for
# A/B measurements: `BITKERNEL_FP8_FOLD=0` in the environment (read at import) runs the branch apart.
FP8_FOLD: bool = os.environ.get("BITKERNEL_FP8_FOLD", "1").strip().lower() not in ("0", "false", "off", "no")
# W1.58A16 with more than SMALL_M rows on sm_90 runs bitkernel's own GEMM (wgmma on codes decoded in registers)
# instead of expanding the weights to 16 bits for cuBLAS, where the build has it (an arch list with 90). A switch
# for A/B measurements: `BITKERNEL_SM90_GEMM=0` in the environment (read at import) expands them everywhere.
SM90_GEMM: bool = os.environ.get("BITKERNEL_SM90_GEMM", "1").strip().lower() not in ("0", "false", "off", "no")
# ...where its busiest CTA gets at least this many k-tiles of 64: below, its fixed costs (a few us) outweigh the
# expansion it saves. H100, M = 512: 3072 x 3072 (~26 k-tiles a CTA) 0.52-0.59x of bf16 against 0.67x expanded,
# 3072 x 12288 (~98) 0.69-0.73x against 0.63x (bench/NOTES.md, session 16).
SM90_MIN_KTILES: float = 32.0
# From this many rows on W1.58A8 takes the FP8 path. Below, the int8 small-M path stays: the
# expansion of the weights to e4m3 (4x the packed bytes, written and read back) would dominate.
FP8_MIN_M = SMALL_M + 1
# torch._scaled_mm's use_fast_accum: Hopper's FP8 tensor cores keep the partial sums in their own
# reduced-precision accumulator over all of K instead of promoting them to fp32 every few k-steps.
# H200, FLUX.1-dev's M = 4608 shapes (bench/results/fp8_path_h200.md): 1.04-1.21x faster GEMMs, and the
# product's error against an fp64 product of the same e4m3 operands went from 1.66e-3 to 1.71e-3
# (K = 3072) and 1.92e-3 (K = 15360), against ~3e-2 from rounding the activations to e4m3 at all.
FP8_FAST_ACCUM: bool = True
# torch._scaled_mm needs K and N multiples of 16; the FP8 operands are zero padded to it.
_FP8_ALIGN = 16
# Per device index: why torch._scaled_mm refused row-wise scaling (the int8 kernel then serves it).
_fp8_failed: dict[int, str] = {}
# Per (device index, dtype): the output plan torch._scaled_mm accepted.
_fp8_plans: dict[tuple[int, torch.dtype], tuple[torch.dtype, bool]] = {}


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return _raw_stream(device.index)


# The current stream's handle: torch's private getter (what inductor's generated code calls) is ~10x cheaper
# in host time than the public one, and the op asks for it on every call.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream
)


# The current device's index: torch's private getter, without torch.cuda.current_device()'s initialisation
# check (~2 us a call on the H200 machine); every caller holds a CUDA tensor, so CUDA is initialised.
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def _on(dev: torch.device) -> contextlib.AbstractContextManager:
    """torch.cuda.device(dev), or nothing where dev is already current (the switch costs host time)."""
    return _NO_SWITCH if dev.index == _current_device() else torch.cuda.device(dev)


_NO_SWITCH = contextlib.nullcontext()


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
        with _on(dev):
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
    if dev.type == "cuda":
        with _on(dev):
            require_cuda().dequantize_cuda(*_dequantize_args(qw, out), _stream(dev))
    else:
        C.dequantize_cpu(*_dequantize_args(qw, out))
    return out


def _dequantize_args(qw: QuantizedWeight, out: torch.Tensor) -> tuple:
    return (
        FORMAT_CODES[qw.fmt],
        _ptr(qw.qweight),
        _ptr(qw.scale),
        _ptr(qw.zero),
        qw.out_features,
        qw.in_features,
        qw.group_size,
        _ptr(out),
        DTYPE_CODES[out.dtype],
    )


def _check_linear(x, qweight, scale, zero, bias, fmt, group_size, act_int8) -> QuantizedWeight:
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
    return qw


def _linear_impl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    fmt: int,
    group_size: int,
    act_int8: bool,
    down: Optional[torch.Tensor],
    up: Optional[torch.Tensor],
) -> torch.Tensor:
    qw = _check_linear(x, qweight, scale, zero, bias, fmt, group_size, act_int8)
    k, n = qw.in_features, qw.out_features
    if bias is not None:
        bias = bias.contiguous()  # the kernels read it as a plain array
    if down is not None:  # the kernels read the branch in x's dtype
        down, up = _like(down, x), _like(up, x)
    x2 = x.reshape(-1, k)  # a view where it can be: the FP8 path reads strided rows in place
    m = x2.shape[0]
    dev = x.device
    y, fused = None, False
    if dev.type == "cuda" and _use_fp8(qw.fmt, group_size, act_int8, m, dev):
        y, fused = _linear_fp8(x2, qweight, scale, bias, down, up)
    if y is None:
        x2 = x2.contiguous()  # non-contiguous inputs are copied, never rejected
        y, fused = _linear_kernels(x2, qw, bias, act_int8, down, up)
    if down is not None and not fused:
        # In place on the op's own contiguous [M, N] (out of place, torch would copy y first), without the
        # reshapes add_lowrank needs for any leading dims: host time on every call.
        y.addmm_(torch.nn.functional.linear(x2, down), up.t())
    return y.reshape(*x.shape[:-1], n)


# The op, registered with the dispatcher directly (a Library with the implementation as its CPU and CUDA kernels)
# rather than through torch.library.custom_op, whose Python layers around the kernel cost ~45 us a call on an
# H100 machine's host (bench/NOTES.md, session 17): compiled code calls the op on every layer.
_LIBRARY = torch.library.Library("bitkernel", "DEF")
_LIBRARY.define(
    "linear(Tensor x, Tensor qweight, Tensor scale, Tensor? zero, Tensor? bias, int fmt, int group_size, "
    "bool act_int8, Tensor? down, Tensor? up) -> Tensor"
)
for _key in ("CPU", "CUDA"):
    _LIBRARY.impl("linear", _linear_impl, _key)
_linear_op = torch.ops.bitkernel.linear.default


def _no_backward(ctx, grad):
    raise RuntimeError(
        "bitkernel.linear has no backward: x, the bias or the low-rank branch needs a gradient through the quantized "
        "product. Detach them or run under torch.no_grad(); a branch to train goes in `lowrank` (bitkernel.nn: "
        "set_lora), which then runs as torch ops"
    )


# Without an autograd kernel, autograd's fallback would give no gradient and only warn. This one runs the forward
# (below autograd, and not at all under torch.inference_mode, as ComfyUI runs its nodes) and refuses the backward.
torch.library.register_autograd("bitkernel::linear", _no_backward)


def _linear_kernels(
    x2: torch.Tensor,
    qw: QuantizedWeight,
    bias: Optional[torch.Tensor],
    act_int8: bool,
    down: Optional[torch.Tensor],
    up: Optional[torch.Tensor],
) -> tuple[torch.Tensor, bool]:
    """([M, N], whether the branch is in it) from contiguous x2 [M, K] by bitkernel's kernels, or by cuBLAS on
    the expanded weights; above the small-M kernels the main product is added onto the branch's."""
    m, k, n = x2.shape[0], qw.in_features, qw.out_features
    fmt, qweight, scale, zero = FORMAT_CODES[qw.fmt], _ptr(qw.qweight), _ptr(qw.scale), _ptr(qw.zero)
    dev = x2.device
    dt = DTYPE_CODES[x2.dtype]
    # The arguments every product kernel takes first (C++ order: x, then the weight, then the bias).
    common = (fmt, _ptr(x2), dt, m, k, qweight, scale, zero, qw.group_size, n, _ptr(bias))
    if dev.type != "cuda":
        if m >= CPU_DENSE_M and not act_int8:
            # Compute-bound on the CPU too: expand the weights once and let torch's BLAS multiply.
            w = dequantize(qw)
            y = torch.nn.functional.linear(x2.float(), w, None if bias is None else bias.float()).to(x2.dtype)
        else:
            y = torch.empty(m, n, dtype=x2.dtype, device=dev)
            C.linear_cpu(*common, act_int8, _ptr(y))
        return y, False
    lib = require_cuda()
    with _on(dev):
        stream = _stream(dev)
        small = 0 < m <= SMALL_M  # memory-bound: the packed weights are streamed once
        y = torch.empty(m, n, dtype=x2.dtype, device=dev) if act_int8 or small else None
        if act_int8:
            xs = torch.empty(m, dtype=torch.float32, device=dev)
            # Few rows are bound by reading the weights: the 16-bit small-M kernel on the int8 codes (exact in
            # fp16 and bf16, and so are their sums with ternary weights: fp32, |sum| <= 127 K), which multiplies
            # by the token's scale in its epilogue, is several times faster than the int8 GEMM's tiles. Two
            # launches, both from the kernel's entry point: the codes in x's dtype into xi, then the product.
            xi = torch.empty(m, k, dtype=x2.dtype, device=dev) if small and qw.fmt == "ternary" else None
            if xi is None or not lib.gemv_tc_cuda(*common, _ptr(xi), _ptr(xs), _ptr(y), stream):
                xq = torch.empty(m, _round_up(k, 64), dtype=torch.int8, device=dev)
                lib.quantize_act_cuda(_ptr(x2), dt, m, k, _ptr(xq), _ptr(xs), stream)
                lib.gemm_s8_cuda(fmt, _ptr(xq), _ptr(xs), m, k, qweight, scale, n, _ptr(bias), dt, _ptr(y), stream)
        elif small and lib.gemv_tc_cuda(*common, 0, 0, _ptr(y), stream):
            pass  # into tensor cores
        elif small and m <= lib.GEMV_MAX_M:
            lib.gemv_cuda(*common, _ptr(y), stream)  # formats and shapes the tensor-core kernel does not take
        else:  # compute-bound
            # The branch's product is written first and the main product is added onto it in the GEMM's
            # epilogue: one more pass over [M, N] instead of the three of a separate sum. (Folding up @ down
            # into the expanded weight instead was measured slower: bench/NOTES.md, session 9.)
            base = None
            if down is not None:
                t = torch.nn.functional.linear(x2, down)
                base = torch.mm(t, up.t()) if bias is None else torch.addmm(bias, t, up.t())
            y = _gemm_sm90(lib, x2, qw, bias, base, stream)
            if y is None:  # expand the weights to 16 bits for cuBLAS (beta = 1 onto the branch)
                w = torch.empty(n, k, dtype=x2.dtype, device=dev)
                lib.dequantize_cuda(*_dequantize_args(qw, w), stream)
                y = torch.nn.functional.linear(x2, w, bias) if base is None else base.addmm_(x2, w.t())
            return y, True
    return y, False


# The sm_90 GEMM's workspace (the split tiles' counts, which every launch leaves zero, then their partial sums,
# ~128 KB per SM). Eager calls share one per (device index, stream): calls on a stream do not overlap. A call
# being captured into a CUDA graph gets its own, allocated in the capture (so the graph owns it and zeroes its
# counts on every replay), because graphs captured alike may be replayed at once on different streams.
_sm90_workspace: dict[tuple[int, int], torch.Tensor] = {}


@functools.cache
def _sm90_sms(index: int) -> int:
    """The SM count of CUDA device `index` if the sm_90 GEMM can run there (this build has its sm_90a image and
    the device is sm_90), else 0."""
    if not hasattr(C, "gemm_ternary_sm90_cuda") or _capability(index) != (9, 0):
        return 0
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm90_gemm_applies(dev: torch.device) -> bool:
    """Whether W1.58A16 above SMALL_M rows may run on bitkernel's sm_90 GEMM on `dev` (it still declines shapes
    it does not take, or with too little work: SM90_MIN_KTILES)."""
    return SM90_GEMM and dev.type == "cuda" and _sm90_sms(dev.index) > 0


def _sm90_ws(lib, dev: torch.device, stream: int) -> torch.Tensor:
    sms = _sm90_sms(dev.index)
    if torch.cuda.is_current_stream_capturing():
        ws = torch.empty(lib.gemm_ternary_sm90_workspace_bytes(sms), dtype=torch.uint8, device=dev)
        ws[: lib.SM90_COUNT_BYTES_PER_SM * sms].zero_()
        return ws
    ws = _sm90_workspace.get((dev.index, stream))
    if ws is None:
        ws = _sm90_workspace[(dev.index, stream)] = _zeros_outside_graph_pools(
            lib.gemm_ternary_sm90_workspace_bytes(sms), dev
        )
    return ws


def _zeros_outside_graph_pools(nbytes: int, dev: torch.device) -> torch.Tensor:
    """A zeroed uint8 tensor that is kept for good, allocated on a helper thread: torch.compile's mode
    "reduce-overhead" warms up with the calling thread's allocations sent to its CUDA graph pool, and fails when
    one of them stays alive without being an output of the graph ("tensor(s) in the cudagraph pool not tracked as
    outputs"). The helper zeroes it on its own stream and waits, so the first launch that reads it may follow."""
    box: list = []

    def make() -> None:
        try:
            with torch.cuda.device(dev):
                t = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
                torch.cuda.current_stream(dev).synchronize()
            box.append(t)
        except BaseException as exc:  # re-raised on the calling thread
            box.append(exc)

    helper = threading.Thread(target=make, name="bitkernel-workspace")
    helper.start()
    helper.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def _gemm_sm90(
    lib, x2: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor], base: Optional[torch.Tensor], stream: int
) -> Optional[torch.Tensor]:
    """x2 @ W.T (+ bias, or + base in place) by the sm_90 GEMM on the packed weights; None where it does not
    apply (the build has no sm_90a image, the device is not sm_90, the format or shape is not its)."""
    if qw.fmt != "ternary" or qw.group_size or not sm90_gemm_applies(x2.device):
        return None
    m, k, n = x2.shape[0], qw.in_features, qw.out_features
    ws = _sm90_ws(lib, x2.device, stream)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device) if base is None else base
    bias_ptr = _ptr(bias) if base is None else 0  # the base holds it already
    ok = lib.gemm_ternary_sm90_cuda(
        _ptr(x2), DTYPE_CODES[x2.dtype], m, k, _ptr(qw.qweight), _ptr(qw.scale), n, bias_ptr,
        base is not None, _ptr(y), _ptr(ws), ws.numel(), SM90_MIN_KTILES, stream,
    )
    return y if ok else None


@torch.library.register_fake("bitkernel::linear")
def _linear_fake(x, qweight, scale, zero, bias, fmt, group_size, act_int8, down, up):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def fp8_path_applies(fmt: str, group_size: int, act_int8: bool, m: int, capability: tuple[int, int]) -> bool:
    """The dispatch rule of the FP8 path, a pure function of the call (no device query).

    Ternary weights with one scale per row and int8-class activations (W1.58A8), at
    least FP8_MIN_M rows (below that the product is bound by reading the weights and the
    int8 small-M path stays), a GPU of compute capability 8.9+, and the FP8 switch on.
    The op also needs this build's FP8 kernels for the GPU and a torch whose row-wise
    `_scaled_mm` accepts the call; without them it runs the int8 kernel.
    """
    return bool(
        FP8 and act_int8 and fmt == "ternary" and group_size == 0 and m >= FP8_MIN_M and tuple(capability) >= (8, 9)
    )


def _version(v: Optional[str]) -> tuple[int, int]:
    parts = (v or "0").split("+")[0].split(".")
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in (parts + ["0"])[:2])


def fp8_output_plan(
    dtype: torch.dtype,
    capability: tuple[int, int],
    torch_version: Optional[str] = None,
    cuda_version: Optional[str] = None,
) -> tuple[torch.dtype, bool]:
    """How the FP8 GEMM produces `dtype`: (`out_dtype` for torch._scaled_mm, bias fused in it).

    bfloat16 output with a bfloat16 bias is what row-wise `_scaled_mm` supports wherever
    it exists. float16 goes direct only on sm_90 with torch >= 2.9 built for CUDA >= 12.9,
    where torch runs row-wise scaling through cuBLAS, which writes float16. Elsewhere torch
    runs CUTLASS kernels that reject float16 output (torch < 2.10) or, in some versions,
    write bfloat16 values into a float16 output without a bias; there the GEMM gives
    bfloat16, cast to float16, and the bias is added afterwards (the output then carries
    bfloat16's 2^-9 relative rounding, small next to e4m3's 2^-4).
    """
    if dtype == torch.bfloat16:
        return torch.bfloat16, True
    tv = _version(torch.__version__ if torch_version is None else torch_version)
    cv = _version(torch.version.cuda if cuda_version is None else cuda_version)
    if tuple(capability)[0] == 9 and tv >= (2, 9) and cv >= (12, 9):
        return dtype, True
    return torch.bfloat16, False


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


@functools.cache
def _fp8_built_for(index: int) -> bool:
    """Whether this build has FP8 kernels for the GPU (sm_89+ code in its image)."""
    with torch.cuda.device(index):
        return bool(require_cuda().fp8_supported())


def _use_fp8(fmt: str, group_size: int, act_int8: bool, m: int, dev: torch.device) -> bool:
    return (
        act_int8
        and fp8_path_applies(fmt, group_size, act_int8, m, _capability(dev.index))
        and dev.index not in _fp8_failed
        and _fp8_built_for(dev.index)
    )


def _round_up(v: int, to: int) -> int:
    return -(-v // to) * to


def _require_fp8(dev: torch.device, what: str) -> None:
    if dev.type != "cuda":
        raise ValueError(f"bitkernel.{what} runs on CUDA tensors, got device {dev}")
    cap = _capability(dev.index)
    if cap < (8, 9):
        raise RuntimeError(
            f"bitkernel.{what} needs a GPU of compute capability 8.9 or newer (FP8 e4m3), "
            f"but {dev} is {cap[0]}.{cap[1]}"
        )
    if not _fp8_built_for(dev.index):
        raise RuntimeError(
            f"bitkernel.{what}: this build of bitkernel has no FP8 kernels for {dev} "
            f"(capability {cap[0]}.{cap[1]}; built for {C.info()['cuda_archs']}). Rebuild with "
            f"BITKERNEL_CUDA_ARCHS including {cap[0]}{cap[1]}: "
            f"`BITKERNEL_CUDA_ARCHS={cap[0]}{cap[1]} pip install --force-reinstall --no-cache-dir ./bitkernel`"
        )


def ternary_to_fp8(
    qweight: torch.Tensor, in_features: int, rows: Optional[int] = None, cols: Optional[int] = None
) -> torch.Tensor:
    """Unpacks canonical ternary codes [N, K / 4] (CUDA) into float8_e4m3fn [rows, cols].

    The values are the weights -1, 0, +1 without their scales (they are exact in
    e4m3); rows >= N (default N) and cols >= K, a multiple of 16 (default K rounded up
    to 16), are zero padded. Pure integer work: it runs on any GPU.
    """
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.device.type != "cuda":
        raise ValueError(
            f"ternary_to_fp8 takes uint8 codes [N, K / 4] on a CUDA device, got {qweight.dtype} "
            f"{tuple(qweight.shape)} on {qweight.device}"
        )
    check_shape("ternary", in_features, 0)
    n = qweight.shape[0]
    if qweight.shape[1] != in_features // 4:
        raise ValueError(f"qweight must have {in_features // 4} bytes per row for in_features={in_features}")
    rows = n if rows is None else rows
    cols = _round_up(in_features, _FP8_ALIGN) if cols is None else cols
    if rows < n or cols < in_features or cols % _FP8_ALIGN:
        raise ValueError(f"ternary_to_fp8 needs rows >= {n} and cols >= {in_features}, a multiple of 16")
    q = qweight.contiguous()
    dev = q.device
    out = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=dev)
    with _on(dev):
        require_cuda().ternary_to_fp8_cuda(_ptr(q), n, in_features, rows, _ptr(out), cols, _stream(dev))
    return out


def fp8_row_scales(amax: torch.Tensor) -> torch.Tensor:
    """The FP8 path's per-token scales from each row's max|x| (float32): the smallest power of two 2^E with
    max|x| / 2^E <= 448 (e4m3's largest value), E >= -126; 1 where max|x| is 0 or not finite.

    A power of two makes x / s exact, so the kernel quantizes with one multiplication an element (a scale of
    max|x| / 448 needed a correctly rounded division, and the operand kernel was bound by issue); e4m3 has
    3 mantissa bits at any exponent, so only the smallest values of a row, which reach e4m3's subnormals up
    to one binade sooner, are coded differently."""
    mant, ex = torch.frexp(amax.float())  # amax = mant * 2^ex, mant in [0.5, 1); 448 = 0.875 * 2^9
    e = (ex - 9 + (mant > 0.875).to(ex.dtype)).clamp_min(-126)
    s = ((e + 127).to(torch.int32) << 23).view(torch.float32)
    return torch.where((amax > 0) & torch.isfinite(amax), s, torch.ones_like(s))


def quantize_rows_fp8(x: torch.Tensor, cols: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 quantization of x [M, K] (float16/bfloat16, CUDA, sm_89+).

    Returns (codes float8_e4m3fn [M, cols], scales float32 [M, 1]) with s =
    fp8_row_scales(max|x_m|) and code = e4m3(x / s) rounded to nearest even, exactly as
    `(x.float() / s).to(torch.float8_e4m3fn)` (x / s is exact: s is a power of two).
    cols >= K (default K rounded up to 16) zero pads the rows. Rows of x may be strided;
    its last dimension must be dense.
    """
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_rows_fp8 takes float16/bfloat16 [M, K], got {x.dtype} {tuple(x.shape)}")
    _require_fp8(x.device, "quantize_rows_fp8")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    cols = _round_up(k, _FP8_ALIGN) if cols is None else cols
    if cols < k:
        raise ValueError(f"quantize_rows_fp8 needs cols >= K = {k}, got {cols}")
    x8 = torch.empty(m, cols, dtype=torch.float8_e4m3fn, device=x.device)
    sx = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    with _on(x.device):
        require_cuda().quantize_rows_fp8_cuda(
            _ptr(x), DTYPE_CODES[x.dtype], m, k, x.stride(0), _ptr(x8), cols, _ptr(sx), _stream(x.device)
        )
    return x8, sx


def _linear_fp8(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    down: Optional[torch.Tensor],
    up: Optional[torch.Tensor],
) -> tuple[Optional[torch.Tensor], bool]:
    """W1.58A8 as e4m3 x e4m3 -> fp32 on FP8 tensor cores: (y, whether the branch is in it); y is None if
    torch._scaled_mm refuses (the branch then runs with the int8 kernel's product).

    A low-rank branch (down [R, K], up [N, R] in x's dtype) is folded into the same GEMM where the kernel takes
    it (R a multiple of 8): its K grows by R, with t = x @ down.T quantized beside x and up / s beside the ternary
    codes (cuda/fp8.cu, Fold), so [M, N] is written once instead of written, read back and written again."""
    dev = x2.device
    m, k = x2.shape
    n = qweight.shape[0]
    np_ = _round_up(n, _FP8_ALIGN)
    lib = require_cuda()
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    with _on(dev):
        stream = _stream(dev)
        t = torch.nn.functional.linear(x2, down) if FP8_FOLD and down is not None and down.shape[0] % 8 == 0 else None
        for fold in (True, False) if t is not None else (False,):
            # The activations' codes and scales and the weights in e4m3, in one launch. The weights are expanded
            # per call into a temporary (the caching allocator reuses the block), so they stay 2-bit in memory:
            # 1.25 bytes of traffic per weight, a few percent of the GEMM at M = 4608 (3072 x 12288: 47 MB,
            # ~14 us on an H200), more at a few hundred rows.
            r = t.shape[1] if fold else 0
            kp = _round_up(k + r, _FP8_ALIGN)
            x8 = torch.empty(m, kp, dtype=torch.float8_e4m3fn, device=dev)
            sx = torch.empty(m, 1, dtype=torch.float32, device=dev)
            w8 = torch.empty(np_, kp, dtype=torch.float8_e4m3fn, device=dev)
            sw = torch.empty(1, np_, dtype=torch.float32, device=dev) if fold else None
            if lib.fp8_operands_cuda(
                _ptr(x2), DTYPE_CODES[x2.dtype], m, k, x2.stride(0), _ptr(x8), kp, _ptr(sx),
                _ptr(qweight.contiguous()), n, np_, _ptr(w8), kp,
                _ptr(t if fold else None), r, r, _ptr(up.contiguous() if fold else None),
                _ptr(scale.contiguous() if fold else None), _ptr(sw), stream,
            ):  # fmt: skip
                break  # False only where the kernel does not take the fold: then without it
        if sw is None:  # the per-row weight scales are the GEMM's column scales
            sw = torch.nn.functional.pad(scale.reshape(1, n), (0, np_ - n)) if np_ != n else scale.reshape(1, n)
        y = _fp8_gemm(x8, sx, w8, sw.contiguous(), bias, n, x2.dtype)
        if y is not None and t is not None and not fold:  # the kernel did not take the fold: t serves the branch
            y.addmm_(t, up.t())
        return y, t is not None


def _fp8_gemm(
    x8: torch.Tensor,
    sx: torch.Tensor,
    w8: torch.Tensor,
    sw: torch.Tensor,
    bias: Optional[torch.Tensor],
    n: int,
    dtype: torch.dtype,
) -> Optional[torch.Tensor]:
    """y [M, n] in `dtype` from the FP8 operands (w8 and its column scales sw [1, N'] zero padded to N' rows);
    None if torch._scaled_mm refuses. Runs on x8's device, which must be current."""
    dev = x8.device
    np_ = w8.shape[0]
    if np_ != n and bias is not None:
        bias = torch.nn.functional.pad(bias, (0, np_ - n))
    plan, y = _fp8_plans.get((dev.index, dtype)), None
    if plan is not None:  # the common case: this output plan has run on this device
        try:
            y = _scaled_mm(x8, w8, sx, sw, bias, *plan)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:  # refused for this call's shape or bias: probe the plans again
            pass
    if y is None:
        plan, y = _first_scaled_mm(x8, w8, sx, sw, bias, dtype, dev)
        if y is None:
            return None
    out_dtype, fuse_bias = plan
    if np_ != n:
        y = y[:, :n]
        bias = None if bias is None else bias[:n]
    if out_dtype != dtype:
        y = y.to(dtype)
    if bias is not None and not fuse_bias:
        y = y + bias
    # Where N was padded and nothing above copied, y is a strided view: the op's output must be contiguous,
    # as its fake implementation says (torch.compile plans with those strides).
    return y.contiguous()


def _scaled_mm(x8, w8, sx, sw, bias, out_dtype: torch.dtype, fuse_bias: bool) -> torch.Tensor:
    return torch._scaled_mm(
        x8,
        w8.t(),  # column-major [K, N], as _scaled_mm wants its second operand
        scale_a=sx,
        scale_b=sw,
        bias=bias if fuse_bias else None,
        out_dtype=out_dtype,
        use_fast_accum=FP8_FAST_ACCUM,
    )


def _first_scaled_mm(x8, w8, sx, sw, bias, dtype: torch.dtype, dev: torch.device):
    """(plan, y) of an FP8 GEMM without a known plan for (device, dtype): the documented output plan, else
    bfloat16 out with the bias added afterwards; (None, None) after a warning if torch._scaled_mm refuses both."""
    plan = fp8_output_plan(dtype, _capability(dev.index))
    error = None
    for p in [plan] + ([(torch.bfloat16, False)] if plan != (torch.bfloat16, False) else []):
        try:
            y = _scaled_mm(x8, w8, sx, sw, bias, *p)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # torch checks arguments before launching: safe in graph capture
            error = exc
            continue
        _fp8_plans[(dev.index, dtype)] = p
        return p, y
    _fp8_failed[dev.index] = str(error)
    warnings.warn(
        f"bitkernel: torch._scaled_mm with row-wise scales failed on {dev} ({error}); W1.58A8 runs "
        "the int8 kernel on this device from now on. Set BITKERNEL_FP8=0 to choose that upfront.",
        RuntimeWarning,
        stacklevel=4,
    )
    return None, None


def linear(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
    act_int8: bool = False,
    lowrank: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) (+ (x @ down.T) @ up.T) for x [..., K] in float16 or bfloat16 (float32 too on CPU).

    `lowrank` = (down [R, K], up [N, R]) is the layer's side branch (quality adapters, user LoRAs), computed
    in x's dtype on x's device (converted if not). Inside the op it costs less than `add_lowrank` after it:
    above SMALL_M rows with 16-bit activations the GEMM (cuBLAS on the expanded weights, or bitkernel's sm_90
    GEMM, whose TMA reduce-add rounds the product to x's dtype before the sum) adds the main product onto the
    branch's, so [M, N] is written once more instead of written, read and written again; on W1.58A8's FP8
    path a branch whose rank is a multiple of 8 is folded into the GEMM itself (x @ down.T and up / s as R
    more columns of its operands, both rounded to e4m3), so [M, N] is written once.

    `act_int8` quantizes each row of x to 8 bits inside the op (W8A8, W1.58A8);
    it needs ternary or int8 weights with one scale per row. x may be
    non-contiguous (it is copied); the result has x's dtype and device.

    The 8-bit activation format depends on the kernel that runs (a kernel choice,
    not part of the weight format):

    - int8: round(x / s) clamped to [-127, 127], s = max|x_row| / 127 (uniform steps
      of s). On CPU, for int8 weights, below FP8_MIN_M rows and on GPUs before sm_89.
    - FP8 e4m3, for ternary weights with at least FP8_MIN_M rows on sm_89+:
      e4m3(x / s) rounded to nearest even, with s = fp8_row_scales(max|x_row|), the
      smallest power of two with max|x_row| / s <= 448. 3 mantissa bits: a relative error up to 2^-4
      per element at any magnitude down to e4m3's subnormals, where int8's steps are
      uniform. torch._scaled_mm multiplies the codes (exact products; the sums in the
      tensor cores' own accumulator, FP8_FAST_ACCUM) with s and the weight scales as
      row and column scales.

    For Gaussian-like activations the two differ by ~2-3% (relative norm of the
    output). `BITKERNEL_FP8=0` (environment, read at import) or
    `bitkernel.functional.FP8 = False` keeps int8 everywhere. If torch's row-wise
    `_scaled_mm` refuses the call (too old a torch for this GPU), the op warns once
    and runs the int8 kernel on that device.
    """
    inside = after = None  # the branch inside the op, or after it
    if lowrank is not None:
        _check_lowrank("bitkernel.linear", *lowrank, qw.in_features, qw.out_features)
        if torch.is_grad_enabled() and any(t.requires_grad for t in lowrank):
            after = lowrank  # the op has no autograd formula: a branch being trained runs as torch ops
        elif lowrank[1].shape[1]:
            inside = lowrank  # the op converts it to x's dtype and device
    # The op where something traces or differentiates it (torch.compile, fake tensors, autograd's error for
    # a gradient through it); else its implementation directly.
    direct = type(x) is torch.Tensor and not torch.compiler.is_compiling() and not (
        x.requires_grad and torch.is_grad_enabled()
    )
    y = (_linear_impl if direct else _linear_op)(
        x, qw.qweight, qw.scale, qw.zero, bias, FORMAT_CODES[qw.fmt], qw.group_size, act_int8, *(inside or (None, None))
    )
    return y if after is None else add_lowrank(y, x, *after)


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t on ref's device in ref's dtype; non_blocking only towards a GPU (a copy to the CPU must be complete
    before it is read). t itself where it already is (without the host time of a no-op `to`)."""
    if t.dtype == ref.dtype and t.device == ref.device:
        return t
    return t.to(ref.device, ref.dtype, non_blocking=ref.device.type == "cuda")


def _check_lowrank(what: str, down: torch.Tensor, up: torch.Tensor, k: int, n: int) -> None:
    if down.dim() != 2 or up.dim() != 2 or down.shape != (up.shape[1], k) or up.shape[0] != n:
        raise ValueError(
            f"{what}: low-rank branch down {tuple(down.shape)} / up {tuple(up.shape)} does not fit x [..., {k}] "
            f"-> y [..., {n}]: down must be [R, K] and up [N, R]"
        )


def add_lowrank(y: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y + (x @ down.T) @ up.T: a quantized linear's low-rank side branch (quality adapters, user LoRAs).

    y [..., N] is a linear's output for x [..., K], down [R, K], up [N, R], computed in y's dtype on y's
    device (x, down and up are converted if not). The second product accumulates onto y in one GEMM
    (beta = 1): [M, N] is read and written once, where a separate product and sum pass over it three
    times (the branch's whole cost at large M), and the sum is rounded once (cuBLAS fp16: within a few ulps). A new
    tensor: y may be a view autograd forbids changing in place (ComfyUI's low-VRAM path makes such views).
    `linear(..., lowrank=(down, up))` does the same inside the product, for less.
    """
    _check_lowrank("bitkernel.add_lowrank", down, up, x.shape[-1], y.shape[-1])
    if up.shape[1] == 0:
        return y.clone()
    n, r = up.shape
    t = torch.nn.functional.linear(_like(x, y), _like(down, y)).reshape(-1, r)
    return torch.addmm(y.reshape(-1, n), t, _like(up, y).t()).reshape(y.shape)
