"""bitkernel's Python API: torch op registration, nn modules, bad input, build properties."""

import subprocess

import pytest
import torch

import bitkernel
import bitkernel._lib as lib
import bitkernel.functional as F
from bitkernel.nn import Int4Linear, Int8Linear, TernaryLinear


def test_info_reports_build():
    i = bitkernel.info()
    assert i["version"] == bitkernel.__version__
    assert isinstance(i["cuda"], bool) and "cpu_features" in i


def test_compiled_module_links_no_torch():
    out = subprocess.run(["ldd", bitkernel._lib.C.__file__], capture_output=True, text=True).stdout
    for lib_name in ("libtorch", "libc10", "libcudart.so"):
        assert lib_name not in out, out


@pytest.mark.parametrize("m", [5, 40])  # the small-M kernels and the dense path (where the branch is fused)
@pytest.mark.parametrize("branch", [False, True])
@pytest.mark.parametrize(
    "fmt,group,a8", [("ternary", 0, False), ("int4", 64, False), ("int8", 0, True), ("ternary", 0, True)]
)
def test_opcheck(device, fmt, group, a8, branch, m):
    gen = torch.Generator().manual_seed(0)
    qw = F.quantize(torch.randn(24, 128, generator=gen).to(device), fmt, group)
    x = torch.randn(m, 128, generator=gen).to(device, torch.bfloat16)
    bias = torch.randn(24, generator=gen).to(device, torch.bfloat16)
    down = torch.randn(4, 128, generator=gen).to(device, torch.bfloat16) if branch else None
    up = torch.randn(24, 4, generator=gen).to(device, torch.bfloat16) if branch else None
    from bitkernel.formats import FORMAT_CODES

    torch.library.opcheck(
        torch.ops.bitkernel.linear.default,
        (x, qw.qweight, qw.scale, qw.zero, bias, FORMAT_CODES[fmt], group, a8, down, up),
    )


def test_torch_compile_traces_the_op():
    lin = TernaryLinear.from_linear(torch.nn.Linear(64, 16).to(torch.bfloat16))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    compiled = torch.compile(lin, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), lin(x))


@pytest.mark.parametrize(
    "cls,kw",
    [
        (TernaryLinear, {}),
        (Int8Linear, {}),
        (Int4Linear, {"group_size": 64}),
        (Int4Linear, {"group_size": 128, "symmetric": False}),
        (TernaryLinear, {"act_int8": True}),
    ],
)
def test_modules_round_trip(device, cls, kw):
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 40).to(device, torch.bfloat16)
    q = cls.from_linear(dense, **kw)
    x = torch.randn(4, 256, device=device, dtype=torch.bfloat16)
    y = q(x)
    ref = torch.nn.functional.linear(x.double(), q.dequantized_weight().double(), q.bias.double())
    tol = 4e-2 if kw.get("act_int8") else 2e-2
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol
    # state_dict round trip into a fresh module
    sd = q.state_dict()
    assert set(sd) >= {"qweight", "scale", "bias"}
    fresh = cls(256, 40, **kw).to(device)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)
    # .to(dtype) moves activations' dtype but never the float32 scales or the codes
    q16 = q.to(torch.float16)
    assert q16.scale.dtype == torch.float32 and torch.equal(q16.qweight, q.qweight)


def test_low_rank_branch_adds_and_removes_exactly(device):
    torch.manual_seed(1)
    q = TernaryLinear.from_linear(torch.nn.Linear(128, 32).to(device, torch.bfloat16))
    x = torch.randn(6, 128, device=device, dtype=torch.bfloat16)
    base = q(x)
    down = torch.randn(8, 128, device=device, dtype=torch.bfloat16) * 0.1
    up = torch.randn(32, 8, device=device, dtype=torch.bfloat16) * 0.1
    q.set_lora(down, up)
    assert torch.allclose(q(x).float(), base.float() + (x @ down.T @ up.T).float(), atol=2e-2)
    sd = q.state_dict()
    assert "lora_down" in sd
    fresh = TernaryLinear(128, 32).to(device)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), q(x))
    q.set_lora(None, None)
    assert torch.equal(q(x), base)


@pytest.mark.parametrize("m", [3, 40])
def test_a_trainable_branch_gets_its_gradients(device, m):
    """The op has no autograd formula: a branch that requires grad runs after it, as torch ops."""
    torch.manual_seed(m)
    q = TernaryLinear.from_linear(torch.nn.Linear(128, 32).to(device, torch.bfloat16))
    down = (torch.randn(4, 128) * 0.1).to(device, torch.bfloat16).requires_grad_()
    up = (torch.randn(32, 4) * 0.1).to(device, torch.bfloat16).requires_grad_()
    q.set_lora(down, up)
    x = torch.randn(m, 128, device=device, dtype=torch.bfloat16)
    w = torch.randn(m, 32, device=device)
    (q(x).float() * w).sum().backward()
    d2, u2 = down.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    ((x @ d2.T @ u2.T).float() * w).sum().backward()
    torch.testing.assert_close(q.lora_down.grad, d2.grad)
    torch.testing.assert_close(q.lora_up.grad, u2.grad)
    with torch.no_grad():  # without grad the branch runs inside the op again: the same values
        apart = F.add_lowrank(F.linear(x, q.quantized, q.bias), x, down, up)
        torch.testing.assert_close(q(x), apart, rtol=2e-2, atol=2e-2)


