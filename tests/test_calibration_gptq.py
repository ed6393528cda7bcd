"""Calibrated ternary GPTQ and the low-rank initialisation against independent references."""

import numpy as np
import pytest
import torch

import bitkernel.functional as BF
from converter.calibration.gptq import HessianAccumulator, gptq_ternary
from converter.calibration.lowrank import svd_lowrank_init
from converter.methods import mse_ternary_scale

DAMP = 0.01


def unpack_codes(qw) -> torch.Tensor:
    """Ternary codes in {-1, 0, 1} read from qweight as docs/FORMAT.md lays them out."""
    b = qw.qweight.cpu().to(torch.int64)
    c = torch.stack([(b >> (2 * i)) & 3 for i in range(4)], dim=-1).reshape(qw.out_features, qw.in_features)
    assert (c != 3).all(), "code 3 is invalid"
    return c - 1


def expand(scale: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    return scale.repeat_interleave(group_size or k, dim=1)


def correlated_inputs(k: int, rows: int = 2048, seed: int = 0, outliers=(3, 17)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) @ torch.randn(k, k, generator=g) / k**0.5
    x[:, list(outliers)] *= 25.0  # a few channels that dominate, as in FLUX activations
    return x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return (x.double().T @ x.double() / x.shape[0]).float()


def damped(h: torch.Tensor) -> torch.Tensor:
    h = h.double()
    return h + DAMP * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)


def h_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    e = (w.double() - q.double().cpu()).cpu()
    return float(torch.einsum("nk,kj,nj->", e, h.double(), e))


