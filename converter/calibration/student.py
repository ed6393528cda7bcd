"""The quantized linear as calibration trains it: frozen integer codes, trainable scales and low-rank branch.

Every format stores W = c * s with integer codes c (ternary -1/0/1, int8
-127..127, int4 u - z) and float scales s per row or group, so distilling the
scales never touches the packed bytes: the result is the same `qweight` (and
zero points) with new `scale`. Scales are trained in log space (s = s0 * exp(t))
so they stay positive and one learning rate suits layers of any magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bitkernel.functional as BF
from bitkernel.formats import QuantizedWeight

from .gptq import pack_ternary


@dataclass
class LayerResult:
    """A quantized layer as calibration leaves it (CPU tensors): the weight, the optional bf16 branch
    (down [r, K], up [N, r]) and, where calibration trained it, the bias (bf16; None: the checkpoint's)."""

    qw: QuantizedWeight
    lora: Optional[tuple[Tensor, Tensor]] = None
    bias: Optional[Tensor] = None


def integer_codes(qw: QuantizedWeight, dtype: torch.dtype = torch.float32, ones: Optional[Tensor] = None) -> Tensor:
    """The codes c of W = c * s [N, K] in `dtype` (exact: integers of at most 8 bits), decoded from the packed
    bytes with unit scales (`ones`, shaped as qw.scale, where the caller keeps them)."""
    ones = torch.ones_like(qw.scale) if ones is None else ones
    return BF.dequantize(QuantizedWeight(qw.fmt, qw.qweight, ones, qw.zero, qw.in_features, qw.group_size), dtype)


def act_rounding(fmt: str, device: torch.device) -> str:
    """How bitkernel rounds an A8 layer's activations on `device` at large M: "e4m3" where the FP8 path
    applies (ternary weights, sm_89+), else "int8"."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if BF.fp8_path_applies(fmt, 0, True, BF.FP8_MIN_M, cap):
            return "e4m3"
    return "int8"


def fake_quant_act(x: Tensor, rounding: str) -> Tensor:
    """x rounded per row as bitkernel's A8 ops round it, with a straight-through gradient: "int8" is
    round(x / s) in [-127, 127] with s = max|x| / 127; "e4m3" is e4m3(x / s) with s the power of two
    bitkernel.functional.fp8_row_scales gives (max|x| / s <= 448)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    xf = x.detach().float()
    if rounding == "e4m3":
        s = BF.fp8_row_scales(amax)
        q = (xf / s).to(torch.float8_e4m3fn).float() * s
    else:
        s = amax.clamp_min(1e-30) / 127
        q = torch.clamp(torch.round(xf / s), -127, 127) * s
    return x + (q.to(x.dtype) - x).detach()


def _rounded(u: Tensor) -> Tensor:
    """The ternary codes a latent stands for."""
    return torch.clamp(torch.round(u), -1, 1)


def _expand(scale: Tensor, group_size: int, k: int) -> Tensor:
    """Scales [N, G] spread over the K weights of a row; one scale per row stays [N, 1] (broadcast: no
    N x K float32 copy, which for FLUX's largest layer is 264 MB per forward)."""
    if not group_size:
        return scale
    return scale.repeat_interleave(group_size, dim=1)[:, :k]


class StudentLinear(nn.Module):
    """y = x @ (c * s).T + b (+ (x @ down.T) @ up.T), with log-scales and the branch trainable.

    Frozen codes stay packed (2 bits a ternary weight) and are decoded each forward: the end-to-end stage
    holds every layer of the model at once (FLUX.1-dev: 3 GB packed against 12 GB as int8 codes)."""

    def __init__(
        self, qw: QuantizedWeight, bias: Optional[Tensor], lora: Optional[tuple[Tensor, Tensor]] = None,
        latent: Optional[Tensor] = None, act_rounding: Optional[str] = None, train_bias: bool = False,
    ):
        """`latent`: the full-precision weight of a ternary layer, to learn the codes too (see _latent_init);
        `act_rounding`: the layer runs with 8-bit activations (A8) rounded this way (fake_quant_act), so it
        is trained with them; `train_bias`: the bias is trained too (a layer without one stays without)."""
        super().__init__()
        self.fmt, self.group_size, self._k, self.act_rounding = qw.fmt, qw.group_size, qw.in_features, act_rounding
        device = qw.qweight.device
        # buffers, so that .to() moves the frozen codes with the scales
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("zero", qw.zero)
        self.register_buffer("scale0", qw.scale.to(device, torch.float32))
        # the codes decode as a weight of unit scales: made once, not on every forward
        self.register_buffer("unit_scale", torch.ones_like(self.scale0), persistent=False)
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))
        self.u: Optional[nn.Parameter] = None
        if latent is not None:
            self.learn_codes(latent)
        if train_bias and bias is not None:  # the per-row mean of the quantization error, which scales cannot undo
            self.bias = nn.Parameter(bias.detach().to(device, torch.float32, copy=True))  # never the teacher's
        else:
            self.register_buffer("bias", None if bias is None else bias.to(device, torch.float32))
        self.down = self.up = None
        if lora is not None:
            self.down = nn.Parameter(lora[0].to(device, torch.float32))
            self.up = nn.Parameter(lora[1].to(device, torch.float32))

    @property
    def in_features(self) -> int:
        return self._k

    @property
    def qw(self) -> QuantizedWeight:
        """The layer as calibration received it (initial scales)."""
        return QuantizedWeight(self.fmt, self.qweight, self.scale0, self.zero, self._k, self.group_size)

    def scale(self) -> Tensor:
        return self.scale0 * torch.exp(self.log_scale)

    def _latent_init(self, w: Tensor) -> Tensor:
        """Learned ternary codes are round(u), u in units of the initial scale, trained through a
        straight-through estimator. u starts at the full-precision weight clamped into the bin of
        the code it already has (GPTQ's), so training starts from GPTQ's rounding while keeping
        how close each weight sits to a flip."""
        s = _expand(self.scale0, self.group_size, self.in_features)
        c = integer_codes(self.qw, torch.float32, self.unit_scale)
        u = torch.where(s > 0, w / torch.where(s > 0, s, 1), c)
        return torch.minimum(torch.maximum(u, c - 0.49), c + 0.49)

    def learn_codes(self, w: Tensor) -> nn.Parameter:
        """Starts learning the ternary codes, from the full-precision weight `w`; returns the latent."""
        if self.fmt != "ternary":
            raise ValueError("only ternary codes are learned")
        self.u = nn.Parameter(self._latent_init(w.to(self.qweight.device, torch.float32)))
        return self.u

    def freeze_codes(self) -> None:
        """Packs the learned codes into the 2-bit buffer and drops the latent (its memory is freed)."""
        if self.u is None:
            return
        self.qweight.copy_(pack_ternary(_rounded(self.u.detach()), self.unit_scale, self.group_size).qweight)
        self.u = None

    def weight(self, dtype: torch.dtype) -> Tensor:
        if self.u is None:
            c = integer_codes(self.qw, dtype, self.unit_scale)
        else:  # straight-through: the forward uses the rounded codes, the gradient flows to u
            c = (self.u + (_rounded(self.u) - self.u).detach()).to(dtype)
        return c * _expand(self.scale(), self.group_size, self.in_features).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype  # the block's compute dtype; the trained parameters stay float32
        bias = None if self.bias is None else self.bias.to(dtype)
        y = F.linear(fake_quant_act(x, self.act_rounding) if self.act_rounding else x, self.weight(dtype), bias)
        if self.down is not None:  # in the compute dtype, as bitkernel runs it (its rounding order may differ)
            y = BF.add_lowrank(y, x, self.down, self.up)
        return y

    def export(self) -> LayerResult:
        """The trained layer in the canonical format (CPU tensors), the branch and a trained bias in bf16."""
        qw = self.qw
        scale = self.scale().detach().float().cpu()
        if self.u is not None:
            out = pack_ternary(_rounded(self.u.detach()).cpu(), scale, qw.group_size)
        else:
            zero = None if qw.zero is None else qw.zero.cpu()
            out = QuantizedWeight(qw.fmt, qw.qweight.cpu(), scale, zero, qw.in_features, qw.group_size)
        lora = None
        if self.down is not None:
            with torch.no_grad():  # the file holds bf16: later blocks must be fitted to what it holds
                self.down.copy_(self.down.to(torch.bfloat16))
                self.up.copy_(self.up.to(torch.bfloat16))
            lora = (self.down.detach().to(torch.bfloat16).cpu(), self.up.detach().to(torch.bfloat16).cpu())
        bias = None
        if isinstance(self.bias, nn.Parameter):
            with torch.no_grad():
                self.bias.copy_(self.bias.to(torch.bfloat16))
            bias = self.bias.detach().to(torch.bfloat16).cpu()
        return LayerResult(out, lora, bias)
