"""What both node APIs (V3 and classic) share: texts, input ranges and the loader node's work.

The info and calibration nodes call report.model_report and
calibration.write_calibration_file / default_prompt_text directly.
"""

from __future__ import annotations

from typing import Optional, Union

from .loader import load_bitflux
from .names import COMPUTE_DTYPES

LOADER_DESCRIPTION = (
    "Loads a 1.58-bit FLUX transformer converted to a bitflux file (from the diffusion_models folder) into "
    "ComfyUI's own Flux model. Use it where Load Diffusion Model would go; LoRA loaders, samplers and "
    "memory management work as with any MODEL."
)
DTYPE_TOOLTIP = (
    "Precision of activations and 16-bit layers. default: what ComfyUI picks for this GPU (bf16 where "
    "supported); fp16 for GPUs without bf16 (GTX 16xx, RTX 20xx)."
)
INFO_DESCRIPTION = (
    "Shows what a MODEL holds: packed size as ComfyUI's memory manager counts it, formats per layer group, "
    "what is on the GPU, and how LoRAs are applied."
)
CALIBRATION_DESCRIPTION = (
    "Encodes calibration prompts with FLUX.1's text encoders (T5-XXL + CLIP-L, exactly as CLIP Text Encode does) "
    "and saves them as a conditioning file in the output folder, for the converter's calibration run (it has no "
    "text encoders). Takes about 4 MiB per prompt."
)
CALIBRATION_TOOLTIPS = {
    "clip": "FLUX.1's text encoders: DualCLIPLoader with clip_l and t5xxl, type flux.",
    "prompts": (
        "One prompt per line; blank lines and lines starting with # are skipped. Default: the shipped list "
        "(converter/calibration/prompts.txt). Do not calibrate on prompts you evaluate with."
    ),
    "width": "Width of the images the converter samples trajectories at (a multiple of 16).",
    "height": "Height of the images the converter samples trajectories at (a multiple of 16).",
    "guidance": "Distilled guidance the converter samples with (FLUX.1-dev: 3.5, as in FluxGuidance).",
    "filename_prefix": "File name in the output folder: <prefix>_00001.safetensors, the counter counting up.",
}
CALIBRATION_OUTPUT_TOOLTIP = "Full path of the conditioning file written."
UNET_TOOLTIP = "A bitflux file."
MAX_CALIBRATION_SIZE = 8192  # pixels per side; FLUX.1 is trained up to about 2 megapixels
# Options of the calibration node's width / height and guidance widgets (keyword names both APIs take).
CALIBRATION_SIZE = {"default": 1024, "min": 16, "max": MAX_CALIBRATION_SIZE, "step": 16}
CALIBRATION_GUIDANCE = {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}


def diffusion_model_files() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("diffusion_models")


def _dtype_problem(compute_dtype: str) -> Optional[str]:
    if compute_dtype not in COMPUTE_DTYPES:
        return f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}"
    return None


def check_choices(unet_name: str, compute_dtype: str) -> Union[bool, str]:
    """True, or what is wrong with the loader's inputs (ComfyUI shows it before running anything)."""
    problem = _dtype_problem(compute_dtype)
    if problem is not None:
        return problem
    if unet_name not in diffusion_model_files():
        return f"{unet_name!r} is not in ComfyUI's diffusion_models folders (models/diffusion_models or models/unet)"
    return True


def load_model(unet_name: str, compute_dtype: str = "default"):
    import folder_paths

    problem = _dtype_problem(compute_dtype)
    if problem is not None:
        raise ValueError(problem)
    path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
    return load_bitflux(path, None if compute_dtype == "default" else compute_dtype)
