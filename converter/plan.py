"""The conversion plan: every output tensor's name, dtype and shape, known before any data is read.

The streaming writer needs the whole header first, and `--dry-run` prints this
plan and the exact output size without reading a single weight.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from ._version import __version__
from .architecture import Architecture, block_linears, expected_shapes
from .fileformat import BitfluxHeader, LayerSpec, layer_tensors
from .methods import method_settings
from .rules import Rule, assign_formats
from .safetensors_io import PlannedTensor, planned_file_size
from .sources import Source

HASH_PLACEHOLDER = "0" * 64  # same length as the real sha256, filled in when the hash is done


@dataclass
class PlanItem:
    """One unit of work: a block linear (weight + bias -> its packed tensors) or one other tensor."""

    name: str  # layer prefix, or tensor key for a plain tensor
    spec: Optional[LayerSpec]  # None for a plain tensor (stored bf16 under its own name)
    source_keys: list[str]
    outputs: list[PlannedTensor]
    source_bytes: int


@dataclass
class Plan:
    arch: Architecture
    items: list[PlanItem]
    header: BitfluxHeader
    source_bytes: int
    layer_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [t for item in self.items for t in item.outputs]

    def metadata(self) -> dict[str, str]:
        return self.header.to_metadata()

    def output_bytes(self) -> int:
        """The exact size of the file (the header with its reserved space included)."""
        return planned_file_size(self.tensors, self.metadata())

    def summary(self) -> str:
        """What --dry-run prints: formats, parameter and byte counts, expected size."""
        a = self.arch
        lines = [
            f"source:  {self.header.source['file']} ({self.header.source['layout']} layout, "
            f"{self.header.source['dtype']}, {_gb(self.source_bytes)})",
            f"model:   FLUX hidden {a.hidden_size} ({a.num_heads} heads), {a.depth} double + "
            f"{a.depth_single_blocks} single blocks, MLP ratio {a.mlp_ratio:g}, in_channels {a.in_channels}, "
            f"context {a.context_in_dim}, vector {a.vec_in_dim}, guidance {'yes' if a.guidance_embed else 'no'}",
            f"method:  {self.header.method['name']}",
            "",
            f"{'format':<12}{'layers':>8}{'params':>16}{'bytes':>16}",
        ]
        count: Counter[str] = Counter()
        params: Counter[str] = Counter()
        nbytes: Counter[str] = Counter()
        for item in self.items:
            label = item.spec.label if item.spec else "bf16 (other)"
            count[label] += 1 if item.spec else 0
            params[label] += _params(self, item)
            nbytes[label] += sum(t.nbytes for t in item.outputs)
        for label in sorted(count, key=lambda x: (x == "bf16 (other)", x)):
            n = str(count[label]) if label != "bf16 (other)" else "-"
            lines.append(f"{label:<12}{n:>8}{params[label]:>16,}{nbytes[label]:>16,}")
        out = self.output_bytes()
        lines += [
            "",
            f"output:  {out:,} bytes ({_gb(out)}), {len(self.tensors)} tensors; "
            f"{self.source_bytes / out:.2f}x smaller than the source",
        ]
        return "\n".join(lines)


def _params(plan: Plan, item: PlanItem) -> int:
    if item.spec is None:
        return int(torch.Size(item.outputs[0].shape).numel())
    n, k = plan.layer_shapes[item.name]
    return n * k


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def layer_shapes_of(arch: Architecture) -> dict[str, tuple[int, int]]:
    """Block linear name -> (out_features, in_features)."""
    shapes = expected_shapes(arch)
    return {name: (shapes[f"{name}.weight"][0], shapes[f"{name}.weight"][1]) for name in block_linears(arch)}


def build_plan(
    source: Source,
    arch: Architecture,
    rules: list[Rule],
    default: LayerSpec,
    method: str,
    specs: Optional[dict[str, LayerSpec]] = None,
    calibration: Optional[dict] = None,
) -> Plan:
    """Assigns formats (or takes `specs`, e.g. a calibration's mixed-precision plan) and lists
    every output tensor in model order."""
    shapes = expected_shapes(arch)
    layer_shapes = layer_shapes_of(arch)
    total_bytes = source.total_bytes()
    if specs is None:
        specs = assign_formats(layer_shapes, rules, default)
    items: list[PlanItem] = []
    done: set[str] = set()
    for key in shapes:
        if key in done:
            continue
        prefix = key.rsplit(".", 1)[0]
        if prefix in specs and key.endswith(".weight"):
            n, k = layer_shapes[prefix]
            bias_key = f"{prefix}.bias"
            keys = [key] + ([bias_key] if bias_key in shapes else [])
            outputs = layer_tensors(prefix, specs[prefix], n, k, bias_key in shapes)
            items.append(PlanItem(prefix, specs[prefix], keys, outputs, sum(source.tensors[s].nbytes for s in keys)))
            done.update(keys)
        else:
            out = [PlannedTensor(key, torch.bfloat16, shapes[key])]
            items.append(PlanItem(key, None, [key], out, source.tensors[key].nbytes))
    header = BitfluxHeader(
        architecture=arch.to_dict(),
        layers=specs,
        method={
            **method_settings(method),
            "calibration": calibration,
            "default_format": default.label,
            "rules": [f"{r.pattern}={r.spec.label}" for r in rules],
        },
        source={
            "file": source.name,
            "sha256": HASH_PLACEHOLDER,
            "layout": source.layout,
            "dtype": source.dtype_summary(),
            "bytes": total_bytes,
        },
        converter_version=__version__,
    )
    return Plan(arch, items, header, total_bytes, layer_shapes)
