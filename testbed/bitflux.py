"""Load a converted (bitflux) file into the testbed's FLUX model: the same
model code as the full-precision testbed, with bitkernel layers in place of
the quantized linears, so two models can be compared on the same noise."""

from __future__ import annotations

import os

import torch

from converter.fileformat import install_layers, load_tensors, read_header
from converter.flux_model import Flux, FluxConfig


def load_bitflux_flux(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Flux:
    """A testbed `Flux` whose layers listed in the file's metadata are bitkernel modules.

    Tensors that are not quantized layers are cast to `dtype`; the packed
    weights and their scales keep the file's layout.
    """
    header = read_header(path)
    cfg = FluxConfig.from_dict(header.architecture)
    tensors = load_tensors(path, device)
    model = Flux(cfg, dtype=dtype, device="meta")
    missing, unexpected = install_layers(model, header.layers, tensors, dtype)
    missing = [k for k in missing if k.rpartition(".")[0] not in header.layers]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match the architecture (missing {missing}, unexpected {unexpected})")
    return model.eval()