def test_a_gradient_through_the_op_is_an_error(device):
    """No backward: a gradient through the op is refused with a message, never passed on as no gradient (what
    autograd's fallback for an op without an autograd kernel does), eagerly, through the dispatcher and compiled.
    The forward runs; without grad mode, or under inference mode as ComfyUI runs, the same."""
    q = TernaryLinear.from_linear(torch.nn.Linear(64, 16).to(device, torch.bfloat16))
    x = torch.randn(3, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    args = (x, q.quantized.qweight, q.quantized.scale, None, q.bias, 0, 0, False, None, None)
    for call in (lambda: q(x), lambda: torch.ops.bitkernel.linear.default(*args)):
        with pytest.raises(RuntimeError, match="no backward"):
            call().float().sum().backward()
    with pytest.raises(RuntimeError, match="no backward"):
        torch.compile(q, backend="aot_eager")(x).float().sum().backward()
    with torch.no_grad():
        expect = q(x)
    with torch.inference_mode():
        torch.testing.assert_close(torch.ops.bitkernel.linear.default(*args), expect, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 33, 512])
def test_add_lowrank_rounds_once_against_float32(device, dtype, m):
    """y + (x @ down.T) @ up.T with the second product accumulated into y: within an ulp of the float32 sum
    of y and the (rounded) first product times up (on the CPU; cuBLAS's fp16 GEMM was measured 2.7 ulps off
    on 2 of 23040 elements at M = 512 on an H200, so 4 there), for 2-D, 3-D and strided y, which is left
    unchanged."""
    g = torch.Generator().manual_seed(m)
    k, n, r = 72, 45, 5
    x = torch.randn(m, k, generator=g).to(device, dtype)
    down = (torch.randn(r, k, generator=g) * 0.2).to(device, dtype)
    up = (torch.randn(n, r, generator=g) * 0.2).to(device, dtype)
    y = torch.randn(m, n, generator=g).to(device, dtype)
    y0 = y.clone()
    t = (x.float() @ down.float().T).to(dtype).float()
    ref = y.float() + t @ up.float().T
    eps = torch.finfo(dtype).eps * (4 if device.type == "cuda" else 1)
    out = F.add_lowrank(y, x, down, up)
    torch.testing.assert_close(out.float(), ref, rtol=eps, atol=eps * 1e-2)
    out3 = F.add_lowrank(y.reshape(1, m, n), x.reshape(1, m, k), down, up)
    assert out3.shape == (1, m, n)
    torch.testing.assert_close(out3.reshape(m, n), out, rtol=0, atol=0)
    ys = torch.zeros(m, 2 * n, device=device, dtype=dtype)[:, ::2].copy_(y)  # same values, every other column
    out_s = F.add_lowrank(ys, x, down, up)
    torch.testing.assert_close(out_s, out, rtol=0, atol=0)
    # float32 branch weights (ComfyUI keeps user LoRAs in float32) are used in y's dtype; rank 0 is a no-op
    torch.testing.assert_close(F.add_lowrank(y, x, down.float(), up.float()), out, rtol=0, atol=0)
    assert torch.equal(F.add_lowrank(y, x, down[:0], up[:, :0]), y)
    with pytest.raises(ValueError, match="down must be"):
        F.add_lowrank(y, x, down[:, 1:], up)
    with pytest.raises(ValueError, match="down must be"):
        F.add_lowrank(y, x, down[:3], up)
    assert torch.equal(y, y0) and torch.equal(ys, y0)  # inputs left alone


def test_bad_input_messages():
    qw = F.quantize(torch.randn(8, 64), "ternary")
    with pytest.raises(TypeError, match="must be"):
        F.linear(torch.randint(0, 3, (2, 64)), qw)
    with pytest.raises(ValueError, match="x has 60 features"):
        F.linear(torch.randn(2, 60), qw)
    with pytest.raises(ValueError, match="multiple of 4"):
        F.quantize(torch.randn(8, 62), "ternary")
    with pytest.raises(ValueError, match="multiple of 2"):
        F.quantize(torch.randn(8, 63), "int4", group_size=0)
    with pytest.raises(ValueError, match="bias must be"):
        F.linear(torch.randn(2, 64), qw, torch.zeros(7))
    with pytest.raises(ValueError, match="group_size=0"):
        F.linear(torch.randn(2, 128), F.quantize(torch.randn(8, 128), "ternary", 64), act_int8=True)
    with pytest.raises(ValueError, match="unknown weight format"):
        F.quantize(torch.randn(8, 64), "int3")
    with pytest.raises(ValueError, match="2-D"):
        F.quantize(torch.randn(64), "int8")
    with pytest.raises(ValueError, match="qweight must be"):
        F.QuantizedWeight("ternary", torch.zeros(8, 15, dtype=torch.uint8), torch.ones(8, 1), None, 64).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch_message():
    qw = F.quantize(torch.randn(8, 64), "ternary")
    with pytest.raises(ValueError, match="move them together"):
        F.linear(torch.randn(2, 64, device="cuda", dtype=torch.float16), qw)


def test_cpu_only_build_message(monkeypatch):
    monkeypatch.setattr(lib, "HAS_CUDA", False)
    with pytest.raises(RuntimeError, match="built without CUDA.*nvcc"):
        lib.require_cuda()


def test_autocast_runs_float32_input_in_autocast_dtype(device):
    q = TernaryLinear.from_linear(torch.nn.Linear(64, 8).to(device))
    x = torch.randn(3, 64, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), q(x.to(torch.bfloat16)).float())
