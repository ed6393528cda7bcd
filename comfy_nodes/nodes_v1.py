"""The same nodes in ComfyUI's classic node API, for ComfyUI versions without comfy_api.latest."""

from __future__ import annotations

from typing import Any

from .calibration import default_prompt_text, write_calibration_file
from .common import (
    CALIBRATION_DESCRIPTION,
    CALIBRATION_GUIDANCE,
    CALIBRATION_OUTPUT_TOOLTIP,
    CALIBRATION_SIZE,
    CALIBRATION_TOOLTIPS,
    DTYPE_TOOLTIP,
    INFO_DESCRIPTION,
    LOADER_DESCRIPTION,
    UNET_TOOLTIP,
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
from .report import model_report


class BitfluxModelLoader:
    DESCRIPTION = LOADER_DESCRIPTION
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "unet_name": (diffusion_model_files(), {"tooltip": UNET_TOOLTIP}),
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
        text = model_report(model, per_layer)
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
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": tips["clip"]}),
                "prompts": (
                    "STRING",
                    {"multiline": True, "dynamicPrompts": False, "default": default_prompt_text(),
                     "tooltip": tips["prompts"]},
                ),  # fmt: skip
                "width": ("INT", {**CALIBRATION_SIZE, "tooltip": tips["width"]}),
                "height": ("INT", {**CALIBRATION_SIZE, "tooltip": tips["height"]}),
                "guidance": ("FLOAT", {**CALIBRATION_GUIDANCE, "tooltip": tips["guidance"]}),
                "filename_prefix": ("STRING", {"default": CALIBRATION_PREFIX, "tooltip": tips["filename_prefix"]}),
            }
        }

    def write(
        self, clip, prompts: str, width: int = 1024, height: int = 1024, guidance: float = 3.5,
        filename_prefix: str = CALIBRATION_PREFIX,
    ) -> dict[str, Any]:
        path, summary = write_calibration_file(clip, prompts, width, height, guidance, filename_prefix)
        return {"ui": {"text": (summary,)}, "result": (path,)}


NODE_CLASS_MAPPINGS = {
    LOADER_NODE: BitfluxModelLoader,
    INFO_NODE: BitfluxModelInfo,
    CALIBRATION_NODE: BitfluxCalibrationPrompts,
}
NODE_DISPLAY_NAME_MAPPINGS = dict(DISPLAY_NAMES)
