"""Calibration conditioning for the testbed model (converter/calibration/conditioning.py has the format).

    python -m testbed.calibration_data [-o OUT.safetensors] [--n 1024] [--seed 0] [--weights testbed/weights]
                                       [--prompts FILE] [--device cpu]

Prompts: the calibration split (`testbed.prompts.calibration_prompts(n, seed)`,
drawn from training captions), or with --prompts a file of one prompt per line
(--n and --seed then do not apply). They are encoded by the shipped testbed text
encoder exactly as testbed.sampling feeds the model: context [P, 12, 128] as
FLUX's `txt`, pooled [P, 128] as `y`; in float32 without autocast, so the file
does not depend on the device it was made on. image_tokens is the testbed's
token grid (16 x 16 for its 64x64 images) and guidance sampling's default.

No prompt may be an evaluation prompt (`testbed.prompts.eval_prompts`):
calibrating on them would overstate the quality evaluate() measures, so the
producer refuses such prompts.

Python: testbed_conditioning(n, seed, weights_dir, device) -> CalibrationConditioning.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

import torch

from converter.calibration.conditioning import (
    CalibrationConditioning,
    overlapping_prompts,
    read_prompt_file,
    save_conditioning,
)
from converter.flux_model import PATCH

from .checkpoint import TEXT_FILE, load_text_encoder
from .prompts import EVAL_SIZE, calibration_prompts, eval_prompts
from .sampling import DEFAULT_GUIDANCE, LATENT_SIZE, SEQ_LEN
from .text import TextEncoder

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DEFAULT_OUTPUT = os.path.join("out", "testbed_calibration.safetensors")  # out/ is git-ignored
ENCODER_NAME = "testbed text encoder"
# Calibration reduced to run on a CPU in minutes (demo.py, bench/calibration_ablation.py): this many
# prompts and these CalibrationSettings overrides (teacher steps, distillation steps and batch; no end-to-end
# stage: ~2 s a step on a CPU).
CPU_PROMPTS = 64
# On a GPU: more trajectories generalise better up to 2048 (600 held-out prompts, H200: 69.7% at 256,
# 76.2% at 1024, 80.3% at 2048, 79.8-80.5% at 4096 and 8192; bench/results/calibration_e2e_h200.md and
# calibration_data_h200.md); the pools repeat prompts but every prompt gets its own noise, so each
# trajectory is new.
GPU_PROMPTS = 2048


def default_prompts(device: torch.device | str) -> int:
    """Calibration prompts for a run on `device`: GPU_PROMPTS on a GPU, CPU_PROMPTS on a CPU."""
    return GPU_PROMPTS if str(device).startswith("cuda") else CPU_PROMPTS
CPU_CALIBRATION = {"steps": 10, "distill_steps": 100, "distill_batch": 16, "e2e_steps": 0}
# What the benchmark rows measured before session 7 ran with: no low-rank branch and the checkpoint's biases,
# the defaults then (bench/quality.py's stage ablations, bench/calibration_ablation.py).
BEFORE_BRANCH_AND_BIAS = {"lowrank": 0, "train_bias": False}
# The token grid of the images sampling.sample makes: latent side / FLUX's 2x2 patch.
IMAGE_TOKENS = (LATENT_SIZE // PATCH, LATENT_SIZE // PATCH)
assert IMAGE_TOKENS[0] * IMAGE_TOKENS[1] == SEQ_LEN


def check_not_eval(prompts: list[str], n_eval: int = EVAL_SIZE) -> None:
    """Raises ValueError if any prompt is one of the first n_eval evaluation prompts."""
    overlap = overlapping_prompts(prompts, eval_prompts(n_eval))
    if overlap:
        shown = ", ".join(repr(p) for p in overlap[:5]) + (", ..." if len(overlap) > 5 else "")
        raise ValueError(
            f"{len(overlap)} calibration prompt(s) are evaluation prompts ({shown}); "
            "calibrating on them would overstate the evaluated quality. Use testbed.prompts.calibration_prompts "
            "(training captions) or remove them."
        )


@torch.no_grad()
def encode(encoder: TextEncoder, prompts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [P, T, C], pooled [P, V]) float32 on the CPU, as testbed.sampling computes them."""
    txt, vec = [], []
    for start in range(0, len(prompts), batch_size):
        ctx, pooled = encoder.encode(prompts[start : start + batch_size])
        txt.append(ctx.float().cpu())
        vec.append(pooled.float().cpu())
    return torch.cat(txt), torch.cat(vec)


def testbed_conditioning(
    n: int = GPU_PROMPTS, seed: int = 0, weights_dir: str = WEIGHTS_DIR, device: torch.device | str = "cpu",
    prompts: Optional[list[str]] = None, encoder: Optional[TextEncoder] = None,
) -> CalibrationConditioning:
    """n calibration prompts (or `prompts`) encoded by the testbed's text encoder in `weights_dir` (or
    `encoder`, already loaded in float32).

    Raises ValueError if a prompt is an evaluation prompt or uses words outside
    the encoder's vocabulary.
    """
    if prompts is None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        prompts = calibration_prompts(n, seed)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    check_not_eval(prompts)
    if encoder is None:
        encoder = load_text_encoder(os.path.join(weights_dir, TEXT_FILE), device, torch.float32)
    txt, vec = encode(encoder, prompts)
    return CalibrationConditioning(
        txt=txt, vec=vec, prompts=prompts, encoder=ENCODER_NAME, image_tokens=IMAGE_TOKENS, guidance=DEFAULT_GUIDANCE
    )


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help=f"conditioning file to write ({DEFAULT_OUTPUT})")
    ap.add_argument("--n", type=int, default=GPU_PROMPTS, help=f"prompts from the calibration split ({GPU_PROMPTS})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration split's draw (0)")
    ap.add_argument("--weights", default=WEIGHTS_DIR, help="folder with text_encoder.safetensors")
    ap.add_argument("--prompts", help="a file of prompts, one per line, instead of the calibration split")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    prompts = read_prompt_file(args.prompts) if args.prompts else None
    cond = testbed_conditioning(args.n, args.seed, args.weights, args.device, prompts)
    save_conditioning(args.output, cond)
    print(
        f"wrote {args.output}: {len(cond)} prompts, txt {list(cond.txt.shape)}, vec {list(cond.vec.shape)}, "
        f"image tokens {cond.image_tokens[0]}x{cond.image_tokens[1]}, guidance {cond.guidance}"
    )


if __name__ == "__main__":
    main()
