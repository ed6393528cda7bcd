"""A bitflux file as a diffusers `FluxTransformer2DModel` with bitkernel layers.

    from converter.diffusers_model import load_diffusers_transformer
    transformer = load_diffusers_transformer("flux1-dev-bitflux.safetensors", device="cuda")
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", transformer=transformer,
                                        torch_dtype=torch.bfloat16)

BFL's fused linears split into diffusers' separate ones by rows: `qkv` into
to_q / to_k / to_v (add_*_proj for the text stream), single-block `linear1`
into to_q / to_k / to_v / proj_mlp. Every format stores its scales (and zero
points) per row or per row-group, so a row slice of the packed tensors is
exactly the packed form of the row slice of the weight. `norm_out` gets its
(shift, scale) halves swapped into diffusers' (scale, shift) order.

Piece by piece (bench/flux_e2e.py fills a full-size model one block at a time):
`empty_transformer(architecture)` gives the model on the meta device,
`install_tensors(model, architecture, layers, tensors)` puts any subset of a
file's tensors in, `meta_tensors(model)` lists what is still missing.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Union

import torch
from torch import nn

from . import keymap
from .fileformat import BitfluxFormatError, LayerSpec, build_linear, load_tensors, read_header


def diffusers_config(architecture: dict[str, Any]) -> dict[str, Any]:
    """FluxTransformer2DModel's config for a bitflux architecture (diffusers patchifies outside the model)."""
    a = architecture
    if float(a["mlp_ratio"]) != 4.0 or not a["qkv_bias"]:
        raise BitfluxFormatError(
            f"diffusers' FluxTransformer2DModel has MLP ratio 4 and q/k/v biases; this file has MLP ratio "
            f"{a['mlp_ratio']} and qkv_bias={a['qkv_bias']}."
        )
    return {
        "patch_size": 1,
        "in_channels": a["in_channels"],
        "out_channels": None,
        "num_layers": a["depth"],
        "num_single_layers": a["depth_single_blocks"],
        "attention_head_dim": a["hidden_size"] // a["num_heads"],
        "num_attention_heads": a["num_heads"],
        "joint_attention_dim": a["context_in_dim"],
        "pooled_projection_dim": a["vec_in_dim"],
        "guidance_embeds": bool(a["guidance_embed"]),
        "axes_dims_rope": tuple(a["axes_dim"]),
    }


def _row_slices(prefix: str, spec: LayerSpec, tensors: dict[str, torch.Tensor], sizes: list[int]) -> list[dict]:
    """The layer's stored tensors cut into row blocks (lora_down, shared by every block, is kept whole)."""
    names = [n for n in tensors if n.startswith(prefix + ".") and "." not in n[len(prefix) + 1 :]]
    out: list[dict[str, torch.Tensor]] = [{} for _ in sizes]
    for name in names:
        t = tensors[name]
        if name.endswith(".lora_down"):
            for part in out:
                part[name] = t
            continue
        for part, piece in zip(out, torch.split(t, sizes, dim=0)):
            part[name] = piece.contiguous()
    return out


def empty_transformer(architecture: dict[str, Any]) -> Any:
    """diffusers' FluxTransformer2DModel for a bitflux architecture, on the meta device (no memory):
    `install_tensors` fills it."""
    from diffusers import FluxTransformer2DModel

    config = diffusers_config(architecture)
    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


def install_tensors(
    model: nn.Module,
    architecture: dict[str, Any],
    layers: Mapping[str, LayerSpec],
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Puts tensors in BFL keys (all of a bitflux file's, or one block's) into a FluxTransformer2DModel:
    each layer of `layers` becomes bitkernel modules (or nn.Linear for "bf16") split by rows into
    diffusers' linears, from its stored tensors; every other tensor is assigned to its diffusers
    parameter. Tensors stay on their device; 16-bit ones are cast to `dtype` (packed codes, scales and
    zero points untouched)."""
    a = architecture
    hidden = a["hidden_size"]
    mlp_hidden = int(hidden * float(a["mlp_ratio"]))
    linears = keymap.linear_map(a["depth"], a["depth_single_blocks"])
    for prefix, spec in layers.items():
        targets = linears.get(prefix)
        if targets is None:
            raise BitfluxFormatError(f"layer {prefix} has no counterpart in diffusers' FluxTransformer2DModel")
        sizes = keymap.split_sizes(f"{prefix}.weight", hidden, mlp_hidden) or [_rows(prefix, spec, tensors)]
        for target, part in zip(targets, _row_slices(prefix, spec, tensors, sizes)):
            model.set_submodule(target, build_linear(prefix, spec, _cast(part, dtype)))

    state: dict[str, torch.Tensor] = {}
    layer_tensor_names = {n for n in tensors if n.rsplit(".", 1)[0] in layers}
    mapping = keymap.tensor_map(a["depth"], a["depth_single_blocks"])
    for name, t in tensors.items():
        if name in layer_tensor_names:
            continue
        m = mapping.get(name)
        if m is None or len(m.diffusers) != 1:
            raise BitfluxFormatError(f"tensor {name} has no counterpart in diffusers' FluxTransformer2DModel")
        state[m.diffusers[0]] = (keymap.swap_halves(t) if m.swap_halves else t).to(dtype)
    model.load_state_dict(state, strict=False, assign=True)


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers not filled yet (still on the meta device)."""
    return [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]


def load_diffusers_transformer(
    path: Union[str, os.PathLike],
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> Any:
    """Builds a diffusers FluxTransformer2DModel from a bitflux file: block linears as bitkernel
    modules (packed weights, float32 scales), everything else in `dtype`, on `device`."""
    header = read_header(path)
    model = empty_transformer(header.architecture)
    tensors = load_tensors(path, device)
    install_tensors(model, header.architecture, header.layers, tensors, dtype)
    left = meta_tensors(model)
    if left:
        raise BitfluxFormatError(f"the file does not provide {len(left)} diffusers tensors, e.g. {left[:3]}")
    # Cast per tensor above, not with model.to(dtype): no second copy of the weights, and diffusers warns
    # against casting a model with to(). Inference only, so no gradients.
    return model.requires_grad_(False).eval()


def _cast(part: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """16-bit tensors of a layer to `dtype`; packed codes, scales and zero points untouched."""
    keep = (".qweight", ".scale", ".zero")
    return {n: t if n.endswith(keep) else t.to(dtype) for n, t in part.items()}


def _rows(prefix: str, spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> int:
    """Output rows of a stored layer."""
    key = f"{prefix}.qweight" if spec.quantized else f"{prefix}.weight"
    return int(tensors[key].shape[0])
