"""What a safetensors file holds, from its key names: the FLUX layout, or why it is refused.

Users pick files from folders full of other models, so a refusal names what
the file looks like (a LoRA, an SD UNet, a VAE, a text encoder, an already
converted file) and what to do instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from .errors import InputError

# Prefixes under which a BFL-layout transformer is found: bare (flux1-dev.safetensors) or as
# saved by ComfyUI / in an all-in-one checkpoint.
BFL_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
DIFFUSERS_PREFIXES = ("", "transformer.")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_PICKLE_ADVICE = (
    "Pickle checkpoints can run arbitrary code when loaded, so this converter never opens them. Convert the file to "
    "safetensors first in an environment you trust (e.g. `safetensors.torch.save_file(torch.load(path, "
    "weights_only=True), 'model.safetensors')`), or download the .safetensors release of the model."
)


def check_not_pickle(path: str) -> None:
    """Refuses pickle / zip / GGUF files by suffix and by their first bytes, without loading them."""
    name = os.path.basename(path)
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise InputError(f"{name} is a pickle checkpoint ({os.path.splitext(name)[1]}). {_PICKLE_ADVICE}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":
        raise InputError(f"{name} is a PyTorch pickle file (despite its name). {_PICKLE_ADVICE}")
    if magic == b"GGUF":
        raise InputError(f"{name} is a GGUF file; this converter reads safetensors (bf16, fp16, fp32 or fp8) only.")


def _example(keys: Iterable[str], n: int = 3) -> str:
    return ", ".join(sorted(keys)[:n])


def classify(keys: list[str], metadata: dict[str, str], name: str) -> tuple[str, str]:
    """("bfl" | "diffusers", key prefix) for a FLUX transformer; InputError for anything else."""
    if metadata.get("format") == "bitflux" or any(k.endswith(".qweight") for k in keys):
        version = metadata.get("format_version", "?")
        raise InputError(
            f"{name} is already a converted bitflux file (format version {version}). Load it with the bitflux "
            "loader, or convert the original bf16/fp8 checkpoint instead."
        )
    lora = [k for k in keys if "lora" in k.lower() or k.endswith(".alpha")]
    if lora:
        raise InputError(
            f"{name} is a LoRA ({len(lora)} low-rank tensors such as {_example(lora, 2)}), not a full model. Convert "
            "the base FLUX checkpoint, then apply the LoRA at load time."
        )
    for prefix in BFL_PREFIXES:
        if f"{prefix}img_in.weight" in keys:
            return "bfl", prefix
    for prefix in DIFFUSERS_PREFIXES:
        if f"{prefix}x_embedder.weight" in keys and any(k.startswith(f"{prefix}transformer_blocks.") for k in keys):
            return "diffusers", prefix
    what = _recognise(keys, metadata)
    found = f"it looks like {what}" if what else f"its tensors are named like {_example(keys)}"
    raise InputError(
        f"{name} is not a FLUX transformer: {found}. Expected a FLUX.1 transformer (BFL keys such as "
        "double_blocks.0.img_attn.qkv.weight and img_in.weight, or a diffusers transformer with "
        "transformer_blocks.0.attn.to_q.weight)."
    )


def _recognise(keys: list[str], metadata: dict[str, str]) -> str:
    def has(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    if has("input_blocks.", "down_blocks.") and has("middle_block.", "mid_block."):
        sdxl = has("label_emb.", "add_embedding.")
        return "an SDXL UNet" if sdxl else "a Stable Diffusion 1.x/2.x UNet"
    if has("encoder.down.", "decoder.up.", "post_quant_conv", "encoder.down_blocks.", "decoder.up_blocks."):
        return "a VAE (autoencoder)"
    if has("encoder.block.", "shared.weight") and has("SelfAttention", "layer.0."):
        return "a T5 text encoder"
    if has("text_model.encoder.layers.", "text_model.embeddings."):
        return "a CLIP text encoder"
    try:
        if "modelspec.architecture" in metadata:
            return f"a {metadata['modelspec.architecture']} model"
        config = json.loads(metadata["config"]) if "config" in metadata else {}
        if "architectures" in config:
            return f"a {config['architectures']} model"
    except (ValueError, TypeError):
        pass
    return ""
