"""Calibration settings compared on the testbed model, cheaply enough for a CPU.

    python bench/calibration_ablation.py [--variants base codes1e-3 ...] [--n 240] [--device cpu] [--out FILE]

Every variant converts the shipped testbed transformer with `--calibrate` on the
same conditioning (64 testbed calibration prompts) at reduced settings (teacher 10
steps, 100 distillation steps of 16 samples per block), then scores `--n` held-out
prompts (20 steps, guidance 3.5). Reduced settings make this a ranking of
settings, not the product's figures: bench/quality.py measures those (1200 prompts,
the converter's defaults, full precision in the same run). Prints one line per
variant as it finishes, then the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from report_table import emit  # noqa: E402

from converter import convert  # noqa: E402
from converter.calibration.conditioning import save_conditioning  # noqa: E402
from converter.calibration.engine import CalibrationSettings  # noqa: E402
from testbed.bitflux import load_bitflux_flux  # noqa: E402
from testbed.calibration_data import (  # noqa: E402
    BEFORE_BRANCH_AND_BIAS,
    CPU_CALIBRATION,
    CPU_PROMPTS,
    testbed_conditioning,
)
from testbed.checkpoint import FLUX_FILE, TEXT_FILE, load_text_encoder  # noqa: E402
from testbed.evaluate import evaluate  # noqa: E402

# the table was measured without a branch and with the checkpoint's biases (BEFORE_BRANCH_AND_BIAS), the
# defaults then
SCALES = {"learn_codes": False}  # what the first table's "base" was: codes frozen at GPTQ's rounding
VARIANTS = {
    "default": {},  # the converter's defaults at the reduced settings as measured: GPTQ, scales and codes
    "base": SCALES,  # GPTQ + scale distillation at scale_lr 2e-3
    "d300": {**SCALES, "distill_steps": 300},
    "lr1e-2": {**SCALES, "scale_lr": 1e-2},
    "codes1e-3": {"learn_codes": True, "code_lr": 1e-3},
    "codes5e-3": {"learn_codes": True, "code_lr": 5e-3},
    "r4": {**SCALES, "lowrank": 4},
    "nogptq_codes": {"gptq": False, "learn_codes": True, "code_lr": 1e-3},
    "a8all": {"a8_keep": 0.0},
    "a8keep25": {"a8_keep": 0.25},
    "e2e": {"e2e_steps": 100, "e2e_batch": 16},
    "bias": {"train_bias": True},  # biases distilled too (bias_lr 1e-3)
    "bias1e-4": {"train_bias": True, "bias_lr": 1e-4},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--weights", default=os.path.join(ROOT, "testbed", "weights"))
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    args = ap.parse_args()
    te = load_text_encoder(os.path.join(args.weights, TEXT_FILE), args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cond = os.path.join(tmp, "cond.safetensors")
        save_conditioning(cond, testbed_conditioning(CPU_PROMPTS, weights_dir=args.weights))
        for name in args.variants:
            t0 = time.monotonic()
            out = os.path.join(tmp, f"{name}.safetensors")
            report = convert(os.path.join(args.weights, FLUX_FILE), out, progress=False, device=args.device,
                             calibration=CalibrationSettings(
                                 cond, **CPU_CALIBRATION | BEFORE_BRANCH_AND_BIAS | VARIANTS[name]))
            seconds = time.monotonic() - t0
            res = evaluate(load_bitflux_flux(out, args.device), te, n=args.n, device=args.device, steps=20,
                           guidance=3.5, seed=0)
            errors = [e["after"] for e in report.calibration["block_error"].values()]
            rows.append((name, res, seconds, errors, os.path.getsize(out)))
            print(name, f"{res['overall'] * 100:.1f}%", flush=True)
    cats = list(rows[0][1]["categories"])
    lines = [
        f"Testbed model, calibration at reduced settings {CPU_CALIBRATION} on {CPU_PROMPTS} calibration prompts, "
        f"{args.n} held-out prompts, device {args.device}. Accuracy in %; block error = relative output error "
        "after distillation.\n",
        "| variant | settings | file MB | overall | " + " | ".join(cats) + " | block errors | convert s |",
        "|" + "---|" * (len(cats) + 6),
    ]
    for name, res, seconds, errors, size in rows:
        cells = " | ".join(f"{res['categories'][c] * 100:.0f}" for c in cats)
        lines.append(f"| {name} | {VARIANTS[name] or 'defaults'} | {size / 1e6:.2f} | {res['overall'] * 100:.1f} | "
                     f"{cells} | {', '.join(f'{e:.4f}' for e in errors)} | {seconds:.0f} |")
    emit("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
