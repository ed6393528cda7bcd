"""The FP8 path of W1.58A8 (sm_89+): its operand kernels bit-exact against torch, the op
against a reference that models e4m3 activations, and the dispatch rule (pure, runs anywhere)."""

import os
import subprocess
import sys

import pytest
import torch

import bitkernel._lib as lib
import bitkernel.functional as F

from kernel_reference import dequantize, fp8_row_scales, pack_codes, quantize_rows_fp8, unpack_codes
from kernel_reference import linear as ref_linear

HAS_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def fp8_gpu(test):
    return pytest.mark.cuda(
        pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a CUDA GPU of compute capability 8.9+")(test)
    )


def round_up(v, to=16):
    return -(-v // to) * to


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------
# References in plain torch (documented rule of functional.quantize_rows_fp8).


def ref_ternary_to_fp8(qweight, k, rows, cols):
    w = (unpack_codes("ternary", qweight.cpu()) - 1).float()
    w[w > 1] = 0  # the invalid code 3 reads as weight 0
    out = torch.zeros(rows, cols)
    out[: w.shape[0], :k] = w
    return out.to(torch.float8_e4m3fn)


def ref_linear_fp8(x, qw, bias):
    """float64 product of the e4m3-quantized activations and the exact ternary weights."""
    k = qw.in_features
    q, s = quantize_rows_fp8(x.reshape(-1, k))
    xr = q.double() * s.double()
    w = dequantize("ternary", qw.qweight, qw.scale, None, k, 0).to(x.device)
    y = xr @ w.T
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], qw.out_features)


def codes(t):
    return t.view(torch.uint8).cpu()


