"""Quality of converted testbed models against the full-precision testbed model.

    python bench/quality.py [--weights testbed/weights] [--methods int8 calibrated mse ...] [--n 1200]
                            [--files extra.safetensors ...] [--keep DIR] [--device cuda]
                            [--out bench/results/quality.md]

Each method converts the shipped full-precision testbed transformer with
converter.convert (the same code path users run on FLUX.1-dev), loads the
bitflux file into the testbed's FLUX model code, and samples the held-out
evaluation prompts with the same per-prompt noise as the full-precision model
in the same run. The table gives per-category rule-scored accuracy with 95%
bootstrap intervals (resampling prompts), and same-noise PSNR / SSIM of the
images against the full-precision model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from report_table import emit  # noqa: E402  (bench/ is on sys.path when this script runs)

from converter import convert  # noqa: E402
from converter.calibration.conditioning import overlapping_prompts, save_conditioning  # noqa: E402
from converter.calibration.engine import CalibrationSettings  # noqa: E402
from testbed.bitflux import load_bitflux_flux  # noqa: E402
from testbed.calibration_data import (  # noqa: E402
    BEFORE_BRANCH_AND_BIAS,
    CPU_PROMPTS,
    GPU_PROMPTS,
    default_prompts,
    testbed_conditioning,
)
from testbed.checkpoint import FLUX_FILE, TEXT_FILE, load_flux, load_text_encoder  # noqa: E402
from testbed.evaluate import evaluate  # noqa: E402
from testbed.prompts import eval_items, eval_prompts  # noqa: E402
from testbed.sampling import DEFAULT_GUIDANCE  # noqa: E402
from testbed.scenes import CATEGORIES  # noqa: E402

# method name -> converter arguments; "calibration" holds CalibrationSettings fields (the conditioning
# file is made per run from the testbed's calibration split, which never overlaps the evaluation prompts).
# A name lists its calibration stages; "rN" is the low-rank branch of rank N, "r0" none. The default and its
# variants (a8, scales-only, windows b4, r16, r0) follow the converter's defaults (rank-32 branch since session 7,
# trained biases since session 8); the stage ablations below them and "2.5 bits" are pinned to what they were
# measured with: no branch, checkpoint biases.
T = {"method": "mse", "default_format": "ternary"}
NO_CODES, NO_E2E, R0 = {"learn_codes": False}, {"e2e_steps": 0}, {"lowrank": 0}
METHODS = {
    "int8": {"method": "mse", "default_format": "int8"},
    "int4": {"method": "mse", "default_format": "int4:64"},
    # the converter's default --calibrate: GPTQ, scales and codes per block, then end to end; rank-32 branch
    "gptq+scales+codes+e2e (default)": {**T, "calibration": {}},
    "gptq+scales+codes+e2e a8": {**T, "default_format": "ternary+a8", "calibration": {}},
    "gptq+scales+codes+e2e r16": {**T, "calibration": {"lowrank": 16}},
    "gptq+scales+codes+e2e r0": {**T, "calibration": R0},
    # codes learned per block, frozen in the end-to-end stage (what FLUX.1-dev got before windows.py)
    "gptq+scales+codes+e2e scales-only": {**T, "calibration": {"e2e_learn_codes": False}},
    # what FLUX.1-dev gets on one 16-24 GB GPU, emulated: the end-to-end stage learns the codes 12 windows at
    # a time (the testbed's finest split) with 4 samples per step
    "gptq+scales+codes+e2e windows b4": {**T, "calibration": {"e2e_code_share": 0.1, "e2e_batch": 4}},
    # rank 32 alone is 4.5 bits on the testbed
    "gptq+scales+codes+e2e 2.5 bits": {**T, "calibration": {"budget": "2.5bits", **BEFORE_BRANCH_AND_BIAS}},
    "gptq+scales+codes": {**T, "calibration": {**NO_E2E, **BEFORE_BRANCH_AND_BIAS}},
    "gptq+scales+e2e": {**T, "calibration": {**NO_CODES, **BEFORE_BRANCH_AND_BIAS}},
    "gptq+scales": {**T, "calibration": {**NO_CODES, **NO_E2E, **BEFORE_BRANCH_AND_BIAS}},
    "gptq+scales r16": {**T, "calibration": {**NO_CODES, **NO_E2E, **BEFORE_BRANCH_AND_BIAS, "lowrank": 16}},
    "gptq only": {**T, "calibration": {**NO_CODES, **NO_E2E, **BEFORE_BRANCH_AND_BIAS, "distill_steps": 0}},
    "scales only": {**T, "calibration": {**NO_CODES, **NO_E2E, **BEFORE_BRANCH_AND_BIAS, "gptq": False}},
    "mse": T,
    "absmean": {"method": "absmean", "default_format": "ternary"},
}
BOOTSTRAP = 1000


def bootstrap_ci(cats: list[str], passed: torch.Tensor, gen: torch.Generator) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of each category's accuracy and of their mean (overall)."""
    samples: dict[str, torch.Tensor] = {}
    for cat in CATEGORIES:
        idx = torch.tensor([i for i, c in enumerate(cats) if c == cat])
        if len(idx) == 0:
            continue
        draws = idx[torch.randint(0, len(idx), (BOOTSTRAP, len(idx)), generator=gen)]
        samples[cat] = passed[draws].float().mean(1)
    samples["overall"] = torch.stack(list(samples.values())).mean(0)
    return {k: (v.quantile(0.025).item(), v.quantile(0.975).item()) for k, v in samples.items()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5, per channel), images in [0, 1]."""
    x = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=3)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean().item()


def run(model, te, args, cats, gen, ref_images=None) -> dict:
    res = evaluate(model, te, n=args.n, device=args.device, steps=args.steps, guidance=args.guidance,
                   seed=args.seed, return_images=True)
    res["ci"] = bootstrap_ci(cats, torch.tensor(res["passed"]), gen)
    if ref_images is not None:
        res["psnr"], res["ssim"] = psnr(res["images"], ref_images), ssim(res["images"], ref_images)
    return res


def _setting(kv: str) -> tuple[str, object]:
    """FIELD=VALUE of CalibrationSettings, VALUE parsed as the field's default's type."""
    key, _, value = kv.partition("=")
    fields = {f.name: f for f in dataclasses.fields(CalibrationSettings)}
    if key not in fields or key in ("conditioning", "state_dir"):
        raise SystemExit(f"--set {kv}: not a calibration setting ({', '.join(sorted(fields))})")
    default = fields[key].default
    if isinstance(default, bool):
        return key, value.lower() in ("1", "true", "yes")
    if default is not None:
        return key, type(default)(value)
    try:  # Optional fields: a number where the value is one (a8_keep=0.25), else the text (budget=2.5bits)
        return key, json.loads(value)
    except ValueError:
        return key, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="testbed/weights")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--files", nargs="*", default=[], help="already converted bitflux files to score too")
    ap.add_argument("--keep", help="keep the converted files in this folder (default: a temporary one)")
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"default {DEFAULT_GUIDANCE}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calib-prompts", type=int,
                    help=f"testbed calibration prompts for calibrated methods ({GPU_PROMPTS} on a GPU, "
                    f"{CPU_PROMPTS} on a CPU)")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="override CalibrationSettings fields of every calibrated method, e.g. e2e_steps=500")
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args()
    if args.calib_prompts is None:
        args.calib_prompts = default_prompts(args.device)
    overrides = dict(_setting(kv) for kv in args.set)
    fp_path = os.path.join(args.weights, FLUX_FILE)
    te = load_text_encoder(os.path.join(args.weights, TEXT_FILE), args.device)
    cats = [it.spec.category for it in eval_items(args.n, args.seed)]
    gen = torch.Generator().manual_seed(0)

    rows = [("full precision (bf16 file)", os.path.getsize(fp_path),
             run(load_flux(fp_path, args.device), te, args, cats, gen), None)]
    ref = rows[0][2]["images"]
    print(f"full precision: {rows[0][2]['overall'] * 100:.1f}%", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cond = os.path.join(tmp, "calibration.safetensors")
        conditioning = testbed_conditioning(args.calib_prompts, encoder=te)
        if overlapping_prompts(conditioning, eval_prompts(args.n, args.seed)):
            raise SystemExit("calibration prompts overlap the evaluation prompts")
        save_conditioning(cond, conditioning)
        out_dir = args.keep or tmp
        os.makedirs(out_dir, exist_ok=True)
        todo = [(m, os.path.join(out_dir, f"{m.replace(' ', '_')}.safetensors")) for m in args.methods]
        todo += [(f, f) for f in args.files]
        for name, path in todo:
            seconds = None
            if name in METHODS:
                kw = dict(METHODS[name])
                if "calibration" in kw:
                    kw["calibration"] = CalibrationSettings(cond, **{**kw["calibration"], **overrides})
                t0 = time.monotonic()
                convert(fp_path, path, progress=False, device=args.device, **kw)
                seconds = time.monotonic() - t0
            model = load_bitflux_flux(path, args.device)
            rows.append((name, os.path.getsize(path), run(model, te, args, cats, gen, ref), seconds))
            print(f"{name}: {rows[-1][2]['overall'] * 100:.1f}% (conversion {seconds or 0:.0f} s)", flush=True)
            if args.out:  # the rows so far, in case the run is cut short
                emit(table(args, rows, overrides), args.out, quiet=True)
    emit(table(args, rows, overrides), args.out)


def table(args: argparse.Namespace, rows: list, overrides: dict) -> str:
    """rows: (name, file bytes, run() result, conversion seconds or None)."""
    head = (f"Testbed model ({args.weights}), {args.n} held-out prompts, {args.steps} steps, guidance "
            f"{args.guidance}, seed {args.seed}, device {args.device}. Accuracy in % with 95% bootstrap "
            f"intervals; PSNR (dB) / SSIM against the full-precision images on the same noise."
            + (f" Calibration overrides: {overrides}." if overrides else "") + "\n\n")
    cols = ["overall", *[c for c in CATEGORIES if c in rows[0][2]["categories"]]]
    lines = ["| model | file MB | " + " | ".join(cols) + " | PSNR | SSIM | convert s |",
             "|" + "---|" * (len(cols) + 5)]
    for name, size, r, seconds in rows:
        accs = [r["overall"] if c == "overall" else r["categories"][c] for c in cols]
        cells = [f"{a * 100:.1f} [{r['ci'][c][0] * 100:.1f}, {r['ci'][c][1] * 100:.1f}]" for a, c in zip(accs, cols)]
        q = [f"{r['psnr']:.2f}", f"{r['ssim']:.3f}"] if "psnr" in r else ["-", "-"]
        t = "-" if seconds is None else f"{seconds:.0f}"
        lines.append(f"| {name} | {size / 1e6:.2f} | " + " | ".join(cells) + " | " + " | ".join(q) + f" | {t} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
