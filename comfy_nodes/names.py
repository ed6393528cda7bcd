"""Node ids, display names and the file names the shipped workflows use.

Kept free of imports so the workflow tests can check names without ComfyUI.
"""

LOADER_NODE = "BitfluxModelLoader"
INFO_NODE = "BitfluxModelInfo"
CALIBRATION_NODE = "BitfluxCalibrationPrompts"

DISPLAY_NAMES = {
    LOADER_NODE: "Load 1.58-bit FLUX (bitflux)",
    INFO_NODE: "1.58-bit FLUX model info",
    CALIBRATION_NODE: "BitFlux Calibration Prompts",
}

CATEGORY = "loaders/bitflux"
CALIBRATION_CATEGORY = "conditioning/bitflux"  # it encodes text, like CLIPTextEncode (category "conditioning")
CALIBRATION_PREFIX = "bitflux_calibration"  # default filename_prefix: output/bitflux_calibration_00001.safetensors

# Choices of the loader's compute_dtype widget; "default" lets ComfyUI pick for the GPU.
COMPUTE_DTYPES = ("default", "bf16", "fp16", "fp32")

# The files the shipped workflows expect (ComfyUI's usual names for FLUX.1's companions).
MODEL_FILE = "flux1-dev-1.58bit.safetensors"
CLIP_L_FILE = "clip_l.safetensors"
T5_FP16_FILE = "t5xxl_fp16.safetensors"
T5_FP8_FILE = "t5xxl_fp8_e4m3fn.safetensors"
VAE_FILE = "ae.safetensors"
LORA_FILE = "flux1-dev-lora.safetensors"
INPUT_IMAGE = "example.png"
