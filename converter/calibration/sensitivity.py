"""Per-layer sensitivity to each candidate format, then the budgeted plan (MixDQ, adapted to FLUX).

MixDQ measures how much quantizing one layer alone changes the output and
separates content (does the image still show what the prompt asks) from
quality (how clean it is). FLUX has no cross-attention to single out, but its
two token streams play those roles: the text tokens carry the prompt into every
joint attention (content), the image tokens carry the picture (quality). For
each block linear and candidate format, that layer alone is quantized (plain
rounding, no GPTQ: a conservative ranking) and the block's outputs on the
teacher's inputs are compared with the full-precision outputs:

    quality = ||d img||^2 / ||img||^2,   content = ||d txt||^2 / ||txt||^2
    sensitivity = quality + content_weight * content

(the last block's text tokens are discarded by the model: content 0 there).
Block-local relative errors are comparable across blocks because every block
adds to the same residual stream. The integer program (mixed.py) then picks
one format per layer under the budget. Layers a --rule names keep their format.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import torch

import bitkernel.functional as BF

from ..fileformat import LayerSpec
from ..methods import quantize_weight
from ..rules import parse_format
from .acts import Acts
from .mixed import candidate_bytes, format_plan, parse_budget, plan_metadata, solve_assignment
from .state import SENSITIVITY_FILE
from .streamed import block_layers

if TYPE_CHECKING:
    from .engine import Calibrator

MAX_SAMPLES = 32  # per block: enough to rank layers, a fraction of the calibration time


def measure(cal: Calibrator, xt: Acts) -> dict[str, dict[str, dict[str, float]]]:
    """layer -> candidate label -> {"quality", "content"} (bf16 is the reference: 0)."""
    saved = cal.state.load_json(SENSITIVITY_FILE)
    if saved is not None:
        return saved
    t0 = time.monotonic()
    sub = subset(xt, MAX_SAMPLES)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for bi, name in enumerate(cal.blocks):
        last = bi == len(cal.blocks) - 1
        fp = cal.model.block(name)
        ref = cal._forward(fp, sub)
        for layer in block_layers(name):
            mod = fp.get_submodule(layer[len(name) + 1 :])
            w = cal.model.weight(layer)
            original = mod.weight.data
            out[layer] = {"bf16": {"quality": 0.0, "content": 0.0}}
            for label in cal.s.candidates:
                spec = parse_format(label)
                if not spec.quantized:
                    continue
                mod.weight.data = BF.dequantize(quantize_weight(w, spec, cal.method)).to(original.dtype)
                try:
                    got = cal._forward(fp, sub)
                finally:
                    mod.weight.data = original
                out[layer][label] = {
                    "quality": rel_error(got.img, ref.img),
                    "content": 0.0 if last else rel_error(got.txt, ref.txt),
                }
        sub = ref
    cal.seconds["sensitivity"] = time.monotonic() - t0
    cal.state.save_json(SENSITIVITY_FILE, out)
    return out


def subset(acts: Acts, n: int) -> Acts:
    # evenly over the set, which is ordered timestep-major: every kept timestep is represented
    idx = torch.linspace(0, len(acts) - 1, min(n, len(acts))).round().long().unique()
    return Acts(acts.img[idx].clone(), acts.txt[idx].clone(), acts.lens[idx], acts.vec[idx])


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).sum() / b.float().pow(2).sum().clamp_min(1e-30))


def _with_act(spec: LayerSpec, act: str) -> LayerSpec:
    """Keeps the layer's requested int8 activations where the chosen format can run them."""
    if act == "a8" and spec.format in ("ternary", "int8") and not spec.group_size:
        return dataclasses.replace(spec, act="a8")
    return spec


def plan_formats(cal: Calibrator, xt: Acts) -> tuple[dict[str, LayerSpec], dict[str, Any]]:
    """New per-layer specs under cal.s.budget and the plan's metadata record."""
    sens = measure(cal, xt)
    shapes = cal.source.shapes()
    layers: dict[str, dict[str, tuple[int, float]]] = {}
    total_params = 0
    for layer, spec in cal.specs.items():
        n, k = shapes[f"{layer}.weight"]
        total_params += n * k
        bias = f"{layer}.bias" in shapes
        if layer in cal.pinned:
            if spec.format == "ternary" and cal.s.lowrank:  # run() gives every ternary layer the branch
                spec = dataclasses.replace(spec, lora_rank=cal.s.lowrank)
            layers[layer] = {spec.label: (candidate_bytes(spec, n, k, bias), 0.0)}
            continue
        cands = {}
        for label in cal.s.candidates:
            cspec = parse_format(label)
            if cspec.format == "ternary" and cal.s.lowrank:
                cspec = LayerSpec("ternary", cspec.group_size, lora_rank=cal.s.lowrank)
            s = sens[layer][label]
            cands[label] = (candidate_bytes(cspec, n, k, bias), s["quality"] + cal.s.content_weight * s["content"])
        layers[layer] = cands
    budget = parse_budget(cal.s.budget, total_params)
    assignment = solve_assignment(layers, budget)
    if cal.show_progress:
        print(format_plan(assignment, layers, total_params), flush=True)
    specs = {layer: cal.specs[layer] if layer in cal.pinned else _with_act(parse_format(label), cal.specs[layer].act)
             for layer, label in assignment.items()}
    record = plan_metadata(assignment, layers, budget, total_params)
    record["content_weight"] = cal.s.content_weight
    record["sensitivity"] = sens
    return specs, record
