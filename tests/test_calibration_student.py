"""StudentLinear, the quantized layer calibration trains, against the plain-PyTorch format reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES

import bitkernel.functional as BF
from converter.calibration.student import StudentLinear, integer_codes
from converter.calibration.windows import BYTES_PER_CODE, CodeWindows

from kernel_reference import dequantize, expand_groups
from kernel_reference import integer_codes as reference_codes

FORMATS = [("ternary", 0, True), ("ternary", 64, True), ("int4", 64, True), ("int4", 128, False), ("int8", 0, True)]


def _qw(
    fmt: str, group: int, sym: bool, n: int = 37, k: int = 192, zero_row: bool = True, device: str = "cpu"
) -> BF.QuantizedWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k + group)) * 0.05
    if zero_row:
        w[3] = 0  # a row (and its groups) of scale 0
    return BF.quantize(w.to(device), fmt, group, symmetric=sym)


def _reference_codes(qw: BF.QuantizedWeight) -> torch.Tensor:
    """W = c * s: the integer c of every weight from the stored fields (docs/FORMAT.md)."""
    return reference_codes(qw.fmt, qw.qweight, qw.zero, qw.in_features, qw.group_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt,group,sym", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_integer_codes_are_the_stored_integers(fmt, group, sym, dtype, device):
    qw = _qw(fmt, group, sym, device=device)
    c = integer_codes(qw, dtype)
    assert c.dtype == dtype and c.shape == (qw.out_features, qw.in_features) and c.device.type == device
    assert torch.equal(c.cpu().double(), _reference_codes(qw)), "codes are small integers: exact in every dtype"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt,group,sym", FORMATS)
@pytest.mark.parametrize("m", [1, 7, 33])
def test_student_forward_and_scale_gradient_against_float64(fmt, group, sym, m, device):
    """At initialisation (log-scale 0, no branch) the student is the file's layer, and the gradient reaching
    its log-scales is that of W = c * s0 * exp(t): both against float64 from the stored fields."""
    qw = _qw(fmt, group, sym, device=device)
    bias = torch.randn(qw.out_features)
    x = torch.randn(m, qw.in_features, generator=torch.Generator().manual_seed(m))
    student = StudentLinear(qw, bias.to(device))
    nk = qw.out_features * qw.in_features
    assert student.qweight.data_ptr() == qw.qweight.data_ptr(), "frozen codes stay packed"
    assert all(b.numel() < nk for name, b in student.named_buffers() if name != "qweight")
    y = student(x.to(device))
    y.pow(2).sum().backward()

    w = dequantize(qw.fmt, qw.qweight, qw.scale, qw.zero, qw.in_features, qw.group_size)
    t = torch.zeros(qw.scale.shape, dtype=torch.float64, requires_grad=True)
    w_t = w * expand_groups(torch.exp(t), qw.in_features, qw.group_size)
    ref = x.double() @ w_t.T + bias.double()
    ref.pow(2).sum().backward()
    assert torch.allclose(y.cpu().double(), ref.detach(), rtol=1e-5, atol=1e-5)
    g = student.log_scale.grad.cpu().double()
    assert torch.allclose(g, t.grad, rtol=1e-3, atol=1e-3 * t.grad.abs().max().item())


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
    res = student.export()
    out = res.qw
    assert res.lora is None and res.bias is None and torch.equal(out.qweight, qw.qweight)
    assert torch.allclose(out.scale, 1.5 * qw.scale, rtol=1e-2)


def test_learned_codes_export_their_rounding():
    """With a latent, the exported codes are round(u) clamped to -1..1 and the scales are the trained ones."""
    w = torch.randn(20, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    qw = BF.quantize(w, "ternary")
    student = StudentLinear(qw, None, latent=w)
    with torch.no_grad():
        student.u.copy_(torch.randn(student.u.shape, generator=torch.Generator().manual_seed(2)) * 2)
        student.log_scale.fill_(0.1)
    out = student.export().qw
    expect = torch.clamp(torch.round(student.u.detach()), -1, 1).double()
    assert torch.equal(_reference_codes(out), expect)
    assert torch.allclose(out.scale, qw.scale * torch.exp(torch.tensor(0.1)), rtol=1e-6)


@pytest.mark.parametrize("train_bias", [False, True])
def test_trained_bias_is_a_parameter_and_exported_in_bf16(train_bias):
    qw = _qw("ternary", 0, True, zero_row=False)
    bias = torch.randn(qw.out_features)
    given = bias.clone()
    student = StudentLinear(qw, bias, train_bias=train_bias)
    params = dict(student.named_parameters())
    assert ("bias" in params) == train_bias
    if not train_bias:
        assert student.export().bias is None  # the converter writes the checkpoint's
        return
    delta = torch.linspace(-0.5, 0.5, qw.out_features)
    x = torch.randn(32, qw.in_features)
    target = F.linear(x, BF.dequantize(qw)) + bias + delta
    opt = torch.optim.Adam([student.bias], lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / 400)
    for _ in range(400):
        loss = (student(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    out = student.export().bias
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), bias + delta, atol=2e-2)
    assert torch.equal(student.bias.detach(), out.float()), "the student continues from what the file holds"
    assert torch.equal(bias, given), "the teacher's bias is never trained in place"


def test_straight_through_gradient_reaches_the_latent():
    """W = round(u) * s in the forward; d loss / d u = d loss / d W * s (the rounding passes the gradient)."""
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    qw = BF.quantize(w, "ternary")
    student = StudentLinear(qw, None, latent=w)
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(4))
    student(x).pow(2).sum().backward()
    s = qw.scale.double().reshape(-1, 1)
    wq = (_reference_codes(qw) * s).requires_grad_(True)
    (x.double() @ wq.T).pow(2).sum().backward()
    assert torch.allclose(student.u.grad.double(), wq.grad * s, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------ the end-to-end stage's code windows


def _students(sizes: list[tuple[int, int]]) -> list[tuple[str, StudentLinear]]:
    return [(f"layer{i}", StudentLinear(_qw("ternary", 0, True, n, k, zero_row=False), None))
            for i, (n, k) in enumerate(sizes)]


def test_code_windows_cover_the_layers_in_order_within_the_budget():
    layers = _students([(37, 192), (64, 64), (200, 128), (16, 64), (40, 64), (300, 256)])
    size = {name: BYTES_PER_CODE * lin.qweight.shape[0] * lin.in_features for name, lin in layers}
    budget = size["layer2"] + size["layer3"]
    w = CodeWindows(layers, budget, steps=100, load_weight=lambda name: None)
    assert w.skipped == ["layer5"]  # larger than a window: keeps its codes
    flat = [name for window in w.windows for name, _ in window]
    assert flat == [name for name, _ in layers if name != "layer5"]
    for window in w.windows:
        assert sum(size[name] for name, _ in window) <= budget
    for a, b in zip(w.windows, w.windows[1:]):  # greedy: the next layer did not fit
        assert sum(size[name] for name, _ in a) + size[b[0][0]] > budget
    # every window gets an equal share of the steps (within one), in order, starting at full rate
    counts = [sum(w.index(s) == i for s in range(100)) for i in range(len(w))]
    assert [w.index(s) for s in range(100)] == sorted(w.index(s) for s in range(100))
    assert max(counts) - min(counts) <= 1 and sum(counts) == 100
    starts = [min(s for s in range(100) if w.index(s) == i) for i in range(len(w))]
    assert all(w.lr_factor(s) == 1.0 for s in starts)
    assert all(0 < w.lr_factor(s - 1) < 0.1 for s in starts[1:])
    assert [s for s in range(100) if w.checkpoint(s)] == starts


def test_code_windows_learn_freeze_and_free_their_latents():
    """Entering a window makes its latents an Adam group (from the full-precision weights, in the bins of
    the codes the layers have); leaving packs round(latent) into the 2-bit buffer and frees the rest."""
    layers = _students([(37, 192), (24, 64)])
    fp = {name: torch.randn(lin.qweight.shape[0], lin.in_features) * 0.05 for name, lin in layers}
    w = CodeWindows(layers, 10**9, steps=10, load_weight=lambda name: fp[name])
    assert len(w) == 1
    keep = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([keep], lr=1e-3)
    before = {name: integer_codes(lin.qw) for name, lin in layers}
    w.enter(0, opt, 1e-6)
    group = opt.param_groups[-1]
    assert group["codes"] and group["lr"] == 1e-6 and len(opt.param_groups) == 2
    for name, lin in layers:
        assert lin.u is not None and any(p is lin.u for p in group["params"])
        assert torch.equal(torch.round(lin.u.detach()), before[name])  # starts at the codes it has
        with torch.no_grad():  # a learned change: flip some codes
            lin.u[0, :5] = torch.tensor([1.2, -1.4, 0.3, -0.6, 0.7])
    (keep.sum() + sum(lin.weight(torch.float32).sum() for _, lin in layers)).backward()
    opt.step()
    assert len(opt.state) == 3
    w.leave(opt)
    assert len(opt.param_groups) == 1 and list(opt.state) == [keep] and w.current == -1
    for _, lin in layers:
        assert lin.u is None
        c = integer_codes(lin.qw)
        assert torch.equal(c[0, :5], torch.tensor([1.0, -1.0, 0.0, -1.0, 1.0]))
        assert torch.equal(_reference_codes(lin.qw), c.double())  # the packed buffer holds them