def rtn(w: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    return BF.dequantize(BF.quantize(w, "ternary", group_size, True, mse_ternary_scale(w, group_size)))


def reference_gptq(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """Unblocked GPTQ/OBQ in float64: one column at a time, eliminating it from an explicit H^-1."""
    w = w.double().clone()
    n, k = w.shape
    s = expand(scale, group_size, k).double()
    hinv = torch.linalg.inv(damped(h))
    codes = torch.zeros(n, k, dtype=torch.float64)
    for j in range(k):
        t = torch.clamp(torch.round(w[:, j] / s[:, j]), -1, 1)
        codes[:, j] = t
        e = (w[:, j] - t * s[:, j]) / hinv[j, j]
        w[:, j + 1 :] -= e[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes


def test_hessian_accumulator_any_dtype_and_shape():
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(2, 50, 24, generator=g).bfloat16(), torch.randn(7, 24, generator=g).half()]
    acc = HessianAccumulator(24, "cpu")
    for p in parts:
        acc.add(p)
    x = torch.cat([p.reshape(-1, 24).double() for p in parts])
    assert acc.count == 107
    assert acc.sum.shape == (24, 24) and acc.sum.dtype == torch.float32
    torch.testing.assert_close(acc.hessian.double(), x.T @ x / 107, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.randn(3, 25))
    with pytest.raises(ValueError, match="no inputs"):
        _ = HessianAccumulator(8).hessian


@pytest.mark.parametrize("group_size", [0, 8])
def test_identity_hessian_is_round_to_nearest(group_size):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(9, 32, generator=g)
    ref = unpack_codes(BF.quantize(w, "ternary", group_size, True, mse_ternary_scale(w, group_size)))
    diag_h = torch.diag(torch.rand(32, generator=g) + 0.1)  # any diagonal H: no error to spread
    for h in (torch.eye(32), diag_h):
        for refit in (False, True):
            qw = gptq_ternary(w, h, group_size=group_size, refit_scale=refit, block_size=5)
            assert torch.equal(unpack_codes(qw), ref)


@pytest.mark.parametrize("group_size,block_size", [(0, 16), (8, 16), (0, 1), (4, 7), (0, 100)])
def test_blocked_matches_unblocked_reference(group_size, block_size):
    g = torch.Generator().manual_seed(3)
    n, k = 7, 40
    w = torch.randn(n, k, generator=g)
    h = hessian_of(correlated_inputs(k, rows=512, seed=3))
    qw = gptq_ternary(w, h, group_size=group_size, damp=DAMP, block_size=block_size, refit_scale=False)
    scale = mse_ternary_scale(w, group_size)
    torch.testing.assert_close(qw.scale, scale, rtol=0, atol=0)  # without refit the scale stays the MSE one
    ref = reference_gptq(w, h, scale, group_size)
    assert torch.equal(unpack_codes(qw), ref.to(torch.int64))


@pytest.mark.parametrize("group_size", [0, 16])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(group_size):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(48, 64, generator=g)
    x = correlated_inputs(64, seed=4)
    h = hessian_of(x)
    q_rtn = rtn(w, group_size)
    q_gptq = BF.dequantize(gptq_ternary(w, h, group_size=group_size, block_size=24, refit_scale=False))
    q_refit = BF.dequantize(gptq_ternary(w, h, group_size=group_size, block_size=24))
    err = {name: float((x @ (w - q).T).norm()) for name, q in [("rtn", q_rtn), ("gptq", q_gptq), ("refit", q_refit)]}
    assert err["gptq"] < 0.85 * err["rtn"], err
    assert err["refit"] < 0.8 * err["rtn"], err


@pytest.mark.parametrize("group_size", [0, 16])
def test_refit_never_increases_h_error(group_size):
    for seed in range(4):
        g = torch.Generator().manual_seed(10 + seed)
        n, k = 11, 64
        w = torch.randn(n, k, generator=g) * (1 + 3 * torch.rand(n, 1, generator=g))
        h = hessian_of(correlated_inputs(k, rows=256, seed=seed))  # fewer rows than ideal: some stress
        hd = damped(h)
        before = gptq_ternary(w, h, group_size=group_size, refit_scale=False)
        after = gptq_ternary(w, h, group_size=group_size)
        assert torch.equal(unpack_codes(before), unpack_codes(after))  # refit changes scales only
        assert (after.scale >= 0).all() and torch.isfinite(after.scale).all()
        e_before, e_after = h_error(w, BF.dequantize(before), hd), h_error(w, BF.dequantize(after), hd)
        assert e_after <= e_before * (1 + 1e-6), (seed, e_before, e_after)
        assert e_after < e_before  # and, here, strictly helps
        # the refit scales are the least-squares optimum: per row for group 0, and no single
        # group's scale can be nudged to lower the error for groups
        t = unpack_codes(after).double()
        if group_size == 0:
            ls = torch.einsum("nk,kj,nj->n", w.double(), hd, t) / torch.einsum("nk,kj,nj->n", t, hd, t)
            torch.testing.assert_close(after.scale[:, 0].double(), ls, rtol=1e-4, atol=0)
        else:
            base = h_error(w, t * expand(after.scale, group_size, k), hd)
            for grp in range(k // group_size):
                for f in (0.99, 1.01):
                    s = after.scale.clone()
                    s[:, grp] *= f
                    assert h_error(w, t * expand(s, group_size, k), hd) >= base * (1 - 1e-7)


def test_group_size_codes_and_shapes():
    g = torch.Generator().manual_seed(5)
    n, k, gs = 13, 96, 32
    w = torch.randn(n, k, generator=g)
    w[2, :gs] = 0  # an all-zero group: scale 0, codes 0
    x = correlated_inputs(k, seed=5)
    qw = gptq_ternary(w, hessian_of(x), group_size=gs, block_size=40)
    qw.validate()
    assert qw.fmt == "ternary" and qw.group_size == gs and qw.scale.shape == (n, k // gs)
    codes = unpack_codes(qw)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert qw.scale[2, 0] == 0 and (codes[2, :gs] == 0).all()
    assert (qw.scale >= 0).all() and torch.isfinite(qw.scale).all()
    q = BF.dequantize(qw)
    assert (x @ (w - q).T).norm() < (x @ (w - rtn(w, gs)).T).norm()


def test_dead_inputs():
    g = torch.Generator().manual_seed(6)
    n, k = 9, 48
    w = torch.randn(n, k, generator=g)
    x = correlated_inputs(k, rows=1024, seed=6)
    dead = [0, 5, 31]
    x[:, dead] = 0
    h = hessian_of(x)
    for gs in (0, 16):
        qw = gptq_ternary(w, h, group_size=gs, block_size=20)
        codes = unpack_codes(qw)
        assert (codes[:, dead] == 0).all()
        assert torch.isfinite(qw.scale).all() and (qw.scale >= 0).all()
        assert (x @ (w - BF.dequantize(qw)).T).norm() < (x @ (w - rtn(w, gs)).T).norm()
    # no calibration signal at all: everything is dead, nothing breaks
    qw = gptq_ternary(w, torch.zeros(k, k))
    assert (unpack_codes(qw) == 0).all() and torch.isfinite(qw.scale).all()


def test_dequantize_is_exactly_codes_times_scale(device):
    g = torch.Generator().manual_seed(7)
    n, k = 5, 64
    w = torch.randn(n, k, generator=g)
    w[0] = torch.tensor([1.0, -1.0, 0.5, -0.5] * 16)  # |w / s| = 0.5 exact ties under an identity H
    h = hessian_of(correlated_inputs(k, seed=7))
    for gs, hh in ((0, h), (16, h), (0, torch.eye(k))):
        qw = gptq_ternary(w.to(device), hh.to(device), group_size=gs)
        assert qw.qweight.device.type == device.type
        deq = BF.dequantize(qw).cpu()
        assert torch.equal(deq, unpack_codes(qw).float() * expand(qw.scale.cpu(), gs, k))


def test_bad_arguments():
    w = torch.randn(4, 32)
    with pytest.raises(ValueError, match="Hessian"):
        gptq_ternary(w, torch.eye(16))
    with pytest.raises(ValueError, match="divide"):
        gptq_ternary(w, torch.eye(32), group_size=12)
    with pytest.raises(ValueError, match="multiple of 4"):
        gptq_ternary(torch.randn(4, 30), torch.eye(30))


def test_lowrank_plain_is_truncated_svd():
    g = torch.Generator().manual_seed(8)
    r = torch.randn(30, 50, generator=g)
    down, up = svd_lowrank_init(r, 6)
    assert down.shape == (6, 50) and up.shape == (30, 6)
    assert down.dtype == up.dtype == torch.float32
    sv = np.linalg.svd(r.double().numpy(), compute_uv=False)
    err = float((r.double() - up.double() @ down.double()).norm())
    assert err == pytest.approx(float(np.sqrt((sv[6:] ** 2).sum())), rel=1e-5)
    # singular values split symmetrically: matching factor columns and rows have equal norms
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-4, atol=0)


@pytest.mark.parametrize("decay", [0.0, 0.05], ids=["flat", "decaying"])
def test_lowrank_large_layers_take_a_reproducible_sketch_near_the_optimum(decay):
    # wide enough that only a sketch of the top singular space is computed (a full SVD is the reference)
    g = torch.Generator().manual_seed(10)
    n, k, rank = 700, 400, 12
    u0 = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    v0 = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64)).Q
    r = (u0 * torch.exp(-decay * torch.arange(k, dtype=torch.float64))) @ v0.T
    r = (r + 0.05 * torch.randn(n, k, generator=g, dtype=torch.float64)).float()
    down, up = svd_lowrank_init(r, rank)
    sv = np.linalg.svd(r.double().numpy(), compute_uv=False)
    optimum = float(np.sqrt((sv[rank:] ** 2).sum()))
    err = float((r.double() - up.double() @ down.double()).norm())
    assert optimum <= err * (1 + 1e-6) and err <= 1.005 * optimum, (err, optimum)
    d2, u2 = svd_lowrank_init(r, rank)
    assert torch.equal(d2, down) and torch.equal(u2, up)


def test_lowrank_activation_aware_beats_plain_in_h_metric():
    g = torch.Generator().manual_seed(9)
    k = 40
    r = torch.randn(24, k, generator=g)
    h = hessian_of(correlated_inputs(k, rows=1024, seed=9))
    for rank in (1, 4, 12):
        plain = svd_lowrank_init(r, rank)
        aware = svd_lowrank_init(r, rank, h)
        e_plain = h_error(r, plain[1] @ plain[0], h)
        e_aware = h_error(r, aware[1] @ aware[0], h)
        assert e_aware < 0.9 * e_plain, (rank, e_aware, e_plain)
    # with an identity Hessian the metric is Frobenius: same error as the plain SVD
    d, u = svd_lowrank_init(r, 5, torch.eye(k))
    d0, u0 = svd_lowrank_init(r, 5)
    assert float((r - u @ d).norm()) == pytest.approx(float((r - u0 @ d0).norm()), rel=1e-5)


def test_lowrank_bad_rank():
    r = torch.randn(10, 16)
    for rank in (0, -1, 11):
        with pytest.raises(ValueError, match="rank must be between 1 and .* = 10"):
            svd_lowrank_init(r, rank)
    with pytest.raises(ValueError, match="Hessian"):
        svd_lowrank_init(r, 2, torch.eye(10))
