"""ComfyUI weight patches on a packed layer, applied at run time.

ComfyUI describes a LoRA as patches on a layer's dense weight: the list
`ModelPatcher.patches[key]` of `(strength, adapter, strength_model, offset,
function)`. Adding `strength * alpha / rank * up @ down` to a ternary weight
would mean re-quantizing it, so a plain LoRA becomes a side branch instead:

    y = packed(x) + (x @ down.T) @ up.T       (all LoRAs of the layer concatenated)

which is exactly `x @ (W + sum of deltas).T` up to rounding, and leaves the
packed weight untouched, so removing the LoRA gives the base output back bit
for bit. Patches that are not a low-rank product of the weight (LoHa, LoKr,
DoRA, full diffs, `strength_model`, a patch function) cannot be a side branch;
`PatchSet.dense` then applies ComfyUI's own `calculate_weight` to the
dequantized weight on each use: correct, slower, and still never stored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

log = logging.getLogger("bitflux")


@dataclass
class LowRank:
    """The side branch y += (x @ down.T) @ up.T, strengths folded into `up`."""

    down: torch.Tensor  # [R, K]
    up: torch.Tensor  # [N, R]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def to(self, device: torch.device, dtype: torch.dtype) -> LowRank:
        return LowRank(self.down.to(device=device, dtype=dtype), self.up.to(device=device, dtype=dtype))


def _lora_weights(adapter: Any) -> Optional[tuple]:
    """(up, down, alpha, mid, dora_scale, reshape) of a plain LoRA patch, else None."""
    try:
        from comfy.weight_adapter.lora import LoRAAdapter
    except ImportError:  # ComfyUI before weight adapters (early 2025): patches were tuples
        LoRAAdapter = None  # noqa: N806
    if LoRAAdapter is not None and isinstance(adapter, LoRAAdapter):
        weights = tuple(adapter.weights)
    elif isinstance(adapter, tuple) and len(adapter) == 2 and adapter[0] == "lora":
        weights = tuple(adapter[1])
    else:
        return None
    return weights + (None,) * (6 - len(weights))


def _plain_lora(patch: tuple) -> Optional[tuple]:
    """(up, down, alpha) of a patch that can be a side branch, else None (cheap: looks at its kind, not its
    tensors)."""
    if (len(patch) > 2 and patch[2] != 1.0) or (len(patch) > 4 and patch[4] is not None):
        return None  # strength_model or a patch function: these scale or transform the base weight itself
    weights = _lora_weights(patch[1])
    if weights is None or any(w is not None for w in weights[3:6]):
        return None  # not a LoRA, or one with mid / dora_scale / reshape
    return weights[:3]


def is_plain_lora(patch: tuple) -> bool:
    """Whether one patch can be a side branch."""
    return _plain_lora(patch) is not None


def lowrank_from_patches(patches: list, out_features: int, in_features: int) -> Optional[LowRank]:
    """All patches of one layer as one side branch (float32), or None if any is not a plain LoRA."""
    downs: list[torch.Tensor] = []
    ups: list[torch.Tensor] = []
    for p in patches:
        lora = _plain_lora(p)
        if lora is None:
            return None
        strength, offset = p[0], (p[3] if len(p) > 3 else None)
        up, down, alpha = lora
        up = up.flatten(start_dim=1).to(torch.float32)
        down = down.flatten(start_dim=1).to(torch.float32)
        rank = down.shape[0]
        rows, cols = (0, out_features), (0, in_features)
        if offset is not None:  # the LoRA covers a slice of the weight, e.g. diffusers' to_q inside qkv
            dim, start, length = offset
            if dim == 0:
                rows = (start, length)
            elif dim == 1:
                cols = (start, length)
            else:
                return None
        if up.shape != (rows[1], rank) or down.shape != (rank, cols[1]):
            return None  # ComfyUI reports the mismatch in the dense path
        if strength == 0:
            continue
        scale = float(strength) * (float(alpha) / rank if alpha is not None else 1.0)
        full_up = torch.zeros(out_features, rank, dtype=torch.float32, device=up.device)
        full_up[rows[0] : rows[0] + rows[1]] = up * scale
        full_down = torch.zeros(rank, in_features, dtype=torch.float32, device=down.device)
        full_down[:, cols[0] : cols[0] + cols[1]] = down
        ups.append(full_up)
        downs.append(full_down.to(full_up.device))
    if not downs:
        return LowRank(torch.zeros(0, in_features), torch.zeros(out_features, 0))
    return LowRank(torch.cat(downs, 0), torch.cat(ups, 1))


@dataclass
class PatchSet:
    """One layer's patches: as a side branch when they are plain LoRAs, else applied densely."""

    key: str
    patches: list
    lowrank: Optional[LowRank]

    @classmethod
    def build(cls, key: str, patches: list, out_features: int, in_features: int) -> PatchSet:
        lowrank = lowrank_from_patches(patches, out_features, in_features)
        if lowrank is None:
            kinds = sorted({type(p[1]).__name__ if not isinstance(p[1], tuple) else str(p[1][0]) for p in patches})
            log.warning(
                "bitflux: %s has patches that are not a plain LoRA (%s); they are applied to a dequantized copy of the "
                "layer on every use (slower, never stored)",
                key,
                ", ".join(kinds),
            )
        return cls(key, patches, lowrank)

    def dense(self, weight: torch.Tensor) -> torch.Tensor:
        """ComfyUI's own patch math on a dequantized float32 weight."""
        import comfy.lora

        return comfy.lora.calculate_weight(self.patches, weight, self.key)

    def moved(self, device: torch.device, dtype: torch.dtype) -> PatchSet:
        lowrank = self.lowrank.to(device, dtype) if self.lowrank is not None else None
        return PatchSet(self.key, self.patches, lowrank)


def patchset_of(fn: Any, out_features: int, in_features: int) -> Optional[PatchSet]:
    """The PatchSet behind a ComfyUI LowVramPatch (cached on it), or None for other weight functions."""
    patches_of, key = getattr(fn, "patches", None), getattr(fn, "key", None)
    if not isinstance(patches_of, dict) or not isinstance(key, str) or key not in patches_of:
        return None
    if getattr(fn, "convert_func", None) is not None or getattr(fn, "set_func", None) is not None:
        return None
    patches = patches_of[key]
    cached = getattr(fn, "_bitflux_patchset", None)
    if cached is not None and cached.patches is patches:
        return cached
    patchset = PatchSet.build(key, patches, out_features, in_features)
    fn._bitflux_patchset = patchset  # LowVramPatch objects live as long as one load; so does the cache
    return patchset
