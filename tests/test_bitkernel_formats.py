"""Packing, unpacking and quantization rules against the plain-PyTorch reference."""

import pytest
import torch

import bitkernel.functional as F

from kernel_reference import dequantize, pack_codes, unpack_codes

CASES = [  # fmt, group_size, symmetric
    ("ternary", 0, True),
    ("ternary", 64, True),
    ("int8", 0, True),
    ("int4", 64, True),
    ("int4", 128, True),
    ("int4", 64, False),
    ("int4", 128, False),
]


def random_codes(fmt, n, k, gen):
    hi = {"ternary": 3, "int4": 16, "int8": 255}[fmt]
    c = torch.randint(0, hi, (n, k), generator=gen)
    return c - 127 if fmt == "int8" else c


@pytest.mark.parametrize("fmt,group,sym", CASES)
# K % 16 == 8 and (300, 520) (partial last group, many warps) take the vectorised CUDA expansion in 16-bit
# chunks; K % 8 == 4 only in 32-bit ones.
@pytest.mark.parametrize("n,k", [(1, 4 * 64), (37, 4 * 53), (130, 196), (5, 1028), (3, 264), (300, 520)])
def test_dequantize_matches_reference(device, fmt, group, sym, n, k):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    codes = random_codes(fmt, n, k, gen)
    g = 1 if group == 0 else -(-k // group)
    scale = torch.rand(n, g, generator=gen) * 0.1 + 1e-3
    zero = None if sym else torch.randint(0, 16, (n, g), generator=gen).to(torch.uint8)
    qw = F.QuantizedWeight(
        fmt, pack_codes(fmt, codes).to(device), scale.to(device), None if zero is None else zero.to(device), k, group
    )
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = F.dequantize(qw, dtype).cpu()
        ref = dequantize(fmt, qw.qweight, scale, zero, k, group).to(dtype)
        assert torch.equal(got, ref), (fmt, dtype)
    # Re-quantizing the dequantized weight with its own scale gives back the same bytes.
    again = F.quantize(F.dequantize(qw, torch.float32), fmt, group, sym, scale=qw.scale, zero=qw.zero)
    assert torch.equal(again.qweight.cpu(), qw.qweight.cpu())


@pytest.mark.parametrize("fmt,group,sym", CASES)
def test_quantize_rules(device, fmt, group, sym):
    gen = torch.Generator().manual_seed(7)
    n, k = 45, 4 * 75  # 300: the last group of 64 or 128 is partial
    w = torch.randn(n, k, generator=gen) * torch.logspace(-4, 2, n).unsqueeze(1)
    w[3] = 0  # a zero row
    w[:, 5] = 0  # a zero column
    qw = F.quantize(w.to(device), fmt, group, sym)
    gs = group or k
    for gi in range(qw.scale.shape[1]):
        blk = w[:, gi * gs : (gi + 1) * gs].double()
        if fmt == "ternary":
            ref = blk.abs().mean(1)
        elif fmt == "int8":
            ref = blk.abs().amax(1) / 127
        elif sym:
            ref = blk.abs().amax(1) / 7
        else:
            ref = (blk.amax(1).clamp(min=0) - blk.amin(1).clamp(max=0)) / 15
        torch.testing.assert_close(qw.scale[:, gi].cpu().double(), ref, rtol=1e-6, atol=0)
    codes = unpack_codes(fmt, qw.qweight.cpu())
    s = qw.scale.cpu().repeat_interleave(gs, 1)[:, :k] if group else qw.scale.cpu()
    ratio = torch.where(s > 0, w / s, torch.zeros_like(w))
    if fmt == "ternary":
        expect = ratio.round().clamp(-1, 1) + 1
    elif fmt == "int8":
        expect = ratio.round().clamp(-127, 127)
    else:
        z = 8 if sym else qw.zero.cpu().repeat_interleave(gs, 1)[:, :k].float()
        expect = torch.where(s > 0, (ratio.round() + z).clamp(0, 15), torch.as_tensor(z).float().expand_as(w))
    assert torch.equal(codes, expect.to(torch.int32))
    assert (unpack_codes(fmt, qw.qweight.cpu())[3] == unpack_codes(fmt, qw.qweight.cpu())[3][0]).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt,group,sym", CASES)
def test_cpu_and_gpu_packing_bit_identical(fmt, group, sym):
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(301, 4 * 97, generator=gen) * 0.02
    a = F.quantize(w, fmt, group, sym)
    b = F.quantize(w.cuda(), fmt, group, sym)
    assert torch.equal(a.qweight, b.qweight.cpu())
    assert torch.equal(a.scale, b.scale.cpu())
    if not sym:
        assert torch.equal(a.zero, b.zero.cpu())


def test_round_trip_codes_reference():
    gen = torch.Generator().manual_seed(3)
    for fmt in ("ternary", "int4", "int8"):
        c = random_codes(fmt, 9, 4 * 33, gen)
        assert torch.equal(unpack_codes(fmt, pack_codes(fmt, c)), c.to(torch.int32))
