"""The "BitFlux Calibration Prompts" node's work: FLUX.1 text-encoder outputs -> a calibration conditioning file.

The converter's `--calibrate` has no text encoders: it reads what T5-XXL and
CLIP-L make of the calibration prompts from a file (format:
converter/calibration/conditioning.py). This encodes each prompt exactly as
ComfyUI's CLIPTextEncode does without hooks (`clip.tokenize`, then
`clip.encode_from_tokens(tokens, return_pooled=True)`), zero-pads the contexts
to a common length with per-prompt lengths in `txt_len` (ComfyUI's T5 output
has 256 tokens, more for long prompts), and writes
`<output>/<prefix>_00001.safetensors` with the next free counter.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any, Callable, Optional

import torch

if __package__ == "comfy_nodes":  # imported as a top-level package (tests, scripts); see fileformat.py
    from converter.calibration import conditioning
else:  # inside ComfyUI: the converter is a sibling package
    from ..converter.calibration import conditioning  # type: ignore[import-not-found]

FLUX_CONTEXT_DIM = 4096  # T5-XXL's width: FLUX.1's context_in_dim
FLUX_POOLED_DIM = 768  # CLIP-L's pooled width: FLUX.1's vec_in_dim
ENCODER_NAME = "comfyui t5xxl+clip_l"
FILE_EXT = ".safetensors"


@functools.lru_cache(maxsize=1)
def default_prompt_text() -> str:
    """The prompts widget's default: the shipped list, one prompt per line (read once: ComfyUI rebuilds the
    node's inputs, and with them this default, for every prompt it validates)."""
    return "\n".join(conditioning.default_prompts())


def check_flux_clip(context: torch.Tensor, pooled: Optional[torch.Tensor]) -> None:
    """Raises ValueError unless the CLIP's outputs have FLUX.1's widths (T5-XXL context, CLIP-L pooled)."""
    c = int(context.shape[-1])
    v = None if pooled is None else int(pooled.shape[-1])
    if c != FLUX_CONTEXT_DIM or v != FLUX_POOLED_DIM:
        raise ValueError(
            "BitFlux Calibration Prompts needs FLUX.1's text encoders: connect a DualCLIPLoader with clip_l and "
            f"t5xxl and type flux. This CLIP gives a context of width {c} and "
            f"{'no pooled vector' if v is None else f'a pooled vector of width {v}'}; FLUX.1 takes "
            f"{FLUX_CONTEXT_DIM} (T5-XXL) and {FLUX_POOLED_DIM} (CLIP-L)."
        )


def next_output_path(filename_prefix: str) -> str:
    """`<ComfyUI output>/<prefix>_NNNNN.safetensors` with the next free counter (subfolders in the prefix allowed,
    ComfyUI's %date% style variables expanded, nothing outside the output folder)."""
    import folder_paths

    if not filename_prefix.strip():
        raise ValueError("filename_prefix is empty: give the file a name, e.g. bitflux_calibration")
    # ComfyUI's own resolution of a prefix (the same checks as SaveImage); its counter expects SaveImage's
    # `<name>_00001_.png` names, so the counter for `<name>_00001.safetensors` is found here.
    folder, name, _, _, _ = folder_paths.get_save_image_path(filename_prefix, folder_paths.get_output_directory())
    os.makedirs(folder, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(name)}_(\d+){re.escape(FILE_EXT)}$")
    used = [int(m.group(1)) for m in map(pattern.match, os.listdir(folder)) if m]
    return os.path.join(folder, f"{name}_{max(used, default=0) + 1:05}{FILE_EXT}")


def _check_inputs(clip: Any, prompts: list[str], width: int, height: int, guidance: float) -> tuple[int, int]:
    """The image token grid, after checking the inputs (ValueError with what to change)."""
    if clip is None:
        raise ValueError("clip input is invalid: None. Connect a DualCLIPLoader with clip_l and t5xxl, type flux.")
    if not prompts:
        raise ValueError(
            "No calibration prompts: write one prompt per line (lines starting with # are skipped), or recreate "
            "the node to get the shipped list back."
        )
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance}")
    return conditioning.flux_image_tokens(width, height)


def _file_tensor(t: torch.Tensor) -> torch.Tensor:
    """One prompt's encoder output on the CPU, in a dtype the file holds (float16 / bfloat16 / float32; ComfyUI
    returns float32)."""
    return t[0].to("cpu") if t.dtype in conditioning.FLOAT_DTYPES else t[0].to("cpu", torch.float32)


def encode_prompts(
    clip: Any, prompts: list[str], image_tokens: tuple[int, int], guidance: float,
    progress: Optional[Callable[[int, int], None]] = None,
) -> conditioning.CalibrationConditioning:
    """Each prompt through ComfyUI's CLIPTextEncode path (inputs checked by _check_inputs); raises ValueError for
    a CLIP that is not FLUX.1's."""
    import comfy.model_management

    contexts, pooled = [], []
    for i, text in enumerate(prompts):
        comfy.model_management.throw_exception_if_processing_interrupted()
        tokens = clip.tokenize(text)
        context, vec = clip.encode_from_tokens(tokens, return_pooled=True)
        if i == 0:  # every prompt goes through the same encoders: checking the first one is enough
            check_flux_clip(context, vec)
        contexts.append(_file_tensor(context))
        pooled.append(_file_tensor(vec))
        if progress is not None:
            progress(i + 1, len(prompts))
    txt, txt_len = conditioning.stack_contexts(contexts)
    del contexts
    return conditioning.CalibrationConditioning(
        txt=txt, vec=torch.stack(pooled), prompts=prompts, encoder=ENCODER_NAME, image_tokens=image_tokens,
        guidance=guidance, txt_len=txt_len,
    )  # fmt: skip


def write_calibration_file(
    clip: Any, prompts_text: str, width: int, height: int, guidance: float, filename_prefix: str
) -> tuple[str, str]:
    """Encode the prompts (one per line), write the file; returns (path, a summary for the node's UI)."""
    import comfy.utils

    prompts = conditioning.parse_prompts(prompts_text)
    image_tokens = _check_inputs(clip, prompts, width, height, guidance)  # bad inputs fail before the encoders load
    path = next_output_path(filename_prefix)  # and so does a bad file name
    bar = comfy.utils.ProgressBar(len(prompts))
    cond = encode_prompts(clip, prompts, image_tokens, guidance, bar.update_absolute)
    conditioning.save_conditioning(path, cond)
    long = int((cond.txt_len > 256).sum())  # T5 pads to 256 tokens; longer prompts keep all their tokens
    summary = (
        f"{path}\n"
        f"{len(cond)} prompts, context {list(cond.txt.shape)} {str(cond.txt.dtype).replace('torch.', '')}"
        f"{f' ({long} longer than 256 tokens)' if long else ''}, pooled {list(cond.vec.shape)}, "
        f"images {width}x{height} ({cond.image_tokens[0]}x{cond.image_tokens[1]} tokens), guidance {cond.guidance}, "
        f"{os.path.getsize(path) / 2**20:.1f} MiB.\n"
        "Give this file to the converter's calibration run."
    )
    return path, summary
