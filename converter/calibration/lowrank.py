"""Low-rank initialisation of the quality-recovery branch (lora_down, lora_up) from a quantization residual.

The branch adds (x @ down.T) @ up.T to the layer output, so the best rank-r
branch for a residual R = W - Q minimises the output error
||X (R - up @ down)^T||_F^2 = ||(R - up @ down) H^{1/2}||_F^2 with H = X^T X.
Without calibration data (H = I) that is the truncated SVD (Eckart-Young).
With H = L L^T (Cholesky of the damped H), the error is ||(R L - up @ down L)||_F,
so the truncated SVD of the whitened residual R L, mapped back by L^-1, is
optimal. Singular values are split as sqrt between the factors so that both
have comparable magnitudes (matters once they are stored in bfloat16 and
fine-tuned).

Only the top `rank` singular triplets are needed, so they come from a
randomized range finder (Halko, Martinsson & Tropp 2011) with power iterations
rather than a full SVD: on FLUX.1-dev's 18432 x 3072 layers the full SVD made
the branch's initialisation ~75% of a double block's calibration time. The
sketch is seeded, so a conversion is reproducible.
"""

from __future__ import annotations

import dataclasses

import torch

from ..fileformat import LayerSpec
from .gptq import damped_hessian, factor_hessian


def svd_lowrank_init(
    residual: torch.Tensor, rank: int, hessian: torch.Tensor | None = None, *, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [rank, K], up [N, rank]) float32 with up @ down ~ residual [N, K].

    With `hessian` [K, K] (the inputs' mean Hessian) the approximation
    minimises the output error in the metric H + damp * mean(diag H) * I; the
    damping keeps directions the calibration data never excited from being
    ignored entirely.
    """
    if residual.dim() != 2:
        raise ValueError(f"residual must be 2-D [out_features, in_features], got {tuple(residual.shape)}")
    n, k = residual.shape
    if not 0 < rank <= min(n, k):
        raise ValueError(f"rank must be between 1 and min(out_features, in_features) = {min(n, k)}, got {rank}")
    r = residual.detach().to(torch.float32)
    chol = None
    if hessian is not None:
        if tuple(hessian.shape) != (k, k):
            raise ValueError(f"Hessian must be [{k}, {k}] for in_features {k}, got {tuple(hessian.shape)}")
        _, chol = factor_hessian(damped_hessian(hessian, damp, r.device)[0])
        r = r @ chol
    u, s, vh = _top_svd(r, rank)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if chol is not None:  # down L = (whitened down)  =>  down = (whitened down) L^-1
        down = torch.linalg.solve_triangular(chol, down, upper=False, left=False)
    return down.contiguous(), up.contiguous()


def _top_svd(a: torch.Tensor, rank: int, oversample: int = 16, power_iters: int = 4):
    """(u, s, vh) of the leading `rank` singular triplets of `a` (at least; callers slice)."""
    n, k = a.shape
    width = rank + oversample
    if width >= min(n, k) // 2:  # as cheap to do exactly
        return torch.linalg.svd(a, full_matrices=False)
    gen = torch.Generator(device=a.device).manual_seed(0)
    basis = torch.linalg.qr(a @ torch.randn(k, width, generator=gen, device=a.device, dtype=a.dtype)).Q
    # Each round multiplies the spectrum's decay by (a a^T); re-orthonormalising keeps the small directions
    # from drowning in rounding.
    for _ in range(power_iters):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.T @ basis).Q).Q
    ub, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return basis @ ub, s, vh


def with_branch(spec: LayerSpec, rank: int) -> LayerSpec:
    """The spec with a branch of `rank` where calibration gives one: ternary layers."""
    return dataclasses.replace(spec, lora_rank=rank) if rank and spec.format == "ternary" else spec
