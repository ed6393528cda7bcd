"""The canonical weight formats (docs/FORMAT.md): names, codes and shape rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Codes shared with the compiled module (csrc/common.h: enum Format).
FORMAT_CODES = {"ternary": 0, "int8": 1, "int4": 2}
WEIGHTS_PER_BYTE = {"ternary": 4, "int8": 1, "int4": 2}
QWEIGHT_DTYPES = {"ternary": torch.uint8, "int8": torch.int8, "int4": torch.uint8}
# Dtype codes of csrc/common.h: enum DType.
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def check_format(fmt: str) -> None:
    if fmt not in FORMAT_CODES:
        raise ValueError(f"unknown weight format {fmt!r}: expected one of {sorted(FORMAT_CODES)}")


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == 0 else -(-in_features // group_size)


def check_shape(fmt: str, in_features: int, group_size: int) -> None:
    """Rejects shapes the packing cannot hold, saying how to fix them."""
    check_format(fmt)
    wpb = WEIGHTS_PER_BYTE[fmt]
    if in_features % wpb != 0:
        raise ValueError(
            f"in_features={in_features} is not a multiple of {wpb}: the {fmt} format packs {wpb} "
            f"weights per byte along the input dimension. Pad the layer's input dimension to a "
            f"multiple of {wpb} (zero columns) or keep this layer in 16-bit."
        )
    if group_size < 0:
        raise ValueError(f"group_size must be 0 (one scale per row) or positive, got {group_size}")
    if group_size and group_size % wpb:
        raise ValueError(f"group_size={group_size} must be a multiple of {wpb} for the {fmt} format")
    if fmt == "int8" and group_size:
        raise ValueError("the int8 format has one scale per output row: use group_size=0")


@dataclass
class QuantizedWeight:
    """A weight matrix [out_features, in_features] in a canonical packed format."""

    fmt: str
    qweight: torch.Tensor  # [N, K / weights_per_byte], uint8 (int8 for the int8 format)
    scale: torch.Tensor  # [N, groups] float32
    zero: Optional[torch.Tensor]  # [N, groups] uint8, asymmetric int4 only
    in_features: int
    group_size: int = 0

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    def validate(self) -> None:
        """Checks that the tensors agree with each other and with the format."""
        check_shape(self.fmt, self.in_features, self.group_size)
        n, k, wpb = self.out_features, self.in_features, WEIGHTS_PER_BYTE[self.fmt]
        g = num_groups(k, self.group_size)
        if self.qweight.dtype != QWEIGHT_DTYPES[self.fmt] or self.qweight.shape != (n, k // wpb):
            raise ValueError(
                f"{self.fmt} qweight must be {QWEIGHT_DTYPES[self.fmt]} of shape {(n, k // wpb)}, "
                f"got {self.qweight.dtype} {tuple(self.qweight.shape)}"
            )
        if self.scale.dtype != torch.float32 or self.scale.shape != (n, g):
            raise ValueError(
                f"scale must be float32 of shape {(n, g)}, got {self.scale.dtype} {tuple(self.scale.shape)}"
            )
        if self.zero is not None:
            if self.fmt != "int4":
                raise ValueError("zero points exist only for asymmetric int4")
            if self.zero.dtype != torch.uint8 or tuple(self.zero.shape) != (n, g):
                raise ValueError(
                    f"zero must be uint8 of shape {(n, g)}, got {self.zero.dtype} {tuple(self.zero.shape)}"
                )
        # Compared pairwise, not as a set of devices: the linear op validates its weight on every call.
        dev = self.qweight.device
        if self.scale.device != dev or (self.zero is not None and self.zero.device != dev):
            devices = {t.device for t in (self.qweight, self.scale, self.zero) if t is not None}
            raise ValueError(f"qweight, scale and zero must be on one device, got {sorted(map(str, devices))}")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero) if t is not None)
