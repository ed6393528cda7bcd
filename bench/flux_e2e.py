"""Full-size FLUX.1-dev transformer, random weights, one denoising step at 1024x1024, batch 1.

    python bench/flux_e2e.py [--variants bf16 w158a16 w158a8] [--steps 5]

Runs the BFL-layout FLUX implementation in converter/flux_model.py (the same math as
ComfyUI's and BFL's model code) at FLUX.1-dev's real sizes: bf16 dense, then
every block linear replaced by bitkernel's TernaryLinear (weight-only, and with
int8 activations), each built block by block so that the quantized variants
never hold the dense model. Prints ms per step (median of CUDA-event timings
after warm-up), the ratio to bf16 measured in the same run, resident weights
and peak VRAM. Random weights say nothing about quality; time and memory do
not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for testbed/

from report_table import emit  # noqa: E402  (bench/ is on sys.path when this script runs)

from bitkernel.nn import TernaryLinear  # noqa: E402
from converter.architecture import FLUX1_DEV  # noqa: E402
from converter.flux_model import Flux, FluxConfig, make_img_ids, make_txt_ids  # noqa: E402

FLUX_DEV = FluxConfig.from_dict(FLUX1_DEV.to_dict())
VARIANTS = {"bf16": None, "w158a16": False, "w158a8": True}  # value: act_int8 of the ternary layers


def _init_(module: nn.Module, gen: torch.Generator) -> None:
    for name, p in module.named_parameters(recurse=False):
        if p.dim() == 2:
            p.normal_(0.0, 0.02, generator=gen)
        elif name == "scale":
            p.fill_(1.0)
        else:
            p.zero_()


def _quantize_linears(block: nn.Module, act_int8: bool) -> None:
    for name, m in list(block.named_modules()):
        if isinstance(m, nn.Linear):
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            setattr(parent, name.rpartition(".")[2], TernaryLinear.from_linear(m, act_int8=act_int8))


def build(act_int8: bool | None, device: torch.device) -> Flux:
    """FLUX.1-dev on `device`, materialised block by block from the meta device."""
    gen = torch.Generator(device=device).manual_seed(0)
    model = Flux(FLUX_DEV, dtype=torch.bfloat16, device="meta")
    with torch.no_grad():
        for name, child in model.named_children():
            blocks = list(child) if name in ("double_blocks", "single_blocks") else [child]
            for block in blocks:
                block.to_empty(device=device)
                for m in block.modules():
                    _init_(m, gen)
                if act_int8 is not None and name in ("double_blocks", "single_blocks"):
                    _quantize_linears(block, act_int8)
    return model.eval()


def run_variant(name: str, steps: int, device: torch.device) -> dict[str, float]:
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = build(VARIANTS[name], device)
    weights = torch.cuda.memory_allocated() - base
    gen = torch.Generator(device=device).manual_seed(1)
    img = torch.randn(1, 4096, 64, device=device, dtype=torch.bfloat16, generator=gen)
    txt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16, generator=gen)
    y = torch.randn(1, 768, device=device, dtype=torch.bfloat16, generator=gen)
    img_ids, txt_ids = make_img_ids(1, 128, 128, device), make_txt_ids(1, 512, device)
    t = torch.full((1,), 0.5, device=device, dtype=torch.bfloat16)
    g = torch.full((1,), 3.5, device=device, dtype=torch.bfloat16)
    times = []
    with torch.inference_mode():
        for _ in range(2):
            out = model(img, img_ids, txt, txt_ids, t, y, g)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = model(img, img_ids, txt, txt_ids, t, y, g)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    if not torch.isfinite(out).all():
        raise RuntimeError(f"{name}: non-finite output")
    peak = torch.cuda.max_memory_allocated() - base
    del model, out
    torch.cuda.empty_cache()
    return {"ms": statistics.median(times), "weights_gib": weights / 2**30, "peak_gib": peak / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/flux_e2e.py needs a CUDA GPU")
    dev = torch.device("cuda")
    res = {}
    for name in args.variants:
        res[name] = run_variant(name, args.steps, dev)
        print(name, res[name], flush=True)
    ref = res.get("bf16", {}).get("ms")
    lines = [
        f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | FLUX.1-dev architecture, random weights, "
        f"1024x1024 (4096 image + 512 text tokens), batch 1, eager, converter/flux_model.py model code\n",
        "| variant | ms / step | speed vs bf16 | weights GiB | peak VRAM GiB |",
        "|---|---|---|---|---|",
    ]
    for name, r in res.items():
        ratio = f"{ref / r['ms']:.2f}x" if ref else "-"
        lines.append(f"| {name} | {r['ms']:.1f} | {ratio} | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} |")
    table = "\n".join(lines) + "\n"
    emit(table, args.out)


if __name__ == "__main__":
    main()
