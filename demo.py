"""The demo: convert the shipped testbed model to 1.58 bits and compare it with full precision.

    python demo.py [--out out/demo] [--n N] [--lowrank R] [--no-calibrate] [--device cpu|cuda]

Converts testbed/weights/flux_testbed.safetensors (a FLUX-architecture model
trained here, see testbed/README.md) to 1.58 bits the way FLUX.1-dev is meant
to be converted: `--calibrate` (docs/CALIBRATION.md) on the testbed's own
calibration prompts (never the evaluation prompts), with the converter's
rank-32 low-rank branch; on a CPU with fewer prompts and steps than the converter's defaults so
it takes about 3 minutes (`--no-calibrate`: plain `mse` rounding, seconds).
Then it samples held-out prompts with the full-precision and the 1.58-bit model on the
same noise, scores both with the testbed's rules, and writes a side-by-side
PNG grid and a Markdown report. Runs on a CPU in a few minutes; uses a GPU when
there is one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from PIL import Image, ImageDraw

from converter import convert
from converter.calibration.conditioning import save_conditioning
from converter.calibration.engine import CalibrationSettings
from testbed.bitflux import load_bitflux_flux
from testbed.calibration_data import CPU_CALIBRATION, default_prompts, testbed_conditioning
from testbed.checkpoint import FLUX_FILE, TEXT_FILE, load_flux, load_text_encoder
from testbed.evaluate import evaluate

HERE = os.path.dirname(os.path.abspath(__file__))


def grid(captions: list[str], left: torch.Tensor, right: torch.Tensor, path: str, cols: int = 4) -> None:
    """Pairs (full precision | 1.58-bit) with their captions, `cols` pairs per row."""
    scale, cap_h, pad = 2, 14, 6
    cell_w, cell_h = 2 * 64 * scale + pad, 64 * scale + cap_h + pad
    rows = -(-len(captions) // cols)
    canvas = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad + cap_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), "each pair: full precision | 1.58-bit, same noise", fill=(0, 0, 0))
    for i, cap in enumerate(captions):
        x, y = pad + (i % cols) * cell_w, cap_h + pad + (i // cols) * cell_h
        for j, img in enumerate((left[i], right[i])):
            arr = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(arr).resize((64 * scale, 64 * scale), Image.NEAREST)
            canvas.paste(tile, (x + j * 64 * scale, y))
        draw.text((x, y + 64 * scale + 1), cap[:40], fill=(0, 0, 0))
    canvas.save(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=os.path.join(HERE, "testbed", "weights"))
    ap.add_argument("--out", default=os.path.join("out", "demo"))
    ap.add_argument("--n", type=int, default=None, help="held-out prompts per model (default 16 on CPU, 96 on GPU)")
    ap.add_argument("--method", default="mse", help="converter rounding method (default: the converter's default)")
    ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                    help="calibrate against the full-precision model (default on)")
    ap.add_argument("--lowrank", type=int, default=CalibrationSettings.lowrank,
                    help="rank of the calibrated low-rank branch (0: none; default: the converter's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.n is None:
        args.n = 96 if str(args.device).startswith("cuda") else 16
    t0 = time.time()
    fp_path = os.path.join(args.weights, FLUX_FILE)
    if not os.path.exists(fp_path):
        print(f"error: {fp_path} is missing; the testbed weights ship with the repository "
              "(or retrain them: see testbed/README.md)", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    q_path = os.path.join(args.out, "flux_testbed_1.58bit.safetensors")
    calibration, described = None, f"method {args.method}, no calibration"
    if args.calibrate:
        cuda = str(args.device).startswith("cuda")
        cond_path = os.path.join(args.out, "calibration_conditioning.safetensors")
        save_conditioning(cond_path, testbed_conditioning(default_prompts(args.device), weights_dir=args.weights))
        # the converter's defaults on a GPU; on a CPU fewer samples and steps (about 2 minutes)
        quick = {} if cuda else CPU_CALIBRATION
        calibration = CalibrationSettings(cond_path, lowrank=args.lowrank, **quick)
        stages = "GPTQ, scales and codes" + (", end to end" if calibration.e2e_steps else "")
        described = (f"method {args.method}, calibrated ({stages}, low-rank {args.lowrank}, "
                     f"{'converter defaults' if cuda else 'CPU settings ' + str(quick)})")
    print(f"converting {fp_path} -> {q_path} ({described})", flush=True)
    report = convert(fp_path, q_path, method=args.method, device=args.device, force=True, progress=False,
                     calibration=calibration)
    t_convert = time.time() - t0

    te = load_text_encoder(os.path.join(args.weights, TEXT_FILE), args.device)
    print(f"sampling {args.n} held-out prompts with each model on {args.device}", flush=True)
    fp = evaluate(load_flux(fp_path, args.device), te, n=args.n, device=args.device, return_images=True)
    q = evaluate(load_bitflux_flux(q_path, args.device), te, n=args.n, device=args.device, return_images=True)

    grid_path = os.path.join(args.out, "grid.png")
    grid(fp["captions"], fp["images"], q["images"], grid_path)
    fp_mb, q_mb = os.path.getsize(fp_path) / 1e6, os.path.getsize(q_path) / 1e6
    lines = [
        "# 1.58-bit testbed demo",
        "",
        f"Model: the FLUX-architecture testbed model ({fp_path}); {args.n} held-out prompts, same noise for both "
        f"models, {fp['steps']} steps, guidance {fp['guidance']}, device {args.device}.",
        "",
        "| | full precision (bf16 file) | 1.58-bit |",
        "|---|---|---|",
        f"| transformer file | {fp_mb:.2f} MB | {q_mb:.2f} MB ({fp_mb / q_mb:.1f}x smaller) |",
        f"| overall accuracy | {fp['overall'] * 100:.1f}% | {q['overall'] * 100:.1f}% |",
    ]
    for cat in fp["categories"]:
        lines.append(f"| {cat} | {fp['categories'][cat] * 100:.1f}% | {q['categories'][cat] * 100:.1f}% |")
    lines += [
        "",
        f"Conversion: {described}; formats: {report.formats}. Times: convert {t_convert:.1f} s, "
        f"sampling {fp['seconds']:.1f} s (full precision) and {q['seconds']:.1f} s (1.58-bit); "
        f"total {time.time() - t0:.1f} s.",
        f"Images: {grid_path}. Accuracy on {args.n} prompts is noisy: bench/quality.py scores 1200 with intervals.",
    ]
    report_path = os.path.join(args.out, "report.md")
    with open(report_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {grid_path}\nwrote {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
