"""The same nodes in ComfyUI's classic node API, for ComfyUI versions without comfy_api.latest."""

from __future__ import annotations

from typing import Any

from .common import (
    DTYPE_TOOLTIP,
    INFO_DESCRIPTION,
    LOADER_DESCRIPTION,
    describe_model,
    diffusion_model_files,
    load_model,
)
from .names import CATEGORY, COMPUTE_DTYPES, DISPLAY_NAMES, INFO_NODE, LOADER_NODE


class BitfluxModelLoader:
    DESCRIPTION = LOADER_DESCRIPTION
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "unet_name": (diffusion_model_files(), {"tooltip": "A bitflux file."}),
                "compute_dtype": (list(COMPUTE_DTYPES), {"default": "default", "tooltip": DTYPE_TOOLTIP}),
            }
        }

    def load(self, unet_name: str, compute_dtype: str = "default") -> tuple:
        return (load_model(unet_name, compute_dtype),)


class BitfluxModelInfo:
    DESCRIPTION = INFO_DESCRIPTION
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "describe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": {"model": ("MODEL",), "per_layer": ("BOOLEAN", {"default": False})}}

    def describe(self, model, per_layer: bool = False) -> dict[str, Any]:
        text = describe_model(model, per_layer)
        return {"ui": {"text": (text,)}, "result": (text,)}


NODE_CLASS_MAPPINGS = {LOADER_NODE: BitfluxModelLoader, INFO_NODE: BitfluxModelInfo}
NODE_DISPLAY_NAME_MAPPINGS = dict(DISPLAY_NAMES)
