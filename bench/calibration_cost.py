"""What `--calibrate` costs on FLUX.1-dev: GPU memory and time per stage, under 24 and 16 GiB caps.

    python bench/calibration_cost.py [--depth 2 --single 4] [--prompts 8] [--caps 24 16] [--e2e-steps 20]
                                     [--no-learn-codes] [--out FILE]
    # the end-to-end stage at FLUX.1-dev's full depth, after a quick block stage:
    python bench/calibration_cost.py --depth 19 --single 38 --prompts 4 --distill-steps 0 --no-gptq --e2e-steps 10

Memory and time do not depend on the weight values, so the model is FLUX.1-dev's
full width (hidden 3072, 24 heads, T5 context 4096, CLIP vector 768, 1024x1024 =
64x64 image tokens, 256 text tokens) with random weights; to fit a device
session it has `--depth` double and `--single` single blocks instead of 19 and
38. Every block of a kind costs the same, so the table extrapolates each stage to
the full 19 + 38 blocks: teacher sampling scales with the number of blocks, the
per-block stages with their count. Each cap runs the converter CLI in its own
process with `--calib-gpu-memory` (the allocator cap), and the peak is torch's
max_memory_reserved in that process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from convert_memory import write_bfl  # noqa: E402
from report_table import emit  # noqa: E402

from converter.architecture import FLUX1_DEV  # noqa: E402
from converter.calibration.conditioning import CalibrationConditioning, save_conditioning  # noqa: E402
from converter.calibration.engine import CalibrationSettings  # noqa: E402

FULL_DOUBLE, FULL_SINGLE = FLUX1_DEV.depth, FLUX1_DEV.depth_single_blocks
E2E_STEPS = CalibrationSettings.e2e_steps  # the converter's default


def write_conditioning(path: str, prompts: int) -> None:
    gen = torch.Generator().manual_seed(0)
    save_conditioning(path, CalibrationConditioning(
        txt=torch.randn(prompts, 256, 4096, generator=gen).to(torch.bfloat16),
        vec=torch.randn(prompts, 768, generator=gen).to(torch.bfloat16),
        prompts=[f"random prompt {i}" for i in range(prompts)], encoder="random (benchmark)",
        image_tokens=(64, 64), guidance=3.5,
    ))


def run(src: str, cond: str, out: str, cap: float, args: argparse.Namespace) -> dict:
    report = out + ".json"
    code = (
        "import sys, json, torch; sys.argv = sys.argv[1:]; from converter.cli import main; rc = main(); "
        f"json.dump({{'rc': rc, 'peak_reserved': torch.cuda.max_memory_reserved()}}, open({report + '.mem'!r}, 'w'))"
    )
    cmd = [sys.executable, "-c", code, "convert.py", src, "-o", out, "--force", "--quiet", "--calibrate",
           "--calib-data", cond, "--calib-steps", str(args.steps), "--calib-timesteps", str(args.timesteps),
           "--distill-steps", str(args.distill_steps), "--calib-gpu-memory", str(cap), "--report-json", report]
    cmd += ["--lowrank", str(args.lowrank)]
    if args.no_learn_codes:
        cmd += ["--no-learn-codes"]
    if args.no_gptq:
        cmd += ["--no-gptq"]
    cmd += ["--e2e-steps", str(args.e2e_steps)]
    t0 = time.monotonic()
    # the converter's messages are echoed with the elapsed time as they come, so a run cut short by a time
    # limit still shows how far each stage got
    lines = []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        for line in proc.stdout:
            lines.append(line)
            print(f"  [{cap:g} GiB, {time.monotonic() - t0:6.1f} s] {line.rstrip()}", flush=True)
    wall = time.monotonic() - t0
    if proc.returncode:
        return {"error": "".join(lines)[-2000:], "wall": wall}
    with open(report) as f:
        rep = json.load(f)
    with open(report + ".mem") as f:
        mem = json.load(f)
    return {"report": rep, "peak_reserved": mem["peak_reserved"], "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--lowrank", type=int, default=CalibrationSettings.lowrank, help="the converter's --lowrank")
    ap.add_argument("--no-learn-codes", action="store_true")
    ap.add_argument("--no-gptq", action="store_true", help="with --distill-steps 0: a quick block stage, to measure "
                    "the end-to-end stage at full depth (--depth 19 --single 38)")
    ap.add_argument("--e2e-steps", type=int, default=20, help="end-to-end steps measured (time per step is reported)")
    ap.add_argument("--caps", type=float, nargs="+", default=[24, 16])
    ap.add_argument("--out")
    args = ap.parse_args()
    arch = dataclasses.replace(FLUX1_DEV, depth=args.depth, depth_single_blocks=args.single)
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        src, cond = os.path.join(tmp, "flux.safetensors"), os.path.join(tmp, "cond.safetensors")
        write_bfl(src, arch)
        write_conditioning(cond, args.prompts)
        for cap in args.caps:
            r = run(src, cond, os.path.join(tmp, f"out{cap:g}.safetensors"), cap, args)
            rows.append((cap, r))
            print(cap, json.dumps({k: v for k, v in r.items() if k != "report"})[:2000], flush=True)
    samples = args.prompts * args.timesteps
    lines = [
        f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | FLUX.1-dev width (hidden 3072), random "
        f"weights, {args.depth} double + {args.single} single blocks measured, 1024x1024 (4096 image + 256 text "
        f"tokens); {args.prompts} prompts x {args.timesteps} timesteps = {samples} samples, teacher "
        f"{args.steps} steps, "
        f"{'plain rounding' if args.no_gptq else 'GPTQ'}, {args.distill_steps} distillation steps per block "
        f"(codes learned: {not args.no_learn_codes}), "
        f"low-rank {args.lowrank}, {args.e2e_steps} end-to-end steps. 'full' = extrapolated to "
        f"{FULL_DOUBLE} + {FULL_SINGLE} blocks (block stage) and to {E2E_STEPS} end-to-end steps over them; the "
        "end-to-end stage's memory grows with the block count and is not extrapolated here.\n",
        "| GPU cap (GiB) | peak reserved (GiB) | teacher sampling s | per double block s | per single block s | "
        "blocks that learned codes | e2e s / step | e2e samples / step | e2e codes | measured total s | "
        f"full FLUX.1-dev est. min (block stage + {E2E_STEPS} e2e steps) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    scale = (FULL_DOUBLE + FULL_SINGLE) / (args.depth + args.single)  # the measured blocks to all of them
    for cap, r in rows:
        if "error" in r:
            lines.append(f"| {cap:g} | failed: {r['error'].splitlines()[-1][:200]} | | | | | | | | | |")
            continue
        cal = r["report"]["calibration"]
        blocks = cal["block_seconds"]
        dbl = [v for k, v in blocks.items() if k.startswith("double")]
        sgl = [v for k, v in blocks.items() if k.startswith("single")]
        d, s = sum(dbl) / len(dbl), sum(sgl) / len(sgl)
        cap_s = cal["stage_seconds"].get("capture", 0.0)
        full = cap_s * scale + d * FULL_DOUBLE + s * FULL_SINGLE
        e2e = cal.get("e2e_error") or {}
        # the training loop alone: the stage also rebuilds the blocks and measures its error before and after
        per_step = e2e["train_seconds"] / max(args.e2e_steps, 1) if "train_seconds" in e2e else None
        e2e_full = 0.0 if per_step is None else per_step * E2E_STEPS * scale
        step_cell = "skipped" if per_step is None else f"{per_step:.2f}"
        learned = [k for k, v in cal["block_error"].items() if v.get("codes")]
        codes_cell = f"{len(learned)} of {len(cal['block_error'])}"
        lines.append(
            f"| {cap:g} | {r['peak_reserved'] / 2**30:.2f} | {cap_s:.1f} | {d:.1f} | {s:.1f} | {codes_cell} | "
            f"{step_cell} | "
            f"{e2e.get('samples_per_step', '-')} | {e2e.get('codes', '-')} | {cal['seconds']:.1f} | "
            f"{full / 60:.1f} + {e2e_full / 60:.1f} |"
        )
    emit("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
