"""Random stand-ins for FLUX.1's files, in the layouts ComfyUI's own loaders read (shared by
tests/test_comfy_server.py and bench/comfy_e2e.py).

- T5-XXL (`t5xxl_fp8_e4m3fn` / `t5xxl_fp16`), CLIP-L (fp16) and the FLUX VAE, built by ComfyUI's own
  modules on the meta device and filled with random values: `write_standin`, `write_random_encoders`.
  CLIP-L and the VAE have their real sizes (ComfyUI's VAE detection hard-codes its widths); with
  `tiny` the T5 keeps T5-XXL's 24 layers (what ComfyUI's detection looks for) at width 64, which
  ComfyUI builds only when its `t5xxl_model_config` model option says so (`small_t5_config` gives it).
- A small FLUX-architecture checkpoint (converter.flux_model, random: `random_flux`) and its converter output:
  `make_tiny_files`.

ComfyUI must be importable (its root on sys.path, torch's CPU/GPU choice made) before the writers run;
nothing here imports it at module level.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from typing import Any, Callable, Optional

import torch

TINY_T5 = {"d_model": 64, "d_kv": 32, "num_heads": 2, "d_ff": 128}  # keeps T5-XXL's 24 layers (ComfyUI's detection)
TINY_CONTEXT = TINY_T5["d_model"]
# The small transformer: FLUX.1's latent (16 channels, 2x2 patches), CLIP-L's pooled width, the tiny T5's width.
TINY_FLUX = {
    "in_channels": 64,
    "vec_in_dim": 768,
    "context_in_dim": TINY_CONTEXT,
    "hidden_size": 256,
    "num_heads": 2,
    "depth": 2,
    "depth_single_blocks": 4,
}
FLUX_VAE = {
    "double_z": True,
    "z_channels": 16,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
KINDS = ("t5", "t5_fp16", "clip_l", "vae")  # t5: float8_e4m3fn like t5xxl_fp8_e4m3fn.safetensors


class RandomPool:
    """Normal values reused at per-name offsets: random enough for timing, fast for billions of weights
    (one pool per (std, dtype), so a tensor is a plain copy)."""

    SIZE = 1 << 25

    def __init__(self, seed: int = 0) -> None:
        self.unit = torch.randn(self.SIZE, generator=torch.Generator().manual_seed(seed))
        self.pools: dict[tuple[float, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], std: float, dtype: torch.dtype) -> torch.Tensor:
        pool = self.pools.get((std, dtype))
        if pool is None:
            pool = self.pools[(std, dtype)] = (self.unit * std).to(dtype)
        n = math.prod(shape)
        off = zlib.crc32(name.encode()) % self.SIZE
        reps = (off + n) // self.SIZE + 1
        flat = pool.repeat(reps)[off : off + n] if reps > 1 else pool[off : off + n]
        return flat.reshape(shape).clone()


def random_state_dict(module: torch.nn.Module, pool: RandomPool, dtype_of) -> dict[str, torch.Tensor]:
    """Random tensors for every entry of a (meta-device) module's state dict: 1/sqrt(fan_in) weights,
    unit norm scales, zero biases, unit embeddings."""
    out = {}
    for name, t in module.state_dict().items():
        shape, dtype = tuple(t.shape), dtype_of(name, t)
        leaf = name.rsplit(".", 1)[-1]
        if t.dim() == 1 and ("norm" in name or "ln" in name or name.endswith("layer_norm.weight")) and leaf == "weight":
            out[name] = torch.ones(shape, dtype=dtype)
        elif leaf == "bias" or t.dim() == 0:
            out[name] = torch.zeros(shape, dtype=dtype)
        elif t.dim() == 1:
            out[name] = torch.ones(shape, dtype=dtype)
        else:
            fan_in = math.prod(shape[1:])
            std = 1.0 if "embed" in name or "shared" in name or "relative_attention_bias" in name else fan_in**-0.5
            out[name] = pool.get(name, shape, std, dtype)
    return out


def _spec(kind: str, comfyui_root: str, tiny: bool) -> tuple[dict[str, Any], Callable, Callable]:
    """(config, meta-device module builder, dtype per state-dict entry) of one stand-in kind."""
    import comfy.clip_model
    import comfy.ldm.models.autoencoder as ae
    import comfy.ops
    import comfy.text_encoders.t5

    if kind in ("t5", "t5_fp16"):
        with open(os.path.join(comfyui_root, "comfy", "text_encoders", "t5_config_xxl.json")) as f:
            cfg = json.load(f)
        if tiny:
            cfg.update(TINY_T5)
        dtype = torch.float8_e4m3fn if kind == "t5" else torch.float16
        return cfg, lambda: comfy.text_encoders.t5.T5(cfg, dtype, "meta", comfy.ops.manual_cast), lambda n, t: dtype
    if kind == "clip_l":
        with open(os.path.join(comfyui_root, "comfy", "sd1_clip_config.json")) as f:
            cfg = json.load(f)
        return (
            cfg,
            lambda: comfy.clip_model.CLIPTextModel(cfg, torch.float16, "meta", comfy.ops.manual_cast),
            lambda n, t: torch.float16,
        )
    if kind == "vae":
        cfg = dict(FLUX_VAE)
        return (
            cfg,
            lambda: ae.AutoencodingEngine(
                regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": cfg},
                decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": cfg},
            ),
            lambda n, t: torch.float32,
        )
    raise ValueError(f"unknown stand-in kind {kind!r} (one of {', '.join(KINDS)})")


def write_standin(
    kind: str,
    path: str,
    comfyui_root: str,
    tiny: bool = True,
    pool: Optional[RandomPool] = None,
    reuse: bool = False,
    verbose: bool = False,
) -> Optional[RandomPool]:
    """Write one random stand-in (`kind` in KINDS) to `path`; with `reuse`, keep a file this function
    wrote earlier with the same config. Returns the RandomPool used (pass it on to the next call), or
    `pool` unchanged when nothing was written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg, build, dtype_of = _spec(kind, comfyui_root, tiny)
    stamp = json.dumps({"random": True, "kind": kind, "config": cfg}, sort_keys=True)
    if reuse and os.path.exists(path):
        try:
            with safe_open(path, "pt") as f:
                if (f.metadata() or {}).get("comfy_e2e") == stamp:
                    return pool
        except Exception:  # noqa: BLE001 (a damaged cache file is rewritten)
            pass
    t = time.monotonic()
    pool = pool or RandomPool()
    with torch.device("meta"):
        module = build()
    sd = random_state_dict(module, pool, dtype_of)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.partial"
    save_file(sd, tmp, metadata={"comfy_e2e": stamp})
    os.replace(tmp, path)
    if verbose:
        size = sum(v.nelement() * v.element_size() for v in sd.values())
        print(f"wrote {path} ({size / 1e9:.2f} GB) in {time.monotonic() - t:.1f} s", flush=True)
    return pool


