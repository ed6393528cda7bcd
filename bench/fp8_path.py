"""The pieces of W1.58A8's FP8 path on FLUX.1-dev's M = 4608 shapes, each against a reference in the same run.

    python bench/fp8_path.py [--out bench/results/fp8_path_<gpu>.md]

1. The FP8 GEMM (torch._scaled_mm on operands already in e4m3, row-wise scales, bf16 out) with fp32 accumulation
   and with fast accumulation (use_fast_accum, what bitkernel.functional.FP8_FAST_ACCUM selects): time against
   bf16 cuBLAS, and error against an fp64 product of the same e4m3 operands.
2. What 8-bit activations cost next to that: the op's error with each accumulation against the product of the
   same ternary weights with the bf16 activations.
3. The per-token activation quantization alone (bitkernel.functional.quantize_rows_fp8) against torch's
   elementwise conversion and copy of the same tensor (bandwidth references).

Times as in bench/kernels.py: CUDA graphs replayed in turn, medians.
"""

from __future__ import annotations

import argparse

import torch
from kernels import SHAPES, fp8_operands, rotation, scaled_mm, time_graphs  # bench/ is on sys.path
from report_table import emit, markdown_table

import bitkernel.functional as F

M = 4608
ERROR_ROWS = 512  # rows of the fp64 references (a 4608-row fp64 product is slow and says no more)


def activations(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    x[:, :8] *= 20  # a few outlier channels, as FLUX's activations have
    return x


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def gemm_row(name: str, n: int, k: int) -> list[str]:
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = activations(M, k, gen)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    qw = F.quantize(w, "ternary", 0)
    x8, sx, w8, sw = fp8_operands(x, qw)
    w8s, ws = rotation(w8), rotation(w)
    t = time_graphs({
        "bf16": [lambda w=w_: torch.nn.functional.linear(x, w) for w_ in ws],
        "fp32": [lambda w=w_: scaled_mm(x8, sx, w, sw, False) for w_ in w8s],
        "fast": [lambda w=w_: scaled_mm(x8, sx, w, sw, True) for w_ in w8s],
    })
    ref = (x8[:ERROR_ROWS].double() @ w8.double().t()) * sx[:ERROR_ROWS].double() * sw.double()
    err = {fast: rel(scaled_mm(x8, sx, w8, sw, fast)[:ERROR_ROWS], ref) for fast in (False, True)}
    return [
        f"{name} ({n}x{k})", f"{1000 * t['bf16']:.1f}",
        f"{1000 * t['fp32']:.1f} ({t['bf16'] / t['fp32']:.2f}x)", f"{err[False]:.2e}",
        f"{1000 * t['fast']:.1f} ({t['bf16'] / t['fast']:.2f}x)", f"{err[True]:.2e}",
    ]


def gemm_rows() -> list[list[str]]:
    rows = []
    for name, n, k in SHAPES:
        rows.append(gemm_row(name, n, k))
        print(" | ".join(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def a8_error_rows() -> list[list[str]]:
    rows = []
    saved = F.FP8_FAST_ACCUM
    try:
        for name, n, k in SHAPES:
            gen = torch.Generator(device="cuda").manual_seed(n + k)
            x = activations(ERROR_ROWS, k, gen)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
            qw = F.quantize(w, "ternary", 0)
            ref = x.double() @ F.dequantize(qw, torch.float32).double().t()
            errs = []
            for fast in (False, True):
                F.FP8_FAST_ACCUM = fast
                errs.append(f"{rel(F.linear(x, qw, None, True), ref):.3e}")
            rows.append([f"{name} ({n}x{k})"] + errs)
    finally:
        F.FP8_FAST_ACCUM = saved
    return rows


def quant_rows() -> list[list[str]]:
    rows = []
    for k in sorted({k for _, _, k in SHAPES}):
        x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        xs = rotation(x)
        t = time_graphs({
            "ours": [lambda x=x_: F.quantize_rows_fp8(x) for x_ in xs],
            "to": [lambda x=x_: x.to(torch.float8_e4m3fn) for x_ in xs],
            "clone": [lambda x=x_: x.clone() for x_ in xs],
        })
        moved = M * k * 3  # bf16 read, e4m3 written
        rows.append([f"{M} x {k}", f"{1000 * t['ours']:.1f} ({moved / t['ours'] / 1e9:.2f} TB/s)",
                     f"{1000 * t['to']:.1f}", f"{1000 * t['clone']:.1f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the tables to this Markdown file")
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("bench/fp8_path.py needs a CUDA GPU of compute capability 8.9 or newer (FP8)")
    head = f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | M = {M}\n\n"
    out = [
        "## 1. FP8 GEMM: fp32 against fast accumulation (us; error against fp64 on the same e4m3 operands)\n",
        markdown_table(["layer (N x K)", "bf16", "fp32 accumulation", "error", "fast accumulation", "error"],
                       gemm_rows()),
        f"\n## 2. The W1.58A8 op against the bf16-activation product, {ERROR_ROWS} rows (relative error)\n",
        markdown_table(["layer (N x K)", "fp32 accumulation", "fast accumulation"], a8_error_rows()),
        "\n## 3. Per-token e4m3 quantization alone (us), against torch's conversion and copy of the same tensor\n",
        markdown_table(["x", "quantize_rows_fp8", "torch x.to(e4m3)", "torch x.clone()"], quant_rows()),
    ]
    emit(head + "\n".join(out) + "\n", args.out)


if __name__ == "__main__":
    main()
