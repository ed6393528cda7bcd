"""The quantized linear as calibration trains it: frozen integer codes, trainable scales and low-rank branch.

Every format stores W = c * s with integer codes c (ternary -1/0/1, int8
-127..127, int4 u - z) and float scales s per row or group, so distilling the
scales never touches the packed bytes: the result is the same `qweight` (and
zero points) with new `scale`. Scales are trained in log space (s = s0 * exp(t))
so they stay positive and one learning rate suits layers of any magnitude.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bitkernel.functional as BF
from bitkernel.formats import QuantizedWeight


def integer_codes(qw: QuantizedWeight) -> Tensor:
    """The codes c of W = c * s as int8 [N, K] (exact: every value is an integer times its scale)."""
    w = BF.dequantize(qw)
    s = _expand(qw.scale.to(w.device, torch.float32), qw.group_size, qw.in_features)
    c = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1)), 0)
    return c.to(torch.int8)


def _expand(scale: Tensor, group_size: int, k: int) -> Tensor:
    return scale.repeat_interleave(group_size or k, dim=1)[:, :k]


class StudentLinear(nn.Module):
    """y = x @ (c * s).T + b (+ (x @ down.T) @ up.T), with log-scales and the branch trainable."""

    def __init__(self, qw: QuantizedWeight, bias: Optional[Tensor], lora: Optional[tuple[Tensor, Tensor]] = None):
        super().__init__()
        self.qw = qw
        self.register_buffer("codes", integer_codes(qw))
        self.register_buffer("scale0", qw.scale.to(self.codes.device, torch.float32))
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))
        self.register_buffer("bias", None if bias is None else bias.to(self.codes.device, torch.float32))
        self.down = self.up = None
        if lora is not None:
            self.down = nn.Parameter(lora[0].to(self.codes.device, torch.float32))
            self.up = nn.Parameter(lora[1].to(self.codes.device, torch.float32))

    @property
    def in_features(self) -> int:
        return self.qw.in_features

    def scale(self) -> Tensor:
        return self.scale0 * torch.exp(self.log_scale)

    def weight(self, dtype: torch.dtype) -> Tensor:
        return self.codes.to(dtype) * _expand(self.scale(), self.qw.group_size, self.in_features).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype  # the block's compute dtype; the trained parameters stay float32
        bias = None if self.bias is None else self.bias.to(dtype)
        y = F.linear(x, self.weight(dtype), bias)
        if self.down is not None:
            y = y + F.linear(F.linear(x, self.down.to(dtype)), self.up.to(dtype))
        return y

    def export(self) -> tuple[QuantizedWeight, Optional[tuple[Tensor, Tensor]]]:
        """The trained layer in the canonical format (CPU tensors), the branch in bf16."""
        qw = self.qw
        scale = self.scale().detach().float().cpu()
        zero = None if qw.zero is None else qw.zero.cpu()
        out = QuantizedWeight(qw.fmt, qw.qweight.cpu(), scale, zero, qw.in_features, qw.group_size)
        lora = None
        if self.down is not None:
            lora = (self.down.detach().to(torch.bfloat16).cpu(), self.up.detach().to(torch.bfloat16).cpu())
        return out, lora
