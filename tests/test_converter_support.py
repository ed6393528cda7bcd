"""Shared helpers of the converter tests (tiny FLUX checkpoints in every layout, references),
plus tests of the helpers themselves."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import bitkernel.functional as BF
from bitkernel.formats import QuantizedWeight
from converter import keymap
from converter.fileformat import LayerSpec, read_header
from converter.flux_model import Flux, FluxConfig, block_linear_names


def tiny_config(**kw) -> FluxConfig:
    """The smallest real FLUX shape: hidden 256 = 2 heads of 128, one block of each kind."""
    base = dict(
        in_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=256, num_heads=2, depth=1,
        depth_single_blocks=1,
    )
    base.update(kw)
    return FluxConfig(**base)


def make_state(cfg: FluxConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A float32 BFL state dict of testbed's Flux with varied per-row weight scales (so that per-row
    scales matter), q/k norm scales not all one."""
    model = Flux(cfg)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        t = torch.randn(v.shape, generator=gen) * 0.05
        if v.dim() == 2:
            t = t * torch.exp(torch.randn(v.shape[0], 1, generator=gen) * 0.5)
        if k.endswith(".scale"):
            t = 1 + t
        state[k] = t.contiguous()
    return state


def save_bfl(state: dict[str, torch.Tensor], path: str, dtype=torch.bfloat16, prefix: str = "", extra=None) -> None:
    tensors = {prefix + k: v.to(dtype).contiguous() for k, v in state.items()}
    tensors.update(extra or {})
    save_file(tensors, path)


def to_diffusers(state: dict[str, torch.Tensor], cfg: FluxConfig) -> dict[str, torch.Tensor]:
    """BFL -> diffusers keys (rows split, norm_out halves swapped)."""
    mlp = int(cfg.hidden_size * cfg.mlp_ratio)
    out = {}
    for bfl, m in keymap.tensor_map(cfg.depth, cfg.depth_single_blocks).items():
        if bfl not in state:
            continue
        t = keymap.swap_halves(state[bfl]) if m.swap_halves else state[bfl]
        sizes = keymap.split_sizes(bfl, cfg.hidden_size, mlp) or [t.shape[0]]
        for name, piece in zip(m.diffusers, torch.split(t, sizes, dim=0)):
            out[name] = piece.contiguous()
    return out


def save_diffusers_folder(state, cfg, folder: str, dtype=torch.bfloat16, shards: int = 2) -> None:
    """A sharded diffusers transformer/ folder with its index, as diffusers writes it."""
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in to_diffusers(state, cfg).items()}
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: tensors[k] for k in part}, os.path.join(folder, shard))
        weight_map.update(dict.fromkeys(part, shard))
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def layer_quantized(tensors: dict[str, torch.Tensor], prefix: str, spec: LayerSpec) -> QuantizedWeight:
    wpb = {"ternary": 4, "int8": 1, "int4": 2}[spec.format]
    q = tensors[f"{prefix}.qweight"]
    return QuantizedWeight(
        spec.format, q, tensors[f"{prefix}.scale"], tensors.get(f"{prefix}.zero"), q.shape[1] * wpb, spec.group_size
    )


def dense_state(path: str) -> dict[str, torch.Tensor]:
    """The BFL float32 state dict a bitflux file stands for (quantized layers dequantized)."""
    header = read_header(path)
    tensors = load_file(path)
    out = {}
    for prefix, spec in header.layers.items():
        if spec.quantized:
            out[f"{prefix}.weight"] = BF.dequantize(layer_quantized(tensors, prefix, spec))
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in header.layers and leaf in ("qweight", "scale", "zero"):
            continue
        out[name] = t.float()
    return out


def mse_reference(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row MSE-optimal ternary (float64 numpy, written independently of the converter): for
    every support size k the best scale is the mean of the k largest |w|; keep the k of least
    error. Returns (scales [N], codes [N, K] in {-1, 0, 1})."""
    w = w.astype(np.float64)
    a = np.abs(w)
    order = np.argsort(-a, axis=1, kind="stable")
    top = np.take_along_axis(a, order, axis=1)
    csum = np.cumsum(top, axis=1)
    err = np.sum(a * a, axis=1, keepdims=True) - csum**2 / np.arange(1, w.shape[1] + 1)
    best = np.argmin(err, axis=1)
    scales = csum[np.arange(len(w)), best] / (best + 1)
    support = np.zeros(w.shape, dtype=bool)
    np.put_along_axis(support, order, np.arange(w.shape[1])[None, :] <= best[:, None], axis=1)
    return scales, (np.sign(w) * support).astype(np.int8)


def ternary_codes(q: QuantizedWeight) -> torch.Tensor:
    """Codes in {-1, 0, 1} of a ternary QuantizedWeight, unpacked per docs/FORMAT.md."""
    b = q.qweight.to(torch.int32)
    parts = [((b >> (2 * i)) & 3) - 1 for i in range(4)]
    return torch.stack(parts, dim=-1).reshape(q.qweight.shape[0], -1)


def test_mse_reference_matches_brute_force():
    # The reference itself, against trying every candidate scale on a tiny row set.
    w = np.random.default_rng(0).standard_normal((3, 16))
    scales, codes = mse_reference(w)
    for r in range(3):
        best = min(
            np.sum((w[r] - s * np.clip(np.round(w[r] / s), -1, 1)) ** 2) for s in np.linspace(0.01, 3, 30000)
        )
        assert np.sum((w[r] - scales[r] * codes[r]) ** 2) <= best + 1e-9


def test_diffusers_layout_round_trip_keys():
    cfg = tiny_config()
    state = make_state(cfg)
    d = to_diffusers(state, cfg)
    assert "transformer_blocks.0.attn.add_k_proj.weight" in d and "single_transformer_blocks.0.proj_mlp.bias" in d
    assert sum(v.numel() for v in d.values()) == sum(v.numel() for v in state.values())
    assert set(block_linear_names(Flux(cfg, device="meta"))) == {
        k.rsplit(".", 1)[0] for k in state if k.startswith(("double_", "single_")) and k.endswith(".weight")
        and "norm" not in k
    }
