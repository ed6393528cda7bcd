"""Quantization methods: how a dense weight becomes a bitkernel QuantizedWeight.

absmean  BitNet b1.58 round-to-nearest: bitkernel's default rule (scale = mean |w|).
mse      per-row (or per-group) MSE-optimal ternary: the scale and the support
         that minimise ||w - alpha * t||^2 over t in {-1, 0, 1}^K.

For a fixed support S (the weights coded +-1) the best scale is
alpha = mean(|w| over S), leaving error sum(w^2) - (sum_S |w|)^2 / |S|; and the
best S of a given size holds the largest |w|. So sorting |w| in decreasing
order, the optimum is the k maximising c_k^2 / k (c_k the sum of the k
largest) with alpha = c_k / k: an exact search, no grid. At that optimum every
weight in S is at least about alpha / 2 and every other at most that, which is
exactly the support bitkernel's code rule clamp(round(w / alpha), -1, 1) gives
(|t| = 1 iff |w| > alpha / 2): passing scale=alpha reproduces the optimum. Where
|w| ties at alpha / 2 both codings have the same error.

int8 and int4 layers use bitkernel's default rules (absmax) under either method.
"""

from __future__ import annotations

from typing import Any

import torch

import bitkernel.functional as F
from bitkernel.formats import QuantizedWeight

from .fileformat import LayerSpec

METHODS = ("mse", "absmean")


def mse_ternary_scale(w: torch.Tensor, group_size: int = 0, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """MSE-optimal ternary scales of w [N, K]: float32 [N, groups] (groups = 1 when group_size is 0).

    Rows are processed in chunks of about `chunk_elems` weights so the sort's
    working memory stays bounded on a full-size layer.
    """
    n, k = w.shape
    g = group_size or k
    if k % g:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    rows = w.reshape(n * (k // g), g)
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=w.device)
    counts = torch.arange(1, g + 1, dtype=torch.float64, device=w.device)
    step = max(1, chunk_elems // g)
    for i in range(0, rows.shape[0], step):
        a = rows[i : i + step].abs().to(torch.float32)
        top = torch.sort(a, dim=1, descending=True).values
        csum = torch.cumsum(top, dim=1, dtype=torch.float64)  # float64: sums of up to 15360 terms
        best = torch.argmax(csum * csum / counts, dim=1, keepdim=True)  # first maximum on ties
        out[i : i + step] = (csum.gather(1, best) / (best + 1).to(torch.float64)).squeeze(1).to(torch.float32)
    return out.reshape(n, k // g)


def quantize_weight(w: torch.Tensor, spec: LayerSpec, method: str) -> QuantizedWeight:
    """Quantizes a float weight [N, K] (on any device bitkernel runs on) to `spec`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    if not spec.quantized:
        raise ValueError(f"{spec.format} is not a quantized format")
    scale = None
    if spec.format == "ternary" and method == "mse":
        # bigger row chunks on a GPU: its memory is plentiful next to a CPU's cache-sized working set
        scale = mse_ternary_scale(w, spec.group_size, chunk_elems=1 << 24 if w.is_cuda else 1 << 22)
    return F.quantize(w, spec.format, spec.group_size, spec.symmetric, scale)


_TERNARY_RULES = {
    "mse": "per-row (or per-group) MSE-optimal scale and support, exact search over support sizes",
    "absmean": "BitNet b1.58: scale = mean |w|, round-to-nearest",
}


def method_settings(method: str) -> dict[str, Any]:
    """The `method` metadata entry: the method and what it did."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    return {
        "name": method,
        "ternary": _TERNARY_RULES[method],
        "int4_int8": "bitkernel default (absmax) round-to-nearest",
        "calibration": None,
    }
