"""What both node APIs (V3 and classic) run."""

from __future__ import annotations

from typing import Union

from .calibration import default_prompt_text, write_calibration_file
from .loader import load_bitflux
from .names import COMPUTE_DTYPES
from .report import model_report

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
MAX_CALIBRATION_SIZE = 8192  # pixels per side; FLUX.1 is trained up to about 2 megapixels


def diffusion_model_files() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("diffusion_models")


def check_choices(unet_name: str, compute_dtype: str) -> Union[bool, str]:
    """True, or what is wrong with the loader's inputs (ComfyUI shows it before running anything)."""
    if compute_dtype not in COMPUTE_DTYPES:
        return f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}"
    if unet_name not in diffusion_model_files():
        return f"{unet_name!r} is not in ComfyUI's diffusion_models folders (models/diffusion_models or models/unet)"
    return True


def load_model(unet_name: str, compute_dtype: str = "default"):
    import folder_paths

    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
    return load_bitflux(path, None if compute_dtype == "default" else compute_dtype)


def describe_model(model, per_layer: bool = False) -> str:
    return model_report(model, per_layer)


def calibration_prompts_default() -> str:
    return default_prompt_text()


def calibration_file(
    clip, prompts: str, width: int, height: int, guidance: float, filename_prefix: str
) -> tuple[str, str]:
    """(path of the conditioning file written, summary text for the node's UI)."""
    return write_calibration_file(clip, prompts, width, height, guidance, filename_prefix)
