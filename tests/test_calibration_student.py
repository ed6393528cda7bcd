"""StudentLinear, the quantized layer calibration trains, against the plain-PyTorch format reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bitkernel.functional as BF
from converter.calibration.student import StudentLinear, integer_codes

from kernel_reference import dequantize, expand_groups, unpack_codes

FORMATS = [("ternary", 0, True), ("ternary", 64, True), ("int4", 64, True), ("int4", 128, False), ("int8", 0, True)]


def _qw(fmt: str, group: int, sym: bool, n: int = 37, k: int = 192, zero_row: bool = True) -> BF.QuantizedWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k + group)) * 0.05
    if zero_row:
        w[3] = 0  # a row (and its groups) of scale 0
    return BF.quantize(w, fmt, group, symmetric=sym)


def _reference_codes(qw: BF.QuantizedWeight) -> torch.Tensor:
    """W = c * s: the integer c of every weight from the stored fields (docs/FORMAT.md)."""
    c = unpack_codes(qw.fmt, qw.qweight).to(torch.float64)
    if qw.fmt == "ternary":
        return c - 1
    if qw.fmt == "int4":
        z = 8.0 if qw.zero is None else expand_groups(qw.zero.to(torch.float64), qw.in_features, qw.group_size)
        return c - z
    return c


@pytest.mark.parametrize("fmt,group,sym", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_integer_codes_are_the_stored_integers(fmt, group, sym, dtype):
    qw = _qw(fmt, group, sym)
    c = integer_codes(qw, dtype)
    assert c.dtype == dtype and c.shape == (qw.out_features, qw.in_features)
    ref = _reference_codes(qw)
    assert torch.equal(c.double(), ref), "codes are small integers: exact in every float dtype"
    s = expand_groups(qw.scale.double(), qw.in_features, qw.group_size)
    w = dequantize(qw.fmt, qw.qweight, qw.scale, qw.zero, qw.in_features, qw.group_size)
    assert torch.allclose(ref * s, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fmt,group,sym", FORMATS)
@pytest.mark.parametrize("m", [1, 7, 33])
def test_student_forward_is_dequantize_then_matmul(fmt, group, sym, m):
    """At initialisation (log-scale 0, no branch) the student is the file's layer: the reference dequantizes
    the stored fields in float64 and multiplies."""
    qw = _qw(fmt, group, sym)
    bias = torch.randn(qw.out_features)
    x = torch.randn(m, qw.in_features, generator=torch.Generator().manual_seed(m))
    student = StudentLinear(qw, bias)
    nk = qw.out_features * qw.in_features
    assert all(b.numel() < nk for b in student.buffers()), "frozen codes stay packed"
    w = dequantize(qw.fmt, qw.qweight, qw.scale, qw.zero, qw.in_features, qw.group_size)
    ref = x.double() @ w.T + bias.double()
    y = student(x)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_scales_train_and_the_export_keeps_the_codes():
    qw = _qw("ternary", 0, True, zero_row=False)
    student = StudentLinear(qw, None)
    x = torch.randn(64, qw.in_features)
    target = 1.5 * F.linear(x, BF.dequantize(qw))
    opt = torch.optim.Adam([student.log_scale], lr=0.05)
    for _ in range(100):
        loss = (student(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out, lora = student.export()
    assert lora is None and torch.equal(out.qweight, qw.qweight)
    assert torch.allclose(out.scale, 1.5 * qw.scale, rtol=1e-2)


def test_learned_codes_export_their_rounding():
    """With a latent, the exported codes are round(u) clamped to -1..1 and the scales are the trained ones."""
    w = torch.randn(20, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    qw = BF.quantize(w, "ternary")
    student = StudentLinear(qw, None, latent=w)
    with torch.no_grad():
        student.u.copy_(torch.randn(student.u.shape, generator=torch.Generator().manual_seed(2)) * 2)
        student.log_scale.fill_(0.1)
    out, _ = student.export()
    expect = torch.clamp(torch.round(student.u.detach()), -1, 1).double()
    assert torch.equal(_reference_codes(out), expect)
    assert torch.allclose(out.scale, qw.scale * torch.exp(torch.tensor(0.1)), rtol=1e-6)
