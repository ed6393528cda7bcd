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

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ContextManager

import torch
from torch import nn

import bitkernel.functional as BF

from ..fileformat import LayerSpec
from ..methods import quantize_weight
from ..rules import parse_format
from .acts import Acts
from .lowrank import with_branch
from .mixed import candidate_bytes, format_plan, parse_budget, plan_metadata, solve_assignment
from .state import SENSITIVITY_FILE
from .streamed import block_layers

if TYPE_CHECKING:
    from .engine import Calibrator

MAX_SAMPLES = 32  # per block: enough to rank layers, a fraction of the calibration time


Errors = dict[str, dict[str, dict[str, float]]]  # layer -> variant label -> {"quality", "content"}
Variants = Callable[[str, nn.Module], Iterator[tuple[str, ContextManager[Any]]]]


def block_errors(cal: Calibrator, xt: Acts, file: str, stage: str, variants: Variants) -> Errors:
    """Each perturbation variants(layer, module) yields, applied alone inside the layer's full-precision
    block: the block's relative output error on (a subset of) the teacher's inputs, image tokens (quality)
    and text tokens (content). Saved in the state folder as `file`, so a resumed run does not measure again."""
    saved = cal.state.load_json(file)
    if saved is not None:
        return saved
    t0 = time.monotonic()
    sub = _subset(xt, MAX_SAMPLES)
    out: Errors = {}
    for bi, name in enumerate(cal.blocks):
        last = bi == len(cal.blocks) - 1
        fp = cal.model.block(name)
        ref = cal._forward(fp, sub)
        for layer in block_layers(name):
            for label, perturbed in variants(layer, fp.get_submodule(layer[len(name) + 1 :])):
                with perturbed:
                    got = cal._forward(fp, sub)
                out.setdefault(layer, {})[label] = {
                    "quality": _rel_error(got.img, ref.img),
                    "content": 0.0 if last else _rel_error(got.txt, ref.txt),
                }
        sub = ref
    cal.seconds[stage] = time.monotonic() - t0
    cal.state.save_json(file, out)
    return out


def measure(cal: Calibrator, xt: Acts) -> Errors:
    """layer -> candidate label -> {"quality", "content"} (bf16 is the reference: 0)."""

    def formats(layer: str, mod: nn.Module) -> Iterator[tuple[str, ContextManager[Any]]]:
        w = cal.model.weight(layer)
        for label in cal.s.candidates:
            spec = parse_format(label)
            if spec.quantized:
                yield label, _weight_swapped(mod, BF.dequantize(quantize_weight(w, spec, cal.method)))

    out = block_errors(cal, xt, SENSITIVITY_FILE, "sensitivity", formats)
    layers = [layer for name in cal.blocks for layer in block_layers(name)]
    return {layer: {"bf16": {"quality": 0.0, "content": 0.0}, **out.get(layer, {})} for layer in layers}


@contextlib.contextmanager
def _weight_swapped(mod: nn.Module, weight: torch.Tensor) -> Iterator[None]:
    original = mod.weight.data
    mod.weight.data = weight.to(original.dtype)
    try:
        yield
    finally:
        mod.weight.data = original


def _subset(acts: Acts, n: int) -> Acts:
    # evenly over the set, which is ordered timestep-major: every kept timestep is represented
    idx = torch.linspace(0, len(acts) - 1, min(n, len(acts))).round().long().unique()
    return Acts(acts.img[idx].clone(), acts.txt[idx].clone(), acts.lens[idx], acts.vec[idx])


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).sum() / b.float().pow(2).sum().clamp_min(1e-30))


def _with_act(spec: LayerSpec, act: str) -> LayerSpec:
    """Keeps the layer's requested int8 activations where the chosen format can run them."""
    if act == "a8" and spec.a8_capable:
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
        if layer in cal.pinned:  # run() gives every ternary layer the branch, pinned ones too
            layers[layer] = {spec.label: (candidate_bytes(with_branch(spec, cal.s.lowrank), n, k, bias), 0.0)}
            continue
        cands = {}
        for label in cal.s.candidates:
            cspec = with_branch(parse_format(label), cal.s.lowrank)
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
