"""The BFL <-> diffusers key map of the FLUX transformer.

Transcribed from ComfyUI's `comfy/utils.py: flux_to_diffusers` (the
authoritative map): diffusers keeps q, k, v (and, in single blocks, the MLP
input) as separate linears whose rows concatenate, in that order, into BFL's
fused `qkv` / `linear1`; and diffusers' `norm_out` stores (scale, shift) where
BFL's `final_layer.adaLN_modulation.1` stores (shift, scale). No torch import
beyond the swap helper: the benchmark uses this map to write diffusers files
without diffusers installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# BFL module -> diffusers modules whose rows concatenate into it (one entry: a rename).
_DOUBLE_LINEARS = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_LINEARS = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
_GLOBAL_LINEARS = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_SWAPPED = "final_layer.adaLN_modulation.1"


@dataclass(frozen=True)
class KeyMapping:
    """One BFL tensor and the diffusers tensors it is made of."""

    bfl: str
    diffusers: tuple[str, ...]  # concatenated along dim 0 in this order
    swap_halves: bool = False  # norm_out: (scale, shift) in diffusers, (shift, scale) in BFL


def linear_map(depth: int, depth_single: int) -> dict[str, tuple[str, ...]]:
    """BFL linear module -> the diffusers linear modules its rows split into."""
    out = {k: (v,) for k, v in _GLOBAL_LINEARS.items()}
    for i in range(depth):
        for k, v in _DOUBLE_LINEARS.items():
            out[f"double_blocks.{i}.{k}"] = tuple(f"transformer_blocks.{i}.{p}" for p in v)
    for i in range(depth_single):
        for k, v in _SINGLE_LINEARS.items():
            out[f"single_blocks.{i}.{k}"] = tuple(f"single_transformer_blocks.{i}.{p}" for p in v)
    return out


def tensor_map(depth: int, depth_single: int) -> dict[str, KeyMapping]:
    """Every tensor a FLUX transformer of these depths may have, by BFL key
    (optional ones, such as guidance_in or the qkv bias, included)."""
    out: dict[str, KeyMapping] = {}
    for bfl, parts in linear_map(depth, depth_single).items():
        for end in ("weight", "bias"):
            key = f"{bfl}.{end}"
            out[key] = KeyMapping(key, tuple(f"{p}.{end}" for p in parts), bfl == _SWAPPED)
    for i in range(depth):
        for k, v in _DOUBLE_NORMS.items():
            out[f"double_blocks.{i}.{k}"] = KeyMapping(f"double_blocks.{i}.{k}", (f"transformer_blocks.{i}.{v}",))
    for i in range(depth_single):
        for k, v in _SINGLE_NORMS.items():
            key = f"single_blocks.{i}.{k}"
            out[key] = KeyMapping(key, (f"single_transformer_blocks.{i}.{v}",))
    return out


def split_sizes(bfl_key: str, hidden_size: int, mlp_hidden: int) -> list[int]:
    """Row counts of the diffusers parts of a BFL tensor, in order."""
    if re.search(r"\.(img_attn|txt_attn)\.qkv\.", bfl_key):
        return [hidden_size] * 3
    if re.search(r"^single_blocks\.\d+\.linear1\.", bfl_key):
        return [hidden_size] * 3 + [mlp_hidden]
    return []


def diffusers_depths(keys: list[str]) -> tuple[int, int]:
    """(double, single) block counts: one more than the highest index seen."""
    double = [int(m.group(1)) for k in keys if (m := re.match(r"transformer_blocks\.(\d+)\.", k))]
    single = [int(m.group(1)) for k in keys if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))]
    return (max(double) + 1 if double else 0, max(single) + 1 if single else 0)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0: diffusers' norm_out order <-> BFL's (its own inverse)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)
