"""W1.58A16 at large M on Hopper: bitkernel's sm_90 GEMM (codes decoded in registers for wgmma, split tiles
summed through a workspace) against dequantize-then-matmul in float64. Runs where the GPU is sm_90 and the build
has the sm_90a image; skipped elsewhere."""

import os
import subprocess
import sys

import pytest
import torch

import bitkernel.functional as F
from bitkernel._lib import C

from kernel_reference import linear as ref_linear

HAS_SM90 = (
    torch.cuda.is_available()
    and torch.cuda.get_device_capability() == (9, 0)
    and hasattr(C, "gemm_ternary_sm90_cuda")
)
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_SM90, reason="needs an sm_90 GPU and the sm_90a build")]
DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def every_shape(monkeypatch):
    """The kernel takes shapes it would leave to the expansion route for speed."""
    monkeypatch.setattr(F, "SM90_MIN_KTILES", 0.0)


def operands(m, n, k, dtype, seed, bias=True):
    gen = torch.Generator().manual_seed(seed)
    qw = F.quantize((torch.randn(n, k, generator=gen) * 0.05).cuda(), "ternary", 0)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    b = (torch.randn(n, generator=gen) * 0.1).to("cuda", dtype) if bias else None
    return x, qw, b


def reference(x, qw, bias):
    return ref_linear(x, "ternary", qw.qweight.cpu(), qw.scale.cpu(), None, 0, bias)


def gemm(x, qw, bias=None, base=None):
    dev = x.device
    with torch.cuda.device(dev):
        return F._gemm_sm90(C, x, qw, bias, base, torch.cuda.current_stream(dev).cuda_stream)


def rel_err(y, ref):
    return ((y.double().cpu() - ref).norm() / ref.norm()).item()


def tol(dtype):
    return 8e-3 if dtype == torch.bfloat16 else 1e-3  # the output's rounding: bf16 2^-9, fp16 2^-12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m,n,k",
    [
        (1, 8, 64),  # one k-tile, one output column pair
        (17, 136, 128),  # N not a multiple of the 128-row tile
        (191, 256, 192),
        (193, 3072, 3072),  # few tiles: every tile split by k
        (512, 9216, 3072),
        (1000, 3072, 12288),  # whole waves, then split tiles
        (4608, 3072, 3072),
        (4097, 1032, 640),  # M one past a multiple of every tile height
    ],
)
def test_product_against_reference(dtype, m, n, k):
    x, qw, bias = operands(m, n, k, dtype, m + n + k)
    y = gemm(x, qw, bias)
    assert y is not None and y.dtype == dtype and y.shape == (m, n)
    assert torch.isfinite(y).all()
    assert rel_err(y, reference(x, qw, bias)) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(300, 1024, 1024), (4608, 3072, 3072)])
def test_accumulates_onto_the_base(dtype, m, n, k):
    """With a base (the low-rank branch's product and the bias) the product is added onto it in place."""
    x, qw, _ = operands(m, n, k, dtype, 7 * m + n, bias=False)
    base = torch.randn(m, n, device="cuda", dtype=dtype)
    expect = reference(x, qw, None) + base.double().cpu()
    y = gemm(x, qw, None, base.clone())
    assert y is not None
    assert rel_err(y, expect) < 2 * tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_op_takes_it_with_a_branch_and_leading_dims(dtype):
    x, qw, bias = operands(2 * 300, 1024, 1024, dtype, 11)
    down = torch.randn(16, 1024, device="cuda", dtype=dtype) * 0.05
    up = torch.randn(1024, 16, device="cuda", dtype=dtype) * 0.05
    y = F.linear(x.reshape(2, 300, 1024), qw, bias, False, (down, up))
    xd = x.double().cpu()
    ref = reference(x, qw, bias) + (xd @ down.double().cpu().T) @ up.double().cpu().T
    assert y.shape == (2, 300, 1024)
    assert rel_err(y.reshape(600, 1024), ref) < 2 * tol(dtype)


def test_split_tiles_are_deterministic_and_leave_their_counts_zero():
    """Split tiles hand their sums over through the workspace (counts first, then the partial sums): the last
    k-range's CTA adds them in a fixed order, so calls agree bit for bit, and it sets the counts back to zero
    for the next launch on the stream."""
    for m, n, k in [(193, 3072, 3072), (1000, 3072, 12288), (512, 9216, 3072)]:
        x, qw, bias = operands(m, n, k, torch.bfloat16, n)
        first = gemm(x, qw, bias)
        for _ in range(3):
            torch.testing.assert_close(gemm(x, qw, bias), first, rtol=0, atol=0)
    torch.cuda.synchronize()
    counts = 16 * torch.cuda.get_device_properties(0).multi_processor_count  # 16 bytes per SM (kernels.h)
    assert F._sm90_workspace and all(int(ws[:counts].count_nonzero()) == 0 for ws in F._sm90_workspace.values())


