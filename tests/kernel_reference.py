"""Independent plain-PyTorch reference of the canonical formats (docs/FORMAT.md).

Nothing here calls bitkernel: the tests compare the kernels against it.
"""

from __future__ import annotations

import torch

WPB = {"ternary": 4, "int8": 1, "int4": 2}


def unpack_codes(fmt: str, qweight: torch.Tensor) -> torch.Tensor:
    """Packed bytes -> stored integer codes [N, K] (ternary: 0..2, int4: 0..15, int8: -127..127)."""
    if fmt == "int8":
        return qweight.to(torch.int32)
    bits = 8 // WPB[fmt]
    q = qweight.to(torch.int32)
    fields = [(q >> (bits * j)) & ((1 << bits) - 1) for j in range(WPB[fmt])]
    return torch.stack(fields, dim=-1).reshape(q.shape[0], -1)


def pack_codes(fmt: str, codes: torch.Tensor) -> torch.Tensor:
    """Stored integer codes [N, K] -> packed bytes, the inverse of unpack_codes."""
    if fmt == "int8":
        return codes.to(torch.int8)
    wpb, bits = WPB[fmt], 8 // WPB[fmt]
    c = codes.to(torch.int32).reshape(codes.shape[0], -1, wpb)
    out = torch.zeros(c.shape[:2], dtype=torch.int32)
    for j in range(wpb):
        out |= c[..., j] << (bits * j)
    return out.to(torch.uint8)


def expand_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """[N, groups] -> [N, K], each group's value repeated over its columns."""
    if group_size == 0:
        return t.expand(t.shape[0], k)
    return t.repeat_interleave(group_size, dim=1)[:, :k]


def integer_codes(fmt, qweight, zero, k, group_size) -> torch.Tensor:
    """The integers c of W = c * s [N, K] in float64: stored code - 1 (ternary), - zero point (int4), as is (int8)."""
    codes = unpack_codes(fmt, qweight.cpu()).to(torch.float64)
    if fmt == "ternary":
        return codes - 1
    if fmt == "int4":
        return codes - (8.0 if zero is None else expand_groups(zero.cpu().to(torch.float64), k, group_size))
    return codes


def dequantize(fmt, qweight, scale, zero, k, group_size) -> torch.Tensor:
    s = expand_groups(scale.cpu().to(torch.float64), k, group_size)
    return integer_codes(fmt, qweight, zero, k, group_size) * s


def quantize_act(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 fake quantization: the value the kernels multiply with."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.where(s > 0, torch.round(xf / s).clamp(-127, 127), torch.zeros_like(xf))
    return q.double() * s.double()


def quantize_act_fp8(x: torch.Tensor) -> torch.Tensor:
    """Per-token e4m3 fake quantization: what W1.58A8 multiplies with on sm_89+ at M > 16.

    s = fp8_row_scales(max|x|), code = e4m3(x / s) (exact quotients: s is a power of two).
    """
    q, s = quantize_rows_fp8(x)
    return q.double() * s.double()


def fp8_row_scales(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two 2^E >= amax / 448 with E >= -126 (1 where amax is 0 or not finite),
    searched exactly in float64 over the exponents instead of read off the float's bits."""
    a = amax.double()
    e = torch.full_like(a, -126.0)
    for _ in range(260):  # raise E while 448 * 2^E < amax (E <= 128 covers float32)
        e = torch.where(448.0 * torch.exp2(e) < a, e + 1, e)
    s = torch.exp2(e).float()
    return torch.where((amax > 0) & torch.isfinite(amax), s, torch.ones_like(s))


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 codes [M, K], float32 scales [M, 1]), rows as fp8_row_scales says."""
    xf = x.float()
    s = fp8_row_scales(xf.abs().amax(dim=-1, keepdim=True))
    return (xf.double() / s.double()).float().to(torch.float8_e4m3fn), s


def linear(x, fmt, qweight, scale, zero, group_size, bias=None, act_int8=False, act_fp8=False) -> torch.Tensor:
    k = x.shape[-1]
    w = dequantize(fmt, qweight, scale, zero, k, group_size)
    if act_fp8:
        xr = quantize_act_fp8(x.cpu())
    else:
        xr = quantize_act(x.cpu()) if act_int8 else x.cpu().double()
    y = xr @ w.T
    if bias is not None:
        y = y + bias.cpu().double()
    return y
