"""Kernel benchmark over FLUX.1-dev's linear shapes: each format against torch bf16 in the same run.

    python bench/kernels.py [--m 1 16 512 4608] [--formats W1.58A16 ...] [--out bench/results/kernels_<gpu>.md]

Times come from CUDA graphs of 20 back-to-back calls replayed between CUDA events,
with enough weight copies in rotation that the weights come from device memory,
not L2. A shape's columns are replayed in turn, bf16 included, for several rounds,
and each column's time is its median over the rounds: the GPU's clock drifts as it
warms (the same bf16 GEMM measured 330 and 381 us a few seconds apart on an H200),
so timing one column after another would credit the drift to whichever ran first.
Ratios are bf16 time / format time: above 1 is faster than torch bf16 (cuBLAS).

On sm_89+ W1.58A8 with M > 16 runs as FP8 (BITKERNEL_FP8=0 measures the int8
kernel instead); the "fp8 cuBLAS" column is its ceiling: torch._scaled_mm alone
on operands already in e4m3 (row-wise scales, bf16 out), without the per-call
activation quantization and weight expansion. "W1.58A16 expansion" is the
2-bit to bf16 expansion alone that W1.58A16 runs before cuBLAS above M = 16
(except where bitkernel's sm_90 GEMM takes the shape), as a share of the bf16
time; on an sm_90 GPU "W1.58A16 via expansion" is that route in full, with the
sm_90 GEMM switched off. "W1.58A16+r32" and "W1.58A8+r32" run the op with a
rank-32 low-rank branch (bf16), as a converted file with the converter's default
calibration has (W1.58A8's FP8 path folds it into its GEMM).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Optional

import torch
from report_table import emit  # bench/ is on sys.path when this script runs

import bitkernel
import bitkernel.functional as F

# (BFL layer name, N, K); guide section 1.
SHAPES = [
    ("double img/txt attn.qkv", 9216, 3072),
    ("double attn.proj", 3072, 3072),
    ("double mlp.0", 12288, 3072),
    ("double mlp.2", 3072, 12288),
    ("double mod.lin", 18432, 3072),
    ("single linear1", 21504, 3072),
    ("single linear2", 3072, 15360),
    ("single modulation.lin", 9216, 3072),
]
# name, format, group, act_int8
VARIANTS = [
    ("W1.58A16", "ternary", 0, False),
    ("W4A16", "int4", 64, False),
    ("W8A16", "int8", 0, False),
    ("W8A8", "int8", 0, True),
    ("W1.58A8", "ternary", 0, True),
]
FP8_CEILING = "fp8 cuBLAS"
# Above the small-M kernels W1.58A16 expands the weights to bf16 for cuBLAS (where the sm_90 GEMM does not take
# the shape): the expansion alone, to show how much of the gap to bf16 it is.
DECODE = "W1.58A16 expansion"
# Where bitkernel's sm_90 GEMM serves W1.58A16 above M = 16: the route it replaces (expansion + cuBLAS), same run.
EXPANDED = "W1.58A16 via expansion"
# W1.58A16 with a rank-32 low-rank branch (the converter's default --calibrate adds one to every ternary layer).
BRANCH_RANK = 32
BRANCH = f"W1.58A16+r{BRANCH_RANK}"
BRANCH8 = f"W1.58A8+r{BRANCH_RANK}"
CALLS_PER_GRAPH = 20
ROUNDS = 9
L2_FLUSH_BYTES = 256 << 20


def capture(fns) -> torch.cuda.CUDAGraph:
    """A CUDA graph of CALLS_PER_GRAPH calls of the callables in rotation (warmed up outside capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns[:3]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(CALLS_PER_GRAPH):
            fns[i % len(fns)]()
    g.replay()
    return g


def time_graphs(columns: dict[str, list]) -> dict[str, float]:
    """Median ms per call of each column's graph, the graphs replayed in turn (in a rotated order each round)
    for ROUNDS rounds."""
    graphs = {name: capture(fns) for name, fns in columns.items()}
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in graphs}
    names = list(graphs)
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[: r % len(names)]:  # each column first in some rounds
            g = graphs[name]
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            times[name].append(a.elapsed_time(b) / CALLS_PER_GRAPH)
    del graphs
    return {name: statistics.median(t) for name, t in times.items()}


