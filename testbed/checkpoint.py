"""Save / load the testbed's two safetensors files (bf16, config in metadata).

flux_testbed.safetensors   transformer, BFL keys; metadata "config" = FluxConfig JSON
text_encoder.safetensors   text encoder; metadata "config" = TextConfig JSON (with vocabulary)
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from converter.flux_model import Flux, FluxConfig, TorchOps

from .text import TextConfig, TextEncoder

FLUX_FILE = "flux_testbed.safetensors"
TEXT_FILE = "text_encoder.safetensors"
MAX_FILE_BYTES = 16_000_000  # per shipped file (decimal bytes; the device machine returns files up to 16 MiB)
FORMAT = "testbed-v1"
LATENT_NOTE = (
    "pixel space: latent = pixel_unshuffle(2 * rgb - 1, 2), [12, 32, 32] for 64x64 RGB in [0, 1]; "
    "no scale or shift; FLUX 2x2 patchify gives 256 tokens of 48 channels"
)


def _save(module: torch.nn.Module, path: str, metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in module.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={"format": FORMAT, **metadata})
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path} is {size} bytes, over the {MAX_FILE_BYTES}-byte limit")


def read_metadata(path: str) -> dict[str, Any]:
    """The file's metadata with JSON values decoded."""
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def save_flux(model: Flux, path: str, extra: dict[str, Any] | None = None) -> None:
    meta = {"config": json.dumps(model.params.to_dict()), "latent": LATENT_NOTE}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    _save(model, path, meta)


def load_flux(
    path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, operations: Any = TorchOps
) -> Flux:
    config = FluxConfig.from_dict(read_metadata(path)["config"])
    model = Flux(config, operations=operations)
    model.load_state_dict(load_file(path), strict=True)
    return model.to(device, dtype).eval()


def save_text_encoder(encoder: TextEncoder, path: str) -> None:
    _save(encoder, path, {"config": json.dumps(encoder.config.to_dict())})


def load_text_encoder(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TextEncoder:
    encoder = TextEncoder(TextConfig.from_dict(read_metadata(path)["config"]))
    encoder.load_state_dict(load_file(path), strict=True)
    return encoder.to(device, dtype).eval()


def load_testbed(
    weights_dir: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Flux, TextEncoder]:
    """Both models from a weights folder (as written by testbed.train)."""
    return (
        load_flux(os.path.join(weights_dir, FLUX_FILE), device, dtype),
        load_text_encoder(os.path.join(weights_dir, TEXT_FILE), device, dtype),
    )
