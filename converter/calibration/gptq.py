"""GPTQ for ternary weights: rounding that sees the layer's inputs.

Round-to-nearest minimises ||W - Q||^2, but what the model feels is the output
error over the inputs X it actually receives:

    ||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T),   H = X^T X (per row: e H e^T).

With correlated inputs (FLUX activations are, and a few channels carry
outliers) an error in one column can be partly cancelled by moving the columns
not yet quantized. GPTQ (Frantar et al. 2022, "OPTQ") does exactly that: it
quantizes the columns in order and after each one spreads the rounding error
over the remaining columns with the optimal (least-squares) update, which
needs only the upper Cholesky factor U of H^-1 (H^-1 = U^T U). Updates are
applied lazily per block of columns so that most of the work is one matmul.

The ternary grid is {-s, 0, s} with one scale s per row (or per group). GPTQ
only chooses codes, so s must be known before the first column: it is the
MSE-optimal scale of the original row, which is also what plain rounding would
use. Once the codes are fixed the output error is a convex quadratic in the
scales, so (`refit_scale`) each row's scales are then solved exactly by least
squares in the same H metric; the solve is kept only where it gives finite,
non-negative scales that do not increase the error, so refitting never hurts.
"""

from __future__ import annotations

import torch

import bitkernel.functional as F
from bitkernel.formats import QuantizedWeight, check_shape

from ..methods import mse_ternary_scale

# Working memory of the scale refit's [rows, groups, K] product, in floats.
_REFIT_CHUNK_ELEMS = 1 << 26


class HessianAccumulator:
    """Sums x^T x over every input row a linear sees; `hessian` is the mean, (1/n) X^T X.

    Holds one [K, K] float32 matrix whatever the number of rows; inputs may
    have any float dtype, any leading shape and any device.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor, chunk_rows: int = 8192) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the accumulator expects {self.in_features}")
        x = x.detach().reshape(-1, self.in_features)
        for i in range(0, x.shape[0], chunk_rows):  # bounds the float32 copy of a large batch
            xc = x[i : i + chunk_rows].to(device=self.sum.device, dtype=torch.float32)
            self.sum.addmm_(xc.T, xc)
        self.count += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """The mean Hessian H / n, float32 [K, K]."""
        if self.count == 0:
            raise ValueError("no inputs were added to the Hessian accumulator")
        return self.sum / self.count


def damped_hessian(
    hessian: torch.Tensor, damp: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + damp * mean(diag H) * I with dead inputs' H_ii = 1, dead mask), float32.

    The mean is over live inputs only: the placeholder 1 of a dead input
    (H_ii = 0, no calibration signal) has no relation to the activations'
    scale. A dead input's row and column of H are zero, so it is decoupled from
    every other input and the value put on its diagonal changes nothing else.
    """
    h = hessian.detach().to(device=device or hessian.device, dtype=torch.float32).clone()
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"the Hessian must be square [K, K], got {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise ValueError("the Hessian has non-finite entries")
    diag = h.diagonal()
    dead = diag == 0
    live_mean = diag[~dead].mean() if (~dead).any() else torch.ones((), device=h.device)
    diag[dead] = 1.0
    diag += damp * live_mean
    return h, dead


def factor_hessian(h: torch.Tensor, inverse_upper: bool = False, tries: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, L) with h = L L^T, or (h, U) with h^-1 = U^T U when `inverse_upper`.

    A float32 Hessian of a large layer can be numerically indefinite even after
    damping; each failed factorisation adds 10x more damping. The returned h
    is the matrix actually factored.
    """
    bump = 1e-6 * h.diagonal().mean().clamp_min(1e-30)
    for _ in range(tries):
        chol, info = torch.linalg.cholesky_ex(h)
        if not info.item() and inverse_upper:
            chol, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
        if not info.item():
            return h, chol
        h = h + bump * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        bump = bump * 10
    raise ValueError("the Hessian is not positive definite even after extra damping (are its entries finite?)")


def pack_ternary(codes: torch.Tensor, scale: torch.Tensor, group_size: int) -> QuantizedWeight:
    """Packs given codes with bitkernel's own rule: w = code * s gives w / s = code exactly (IEEE)."""
    n, k = codes.shape
    w = codes * scale.repeat_interleave(group_size or k, dim=1)
    qw = F.quantize(w, "ternary", group_size, True, scale)
    if not torch.equal(F.dequantize(qw), w):  # guards the rule above against a changed packing rule
        raise RuntimeError("packing did not reproduce the GPTQ codes")
    return qw


