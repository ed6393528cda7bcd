"""Which layers run with 8-bit activations (W1.58A8): all that can, except the most sensitive.

Quantizing a linear's input per token to int8 (docs/FORMAT.md, "Activations")
lets it run on INT8/FP8 tensor cores, but a few layers feed errors into
everything after them. Each eligible layer (ternary or int8 weights with one
scale per row, not pinned by a --rule) is measured alone, as sensitivity.py
measures formats: its input rounded per token as bitkernel rounds it on the
calibrating device (int8, or e4m3 where the FP8 path runs ternary layers:
sm_89+) in the full-precision block, the block's outputs on the teacher's inputs compared with the exact
ones (image-token error + content_weight x text-token error). The `a8_keep`
fraction of eligible layers with the largest error stay A16; the rest become
A8. Layers a --rule names keep the activations the rule gives them and are
not counted. Calibration then trains those layers with their activations quantized
(student.py), so scales, codes and branches compensate for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ContextManager

from torch import nn

from ..fileformat import LayerSpec
from .sensitivity import block_errors
from .state import ACT_SENSITIVITY_FILE
from .student import act_rounding, fake_quant_act

if TYPE_CHECKING:
    from .engine import Calibrator

def measure_acts(cal: Calibrator, xt: Any) -> dict[str, float]:
    """layer -> sensitivity of the block's output to that layer's A8, for every eligible layer."""

    def rounded(layer: str, mod: nn.Module) -> Iterator[tuple[str, ContextManager[Any]]]:
        if layer not in cal.pinned and cal.specs[layer].a8_capable:
            yield "a8", _inputs_rounded(mod, act_rounding(cal.specs[layer].format, cal.device))

    out = block_errors(cal, xt, ACT_SENSITIVITY_FILE, "act_sensitivity", rounded)
    return {layer: e["a8"]["quality"] + cal.s.content_weight * e["a8"]["content"] for layer, e in out.items()}


@contextlib.contextmanager
def _inputs_rounded(mod: nn.Module, rounding: str) -> Iterator[None]:
    hook = mod.register_forward_pre_hook(lambda m, args: (fake_quant_act(args[0], rounding),))
    try:
        yield
    finally:
        hook.remove()


def plan_acts(cal: Calibrator, xt: Any) -> tuple[dict[str, LayerSpec], dict[str, Any]]:
    """New specs with A8 on every eligible layer but the a8_keep most sensitive, and the plan's record."""
    sens = measure_acts(cal, xt)
    ranked = sorted(sens, key=sens.get, reverse=True)
    pinned = [k for k in cal.specs if k in cal.pinned]
    keep = set(ranked[: math.ceil(cal.s.a8_keep * len(ranked))])
    specs = dict(cal.specs)
    for layer in ranked:
        specs[layer] = dataclasses.replace(specs[layer], act="a16" if layer in keep else "a8")
    if cal.show_progress:
        print(f"activations: {len(ranked) - len(keep)} of {len(ranked)} eligible layers A8; A16 kept for the "
              f"{len(keep)} most sensitive" + (f"; {len(pinned)} layers a --rule names keep its activations"
                                              if pinned else ""), flush=True)
    roundings = sorted({act_rounding(cal.specs[k].format, cal.device) for k in ranked})
    record = {"keep": cal.s.a8_keep, "a16": sorted(keep), "sensitivity": sens, "rounding": roundings}
    return specs, record
