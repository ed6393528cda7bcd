"""torch.nn modules over the packed formats: TernaryLinear, Int4Linear, Int8Linear.

Each holds its weight in the canonical layout (buffers `qweight`, `scale`, and
`zero` for asymmetric INT4), so `state_dict()` is exactly what a converted file
stores. An optional low-rank side branch `y += (x @ lora_down.T) @ lora_up.T`
carries quality-recovery adapters and user LoRAs without touching the packed
weight.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F
from .formats import QWEIGHT_DTYPES, WEIGHTS_PER_BYTE, QuantizedWeight, check_shape, num_groups


class QuantLinear(nn.Module):
    """Base class; subclasses fix FORMAT."""

    FORMAT: str = ""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 0,
        symmetric: bool = True,
        act_int8: bool = False,
        lora_rank: int = 0,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        check_shape(self.FORMAT, in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.act_int8 = group_size, act_int8
        g = num_groups(in_features, group_size)
        wpb = WEIGHTS_PER_BYTE[self.FORMAT]
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features // wpb, dtype=QWEIGHT_DTYPES[self.FORMAT], device=device)
        )
        self.register_buffer("scale", torch.zeros(out_features, g, dtype=torch.float32, device=device))
        zero = None if symmetric else torch.zeros(out_features, g, dtype=torch.uint8, device=device)
        self.register_buffer("zero", zero)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        self.lora_down: Optional[nn.Parameter] = None
        self.lora_up: Optional[nn.Parameter] = None
        if lora_rank:
            self.set_lora(
                torch.zeros(lora_rank, in_features, dtype=dtype, device=device),
                torch.zeros(out_features, lora_rank, dtype=dtype, device=device),
            )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 0,
        symmetric: bool = True,
        act_int8: bool = False,
        scale: Optional[torch.Tensor] = None,
    ) -> QuantLinear:
        """Quantizes a dense nn.Linear with the format's default rule (or a given scale)."""
        qw = F.quantize(linear.weight.detach(), cls.FORMAT, group_size, symmetric, scale)
        return cls.from_quantized(qw, linear.bias.detach() if linear.bias is not None else None, act_int8)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, act_int8: bool = False
    ) -> QuantLinear:
        if qw.fmt != cls.FORMAT:
            raise ValueError(f"{cls.__name__} holds {cls.FORMAT} weights, got {qw.fmt}")
        qw.validate()
        dtype = bias.dtype if bias is not None else torch.bfloat16
        m = cls(
            qw.in_features,
            qw.out_features,
            bias=bias is not None,
            group_size=qw.group_size,
            symmetric=qw.zero is None,
            act_int8=act_int8,
            device=qw.qweight.device,
            dtype=dtype,
        )
        m.qweight.copy_(qw.qweight)
        m.scale.copy_(qw.scale)
        if qw.zero is not None:
            m.zero.copy_(qw.zero)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.FORMAT, self.qweight, self.scale, self.zero, self.in_features, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight this layer stands for (without the low-rank branch)."""
        return F.dequantize(self.quantized, dtype)

    def set_lora(self, down: Optional[torch.Tensor], up: Optional[torch.Tensor]) -> None:
        """Sets (or with None, removes) the low-rank side branch: y += (x @ down.T) @ up.T."""
        if down is None or up is None:
            self.lora_down = self.lora_up = None
            return
        if down.shape[1] != self.in_features or up.shape[0] != self.out_features or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"low-rank branch must be down [r, {self.in_features}] and up [{self.out_features}, r], "
                f"got {tuple(down.shape)} and {tuple(up.shape)}"
            )
        self.lora_down = nn.Parameter(down, requires_grad=down.requires_grad)
        self.lora_up = nn.Parameter(up, requires_grad=up.requires_grad)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A file with a low-rank branch loads into a module created without one.
        down, up = state_dict.get(prefix + "lora_down"), state_dict.get(prefix + "lora_up")
        if down is not None and up is not None and self.lora_down is None:
            self.set_lora(
                torch.empty_like(down, device=self.qweight.device), torch.empty_like(up, device=self.qweight.device)
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must not touch the float32 scales: only their device follows.
        scale = self.scale
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, device=scale.device))
        self.scale = scale.to(probe.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast a float32 input runs in the autocast dtype, as nn.Linear's would.
        if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        lowrank = None if self.lora_down is None else (self.lora_down, self.lora_up)
        return F.linear(x, self.quantized, bias, self.act_int8, lowrank)

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
        ]
        if self.group_size:
            parts.append(f"group_size={self.group_size}")
        if self.act_int8:
            parts.append("act_int8=True")
        if self.lora_down is not None:
            parts.append(f"lora_rank={self.lora_down.shape[0]}")
        return ", ".join(parts)


class TernaryLinear(QuantLinear):
    """Weights in {-1, 0, +1} times a float32 scale per row (or per group)."""

    FORMAT = "ternary"


class Int8Linear(QuantLinear):
    """Symmetric INT8 weights with one float32 scale per output row."""

    FORMAT = "int8"


class Int4Linear(QuantLinear):
    """INT4 weights with group-wise scales (and zero points when asymmetric)."""

    FORMAT = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 64, **kwargs) -> None:
        super().__init__(in_features, out_features, bias, group_size, **kwargs)
