"""Shared helpers of the ComfyUI tests: a CPU ComfyUI in this process, small bitflux files, LoRAs.

The tests run when COMFYUI_DIR points to a ComfyUI checkout (they skip with the
reason otherwise). torchvision has no CPU build on the test machines while
ComfyUI imports it at module level (for models these tests never build), so a
stub package stands in for it when it is missing.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
from typing import Any, Optional

import pytest
import torch
from comfy_standins import random_flux
from safetensors.torch import save_file
from torch import nn

from converter.fileformat import BitfluxHeader, LayerSpec
from converter.flux_model import FluxConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STUB = '''"""Import stub for torchvision (test machines have no CPU build): ComfyUI imports it for models
the tests never build. Any real use fails loudly."""


def __getattr__(name):
    raise ImportError(f"torchvision stub: torchvision.{name} is not available in this test environment")
'''

# Layer formats of the test model: most block linears ternary, one of every other kind.
SPECIAL_LAYERS = {
    "double_blocks.0.img_attn.qkv": LayerSpec("int8"),
    "double_blocks.0.txt_mlp.0": LayerSpec("int4", group_size=64),
    "double_blocks.1.img_mlp.2": LayerSpec("int4", group_size=64, symmetric=False),
    "single_blocks.0.linear2": LayerSpec("ternary", lora_rank=8),
    "double_blocks.1.txt_mod.lin": LayerSpec("bf16"),
}


def comfyui_dir() -> str:
    root = os.environ.get("COMFYUI_DIR")
    if not root:
        pytest.skip("COMFYUI_DIR is not set: point it to a ComfyUI checkout to run the ComfyUI tests")
    if not os.path.isfile(os.path.join(root, "comfy", "model_patcher.py")):
        pytest.skip(f"COMFYUI_DIR={root} is not a ComfyUI checkout (no comfy/model_patcher.py)")
    return root


def stub_dir() -> Optional[str]:
    """A directory holding the torchvision stub, or None where torchvision is installed."""
    try:
        importlib.metadata.version("torchvision")  # the installed distribution, never the stub itself
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    d = os.path.join(tempfile.gettempdir(), "bitflux-test-stubs")
    pkg = os.path.join(d, "torchvision")
    os.makedirs(pkg, exist_ok=True)
    for name in ("__init__.py", "transforms.py"):
        with open(os.path.join(pkg, name), "w") as f:
            f.write(_STUB)
    return d


def import_comfy() -> Any:
    """ComfyUI's modules, imported in this process for CPU use; skips when that is impossible."""
    root = comfyui_dir()
    stubs = stub_dir()
    for p in (stubs, root):
        if p and p not in sys.path:
            sys.path.insert(0, p)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401  (reads args.cpu once, at import)
        import comfy.sd  # noqa: F401
        import folder_paths  # noqa: F401
        import nodes
    except ImportError as exc:
        pytest.skip(f"ComfyUI does not import here ({exc}): install its requirements.txt in this environment")
    return nodes


# ---------------------------------------------------------------------- small models


def block_linears(model: nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (n.startswith("double_blocks.") or n.startswith("single_blocks."))
    ]


