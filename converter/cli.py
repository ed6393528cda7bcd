"""Command line: `python converter/convert.py CHECKPOINT -o OUT.safetensors [options]`."""

from __future__ import annotations

import argparse
import json
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
    signal.signal(signal.SIGTERM, _on_sigterm)
    from .pipeline import convert  # torch and bitkernel load after argument errors are reported

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