def write_random_encoders(workdir: str, comfyui_root: str, tiny: bool) -> dict[str, str]:
    """Random T5-XXL (fp8 e4m3fn), CLIP-L (fp16) and FLUX VAE files, in the key layouts of the files users
    download; written once into `workdir` and reused. Returns {"t5", "clip_l", "vae"} -> path."""
    te_dir = os.path.join(workdir, "text_encoders")
    paths = {
        "t5": os.path.join(te_dir, f"t5xxl{'_tiny' if tiny else ''}_fp8_e4m3fn_random.safetensors"),
        "clip_l": os.path.join(te_dir, "clip_l_random.safetensors"),
        "vae": os.path.join(workdir, "vae", "ae_random.safetensors"),
    }
    pool = None
    for kind, path in paths.items():
        pool = write_standin(kind, path, comfyui_root, tiny, pool, reuse=True, verbose=True)
    return paths


def small_t5_config(sd: dict[str, torch.Tensor]) -> Optional[dict[str, int]]:
    """ComfyUI's `t5xxl_model_config` option for a T5 state dict narrower than T5-XXL (None for T5-XXL
    itself), read from the tensor shapes."""
    shared = sd.get("shared.weight")
    if shared is None or shared.shape[1] == 4096:
        return None
    heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    return {
        "d_model": int(shared.shape[1]),
        "num_heads": int(heads),
        "d_kv": int(sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]) // int(heads),
        "d_ff": int(sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]),
    }


def random_flux(cfg: Any, seed: int = 0) -> torch.nn.Module:
    """converter.flux_model.Flux for `cfg` (a FluxConfig) with small random weights, q/k RMSNorm scales near 1."""
    from converter.flux_model import Flux

    torch.manual_seed(seed)
    model = Flux(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith(".scale") else 0.05 * torch.randn_like(p))
    return model


def make_tiny_files(workdir: str, device: str = "cpu", out_name: Optional[str] = None) -> tuple[str, str]:
    """A small FLUX-architecture BFL checkpoint (converter.flux_model, random, bf16) and its converter output
    (default method). Returns (converted path, checkpoint path)."""
    from safetensors.torch import save_file

    from converter import convert
    from converter.flux_model import FluxConfig

    os.makedirs(workdir, exist_ok=True)
    dense = os.path.join(workdir, "tiny-flux-random.safetensors")
    out = os.path.join(workdir, out_name or "tiny-flux-random-bitflux.safetensors")
    model = random_flux(FluxConfig(**TINY_FLUX))
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, dense)
    convert(dense, out, force=True, progress=False, device=device if device == "cuda" else "cpu")
    return out, dense
