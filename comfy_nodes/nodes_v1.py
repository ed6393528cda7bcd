"""The same nodes in ComfyUI's classic node API, for ComfyUI versions without comfy_api.latest."""

from __future__ import annotations

from typing import Any

from .common import (
    CALIBRATION_DESCRIPTION,
    CALIBRATION_OUTPUT_TOOLTIP,
    CALIBRATION_TOOLTIPS,
    DTYPE_TOOLTIP,
    INFO_DESCRIPTION,
    LOADER_DESCRIPTION,
    MAX_CALIBRATION_SIZE,
    calibration_file,
    calibration_prompts_default,
    describe_model,
    diffusion_model_files,
    load_model,
)
from .names import (
    CALIBRATION_CATEGORY,
    CALIBRATION_NODE,
    CALIBRATION_PREFIX,
    CATEGORY,
    COMPUTE_DTYPES,
    DISPLAY_NAMES,
    INFO_NODE,
    LOADER_NODE,
)


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


class BitfluxCalibrationPrompts:
    DESCRIPTION = CALIBRATION_DESCRIPTION
    CATEGORY = CALIBRATION_CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = (CALIBRATION_OUTPUT_TOOLTIP,)
    FUNCTION = "write"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        tips = CALIBRATION_TOOLTIPS
        size = {"default": 1024, "min": 16, "max": MAX_CALIBRATION_SIZE, "step": 16}
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": tips["clip"]}),
                "prompts": (
                    "STRING",
                    {"multiline": True, "dynamicPrompts": False, "default": calibration_prompts_default(),
                     "tooltip": tips["prompts"]},
                ),  # fmt: skip
                "width": ("INT", {**size, "tooltip": tips["width"]}),
                "height": ("INT", {**size, "tooltip": tips["height"]}),
                "guidance": (
                    "FLOAT",
                    {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": tips["guidance"]},
                ),
                "filename_prefix": ("STRING", {"default": CALIBRATION_PREFIX, "tooltip": tips["filename_prefix"]}),
            }
        }

    def write(
        self, clip, prompts: str, width: int = 1024, height: int = 1024, guidance: float = 3.5,
        filename_prefix: str = CALIBRATION_PREFIX,
    ) -> dict[str, Any]:
        path, summary = calibration_file(clip, prompts, width, height, guidance, filename_prefix)
        return {"ui": {"text": (summary,)}, "result": (path,)}


NODE_CLASS_MAPPINGS = {
    LOADER_NODE: BitfluxModelLoader,
    INFO_NODE: BitfluxModelInfo,
    CALIBRATION_NODE: BitfluxCalibrationPrompts,
}
NODE_DISPLAY_NAME_MAPPINGS = dict(DISPLAY_NAMES)
