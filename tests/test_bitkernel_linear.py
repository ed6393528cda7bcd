"""The quantized linear product against dequantize-then-matmul in float64."""

import pytest
import torch

import bitkernel.functional as F

from kernel_reference import linear as ref_linear

MS = [1, 2, 7, 16, 33, 512, 4608]
DTYPES = [torch.float16, torch.bfloat16]
CASES = [  # fmt, group_size, symmetric, act_int8
    ("ternary", 0, True, False),
    ("ternary", 64, True, False),
    ("int8", 0, True, False),
    ("int4", 64, True, False),
    ("int4", 128, False, False),
    ("ternary", 0, True, True),
    ("int8", 0, True, True),
]


def rel_err(y, ref):
    return ((y.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make(fmt, group, sym, n, k, device, gen, bias_dtype=None):
    w = torch.randn(n, k, generator=gen) * 0.05
    qw = F.quantize(w.to(device), fmt, group, sym)
    bias = None if bias_dtype is None else (torch.randn(n, generator=gen) * 0.1).to(device, bias_dtype)
    return qw, bias


def takes_fp8(x, qw, act_int8):
    """Whether the op runs e4m3 activations here (W1.58A8 at M > 16 on sm_89+)."""
    if x.device.type != "cuda":
        return False
    m = x.numel() // x.shape[-1]
    return F.fp8_path_applies(qw.fmt, qw.group_size, act_int8, m, torch.cuda.get_device_capability(x.device))


def check(x, qw, bias, act_int8, tol):
    y = F.linear(x, qw, bias, act_int8)
    assert y.dtype == x.dtype and y.device == x.device and y.shape == (*x.shape[:-1], qw.out_features)
    ref = ref_linear(
        x,
        qw.fmt,
        qw.qweight.cpu(),
        qw.scale.cpu(),
        None if qw.zero is None else qw.zero.cpu(),
        qw.group_size,
        bias,
        act_int8,
        act_fp8=takes_fp8(x, qw, act_int8),
    )
    assert torch.isfinite(y).all()
    err = rel_err(y, ref)
    assert err < tol, err


@pytest.mark.parametrize("fmt,group,sym,a8", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_linear_odd_shapes(device, fmt, group, sym, a8, dtype, m):
    gen = torch.Generator().manual_seed(m * 31 + len(fmt))
    # Odd N, K an odd multiple of the packing; large M with a small layer keeps the CPU run short.
    n, k = (131, 4 * 75) if m <= 512 else (19, 4 * 17)
    qw, bias = make(fmt, group, sym, n, k, device, gen, dtype)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    # bf16 outputs carry ~2^-9 relative rounding; int8 activations add their own error to the reference's.
    check(x, qw, bias, a8, 2e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize("fmt,group,sym,a8", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_linear_with_branch(device, fmt, group, sym, a8, dtype, m):
    """linear(..., lowrank=(down, up)) against the reference product plus the branch in float64, on every
    path (small M, the dense path where cuBLAS adds the product onto the branch's, A8, CPU), with leading
    dims; float32 branch weights are used in x's dtype, and an empty branch changes nothing."""
    gen = torch.Generator().manual_seed(m * 7 + len(fmt))
    n, k, r = (131, 4 * 75, 5) if m <= 512 else (19, 4 * 17, 3)
    qw, bias = make(fmt, group, sym, n, k, device, gen, dtype)
    x = torch.randn(1, m, k, generator=gen).to(device, dtype)
    down = torch.randn(r, k, generator=gen) * 0.1
    up = torch.randn(n, r, generator=gen) * 0.1
    y = F.linear(x, qw, bias, a8, (down.to(device, dtype), up.to(device, dtype)))
    assert y.dtype == dtype and y.shape == (1, m, n)
    ref = ref_linear(
        x.reshape(m, k), qw.fmt, qw.qweight.cpu(), qw.scale.cpu(), None if qw.zero is None else qw.zero.cpu(),
        qw.group_size, bias, a8, act_fp8=takes_fp8(x, qw, a8),
    )
    xd = x.reshape(m, k).double().cpu()
    ref = ref + (xd @ down.to(dtype).double().T) @ up.to(dtype).double().T
    err = rel_err(y.reshape(m, n), ref)
    assert err < (2e-2 if dtype == torch.bfloat16 else 5e-3), err
    # the same as the product followed by add_lowrank, up to rounding (each rounds the sum differently)
    apart = F.add_lowrank(F.linear(x, qw, bias, a8), x, down, up)
    assert rel_err(y, apart.double().cpu()) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    torch.testing.assert_close(F.linear(x, qw, bias, a8, (down, up)), y, rtol=0, atol=0)  # float32 branch
    assert torch.equal(F.linear(x, qw, bias, a8, (down[:0], up[:, :0])), F.linear(x, qw, bias, a8))
    with pytest.raises(ValueError, match="down must be"):
        F.linear(x, qw, bias, a8, (down[:, 1:], up))


@pytest.mark.parametrize("fmt,group,sym,a8", CASES)
def test_linear_flux_like_shape_and_leading_dims(device, fmt, group, sym, a8):
    gen = torch.Generator().manual_seed(5)
    qw, bias = make(fmt, group, sym, 96, 3072 // 4, device, gen, torch.bfloat16)
    x = torch.randn(2, 3, 5, 768, generator=gen).to(device, torch.bfloat16)
    check(x, qw, bias, a8, 2e-2)
    # Non-contiguous input: copied, same result as its contiguous copy.
    xt = torch.randn(768, 6, generator=gen).to(device, torch.bfloat16).T
    assert not xt.is_contiguous()
    assert torch.equal(F.linear(xt, qw, bias, a8), F.linear(xt.contiguous(), qw, bias, a8))


@pytest.mark.parametrize("fmt,group,sym,a8", CASES)
def test_zero_rows_columns_and_extreme_scales(device, fmt, group, sym, a8):
    gen = torch.Generator().manual_seed(9)
    n, k = 67, 256
    w = torch.randn(n, k, generator=gen) * torch.logspace(-6, 3, n).unsqueeze(1)
    w[4] = 0
    w[:, 10:20] = 0
    qw = F.quantize(w.to(device), fmt, group, sym)
    x = torch.randn(9, k, generator=gen).to(device, torch.bfloat16)  # bf16: its range holds every row's outputs
    x[2] = 0  # a zero row of activations
    y = F.linear(x, qw, None, a8)
    assert torch.all(y[:, 4] == 0) and torch.all(y[2] == 0)
    ref = ref_linear(
        x, fmt, qw.qweight.cpu(), qw.scale.cpu(), None if qw.zero is None else qw.zero.cpu(), group, None, a8
    )
    # Per column, since the row scales span nine decades.
    colerr = (y.double().cpu() - ref).norm(dim=0) / ref.norm(dim=0).clamp_min(1e-300)
    assert colerr[ref.norm(dim=0) > 0].max() < 2e-2


def test_float32_on_cpu_and_empty_batch():
    gen = torch.Generator().manual_seed(2)
    qw, bias = make("ternary", 0, True, 33, 64, "cpu", gen, torch.float32)
    check(torch.randn(3, 64, generator=gen), qw, bias, False, 1e-5)
    assert F.linear(torch.randn(0, 64), qw, bias).shape == (0, 33)


@pytest.mark.parametrize("fmt,group,sym,a8", [c for c in CASES if not c[3] or c[0] == "ternary"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 64), (2, 576), (3, 576), (4, 1344), (7, 576), (8, 1344), (9, 576), (16, 576),
                                 (1, 2880), (16, 2880)])
def test_linear_small_m_aligned_shapes(device, fmt, group, sym, a8, dtype, m, k):
    # K a multiple of 64 and M <= 16: the shapes the CUDA tensor-core small-M kernel takes (odd N,
    # a partial last scale group, fewer 64-k chunks than warps); W1.58A8 runs it on the int8 codes.
    gen = torch.Generator().manual_seed(m * 7 + k)
    qw, bias = make(fmt, group, sym, 131, k, device, gen, dtype)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    check(x, qw, bias, a8, 2e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize("group", [0, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 4500, 3072), (2, 4500, 3072), (8, 4500, 3072), (1, 1000, 15360),
                                   (3, 1000, 15360)])
def test_ternary_small_m_large_shapes(device, group, dtype, m, n, k):
    # Wide and deep ternary layers at M <= 16: enough rows for the CUDA kernel's two-tile warps and
    # long K splits (the grid is sized to one wave of the GPU), against the fp32 reference.
    gen = torch.Generator().manual_seed(m * 13 + n + k)
    qw, bias = make("ternary", group, True, n, k, device, gen, dtype)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    check(x, qw, bias, False, 2e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 4500, 3072), (2, 131, 576), (1, 67, 64), (1, 1000, 15360), (1, 300, 2880),
                                   (1, 200, 16448), (2, 1000, 15360)])
def test_ternary_one_or_two_tokens_to_the_outputs_rounding(device, dtype, m, n, k):
    # One or two tokens (on CUDA at M = 1 and K <= 16384: integer tensor cores on x's digits), activations spanning
    # nine decades within a token: every output within its dtype's rounding of the exact product, plus a part of
    # sum |x w| far below it.
    gen = torch.Generator().manual_seed(m + n + k)
    qw, bias = make("ternary", 0, True, n, k, device, gen, dtype)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-6, 3, k)[torch.randperm(k, generator=gen)]
    x = x.to(device, dtype)
    y = F.linear(x, qw, bias, False).double().cpu()
    ref = ref_linear(x, "ternary", qw.qweight.cpu(), qw.scale.cpu(), None, 0, bias)
    w = ref_linear(x.abs(), "ternary", qw.qweight.cpu(), qw.scale.cpu().abs(), None, 0).abs()  # sum |x| |w|
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # an ulp at the bottom of a binade
    bound = eps * ref.abs() + 2.0**-16 * w + (0 if bias is None else 2.0**-24 * bias.double().cpu().abs())
    assert torch.all((y - ref).abs() <= bound), ((y - ref).abs() / bound).max()


@pytest.mark.parametrize("m", [1, 2])
def test_ternary_one_or_two_tokens_non_finite_input(device, m):
    # A token holding inf yields non-finite outputs; the other token of the pair stays exact.
    gen = torch.Generator().manual_seed(5)
    qw, _ = make("ternary", 0, True, 75, 576, device, gen)
    x = torch.randn(m, 576, generator=gen).to(device, torch.bfloat16)
    x[0, 100] = float("inf")
    y = F.linear(x, qw, None, False).double().cpu()
    assert not torch.isfinite(y[0]).any()
    if m == 2:
        ref = ref_linear(x[1:], "ternary", qw.qweight.cpu(), qw.scale.cpu(), None, 0)
        assert rel_err(y[1:], ref) < 2e-3


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("m", [1, 4])
def test_ternary_small_m_chain_reads_the_previous_layers_output(device, graph, m):
    # Small-M layers back to back, each fed the output of the one before with no other kernel
    # between (a kernel that started before its input was complete would read part of it), eagerly
    # and replayed from a CUDA graph; checked layer by layer against the reference on what the
    # layer was actually fed.
    if graph and device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    gen = torch.Generator().manual_seed(m)
    layers = [make("ternary", 0, True, 1536, 1536, device, gen)[0] for _ in range(8)]
    x0 = torch.randn(m, 1536, generator=gen).to(device, torch.bfloat16)

    def chain(x):
        outs = []
        for qw in layers:
            x = F.linear(x, qw, None, False)  # no other kernel between: (x ~ N(0, 1)) -> y ~ N(0, ~1.3)
            outs.append(x)
        return outs

    if graph:
        chain(x0)  # warm-up outside the capture (lazy CUDA state)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = chain(x0)
        g.replay()
    else:
        outs = chain(x0)
    for qw, x, y in zip(layers, [x0] + outs[:-1], outs):
        ref = ref_linear(x, qw.fmt, qw.qweight.cpu(), qw.scale.cpu(), None, qw.group_size)
        assert rel_err(y, ref) < 2e-2


@pytest.mark.parametrize("fmt,group,sym,a8", CASES)
@pytest.mark.parametrize("m", [1, 33])
def test_eager_call_is_the_op(device, fmt, group, sym, a8, m):
    """Eagerly, linear() runs the op's implementation without the custom-op dispatch (host time): bit for bit
    what the registered op bitkernel::linear computes, with and without a branch."""
    gen = torch.Generator().manual_seed(m + len(fmt))
    qw, bias = make(fmt, group, sym, 131, 4 * 75, device, gen, torch.bfloat16)
    x = torch.randn(m, 4 * 75, generator=gen).to(device, torch.bfloat16)
    lr = ((torch.randn(4, 300, generator=gen) * 0.1).to(device, torch.bfloat16),
          (torch.randn(131, 4, generator=gen) * 0.1).to(device, torch.bfloat16))
    for branch in (None, lr):
        op = torch.ops.bitkernel.linear(x, qw.qweight, qw.scale, qw.zero, bias, F.FORMAT_CODES[fmt], group, a8,
                                        *(branch or (None, None)))
        assert torch.equal(F.linear(x, qw, bias, a8, branch), op)


@pytest.mark.parametrize("fmt,group,sym,a8", CASES)
@pytest.mark.parametrize("m", [1, 33])
def test_strided_bias_reads_as_its_values(device, fmt, group, sym, a8, m):
    """A bias view with a stride (every other element of a buffer) gives what its contiguous copy gives."""
    gen = torch.Generator().manual_seed(m + len(fmt))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    qw, bias = make(fmt, group, sym, 131, 4 * 75, device, gen, dtype)
    x = torch.randn(m, 4 * 75, generator=gen).to(device, bias.dtype)
    wide = torch.zeros(2 * 131, device=device, dtype=bias.dtype)
    wide[::2] = bias
    assert torch.equal(F.linear(x, qw, wide[::2], a8), F.linear(x, qw, bias, a8))
