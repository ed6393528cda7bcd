"""The full-precision FLUX transformer, one block at a time, straight from the checkpoint.

FLUX.1-dev in bf16 is 23.8 GB: it fits neither a 16 GB GPU nor, with activations,
a 24 GB one. Calibration never needs the whole model at once: the embedders and
the final layer (0.2 GB) stay on the GPU, and each block is built from the
source when it is needed (0.3 to 0.7 GB). Blocks are kept resident while a byte
budget allows, so a GPU with room (or the small testbed model) reads each block
once; otherwise a block is read again from the checkpoint (the OS page cache
serves repeated reads when RAM allows).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..architecture import DOUBLE_LINEARS, SINGLE_LINEARS, Architecture
from ..flux_model import DoubleStreamBlock, Flux, FluxConfig, SingleStreamBlock, run_single
from ..sources import Source


def block_names(arch: Architecture) -> list[str]:
    """Block prefixes in execution order."""
    return [f"double_blocks.{i}" for i in range(arch.depth)] + [
        f"single_blocks.{i}" for i in range(arch.depth_single_blocks)
    ]


def block_layers(block: str) -> list[str]:
    """The quantizable linears of a block (BFL prefixes)."""
    names = DOUBLE_LINEARS if block.startswith("double_blocks.") else SINGLE_LINEARS
    return [f"{block}.{n}" for n in names]


def run_block(block: nn.Module, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
    """Any block on the (img, txt) stream pair."""
    if isinstance(block, DoubleStreamBlock):
        return block(img=img, txt=txt, vec=vec, pe=pe)
    return run_single(block, img, txt, vec, pe)


class StreamedFlux:
    """Embedders and final layer resident on `device`; blocks built on demand."""

    def __init__(
        self, source: Source, arch: Architecture, device: torch.device, dtype: torch.dtype, resident_bytes: int
    ) -> None:
        self.source, self.arch, self.device, self.dtype = source, arch, device, dtype
        self.config = FluxConfig.from_dict(arch.to_dict())
        self.model = Flux(self.config, device="meta")
        self.model.double_blocks = nn.ModuleList()  # blocks live in self._resident or are built per use
        self.model.single_blocks = nn.ModuleList()
        prefixes = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
        state = {k: self._load(k) for k in source.shapes() if k.startswith(prefixes)}
        self.model.load_state_dict(state, strict=True, assign=True)
        self.model.requires_grad_(False)  # the end-to-end stage trains only the quantized layers
        self.resident_budget = resident_bytes
        self._resident: dict[str, nn.Module] = {}

    def _load(self, key: str) -> Tensor:
        return self.source.load(key).to(self.device, self.dtype)

    def block(self, name: str) -> nn.Module:
        """The full-precision block `name` on the device (do not modify it: it may be shared)."""
        if name in self._resident:
            return self._resident[name]
        c = self.config
        if name.startswith("double_blocks."):
            module: nn.Module = DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qkv_bias, device="meta")
        else:
            module = SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, device="meta")
        prefix = name + "."
        state = {k[len(prefix) :]: self._load(k) for k in self.source.shapes() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True, assign=True)
        module.eval().requires_grad_(False)
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        if size <= self.resident_budget:
            self.resident_budget -= size
            self._resident[name] = module
        return module

    def done_with(self, name: str) -> None:
        """Block `name` is not read again until release(): its resident copy goes, and no block becomes
        resident from now on (the block stage goes through the blocks once; the resident ones that the
        teacher kept held 6 GiB of a 16 GiB GPU there and made half of FLUX.1-dev's double blocks keep
        GPTQ's codes)."""
        self._resident.pop(name, None)
        self.resident_budget = 0

    def release(self) -> None:
        """Drops the resident blocks and keeps none from now on (their memory goes to the caller)."""
        self._resident.clear()
        self.resident_budget = 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def weight(self, layer: str) -> Tensor:
        """A block linear's full-precision weight, float32 on the device."""
        return self.source.load(f"{layer}.weight").to(self.device, torch.float32)

    def embed(self, *args: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.model.embed(*args)

    def head(self, img: Tensor, vec: Tensor) -> Tensor:
        return self.model.final_layer(img, vec)
