"""Errors the user reads in ComfyUI's error dialog: each says what happened and what to do.

ComfyUI shows an exception's message as is, so the messages are written for a
person, not a log. Out-of-memory errors keep torch's OutOfMemoryError type:
ComfyUI recognises it (it unloads models and shows its own tips) and its VAE
falls back to tiled decoding on it.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

import torch

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BitfluxLoadError(ValueError):
    """A bitflux model cannot be loaded here; the message says what to do."""


class BitfluxOutOfMemoryError(torch.cuda.OutOfMemoryError):
    """torch's out-of-memory error with advice for this model."""


def install_command() -> str:
    """The command that (re)installs the kernel wheel for the Python running ComfyUI."""
    return f'"{sys.executable}" "{os.path.join(PACK_DIR, "install.py")}"'


def require_bitkernel(device: torch.device) -> ModuleType:
    """bitkernel, after checking it is installed and can run on `device`."""
    try:
        import bitkernel
    except ImportError as exc:
        raise BitfluxLoadError(
            f"The bitkernel package is not installed in the Python that runs ComfyUI ({sys.executable}): {exc}.\n"
            f"Install it with {install_command()} and restart ComfyUI."
        ) from None
    info: dict[str, Any] = bitkernel.info()
    if device.type == "cuda" and not info.get("cuda"):
        raise BitfluxLoadError(
            "bitkernel was built without CUDA kernels (no CUDA compiler was found when it was installed), "
            "but ComfyUI runs on a GPU.\n"
            "Install the NVIDIA CUDA toolkit (12.8 or newer, so that `nvcc --version` works), then run "
            f"{install_command()} again and restart ComfyUI. "
            "(Starting ComfyUI with --cpu works with this build, but very slowly.)"
        )
    driver, runtime = info.get("cuda_driver") or 0, info.get("cuda_runtime") or 0
    if device.type == "cuda" and driver and runtime and driver < runtime:
        raise BitfluxLoadError(
            f"bitkernel was built with CUDA {runtime // 1000}.{runtime % 1000 // 10}, newer than the NVIDIA driver "
            f"supports (CUDA {driver // 1000}.{driver % 1000 // 10}).\nUpdate the NVIDIA driver, or install CUDA 12.8 "
            f"(driver r570 or newer) and run {install_command()} again; then restart ComfyUI."
        )
    return bitkernel


def out_of_memory_message(exc: BaseException, packed_bytes: int, loaded_bytes: int) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "CUDA out of memory"
    return (
        f"Out of GPU memory while running the 1.58-bit FLUX transformer ({first_line}).\n"
        f"Its weights take {packed_bytes / 2**30:.2f} GiB packed; {loaded_bytes / 2**30:.2f} GiB were on the GPU.\n"
        "What to do: lower the image size or the batch size; start ComfyUI with --lowvram (layers then stay in "
        "system RAM and move to the GPU when used); load T5 as t5xxl_fp8_e4m3fn.safetensors and set the "
        "DualCLIPLoader device to cpu; use VAE Decode (Tiled); close other programs that use the GPU."
    )