def _refit(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """Least-squares scales per row in the metric h, given the codes (joint over a row's groups).

    Row n's output is sum_g s_g t_g (t_g its codes masked to group g), so the
    error (w - sum_g s_g t_g) H (...)^T is minimised by A s = b with
    A_gh = t_g H t_h^T and b_g = t_g H w^T. A group without a nonzero code has
    an all-zero row and column in A and keeps its old scale.
    """
    n, k = w.shape
    gs = group_size or k
    ng = k // gs
    hr = h.reshape(ng, gs, k)
    out = scale.clone()
    step = max(1, _REFIT_CHUNK_ELEMS // (ng * k))
    for i in range(0, n, step):
        t, wc, s_old = codes[i : i + step], w[i : i + step], scale[i : i + step].double()
        tg = t.reshape(-1, ng, gs)
        x = torch.einsum("cgb,gbk->cgk", tg, hr)  # x[c, g] = t_g H
        a = torch.einsum("cgja,cja->cgj", x.reshape(-1, ng, ng, gs), tg).double()
        b = torch.einsum("cgk,ck->cg", x, wc).double()
        empty = a.diagonal(dim1=1, dim2=2) <= 0
        a_fix = a.clone()
        a_fix.diagonal(dim1=1, dim2=2)[empty] = 1.0
        s_new, info = torch.linalg.solve_ex(a_fix, torch.where(empty, s_old, b).unsqueeze(-1))
        s_new = s_new.squeeze(-1)
        ok = (info == 0) & torch.isfinite(s_new).all(-1) & (s_new >= 0).all(-1)
        ok &= _excess(torch.where(ok[:, None], s_new, s_old), a, b) <= _excess(s_old, a, b)
        out[i : i + step] = torch.where(ok[:, None], s_new, s_old).to(torch.float32)
    return out


def _excess(s: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, e H e^T - w H w^T for scales s: the error up to a term that does not depend on s."""
    return torch.einsum("cg,cgj,cj->c", s, a, s) - 2 * (s * b).sum(-1)


def gptq_ternary(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    group_size: int = 0,
    damp: float = 0.01,
    block_size: int = 128,
    refit_scale: bool = True,
) -> QuantizedWeight:
    """Ternary GPTQ of w [N, K] against the inputs' Hessian [K, K] (e.g. HessianAccumulator.hessian).

    Minimises tr((W - Q) (H + lambda I) (W - Q)^T), lambda = damp * mean(diag H),
    over codes in {-1, 0, 1} (per-row or per-group scales, see the module
    docstring). Dead inputs (H_ii = 0) get code 0. Math in float32 on w's
    device; returns the canonical packed QuantizedWeight.
    """
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got {tuple(w.shape)}")
    n, k = w.shape
    check_shape("ternary", k, group_size)
    if group_size and k % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {k}")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"Hessian must be [{k}, {k}] for in_features {k}, got {tuple(hessian.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    w = w.detach().to(torch.float32)
    scale = mse_ternary_scale(w, group_size)
    h, dead = damped_hessian(hessian, damp, w.device)
    h, hinv = factor_hessian(h, inverse_upper=True)

    # no calibration signal: the paper's choice, these weights cost nothing measured (a new tensor: the caller's
    # weight stays intact)
    w = torch.where(dead, torch.zeros((), device=w.device), w)
    work = w.clone() if refit_scale else w  # the refit needs w as it was
    s_cols = scale.repeat_interleave(group_size or k, dim=1)
    live = s_cols > 0  # an all-zero group has scale 0 and code 0 (what packing stores)
    safe = torch.where(live, s_cols, torch.ones_like(s_cols))
    codes = torch.zeros_like(work)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = work[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            t = torch.clamp(torch.round(w1[:, i] / safe[:, j]), -1, 1) * live[:, j]
            codes[:, j] = t
            e = (w1[:, i] - t * s_cols[:, j]) / hinv1[i, i]
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1)
            err1[:, i] = e
        work[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)  # the lazy update of later blocks

    if refit_scale:
        scale = _refit(w, h, codes, scale, group_size)
    return pack_ternary(codes, scale, group_size)
