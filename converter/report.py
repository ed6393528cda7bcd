"""The conversion report: sizes, per-layer weight SQNR, time, peak memory."""

from __future__ import annotations

import math
import resource
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """10 log10(|w|^2 / |w - w_hat|^2) in dB; inf when the error is zero."""
    w = w.float().reshape(-1)
    err = w - w_hat.float().reshape(-1)
    # dot products: BLAS-fast and accurate enough (blocked float32 sums) for dB to two decimals
    signal, noise = torch.dot(w, w).item(), torch.dot(err, err).item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def peak_rss_bytes() -> int:
    """Peak resident set of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@dataclass
class LayerStat:
    name: str
    format: str  # LayerSpec.label
    params: int
    sqnr_db: float


@dataclass
class ConversionReport:
    source: str
    output: Optional[str]
    dry_run: bool
    layout: str
    source_dtype: str
    method: str
    device: str
    architecture: dict[str, Any]
    source_bytes: int
    output_bytes: int
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    ignored_tensors: int = 0
    layers: list[LayerStat] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    plan: str = ""  # the plan's summary (printed by a dry run)
    calibration: Optional[dict[str, Any]] = None  # the file's `calibration` record, when calibrated

    @property
    def ratio(self) -> float:
        return self.source_bytes / self.output_bytes if self.output_bytes else 0.0

    def worst(self, n: int = 5) -> list[LayerStat]:
        return sorted(self.layers, key=lambda s: s.sqnr_db)[:n]

    def mean_sqnr_by_format(self) -> dict[str, float]:
        """Parameter-weighted mean SQNR (dB) per format."""
        total: Counter[str] = Counter()
        weight: Counter[str] = Counter()
        for s in self.layers:
            if math.isfinite(s.sqnr_db):
                total[s.format] += s.sqnr_db * s.params
                weight[s.format] += s.params
        return {k: total[k] / weight[k] for k in weight}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        for s in d["layers"]:
            s["sqnr_db"] = s["sqnr_db"] if math.isfinite(s["sqnr_db"]) else None
        return d

    def to_text(self) -> str:
        if self.dry_run:
            return f"{self.plan}\n\ndry run: nothing was written"
        lines = [
            f"wrote {self.output}",
            f"  source  {self.source}: {self.source_bytes:,} bytes ({self.source_bytes / 1e9:.2f} GB, "
            f"{self.layout} layout, {self.source_dtype})",
            f"  output  {self.output_bytes:,} bytes ({self.output_bytes / 1e9:.2f} GB), {self.ratio:.2f}x smaller",
            "  layers  " + ", ".join(f"{n} {f}" for f, n in sorted(self.formats.items())) + f"; method {self.method}",
        ]
        if self.ignored_tensors:
            lines.append(f"  ignored {self.ignored_tensors} tensors outside the transformer (VAE, text encoders)")
        if self.layers:
            means = ", ".join(f"{f} {v:.2f} dB" for f, v in sorted(self.mean_sqnr_by_format().items()))
            lines.append(f"  weight SQNR (parameter-weighted mean): {means or 'exact'}")
            lines.append(
                "  worst layers: " + ", ".join(f"{s.name} ({s.format}) {s.sqnr_db:.2f} dB" for s in self.worst())
            )
        gpu = f", peak GPU memory {self.peak_gpu_bytes / 2**30:.2f} GiB" if self.peak_gpu_bytes else ""
        if self.calibration:
            c = self.calibration
            errs = c["block_error"]
            mean = lambda key: sum(e[key] for e in errs.values()) / max(len(errs), 1)  # noqa: E731
            lines.append(
                f"  calibration {c['samples']} samples from {c['conditioning']['prompts']} prompts, "
                f"{c['seconds']:.0f} s; mean block error {mean('before'):.4f} after rounding, "
                f"{mean('after'):.4f} after distillation"
            )
        lines.append(
            f"  time {self.seconds:.1f} s on {self.device}, peak RSS {self.peak_rss_bytes / 2**30:.2f} GiB{gpu}"
        )
        return "\n".join(lines)
