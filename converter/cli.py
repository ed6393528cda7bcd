"""Command line: `python converter/convert.py CHECKPOINT -o OUT.safetensors [options]`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Optional

from ._version import __version__
from .errors import ConversionError

EPILOG = """\
formats: ternary (default; 2-bit packed, one scale per row), ternary:G, int8, int4:G (symmetric),
int4a:G (asymmetric), bf16; a "+a8" suffix (ternary+a8, int8+a8) marks a layer for int8 activations.
Rules are fnmatch patterns on BFL layer names, the last match wins:
  --rule 'double_blocks.*.img_mod.lin=int8' --rule 'single_blocks.37.*=bf16' --rule '*_mod.lin=int4:64'
Inputs: a BFL single file (flux1-dev.safetensors; bf16, fp16, fp32 or fp8, ComfyUI prefixes and scaled fp8
included), a diffusers transformer/ folder (sharded with an index) or a single diffusers-layout file.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert a FLUX.1 transformer checkpoint to a 1.58-bit bitflux file (docs/FORMAT.md).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="FLUX .safetensors file, or a diffusers transformer folder")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument(
        "--method",
        choices=("mse", "absmean"),
        default="mse",
        help="ternary rounding: per-row MSE-optimal scale (default) or BitNet absmean",
    )
    p.add_argument(
        "--format",
        default="ternary",
        dest="default_format",
        help="format of every block linear no rule names (default: ternary)",
    )
    p.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="PATTERN=FORMAT",
        help="per-layer format; repeatable, last match wins",
    )
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default=None,
        help="where the quantization math runs (default: cuda if available)",
    )
    c = p.add_argument_group(
        "calibration",
        "fit the quantized model to the full-precision one on its own trajectories (docs/CALIBRATION.md)",
    )
    c.add_argument(
        "--calibrate", action="store_true",
        help="calibrate: GPTQ, block-wise distillation of scales and codes, end-to-end velocity matching",
    )
    c.add_argument(
        "--calib-data",
        metavar="FILE",
        help="conditioning file of the calibration prompts (ComfyUI node 'BitFlux Calibration Prompts', or "
        "`python -m testbed.calibration_data` for the testbed model)",
    )
    c.add_argument("--calib-prompts", type=int, metavar="N", help="use the first N prompts (default all)")
    c.add_argument("--calib-steps", type=int, help="teacher sampling steps (default 20)")
    c.add_argument("--calib-timesteps", type=int, help="samples kept per trajectory (default 4)")
    c.add_argument("--no-gptq", action="store_true", help="plain rounding instead of GPTQ")
    c.add_argument("--distill-steps", type=int, help="Adam steps per block on the scales (default 300; 0: none)")
    c.add_argument(
        "--no-learn-codes", action="store_true",
        help="distil only the scales (and branch); by default the ternary codes are learned too",
    )
    c.add_argument(
        "--train-bias", action=argparse.BooleanOptionalAction,
        help="distil the quantized layers' biases too, in both stages (default on; the file holds the trained "
        "biases). --no-train-bias keeps the checkpoint's biases, as runs before it was the default did",
    )
    c.add_argument(
        "--lowrank", type=int, metavar="R",
        help="rank of the bf16 low-rank branch on ternary layers (default 32; 0: none, the smallest and fastest file: "
        "on FLUX.1-dev rank 32 adds 306 MB and ~6%% to a W1.58A16 step, and on the testbed model it took the "
        "calibrated model from 80.8%% to 86.7%% against 89.4%% for full precision)"
    )
    c.add_argument(
        "--e2e-steps", type=int, metavar="N",
        help="end-to-end velocity matching over all blocks after the block stage, N Adam steps (default 2000; "
        "0: off). It holds the whole quantized model on the GPU and is skipped, with a message, where that "
        "does not fit",
    )
    c.add_argument(
        "--e2e-batch", type=int, metavar="N",
        help="samples per end-to-end step (default: as many as fit the GPU at once). More than fit are "
        "accumulated over several passes, in proportion more time: at 1024x1024 a 16-24 GB GPU fits 3-5, and "
        "on the testbed model 8 samples per step scored 3 points above 4",
    )
    c.add_argument(
        "--a8-keep", type=float, metavar="FRACTION",
        help="8-bit activations (W1.58A8: INT8/FP8 tensor cores) on every ternary/int8 layer except this most "
        "A8-sensitive fraction of them, measured on the calibration set (e.g. 0.25; 0: all); layers a --rule "
        "names keep the activations it gives them",
    )
    c.add_argument(
        "--budget",
        help="mixed precision by sensitivity under this size of the block linears: e.g. 3.4GB or 2.5bits",
    )
    c.add_argument("--calib-gpu-memory", type=float, metavar="GB", help="GPU memory calibration may use (GiB)")
    c.add_argument("--calib-dir", help="working folder (resumable; default OUTPUT.calib, removed after success)")
    c.add_argument("--keep-calib-dir", action="store_true", help="keep the working folder after success")
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the output size; write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--report-json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--version", action="version", version=f"bitflux converter {__version__}")
    return p