def copies_for(nbytes: int) -> int:
    return max(1, min(16, -(-L2_FLUSH_BYTES // max(nbytes, 1))))


def rotation(t: torch.Tensor) -> list[torch.Tensor]:
    """t and enough copies of it that calls cycling through them read device memory, not L2."""
    return [t] + [t.clone() for _ in range(copies_for(t.numel() * t.element_size()) - 1)]


def fp8_operands(
    x: torch.Tensor, qw: F.QuantizedWeight
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x8, sx, w8, sw): W1.58A8's FP8 GEMM operands already in e4m3, as the op makes them."""
    x8, sx = F.quantize_rows_fp8(x)
    w8 = F.ternary_to_fp8(qw.qweight, qw.in_features)
    return x8, sx, w8, qw.scale.reshape(1, qw.out_features).contiguous()


def scaled_mm(x8: torch.Tensor, sx: torch.Tensor, w8: torch.Tensor, sw: torch.Tensor, fast: bool) -> torch.Tensor:
    """torch._scaled_mm on those operands (row-wise scales, bf16 out; `fast`: use_fast_accum)."""
    return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=fast)


def bench_shape(n: int, k: int, m: int, variants: list[tuple[str, str, int, bool]]) -> dict[str, float]:
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    ws = rotation(w)
    columns = {"bf16": [lambda w=w_: torch.nn.functional.linear(x, w) for w_ in ws]}
    lr = (torch.randn(BRANCH_RANK, k, device="cuda", dtype=x.dtype, generator=gen) * 0.02,
          torch.randn(n, BRANCH_RANK, device="cuda", dtype=x.dtype, generator=gen) * 0.02)  # both +r32 columns
    for name, fmt, group, a8 in variants:
        qw = F.quantize(w, fmt, group)
        qws = [qw] + [
            F.QuantizedWeight(
                qw.fmt, qw.qweight.clone(), qw.scale.clone(), None if qw.zero is None else qw.zero.clone(), k, group
            )
            for _ in range(copies_for(qw.nbytes()) - 1)
        ]
        columns[name] = [lambda q=q_, a=a8: F.linear(x, q, None, a) for q_ in qws]
        if name == "W1.58A8":
            ceiling = fp8_ceiling(x, qw)
            if ceiling:
                columns[FP8_CEILING] = ceiling
        if name == "W1.58A16" and m > F.SMALL_M:
            columns[DECODE] = [lambda q=q_: F.dequantize(q, torch.bfloat16) for q_ in qws]
            if F.sm90_gemm_applies(x.device):
                columns[EXPANDED] = [lambda q=q_: expanded(x, q) for q_ in qws]
        if name in ("W1.58A16", "W1.58A8"):
            columns[BRANCH8 if a8 else BRANCH] = [lambda q=q_, a=a8: F.linear(x, q, None, a, lr) for q_ in qws]
    res = time_graphs(columns)
    del columns, ws
    torch.cuda.empty_cache()
    return res


def expanded(x: torch.Tensor, qw: F.QuantizedWeight) -> torch.Tensor:
    """W1.58A16 with the sm_90 GEMM switched off: the weights expanded to bf16 for cuBLAS."""
    before, F.SM90_GEMM = F.SM90_GEMM, False
    try:
        return F.linear(x, qw)
    finally:
        F.SM90_GEMM = before


def fp8_ceiling(x: torch.Tensor, qw: F.QuantizedWeight) -> list:
    """Calls of torch._scaled_mm on pre-quantized e4m3 operands (none where the GPU or torch lacks it)."""
    if torch.cuda.get_device_capability() < (8, 9):
        return []
    x8, sx, w8, sw = fp8_operands(x, qw)
    try:
        scaled_mm(x8, sx, w8, sw, F.FP8_FAST_ACCUM)
    except RuntimeError:
        return []
    return [lambda w=w_: scaled_mm(x8, sx, w, sw, F.FP8_FAST_ACCUM) for w_ in rotation(w8)]


def cell(t: Optional[float], base: float, share: bool = False) -> str:
    if t is None:
        return "n/a"
    return f"{t:.4f} ({100 * t / base:.1f}% of bf16)" if share else f"{t:.4f} ({base / t:.2f}x)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 512, 4608])
    ap.add_argument("--formats", nargs="+", default=[v[0] for v in VARIANTS], choices=[v[0] for v in VARIANTS],
                    help="formats to time (default all)")
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args()
    variants = [v for v in VARIANTS if v[0] in args.formats]
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA GPU")
    info = bitkernel.info()
    head = (
        f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | bitkernel {info['version']} "
        f"(archs {info['cuda_archs']}) | W1.58A8 FP8 path {'on' if F.FP8 else 'off'}\n\n"
    )
    names = [v[0] for v in variants] + ([FP8_CEILING] if "W1.58A8" in args.formats else [])
    names += [DECODE, EXPANDED, BRANCH] if "W1.58A16" in args.formats else []
    names += [BRANCH8] if "W1.58A8" in args.formats else []
    cols = ["bf16 ms"] + [f"{name} ms (x)" for name in names]
    lines = ["| layer (N x K) | M | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for label, n, k in SHAPES:
        for m in args.m:
            r = bench_shape(n, k, m, variants)
            cells = [f"{r['bf16']:.4f}"] + [cell(r.get(name), r["bf16"], name == DECODE) for name in names]
            lines.append(f"| {label} ({n}x{k}) | {m} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    table = head + "\n".join(lines) + "\n"
    emit(table, args.out)


if __name__ == "__main__":
    main()
