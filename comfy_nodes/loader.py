"""A bitflux file -> ComfyUI's own Flux model (comfy.model_base.Flux) with packed layers, in a ModelPatcher.

The model config comes from the file's `architecture` metadata, never from
ComfyUI's shape-based detection (which hard-codes 24 heads), so FLUX-shaped
models of any size load. Everything after construction is stock ComfyUI: the
returned MODEL goes through its samplers, LoRA loaders and memory manager.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import comfy.latent_formats
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models
import torch

from .errors import BitfluxLoadError, BitfluxOutOfMemoryError, out_of_memory_message, require_bitkernel
from .fileformat import BitfluxFormatError, BitfluxHeader, load_tensors, read_header
from .lowrank import PatchSet
from .ops import PackedLinearMixin, make_operations, packed_layers

log = logging.getLogger("bitflux")

CALLBACK_KEY = "bitflux"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BitfluxInfo:
    """What the info node reports; attached to the BaseModel (shared by all clones of the MODEL)."""

    path: str
    header: BitfluxHeader
    file_bytes: int


class PlainLatentFormat(comfy.latent_formats.LatentFormat):
    """Latents of a FLUX-architecture model with a channel count other than FLUX.1's 16 (test models):
    no scale or shift is known for them, so none is applied."""

    def __init__(self, channels: int) -> None:
        self.latent_channels = channels
        self.scale_factor = 1.0


def unet_config_from_architecture(arch: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's Flux kwargs from BFL FluxParams (channels counted before ComfyUI's own 2x2 patchify)."""
    try:
        patch = int(arch.get("patch_size", 2))
        in_ch, out_ch = int(arch["in_channels"]), int(arch.get("out_channels", arch["in_channels"]))
        hidden, heads = int(arch["hidden_size"]), int(arch["num_heads"])
        axes = [int(a) for a in arch["axes_dim"]]
        cfg = {
            "image_model": "flux",
            "in_channels": in_ch // (patch * patch),
            "out_channels": out_ch // (patch * patch),
            "patch_size": patch,
            "vec_in_dim": int(arch["vec_in_dim"]),
            "context_in_dim": int(arch["context_in_dim"]),
            "hidden_size": hidden,
            "mlp_ratio": float(arch["mlp_ratio"]),
            "num_heads": heads,
            "depth": int(arch["depth"]),
            "depth_single_blocks": int(arch["depth_single_blocks"]),
            "axes_dim": axes,
            "theta": int(arch["theta"]),
            "qkv_bias": bool(arch["qkv_bias"]),
            "guidance_embed": bool(arch["guidance_embed"]),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise BitfluxFormatError(f"the file's architecture metadata is unusable ({exc!r}): {arch}") from None
    problems = []
    if in_ch % (patch * patch) or out_ch % (patch * patch):
        problems.append(f"in/out channels {in_ch}/{out_ch} are not multiples of patch_size^2 = {patch * patch}")
    if hidden % heads or sum(axes) != hidden // heads:
        problems.append(f"hidden_size {hidden}, num_heads {heads} and axes_dim {axes} do not fit together")
    if problems:
        raise BitfluxFormatError("the file's architecture metadata is inconsistent: " + "; ".join(problems))
    return cfg


def model_config_for(header: BitfluxHeader) -> comfy.supported_models.Flux:
    unet_config = unet_config_from_architecture(header.architecture)
    # FLUX.1-dev has the guidance embedder; schnell does not and samples with shift 1 (ComfyUI's own split).
    cls = comfy.supported_models.Flux if unet_config["guidance_embed"] else comfy.supported_models.FluxSchnell
    config = cls(unet_config)
    if unet_config["out_channels"] != config.latent_format.latent_channels:
        config.latent_format = PlainLatentFormat(unet_config["out_channels"])
    return config


def pick_dtypes(
    config: comfy.supported_models.Flux, load_device: torch.device, model_bytes: int, compute_dtype: Optional[str]
) -> tuple[torch.dtype, Optional[torch.dtype]]:
    """(storage dtype of the 16-bit tensors, manual-cast compute dtype or None), as ComfyUI picks them."""
    supported = list(config.supported_inference_dtypes)
    if compute_dtype in DTYPES:
        unet_dtype = DTYPES[compute_dtype]
    else:
        # ComfyUI weighs the dtype choice by parameter count; the bf16-equivalent count of our bytes is fair.
        unet_dtype = mm.unet_dtype(
            model_params=model_bytes // 2, supported_dtypes=supported, weight_dtype=torch.bfloat16
        )
    return unet_dtype, mm.unet_manual_cast(unet_dtype, load_device, supported)


def base_operations(unet_dtype: torch.dtype, manual_cast: Optional[torch.dtype], load_device: torch.device) -> type:
    try:
        return comfy.ops.pick_operations(unet_dtype, manual_cast, load_device=load_device)
    except TypeError:  # other ComfyUI versions take other keywords
        return comfy.ops.manual_cast if manual_cast is not None else comfy.ops.disable_weight_init


def build_model(
    header: BitfluxHeader,
    state_dict: dict[str, torch.Tensor],
    compute_dtype: Optional[str] = None,
    packed: bool = True,
    load_device: Optional[torch.device] = None,
    model_bytes: int = 0,
):
    """ComfyUI's Flux BaseModel for `header`, weights loaded from `state_dict` (consumed).

    packed=False builds it with ComfyUI's stock ops instead (for a dense reference: a state dict
    with `.weight` tensors everywhere)."""
    load_device = load_device or mm.get_torch_device()
    model = empty_model(header, compute_dtype, packed, load_device, model_bytes)
    model = model.to(mm.unet_offload_device())
    model.load_model_weights(state_dict, "")
    if packed:
        _check_complete(model.diffusion_model, header)
    return model


def empty_model(
    header: BitfluxHeader,
    compute_dtype: Optional[str],
    packed: bool,
    load_device: torch.device,
    model_bytes: int = 0,
    device: Optional[torch.device] = None,
):
    """ComfyUI's Flux BaseModel for `header` without weights: the dtypes the loader node picks for
    `load_device`, our packed operations (packed=True) or ComfyUI's stock ones, built on `device` (None:
    where ComfyUI builds it)."""
    config = model_config_for(header)
    unet_dtype, manual_cast = pick_dtypes(config, load_device, model_bytes, compute_dtype)
    config.set_inference_dtype(unet_dtype, manual_cast)
    if packed:
        base = base_operations(unet_dtype, manual_cast, load_device)
        config.custom_operations = make_operations(base, header.layers, manual_cast or unet_dtype)
    return config.get_model({}, "", device=device)


def _check_complete(diffusion_model: torch.nn.Module, header: BitfluxHeader) -> None:
    layers = dict(packed_layers(diffusion_model))
    problems = []
    empty = [n for n, m in layers.items() if not m.is_loaded]
    if empty:
        problems.append(
            f"no weights for {len(empty)} layers ({', '.join(empty[:4])}{', ...' if len(empty) > 4 else ''})"
        )
    unknown = [n for n in header.layers if n not in layers]
    if unknown:
        problems.append(f"layers metadata names layers this architecture lacks ({', '.join(unknown[:4])})")
    unpacked = [n for n, s in header.layers.items() if s.quantized and n in layers and not layers[n].is_packed]
    if unpacked:
        problems.append(f"layers listed as packed are stored dense ({', '.join(unpacked[:4])})")
    if problems:
        raise BitfluxFormatError("the file does not match its own metadata: " + "; ".join(problems) + ".")
    for name, m in layers.items():
        m.patch_key = f"diffusion_model.{name}.weight"


# ---------------------------------------------------------------------- ModelPatcher hooks


def _packed_modules(patcher) -> list[PackedLinearMixin]:
    return [m for _, m in packed_layers(patcher.model.diffusion_model) if m.is_packed]


def attach_patches(patcher, device_to=None, *args, **kwargs) -> None:
    """ON_LOAD callback: give each fully loaded packed layer its patches (or none) as a resident branch.

    Layers on the low-VRAM path get theirs from ComfyUI's LowVramPatch at call time instead; a layer
    without patches gets None, which is what makes removing a LoRA exact."""
    model = patcher.model
    dtype = model.manual_cast_dtype or model.get_dtype()
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.bfloat16
    count = 0
    for m in _packed_modules(patcher):
        patches = patcher.patches.get(getattr(m, "patch_key", ""))
        if not patches or m.lowvram_patch() is not None:
            m.resident = None
            continue
        device = device_to if device_to is not None else m.qweight.device
        m.resident = PatchSet.build(m.patch_key, patches, m.out_features, m.in_features).moved(device, dtype)
        count += 1
    if count:
        log.info("bitflux: %d packed layers carry patches (LoRA) as run-time branches", count)


def drop_patches(patcher, *args, **kwargs) -> None:
    """ON_DETACH callback: the model left the GPU; free the branches it held there."""
    for m in _packed_modules(patcher):
        m.resident = None


def refuse_weight_hooks(patcher, *args, **kwargs) -> None:
    """ON_REGISTER_ALL_HOOK_PATCHES callback: LoRA hooks (scheduled LoRAs) would be baked into the weight
    by ComfyUI's hook path, which packed layers do not have; stop with a message instead of a crash."""
    packed = {getattr(m, "patch_key", "") for m in _packed_modules(patcher)}
    hooked = [k for patches in patcher.hook_patches.values() for k in patches if k in packed]
    if hooked:
        raise BitfluxLoadError(
            f"LoRA hooks (Create Hook LoRA / Set Model Hooks on the MODEL) patch {len(hooked)} packed 1.58-bit "
            "layers, which hooks cannot change. Apply the LoRA with Load LoRA (LoraLoaderModelOnly) instead."
        )


def out_of_memory_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: an out-of-memory error inside the transformer gets advice for this model."""
    try:
        return executor(*args, **kwargs)
    except torch.cuda.OutOfMemoryError as exc:
        if isinstance(exc, BitfluxOutOfMemoryError):
            raise
        tensors = list(executor.class_obj.state_dict().values())  # class_obj: the Flux module
        packed = sum(t.nelement() * t.element_size() for t in tensors)
        loaded = sum(t.nelement() * t.element_size() for t in tensors if t.device.type == "cuda")
        raise BitfluxOutOfMemoryError(out_of_memory_message(exc, packed, loaded)) from exc


def install_hooks(patcher) -> None:
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, CALLBACK_KEY, attach_patches)
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, CALLBACK_KEY, drop_patches)
    patcher.add_callback_with_key(
        comfy.patcher_extension.CallbacksMP.ON_REGISTER_ALL_HOOK_PATCHES, CALLBACK_KEY, refuse_weight_hooks
    )
    patcher.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CALLBACK_KEY, out_of_memory_wrapper
    )


def make_patcher(model):
    # Newer ComfyUI aliases its default patcher class (the Dynamic VRAM one when enabled); use that.
    patcher_cls = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = patcher_cls(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    install_hooks(patcher)
    return patcher


def load_bitflux(path: str, compute_dtype: Optional[str] = None):
    """The MODEL (ModelPatcher) for a bitflux file."""
    header = read_header(path)  # BitfluxFormatError: not bitflux, newer version, damaged metadata
    load_device = mm.get_torch_device()
    require_bitkernel(load_device)
    file_bytes = os.path.getsize(path)
    state_dict = load_tensors(path, "cpu")
    try:
        model = build_model(header, state_dict, compute_dtype, True, load_device, file_bytes)
    except BitfluxFormatError as exc:
        raise BitfluxFormatError(f"{os.path.basename(path)}: {exc}") from None
    model.bitflux = BitfluxInfo(path, header, file_bytes)
    return make_patcher(model)