def _on_sigterm(signum: int, frame: object) -> None:
    # Turned into an exception so the clean-up of the partial file runs.
    raise SystemExit(128 + signum)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if sys.platform == "linux" and not ({"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & os.environ.keys()):
        # Calibration frees and allocates blocks of many sizes near the GPU's limit: without growable
        # segments, 2.3 GiB held by torch's cache could not serve 358 MiB at FLUX.1-dev's width under a
        # 16 GiB cap (H200). Read when CUDA first initialises, so it must be set before that; a user's own
        # allocator settings (either name torch reads) are left alone.
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    signal.signal(signal.SIGTERM, _on_sigterm)
    # The calibration settings given on the command line (None: the default).
    given = {
        "prompts": args.calib_prompts,
        "steps": args.calib_steps,
        "timesteps": args.calib_timesteps,
        "distill_steps": args.distill_steps,
        "e2e_steps": args.e2e_steps,
        "e2e_batch": args.e2e_batch,
        "a8_keep": args.a8_keep,
        "lowrank": args.lowrank,
        "train_bias": args.train_bias,
    }
    tuning = (*given.values(), args.calib_gpu_memory)
    calib_flags = (args.calib_data, args.budget, args.calib_dir, args.no_gptq, args.no_learn_codes,
                   args.keep_calib_dir)
    if not args.calibrate and (any(calib_flags) or any(v is not None for v in tuning)):
        print("error: calibration options need --calibrate", file=sys.stderr)
        return 2
    if args.calibrate and not args.calib_data:
        print(
            "error: --calibrate needs --calib-data FILE: the calibration prompts encoded by the model's text "
            "encoders. Make it with the ComfyUI node 'BitFlux Calibration Prompts' (FLUX.1-dev: DualCLIPLoader "
            "with t5xxl + clip_l, type flux) or `python -m testbed.calibration_data` (the testbed model).",
            file=sys.stderr,
        )
        return 2
    from .pipeline import convert  # torch and bitkernel load after argument errors are reported

    calibration = None
    if args.calibrate:
        from .calibration.engine import CalibrationSettings

        calibration = CalibrationSettings(
            conditioning=args.calib_data,
            **{k: v for k, v in given.items() if v is not None},
            gptq=not args.no_gptq,
            learn_codes=not args.no_learn_codes,
            budget=args.budget,
            gpu_memory_gb=args.calib_gpu_memory,
            state_dir=args.calib_dir,
        )
    try:
        report = convert(
            args.checkpoint,
            args.output,
            method=args.method,
            rules=args.rule,
            default_format=args.default_format,
            device=args.device,
            force=args.force,
            dry_run=args.dry_run,
            progress=not args.quiet,
            calibration=calibration,
            keep_calibration_dir=args.keep_calib_dir,
        )
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions: the partial file is already removed
        print(f"error: {exc}; no output file was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: no output file was written", file=sys.stderr)
        return 130
    print(report.to_text())
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump(report.to_json(), f, indent=1)
    return 0
