"""Converter memory / time benchmark on a full-size FLUX.1-dev checkpoint with random weights.

    python bench/convert_memory.py                      # full size: 23.8 GB bf16, BFL file then diffusers folder
    python bench/convert_memory.py --scale 0.1          # quick run: hidden 1024 (about 2.6 GB), same depths
    python bench/convert_memory.py --dry-run            # sparse files, plan and output size only (seconds)
    python bench/convert_memory.py --layouts bfl --device cpu --out bench/results/convert_memory.md

For each layout it generates the checkpoint (real BFL key names and shapes; the
diffusers layout as `transformer/` shards of at most 10 GB x scale with an index,
written through converter.keymap, no diffusers import), in a child process that
streams one tensor at a time, then runs `converter/convert.py` on it in another
child, and measures wall time and peak RSS (/usr/bin/time -v where present, else
the converter's own getrusage). The checkpoint is deleted before the next
layout is generated, so the disk holds one source and the outputs at a time.
Both layouts hold the same BFL tensors, so their outputs must be identical
except for the `source` metadata: the script checks that too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import zlib
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from report_table import markdown_table  # noqa: E402  (bench/ is on sys.path when this script runs)

from converter import keymap  # noqa: E402
from converter.architecture import FLUX1_DEV, HEAD_DIM, Architecture, expected_shapes  # noqa: E402
from converter.safetensors_io import (  # noqa: E402
    PlannedTensor,
    SafetensorsReader,
    StreamingWriter,
    encode_header,
)
from converter.sources import DIFFUSERS_INDEX  # noqa: E402

POOL = 1 << 26  # random values reused (at per-tensor offsets) so generation is disk-bound, not RNG-bound


def architecture(scale: float) -> Architecture:
    """FLUX.1-dev at scale 1; smaller scales shrink the hidden size (parameters ~ hidden^2) in whole heads."""
    hidden = max(HEAD_DIM, round(FLUX1_DEV.hidden_size * math.sqrt(scale) / HEAD_DIM) * HEAD_DIM)
    return dataclasses.replace(FLUX1_DEV, hidden_size=hidden, num_heads=hidden // HEAD_DIM)


class RandomWeights:
    """Deterministic per-name tensors: the same BFL tensor whichever layout asks for it."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.pool = (torch.randn(POOL, generator=gen) * 0.02).to(torch.bfloat16)

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        off = zlib.crc32(name.encode()) % POOL
        if n > POOL:
            flat = self.pool.repeat(n // POOL + 1)[:n]
        elif off + n <= POOL:
            flat = self.pool[off : off + n]
        else:
            flat = torch.cat([self.pool[off:], self.pool[: n - (POOL - off)]])
        t = flat.reshape(shape)
        if name.endswith(".scale"):  # q/k RMSNorm scales sit near 1
            t = t + 1
        return t.contiguous()


def diffusers_tensors(arch: Architecture) -> list[tuple[str, tuple[int, ...], str, int, int, bool]]:
    """(diffusers name, shape, BFL name, row start, rows, swapped) for every diffusers tensor."""
    shapes = expected_shapes(arch)
    out = []
    for bfl, m in keymap.tensor_map(arch.depth, arch.depth_single_blocks).items():
        if bfl not in shapes:
            continue
        shape = shapes[bfl]
        sizes = keymap.split_sizes(bfl, arch.hidden_size, arch.mlp_hidden) or [shape[0]]
        start = 0
        for name, rows in zip(m.diffusers, sizes):
            out.append((name, (rows, *shape[1:]), bfl, start, rows, m.swap_halves))
            start += rows
    return out


def write_tensors(
    file: str, tensors: list[tuple[str, tuple[int, ...]]], fetch: Callable[[str], torch.Tensor], sparse: bool = False
) -> None:
    """A bf16 safetensors file of `tensors` (name, shape), each from fetch(name), one in memory at a time.
    `sparse`: header only, data a hole (fetch is not called)."""
    plan = [PlannedTensor(n, torch.bfloat16, s) for n, s in tensors]
    if sparse:
        with open(file, "wb") as f:
            f.write(encode_header(plan, {}))
            f.truncate(f.tell() + sum(t.nbytes for t in plan))
        return
    writer = StreamingWriter(file, plan, {}, reserve=0)
    try:
        for n, _ in tensors:
            writer.write(n, fetch(n))
        writer.finish()
    finally:
        writer.close()


def write_bfl(path: str, arch: Architecture, sparse: bool = False) -> None:
    """A BFL-layout checkpoint of `arch` with random weights (sparse: header only, data a hole)."""
    shapes = expected_shapes(arch)
    weights = None if sparse else RandomWeights()
    write_tensors(path, list(shapes.items()), lambda n: weights.get(n, shapes[n]), sparse)


def generate(layout: str, path: str, scale: float, sparse: bool) -> dict[str, Any]:
    """Writes the checkpoint, one tensor in memory at a time. `sparse`: header only, data a hole."""
    start = time.monotonic()
    arch = architecture(scale)
    shapes = expected_shapes(arch)

    if layout == "bfl":
        write_bfl(path, arch, sparse)
    else:
        weights = None if sparse else RandomWeights()
        os.makedirs(path, exist_ok=True)
        parts = diffusers_tensors(arch)
        by_name = {p[0]: p for p in parts}

        def fetch(name: str) -> torch.Tensor:
            _, _, bfl, row, rows, swap = by_name[name]
            full = weights.get(bfl, shapes[bfl])
            full = keymap.swap_halves(full) if swap else full
            return full[row : row + rows].contiguous()

        limit = 10e9 * scale  # diffusers' default max_shard_size is 10GB
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape, *_ in parts:
            nbytes = 2 * math.prod(shape)
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append((name, shape))
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_tensors(os.path.join(path, file), shard, fetch, sparse)
            weight_map.update(dict.fromkeys((n for n, _ in shard), file))
        total = sum(2 * math.prod(s) for _, s, *_ in parts)
        with open(os.path.join(path, DIFFUSERS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return {
        "seconds": time.monotonic() - start,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "bytes": _size(path),
    }


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def run_converter(src: str, out: str, args: argparse.Namespace) -> dict[str, Any]:
    report = out + ".report.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "converter", "convert.py"),
        src,
        "-o",
        out,
        "--force",
        "--quiet",
        "--method",
        args.method,
        "--report-json",
        report,
    ]
    if args.device:
        cmd += ["--device", args.device]
    if args.dry_run:
        cmd.append("--dry-run")
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if timer:
        cmd = [timer, "-v", *cmd]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"converter failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    print(proc.stdout, flush=True)
    data = json.loads(open(report).read())
    os.unlink(report)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    data["wall_s"] = wall
    data["time_v_peak_rss_bytes"] = int(m.group(1)) * 1024 if m else None
    return data


def same_tensors(a: str, b: str) -> bool:
    """Equal tensors and metadata except `source`, compared one tensor at a time."""
    with SafetensorsReader(a) as ra, SafetensorsReader(b) as rb:
        if ra.tensors.keys() != rb.tensors.keys():
            return False
        strip = lambda m: {k: v for k, v in m.items() if k != "source"}  # noqa: E731
        if strip(ra.metadata) != strip(rb.metadata):
            return False
        return all(torch.equal(ra.read(n).view(torch.uint8), rb.read(n).view(torch.uint8)) for n in ra.tensors)


def _gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of FLUX.1-dev's parameter count (1.0: full)")
    p.add_argument("--layouts", nargs="+", choices=("bfl", "diffusers"), default=["bfl", "diffusers"])
    p.add_argument("--workdir", default=os.path.join(ROOT, "out", "convert_memory"))
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="converter --device (default: its own)")
    p.add_argument("--method", choices=("mse", "absmean"), default="mse")
    p.add_argument("--dry-run", action="store_true", help="sparse checkpoints and converter --dry-run only")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints and outputs")
    p.add_argument("--out", help="also write the table (markdown) here")
    p.add_argument("--_generate", nargs=2, metavar=("LAYOUT", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._generate:  # child process: generate and report its own time and memory
        print(json.dumps(generate(args._generate[0], args._generate[1], args.scale, args.dry_run)))
        return

    arch = architecture(args.scale)
    total = sum(2 * math.prod(s) for s in expected_shapes(arch).values())
    os.makedirs(args.workdir, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    if not args.dry_run and free < total * 1.3 + (1 << 30):
        raise SystemExit(f"{args.workdir}: {free / 1e9:.1f} GB free, need about {total * 1.3 / 1e9:.1f} GB")
    print(
        f"FLUX hidden {arch.hidden_size}, {arch.depth}+{arch.depth_single_blocks} blocks, "
        f"{total / 1e9:.2f} GB bf16; torch {torch.__version__}, {os.cpu_count()} CPUs",
        flush=True,
    )
    rows, outputs = [], {}
    for layout in args.layouts:
        src = os.path.join(args.workdir, "flux1-dev-random.safetensors" if layout == "bfl" else "transformer")
        out = os.path.join(args.workdir, f"bitflux-from-{layout}.safetensors")
        _remove(src)
        gen = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--scale", str(args.scale), "--_generate", layout, src]
            + (["--dry-run"] if args.dry_run else []),
            capture_output=True,
            text=True,
        )
        if gen.returncode != 0:
            raise SystemExit(f"generation failed:\n{gen.stderr[-4000:]}")
        g = json.loads(gen.stdout.strip().splitlines()[-1])
        print(
            f"{layout}: generated {g['bytes'] / 1e9:.2f} GB in {g['seconds']:.0f} s "
            f"(peak RSS {_gib(g['peak_rss_bytes'])} GiB)",
            flush=True,
        )
        c = run_converter(src, out, args)
        if not args.keep:
            _remove(src)
        outputs[layout] = out
        sqnr = c["layers"] and sum(s["sqnr_db"] * s["params"] for s in c["layers"] if s["sqnr_db"] is not None) / sum(
            s["params"] for s in c["layers"] if s["sqnr_db"] is not None
        )
        rows.append(
            [
                layout,
                f"{g['bytes'] / 1e9:.2f}",
                f"{g['seconds']:.0f}",
                _gib(g["peak_rss_bytes"]),
                f"{c['wall_s']:.0f}",
                _gib(c["time_v_peak_rss_bytes"]),
                _gib(c["peak_rss_bytes"]),
                _gib(c.get("peak_gpu_bytes") or None),
                c["device"],
                f"{c['output_bytes']:,}",
                f"{c['ratio']:.2f}",
                f"{sqnr:.2f}" if sqnr else "-",
            ]
        )
    head = [
        "layout",
        "source GB",
        "gen s",
        "gen peak RSS GiB",
        "convert wall s",
        "convert peak RSS GiB (time -v)",
        "converter ru_maxrss GiB",
        "peak GPU GiB",
        "device",
        "output bytes",
        "ratio",
        "mean SQNR dB",
    ]
    lines = [markdown_table(head, rows)]
    if not args.dry_run and len(outputs) == 2:
        same = same_tensors(outputs["bfl"], outputs["diffusers"])
        lines.append(f"\nBFL and diffusers outputs identical (tensors and metadata except source): {same}")
    if not args.keep:
        for out in outputs.values():
            _remove(out)
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"FLUX hidden {arch.hidden_size} (scale {args.scale}), method {args.method}\n\n{table}\n")


if __name__ == "__main__":
    main()