def int8_kernel(x, qw, bias):
    """The W1.58A8 int8 kernel (the path before FP8), called directly."""
    c = lib.require_cuda()
    x2 = x.reshape(-1, qw.in_features).contiguous()
    m, k, n = x2.shape[0], qw.in_features, qw.out_features
    xq = torch.empty(m, round_up(k, 64), dtype=torch.int8, device=x.device)
    xs = torch.empty(m, dtype=torch.float32, device=x.device)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    st = torch.cuda.current_stream().cuda_stream
    dt = F.DTYPE_CODES[x.dtype]
    c.quantize_act_cuda(x2.data_ptr(), dt, m, k, xq.data_ptr(), xs.data_ptr(), st)
    c.gemm_s8_cuda(
        0, xq.data_ptr(), xs.data_ptr(), m, k, qw.qweight.data_ptr(), qw.scale.data_ptr(), n,
        0 if bias is None else bias.data_ptr(), dt, y.data_ptr(), st,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """Counts torch._scaled_mm calls (the FP8 path's GEMM) and starts from a clean plan cache."""
    calls = []
    real = torch._scaled_mm

    def spy(*args, **kwargs):
        calls.append(kwargs.get("out_dtype"))
        return real(*args, **kwargs)

    fp8_path_with(monkeypatch, spy)
    return calls


@pytest.fixture
def scaled_mm_widths(monkeypatch):
    """The K of each torch._scaled_mm call (the FP8 path's GEMM), from a clean plan cache."""
    widths = []
    real = torch._scaled_mm
    fp8_path_with(monkeypatch, lambda a, *rest, **kw: widths.append(a.shape[1]) or real(a, *rest, **kw))
    return widths


def fp8_path_with(monkeypatch, scaled_mm):
    """The FP8 path on, from a clean plan cache, with `scaled_mm` in place of torch._scaled_mm."""
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    monkeypatch.setattr(F, "_fp8_plans", {})
    monkeypatch.setattr(F, "_fp8_failed", {})
    monkeypatch.setattr(F, "FP8", True)


def make_ternary(n, k, gen, device="cuda", bias_dtype=None):
    w = torch.randn(n, k, generator=gen) * 0.05
    qw = F.quantize(w.to(device), "ternary")
    bias = None if bias_dtype is None else (torch.randn(n, generator=gen) * 0.1).to(device, bias_dtype)
    return qw, bias


def tolerance(dtype):
    # What is left once the reference models e4m3: the GEMM's accumulation (fast accumulation:
    # ~0.5e-4 relative more than fp32's at these K, bench/results/fp8_path_h200.md) and the output
    # rounding (bfloat16 2^-9 relative, float16 2^-11, or bfloat16's when fp16 goes through bf16). An int8
    # reference would be ~2.5e-2 away, so these bounds check the e4m3 model, not just closeness.
    direct_fp16 = F.fp8_output_plan(dtype, torch.cuda.get_device_capability()) == (torch.float16, True)
    return 1e-3 if direct_fp16 else 5e-3


# ---------------------------------------------------------------------------
# CPU: the dispatch rule, the output plan, the switch and argument errors.


def test_dispatch_rule_is_a_pure_function(monkeypatch):
    monkeypatch.setattr(F, "FP8", True)
    rule = F.fp8_path_applies
    assert rule("ternary", 0, True, 17, (9, 0))
    assert rule("ternary", 0, True, 4608, (8, 9))
    assert rule("ternary", 0, True, 4608, (12, 0))
    assert not rule("ternary", 0, True, 16, (9, 0))  # small M keeps the int8 path
    assert not rule("ternary", 0, True, 4608, (8, 6))  # no FP8 tensor cores before sm_89
    assert not rule("ternary", 0, False, 4608, (9, 0))  # W1.58A16 expands to 16 bits instead
    assert not rule("int8", 0, True, 4608, (9, 0))  # int8 weights are not exact in e4m3
    assert not rule("ternary", 64, True, 4608, (9, 0))  # group scales cannot be column scales
    monkeypatch.setattr(F, "FP8", False)
    assert not rule("ternary", 0, True, 4608, (9, 0))


def test_output_plan():
    plan = F.fp8_output_plan
    bf16, fp16 = torch.bfloat16, torch.float16
    assert plan(bf16, (8, 9), "2.4.0", "12.1") == (bf16, True)
    assert plan(fp16, (9, 0), "2.11.0+cu130", "13.0") == (fp16, True)  # cuBLAS row-wise path
    assert plan(fp16, (9, 0), "2.11.0", "12.8") == (bf16, False)  # CUTLASS path
    assert plan(fp16, (9, 0), "2.8.0", "12.9") == (bf16, False)
    assert plan(fp16, (8, 9), "2.11.0", "13.0") == (bf16, False)
    assert plan(fp16, (10, 0), "2.11.0", "13.0") == (bf16, False)


def test_row_scales_match_the_reference():
    """The calibration's fake quantization uses F.fp8_row_scales: the kernel's rule (tested bit for bit on the
    GPU below) against the reference's exponent search, on the CPU."""
    gen = torch.Generator().manual_seed(3)
    a = torch.cat([
        torch.exp(torch.randn(4000, generator=gen) * 30),  # e^+-90 and beyond: every binade of float32
        torch.tensor([0.0, float("inf"), float("nan"), 1e-45, 1e-38, 5e-36, 448.0, 448.0 * 2**-20, 3.4e38]),
        torch.tensor([448.0 * 2**k for k in range(-40, 40)]).nextafter(torch.tensor(1e39)),  # just above a power
    ]).float().unsqueeze(1)  # fmt: skip
    ref = fp8_row_scales(a)
    got = F.fp8_row_scales(a)
    assert torch.equal(got, ref)
    ok = (a > 0) & torch.isfinite(a)
    assert torch.all(a[ok] / got[ok] <= 448) and torch.all(got[~ok] == 1)


def test_env_switch_read_at_import():
    code = "import bitkernel.functional as F; print(F.FP8)"
    for value, expect in (("0", "False"), (None, "True")):
        env = {k: v for k, v in os.environ.items() if k != "BITKERNEL_FP8"}
        if value is not None:
            env["BITKERNEL_FP8"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expect


def test_fp8_entry_points_reject_what_they_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="CUDA"):
        F.quantize_rows_fp8(torch.randn(4, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="float16/bfloat16"):
        F.quantize_rows_fp8(torch.randn(4, 64))
    with pytest.raises(ValueError, match="uint8 codes"):
        F.ternary_to_fp8(torch.zeros(4, 16, dtype=torch.uint8), 64)
    # An sm_80 GPU gets a message naming the requirement (no GPU needed to check it).
    monkeypatch.setattr(F, "_capability", lambda index: (8, 0))
    with pytest.raises(RuntimeError, match="compute capability 8.9"):
        F._require_fp8(torch.device("cuda", 0), "quantize_rows_fp8")


# ---------------------------------------------------------------------------
# GPU: the operand kernels, bit for bit.


@fp8_gpu
@pytest.mark.parametrize("n,k", [(131, 300), (19, 68), (64, 4096), (3072, 3072), (7, 4)])
@pytest.mark.parametrize("pad", [False, True])
def test_ternary_to_fp8_bit_exact(n, k, pad):
    gen = torch.Generator().manual_seed(n + k)
    c = torch.randint(0, 3, (n, k), generator=gen)
    c[0, : min(k, 8)] = 3  # invalid code: weight 0
    q = pack_codes("ternary", c)
    rows, cols = (round_up(n) + 16, round_up(k) + 32) if pad else (n, round_up(k))
    out = F.ternary_to_fp8(q.cuda(), k, rows, cols)
    assert out.dtype == torch.float8_e4m3fn and out.shape == (rows, cols)
    assert torch.equal(codes(out), codes(ref_ternary_to_fp8(q, k, rows, cols)))
    # Codes at an odd address take the byte-load path: same bytes.
    buf = torch.empty(n * k // 4 + 1, dtype=torch.uint8, device="cuda")
    q_odd = buf[1:].view(n, k // 4)
    q_odd.copy_(q)
    assert torch.equal(codes(F.ternary_to_fp8(q_odd, k, rows, cols)), codes(out))


def awkward_rows(m, k, dtype, gen):
    """Rows over many decades, a zero row, -0.0, values in e4m3's subnormal range, outliers."""
    x = torch.randn(m, k, generator=gen) * torch.logspace(-4, 4, m).unsqueeze(1)
    x[1] = 0
    x[2] = -0.0
    x[3, ::2] = -0.0
    x[4] = torch.randn(k, generator=gen) * 1e-3
    x[4, k // 2] = 300.0  # one outlier: most codes land in e4m3's subnormals or flush to +-0
    x = x.to(dtype)
    if dtype == torch.bfloat16:  # the ends of bf16's range: a scale below 2^-126 (clamped there), one of 2^80
        x[5] = (torch.randn(k, generator=gen) * 1e-37).to(dtype)
        x[6] = (torch.randn(k, generator=gen) * 1e25).to(dtype)
        x[8] = (torch.randn(k, generator=gen) * 1e-39).to(dtype)  # max|x| a float32 subnormal
    return x


@fp8_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
# 64..15360: single pass in registers (2, 4, 8 vectors per thread); 20000: two passes; 300 and
# 1000: K % 8 != 0 or unaligned rows take the element-wise two-pass kernel.
@pytest.mark.parametrize("k", [64, 300, 1000, 3072, 6144, 15360, 20000])
# 2000 rows: more than the single-pass kernel's grid on any GPU, so its blocks walk several rows each.
@pytest.mark.parametrize("m", [37, 2000])
def test_quantize_rows_fp8_bit_exact(dtype, k, m):
    gen = torch.Generator().manual_seed(k + m)
    x = awkward_rows(m, k, dtype, gen).cuda()
    q, s = F.quantize_rows_fp8(x)
    qr, sr = quantize_rows_fp8(x.cpu())
    assert q.shape == (m, round_up(k)) and s.shape == (m, 1) and s.dtype == torch.float32
    assert torch.equal(s.cpu(), sr)
    assert torch.equal(codes(q[:, :k]), codes(qr))
    assert torch.all(codes(q[:, k:]) == 0)
    assert s[1].item() == 1.0 and torch.all(codes(q[1]) == 0)  # zero row: scale 1, zeros
    assert torch.all(codes(q[3, :k:2]) == 0x80)  # -0.0 stays -0.0, as in torch
    # Strided rows (aligned and unaligned starts) give the same bytes, and extra columns are zero.
    for off in (8, 1):
        big = torch.zeros(m, k + 24, dtype=dtype, device="cuda")
        big[:, off : off + k] = x
        qs, ss = F.quantize_rows_fp8(big[:, off : off + k], cols=round_up(k) + 16)
        assert torch.equal(codes(qs[:, :k]), codes(qr)) and torch.equal(ss.cpu(), sr)
        assert torch.all(codes(qs[:, k:]) == 0)


@fp8_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
# (M, N, K): one launch with 2, 4 and 8 vectors per thread, more rows than the quantization's grid, N padded;
# K = 300 and 20000 do not fit it and take the two kernels.
@pytest.mark.parametrize("m,n,k", [(37, 131, 3072), (2000, 96, 768), (600, 19, 6144), (50, 64, 15360),
                                   (40, 131, 300), (20, 16, 20000)])
def test_fp8_operands_in_one_launch_match_the_two_kernels(dtype, m, n, k):
    """The op's operands (fp8_operands_cuda) are the bytes of quantize_rows_fp8 and ternary_to_fp8."""
    gen = torch.Generator().manual_seed(m + n + k)
    x = awkward_rows(m, k, dtype, gen).cuda()
    q = pack_codes("ternary", torch.randint(0, 3, (n, k), generator=gen)).cuda()
    kp, rows = round_up(k), round_up(n)
    x8 = torch.full((m, kp), 7, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    sx = torch.empty(m, 1, dtype=torch.float32, device="cuda")
    w8 = torch.full((rows, kp), 7, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    assert lib.C.fp8_operands_cuda(
        x.data_ptr(), F.DTYPE_CODES[dtype], m, k, x.stride(0), x8.data_ptr(), kp, sx.data_ptr(),
        q.data_ptr(), n, rows, w8.data_ptr(), kp, 0, 0, 0, 0, 0, 0, torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    xr, sr = F.quantize_rows_fp8(x)
    assert torch.equal(codes(x8), codes(xr)) and torch.equal(sx, sr)
    assert torch.equal(codes(w8), codes(F.ternary_to_fp8(q, k, rows, kp)))


@fp8_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,r", [(37, 131, 3072, 32), (5, 16, 64, 8), (40, 19, 15360, 24), (3, 7, 16, 40)])
def test_fp8_operands_with_the_folded_branch(dtype, m, n, k, r):
    """With a branch (t [M, R], up [N, R]) the operands are [x | t] quantized as one row and
    [codes | e4m3(up / s)] with the GEMM's column scales s (1, and zero codes, where s is 0), bit for bit."""
    gen = torch.Generator().manual_seed(m + n + k + r)
    x = (torch.randn(m, k, generator=gen) * 3).to("cuda", dtype)
    t = (torch.randn(m, r, generator=gen) * torch.logspace(-2, 2, m).unsqueeze(1)).to("cuda", dtype)
    up = (torch.randn(n, r, generator=gen) * 0.05).to("cuda", dtype)
    scale = torch.rand(n, 1, generator=gen).cuda() * 0.05 + 0.01
    scale[n // 2] = 0
    scale[1] = 1e-5  # max|up| / s ~ 10^4: this row's codes become +-2^-e (e = 5 or 6)
    up[n // 2] *= 20000  # beyond 448 with the zero row's scale of 1 too
    q = pack_codes("ternary", torch.randint(0, 3, (n, k), generator=gen)).cuda()
    kp, rows = round_up(k + r), round_up(n)
    x8 = torch.full((m, kp), 7, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    sx = torch.empty(m, 1, dtype=torch.float32, device="cuda")
    w8 = torch.full((rows, kp), 7, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    sw = torch.full((1, rows), -1.0, device="cuda")
    assert lib.C.fp8_operands_cuda(
        x.data_ptr(), F.DTYPE_CODES[dtype], m, k, k, x8.data_ptr(), kp, sx.data_ptr(), q.data_ptr(), n, rows,
        w8.data_ptr(), kp, t.data_ptr(), r, r, up.data_ptr(), scale.data_ptr(), sw.data_ptr(),
        torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    xr, sr = F.quantize_rows_fp8(torch.cat([x, t], 1), kp)
    assert torch.equal(codes(x8), codes(xr)) and torch.equal(sx, sr)
    sc, mag = fold_scales(scale, up)
    assert sc[1] > 2 * scale[1].item() and sc[n // 2] > 1  # the exponent is exercised
    assert torch.equal(sw[0, :n].cpu(), sc) and torch.all(sw[0, n:] == 1)
    wr = F.ternary_to_fp8(q, k, rows, kp).float()
    wr[:n] *= mag[:, None].cuda()
    wr[n // 2] = 0
    wr[:n, k : k + r] = (up.double() / sc[:, None].cuda().double()).float()
    wr = wr.to(torch.float8_e4m3fn)
    assert not torch.isnan(wr.float()).any()
    assert torch.equal(codes(w8), codes(wr))
    # A rank the kernel does not take (not a multiple of 8) is refused without writing anything.
    before = codes(x8).clone()
    assert not lib.C.fp8_operands_cuda(
        x.data_ptr(), F.DTYPE_CODES[dtype], m, k, k, x8.data_ptr(), kp, sx.data_ptr(), q.data_ptr(), n, rows,
        w8.data_ptr(), kp, t.data_ptr(), r - 1, r, up.data_ptr(), scale.data_ptr(), sw.data_ptr(),
        torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    assert torch.equal(codes(x8), before)


# ---------------------------------------------------------------------------
# GPU: the op.


@fp8_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [17, 33, 512, 4608])
@pytest.mark.parametrize("n,k", [(131, 4 * 75), (96, 768), (3072, 3072)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_a8_op_matches_fp8_model(scaled_mm_calls, dtype, m, n, k, with_bias):
    if n * k > 10**6 and m < 512:
        pytest.skip("the FLUX-sized layer is covered at large M")
    gen = torch.Generator().manual_seed(m + n + k)
    qw, bias = make_ternary(n, k, gen, bias_dtype=dtype if with_bias else None)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    x[m // 2] = 0
    y = F.linear(x, qw, bias, act_int8=True)
    assert len(scaled_mm_calls) == 1, "the FP8 path did not run"
    assert y.dtype == dtype and y.shape == (m, n)
    ref = ref_linear_fp8(x, qw, bias)
    assert rel_err(y, ref) < tolerance(dtype), rel_err(y, ref)
    # A zero row gives exactly the bias (or zeros).
    assert torch.equal(y[m // 2], bias if with_bias else torch.zeros_like(y[m // 2]))


@fp8_gpu
def test_a8_op_leading_dims_strided_input_and_zero_weight_rows(scaled_mm_calls):
    gen = torch.Generator().manual_seed(7)
    n, k = 67, 256
    w = torch.randn(n, k, generator=gen) * torch.logspace(-6, 3, n).unsqueeze(1)
    w[4] = 0
    qw = F.quantize(w.cuda(), "ternary")
    bias = (torch.randn(n, generator=gen) * 0.1).to("cuda", torch.bfloat16)
    x = torch.randn(2, 3, 7, k, generator=gen).to("cuda", torch.bfloat16)
    y = F.linear(x, qw, bias, act_int8=True)
    assert y.shape == (2, 3, 7, n) and len(scaled_mm_calls) == 1
    assert torch.all(y[..., 4] == bias[4])
    ref = ref_linear_fp8(x, qw, bias)
    colerr = (y.double() - ref).reshape(-1, n).norm(dim=0) / ref.reshape(-1, n).norm(dim=0)
    assert colerr.max() < 5e-3, colerr.max()
    # Rows with a stride (a slice of a wider tensor) are read in place: same result.
    big = torch.randn(40, k + 64, generator=gen).to("cuda", torch.bfloat16)
    xs = big[:, 32 : 32 + k]
    assert not xs.is_contiguous()
    assert torch.equal(F.linear(xs, qw, bias, True), F.linear(xs.contiguous(), qw, bias, True))


def fold_scales(scale, up):
    """(column scales, code magnitudes 2^-e) of the folded branch's weight rows (cuda/fp8.cu, Fold): s, or 1
    where s is 0, doubled (at most 9 times) while max|up[n]| exceeds 448 times it; float32 as the kernel."""
    sc = scale.reshape(-1).float().cpu().clone()
    sc[sc == 0] = 1
    amax = up.abs().amax(1).float().cpu()
    mag = torch.ones_like(sc)
    for _ in range(9):
        need = amax > 448 * sc
        sc, mag = torch.where(need, sc * 2, sc), torch.where(need, mag / 2, mag)
    return sc, mag


def ref_linear_fp8_fold(x, qw, bias, down, up):
    """The FP8 GEMM with the branch folded into its K (cuda/fp8.cu, Fold), in float64: rows [x | t] with
    t = x @ down.T (the op's own cuBLAS call) quantized together, weight rows [codes 2^-e | e4m3(up / sc)] with
    column scales sc (fold_scales), and a row of scale 0 taken as zero codes."""
    k, n = qw.in_features, qw.out_features
    x2 = x.reshape(-1, k)
    t = torch.nn.functional.linear(x2, down)
    q, s = quantize_rows_fp8(torch.cat([x2, t], 1))
    sc, mag = fold_scales(qw.scale, up)
    w = dequantize("ternary", qw.qweight.cpu(), torch.ones(n, 1), None, k, 0).double() * mag.double()[:, None]
    w[qw.scale.reshape(-1).cpu() == 0] = 0
    sc = sc.double()
    u8 = (up.double().cpu() / sc[:, None]).float().to(torch.float8_e4m3fn).double()
    y = (q.double().cpu() * s.double().cpu()) @ torch.cat([w, u8], 1).T * sc
    if bias is not None:
        y = y + bias.double().cpu()
    return y.reshape(*x.shape[:-1], n)


@fp8_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [17, 100, 4608])
@pytest.mark.parametrize("n,k,r", [(131, 4 * 76, 8), (96, 768, 32), (3072, 3072, 32), (40, 256, 24)])
def test_a8_branch_folded_into_the_gemm(scaled_mm_widths, dtype, m, n, k, r):
    if n * k > 10**6 and m < 4608:
        pytest.skip("the FLUX-sized layer is covered at large M")
    gen = torch.Generator().manual_seed(m + n + r)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[3] = 0  # scale 0: the fold gives the row column scale 1 and zero codes, the branch still counts
    qw = F.quantize(w.cuda(), "ternary")
    assert qw.scale[3].item() == 0
    qw.scale[5] = 1e-6  # a row whose branch is ~10^4 times its weights: codes +-2^-e, column scale s 2^e
    bias = (torch.randn(n, generator=gen) * 0.1).to("cuda", dtype)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    x[m // 2] = 0
    down = (torch.randn(r, k, generator=gen) * 0.05).to("cuda", dtype)
    up = (torch.randn(n, r, generator=gen) * 0.05).to("cuda", dtype)
    y = F.linear(x, qw, bias, True, (down, up))
    assert scaled_mm_widths == [round_up(k + r)], "the branch was not folded into the GEMM's K"
    assert y.dtype == dtype and y.shape == (m, n)
    ref = ref_linear_fp8_fold(x, qw, bias, down, up)
    assert rel_err(y.cpu(), ref) < tolerance(dtype), rel_err(y.cpu(), ref)
    col3 = (y[:, 3].double().cpu() - ref[:, 3]).norm() / ref[:, 3].norm()
    assert col3 < 2e-2, col3  # the zero-scale row: bias + branch
    assert torch.equal(y[m // 2], bias)  # a zero row: t = 0 too
    # Against the exact branch in float64 the fold adds e4m3's rounding of t and up: small next to the branch.
    branch = (x.double() @ down.double().T @ up.double().T).cpu()
    exact = ref_linear_fp8(x, qw, bias).cpu() + branch
    assert (y.cpu().double() - exact).norm() < 0.1 * branch.norm() + tolerance(dtype) * exact.norm()


@fp8_gpu
def test_a8_branch_of_other_ranks_runs_apart(scaled_mm_widths):
    gen = torch.Generator().manual_seed(12)
    qw, bias = make_ternary(96, 768, gen, bias_dtype=torch.bfloat16)
    x = torch.randn(64, 768, generator=gen).to("cuda", torch.bfloat16)
    down = (torch.randn(5, 768, generator=gen) * 0.05).to("cuda", torch.bfloat16)
    up = (torch.randn(96, 5, generator=gen) * 0.05).to("cuda", torch.bfloat16)
    y = F.linear(x, qw, bias, True, (down, up))
    assert scaled_mm_widths == [768]
    ref = ref_linear_fp8(x, qw, bias).cpu() + (x.double() @ down.double().T @ up.double().T).cpu()
    assert rel_err(y.cpu(), ref) < tolerance(torch.bfloat16)


@fp8_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_switch_off_gives_the_int8_path(scaled_mm_calls, monkeypatch, dtype):
    gen = torch.Generator().manual_seed(3)
    qw, bias = make_ternary(131, 300, gen, bias_dtype=dtype)
    x = torch.randn(512, 300, generator=gen).to("cuda", dtype)
    y8 = F.linear(x, qw, bias, True)
    assert len(scaled_mm_calls) == 1
    monkeypatch.setattr(F, "FP8", False)
    y = F.linear(x, qw, bias, True)
    assert len(scaled_mm_calls) == 1  # no GEMM call: the int8 kernel ran
    assert torch.equal(y, int8_kernel(x, qw, bias))
    ref = ref_linear(x, "ternary", qw.qweight.cpu(), qw.scale.cpu(), None, 0, bias, True)
    assert rel_err(y.cpu(), ref) < (2e-2 if dtype == torch.bfloat16 else 5e-3)
    assert not torch.equal(y, y8)  # the two activation formats round differently


@fp8_gpu
def test_small_m_keeps_the_int8_path(scaled_mm_calls):
    gen = torch.Generator().manual_seed(4)
    qw, bias = make_ternary(131, 300, gen, bias_dtype=torch.bfloat16)
    x = torch.randn(16, 300, generator=gen).to("cuda", torch.bfloat16)
    assert torch.equal(F.linear(x, qw, bias, True), int8_kernel(x, qw, bias))
    assert not scaled_mm_calls


@fp8_gpu
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp16_through_bf16_output(scaled_mm_calls, monkeypatch, with_bias):
    # The plan for torch/GPU combinations whose row-wise _scaled_mm cannot write float16.
    monkeypatch.setattr(F, "fp8_output_plan", lambda dtype, cap: (torch.bfloat16, False))
    gen = torch.Generator().manual_seed(5)
    qw, bias = make_ternary(131, 300, gen, bias_dtype=torch.float16 if with_bias else None)
    x = torch.randn(64, 300, generator=gen).to("cuda", torch.float16)
    y = F.linear(x, qw, bias, True)
    assert scaled_mm_calls == [torch.bfloat16] and y.dtype == torch.float16
    assert rel_err(y, ref_linear_fp8(x, qw, bias)) < 5e-3


@fp8_gpu
def test_refused_scaled_mm_falls_back_to_int8_once(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("row-wise scaling is not supported here")

    fp8_path_with(monkeypatch, refuse)
    gen = torch.Generator().manual_seed(6)
    qw, bias = make_ternary(131, 300, gen, bias_dtype=torch.float16)
    x = torch.randn(64, 300, generator=gen).to("cuda", torch.float16)
    with pytest.warns(RuntimeWarning, match="int8 kernel"):
        y = F.linear(x, qw, bias, True)
    assert torch.equal(y, int8_kernel(x, qw, bias))
    tried = len(calls)
    assert tried >= 1
    assert torch.equal(F.linear(x, qw, bias, True), y) and len(calls) == tried  # not retried


@fp8_gpu
def test_refusal_after_a_plan_worked_probes_again(monkeypatch):
    """A plan that ran once is tried first; if torch._scaled_mm refuses a later call (its shape, its bias), the
    plans are probed again for that call instead of the error reaching the caller."""
    real = torch._scaled_mm
    refuse_fused_bias = []

    def picky(*args, **kwargs):
        if refuse_fused_bias and kwargs.get("bias") is not None:
            raise RuntimeError("no fused bias for this call")
        return real(*args, **kwargs)

    fp8_path_with(monkeypatch, picky)
    gen = torch.Generator().manual_seed(8)
    qw, bias = make_ternary(96, 768, gen, bias_dtype=torch.bfloat16)
    x = torch.randn(64, 768, generator=gen).to("cuda", torch.bfloat16)
    ref = ref_linear_fp8(x, qw, bias)
    assert rel_err(F.linear(x, qw, bias, True), ref) < tolerance(torch.bfloat16)  # plan: bf16 out, bias fused
    refuse_fused_bias.append(True)
    assert rel_err(F.linear(x, qw, bias, True), ref) < tolerance(torch.bfloat16)  # bias added after the GEMM
    assert not F._fp8_failed


@fp8_gpu
def test_op_registration_and_cuda_graph_capture(scaled_mm_calls):
    gen = torch.Generator().manual_seed(8)
    qw, bias = make_ternary(48, 256, gen, bias_dtype=torch.bfloat16)
    x = torch.randn(33, 256, generator=gen).to("cuda", torch.bfloat16)
    torch.library.opcheck(
        torch.ops.bitkernel.linear.default, (x, qw.qweight, qw.scale, None, bias, 0, 0, True, None, None)
    )
    y0 = F.linear(x, qw, bias, True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        F.linear(x, qw, bias, True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = F.linear(x, qw, bias, True)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y0)