def test_graphs_own_their_workspace():
    """Two graphs captured alike (the same capture stream) replayed at once on two streams: each has its own split
    tiles' counts and sums, so both give the eager result."""
    x, qw, bias = operands(193, 3072, 3072, torch.bfloat16, 5)  # every tile split by k
    expect = F.linear(x, qw, bias)
    graphs, outs = [], []
    for _ in range(2):
        F.linear(x, qw, bias)  # warm-up outside capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(F.linear(x, qw, bias))
        graphs.append(g)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(5):
        for g, s in zip(graphs, streams):
            with torch.cuda.stream(s):
                g.replay()
        torch.cuda.synchronize()
        for y in outs:
            torch.testing.assert_close(y, expect, rtol=0, atol=0)


def test_strided_bias():
    x, qw, bias = operands(300, 1024, 1024, torch.float16, 9)
    wide = torch.zeros(2 * 1024, device="cuda", dtype=torch.float16)
    wide[::2] = bias
    torch.testing.assert_close(F.linear(x, qw, wide[::2]), F.linear(x, qw, bias), rtol=0, atol=0)


@pytest.mark.parametrize(
    "what,shape,group",
    [("K not a multiple of 64", (256, 128, 96), 0), ("N not a multiple of 8", (256, 132, 128), 0),
     ("group scales", (256, 128, 128), 64)],
)
def test_declines_what_it_does_not_take(what, shape, group):
    """Those go to the expansion route, which the op still gets right."""
    m, n, k = shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qw = F.quantize(torch.randn(n, k, device="cuda") * 0.05, "ternary", group)
    assert gemm(x, qw) is None, what
    ref = ref_linear(x, "ternary", qw.qweight.cpu(), qw.scale.cpu(), None, group)
    assert rel_err(F.linear(x, qw), ref) < tol(torch.bfloat16)


def test_declines_unaligned_input():
    x, qw, _ = operands(257, 128, 128, torch.bfloat16, 3)
    assert gemm(x.reshape(-1)[4 : 4 + 256 * 128].reshape(256, 128), qw) is None  # 8 bytes past 16-byte alignment
    assert gemm(x[1:], qw) is not None  # one row (256 bytes) in: still aligned


@pytest.mark.parametrize("bn", [128, 192, 256])
def test_every_tile_height(bn):
    """The three tile heights the host picks among, each forced (BITKERNEL_SM90_BN is read once per process)."""
    code = (
        "import torch, bitkernel.functional as F\n"
        "from bitkernel._lib import C\n"
        "from kernel_reference import linear\n"
        "F.SM90_MIN_KTILES = 0.0\n"
        "for m, n, k, dt in [(700, 1024, 1024, torch.bfloat16), (4608, 3072, 3072, torch.float16)]:\n"
        "    g = torch.Generator().manual_seed(m)\n"
        "    qw = F.quantize((torch.randn(n, k, generator=g) * 0.05).cuda(), 'ternary', 0)\n"
        "    x = torch.randn(m, k, generator=g).to('cuda', dt)\n"
        "    y = F._gemm_sm90(C, x, qw, None, None, torch.cuda.current_stream().cuda_stream)\n"
        "    ref = linear(x, 'ternary', qw.qweight.cpu(), qw.scale.cpu(), None, 0)\n"
        "    err = ((y.double().cpu() - ref).norm() / ref.norm()).item()\n"
        "    assert err < 8e-3, (m, n, k, err)\n"
    )
    env = dict(os.environ, BITKERNEL_SM90_BN=str(bn))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tests_dir, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_reduce_overhead_compile_warms_up_without_keeping_a_workspace_in_its_pool():
    """torch.compile's mode "reduce-overhead" first runs the function eagerly with the current stream's allocations
    sent to its CUDA graph pool, then fails if any of them is still alive and not an output. The workspace made on
    that first call (a fresh stream: none cached for it) is allocated outside that pool."""
    x, qw, bias = operands(512, 1024, 1024, torch.bfloat16, 31)
    expect = F.linear(x, qw, bias)
    torch.cuda.synchronize()
    F._sm90_workspace.clear()  # so that the warm-up makes one
    lin = torch.compile(lambda t: F.linear(t, qw, bias) * 1.0, mode="reduce-overhead")
    with torch.cuda.stream(torch.cuda.Stream()):
        for _ in range(4):  # warm-up, record, replays
            y = lin(x).clone()
    torch.cuda.synchronize()
    assert F._sm90_workspace
    torch.testing.assert_close(y, expect, rtol=0, atol=0)