def write_bitflux(
    path: str,
    cfg: Optional[FluxConfig] = None,
    seed: int = 0,
    special: Optional[dict[str, LayerSpec]] = None,
    metadata_override: Optional[dict[str, str]] = None,
) -> BitfluxHeader:
    """A converted file as docs/FORMAT.md describes it, made with bitkernel's default quantizers."""
    import bitkernel.functional as bkf

    cfg = cfg or FluxConfig()
    special = SPECIAL_LAYERS if special is None else special
    model = random_flux(cfg, seed)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    layers: dict[str, LayerSpec] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name in block_linears(model):
        spec = special.get(name, LayerSpec("ternary"))
        layers[name] = spec
        w = sd.pop(f"{name}.weight")
        bias = sd.pop(f"{name}.bias", None)
        if spec.quantized:
            qw = bkf.quantize(w, spec.format, spec.group_size, spec.symmetric)
            tensors[f"{name}.qweight"] = qw.qweight
            tensors[f"{name}.scale"] = qw.scale
            if qw.zero is not None:
                tensors[f"{name}.zero"] = qw.zero
        else:
            tensors[f"{name}.weight"] = w.to(torch.bfloat16)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.to(torch.bfloat16)
        if spec.lora_rank:
            n, k = w.shape
            tensors[f"{name}.lora_down"] = (0.05 * torch.randn(spec.lora_rank, k, generator=gen)).bfloat16()
            tensors[f"{name}.lora_up"] = (0.05 * torch.randn(n, spec.lora_rank, generator=gen)).bfloat16()
    for k, v in sd.items():
        tensors[k] = v.to(torch.bfloat16)
    arch = dict(cfg.to_dict(), patch_size=2)
    header = BitfluxHeader(
        architecture=arch,
        layers=layers,
        method={"name": "absmean"},
        source={"file": "random", "sha256": "0" * 64, "layout": "bfl", "dtype": "float32"},
        converter_version="test",
    )
    meta = header.to_metadata()
    meta.update(metadata_override or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
    return header


def dense_state_dict(tensors: dict[str, torch.Tensor], header: BitfluxHeader) -> dict[str, torch.Tensor]:
    """The file's weights as dense float32 `.weight` tensors (file adapters merged): what stock ops run."""
    import bitkernel.functional as bkf
    from bitkernel.formats import WEIGHTS_PER_BYTE, QuantizedWeight

    out = {}
    done = set()
    for name, spec in header.layers.items():
        if not spec.quantized:
            continue
        qweight = tensors[f"{name}.qweight"]
        k = qweight.shape[1] * WEIGHTS_PER_BYTE[spec.format]
        qw = QuantizedWeight(
            spec.format, qweight, tensors[f"{name}.scale"], tensors.get(f"{name}.zero"), k, spec.group_size
        )
        w = bkf.dequantize(qw, torch.float32)
        if spec.lora_rank:
            w = w + tensors[f"{name}.lora_up"].float() @ tensors[f"{name}.lora_down"].float()
        out[f"{name}.weight"] = w
        done.update(f"{name}.{t}" for t in ("qweight", "scale", "zero", "lora_down", "lora_up"))
    for key, t in tensors.items():
        if key not in done:
            out[key] = t.float()
    return out


def write_lora(path: str, header: BitfluxHeader, rank: int = 4, seed: int = 7) -> list[str]:
    """A LoRA in two ComfyUI-supported key styles: kohya (`lora_unet_*`) on BFL layers, and diffusers
    (`transformer.*`) on to_q, which ComfyUI maps into a row slice of the fused qkv. Returns the BFL
    layer names it touches."""
    arch = header.architecture
    hidden, mlp = arch["hidden_size"], int(arch["hidden_size"] * arch["mlp_ratio"])
    gen = torch.Generator().manual_seed(seed)

    def pair(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (0.2 * torch.randn(n, rank, generator=gen)).half(), (0.2 * torch.randn(rank, k, generator=gen)).half()

    targets = {
        "double_blocks.0.img_attn.proj": (hidden, hidden),  # ternary
        "double_blocks.0.img_attn.qkv": (3 * hidden, hidden),  # int8
        "double_blocks.1.img_mlp.2": (hidden, mlp),  # int4 asymmetric
        "single_blocks.0.linear2": (hidden, hidden + mlp),  # ternary with a file adapter
        "single_blocks.1.linear1": (3 * hidden + mlp, hidden),  # ternary
        "double_blocks.1.txt_mod.lin": (6 * hidden, hidden),  # bf16 layer: ComfyUI's own path
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, (n, k) in targets.items():
        up, down = pair(n, k)
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"] = up, down
        tensors[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    up, down = pair(hidden, hidden)  # diffusers to_q of double block 1 -> rows [0, hidden) of img_attn.qkv
    tensors["transformer.transformer_blocks.1.attn.to_q.lora_B.weight"] = up
    tensors["transformer.transformer_blocks.1.attn.to_q.lora_A.weight"] = down
    save_file(tensors, path)
    return [*targets, "double_blocks.1.img_attn.qkv"]


def conditioning(cfg: FluxConfig, batch: int = 1, tokens: int = 8, seed: int = 3, guidance: float = 3.5) -> list:
    """Hand-made Flux conditioning: T5-like context and CLIP-like pooled vector of the test model's widths."""
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, tokens, cfg.context_in_dim, generator=gen)
    pooled = torch.randn(batch, cfg.vec_in_dim, generator=gen)
    return [[ctx, {"pooled_output": pooled, "guidance": guidance}]]


def latent(batch: int, size: int = 16, seed: int = 5, channels: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, channels, size, size, generator=gen)}
