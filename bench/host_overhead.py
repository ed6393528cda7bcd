"""Host time per call of bitkernel's linear against torch's F.linear, on shapes too small for the GPU to be
the limit: what a step pays on the CPU side per layer (a FLUX.1-dev step makes ~500 such calls; where the
host takes longer than the GPU, the step waits for the host).

    python bench/host_overhead.py [--calls 2000]

Prints microseconds per call, and each as a multiple of torch's F.linear on the same input.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from kernels import BRANCH_RANK  # bench/kernels.py: the converter's default --calibrate branch
from report_table import markdown_table  # bench/ is on sys.path when this script runs

import bitkernel.functional as F


def per_call_us(f: Callable[[], object], calls: int) -> float:
    for _ in range(50):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        f()
    return 1e6 * (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/host_overhead.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = n = 256
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    b = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    qw = F.quantize(w, "ternary")
    lr = (torch.randn(BRANCH_RANK, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02,
          torch.randn(n, BRANCH_RANK, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02)
    rows = []
    with torch.inference_mode():
        for m in (1, 4608):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            base = per_call_us(lambda x=x: torch.nn.functional.linear(x, w, b), args.calls)
            rows.append((f"torch F.linear bf16, M = {m}", base, base))
            for name, a8, branch in (("W1.58A16", False, None), (f"W1.58A16+r{BRANCH_RANK}", False, lr),
                                     ("W1.58A8", True, None), (f"W1.58A8+r{BRANCH_RANK}", True, lr)):
                us = per_call_us(lambda x=x, a8=a8, br=branch: F.linear(x, qw, b, a8, br), args.calls)
                rows.append((f"bitkernel {name}, M = {m}", us, base))
    print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | {args.calls} calls, K = N = {k}")
    print()
    print(markdown_table(["call", "host us per call", "vs torch F.linear"],
                         [[name, f"{us:.1f}", f"{us / base:.1f}x"] for name, us, base in rows]))


if __name__ == "__main__":
    main()
