"""Learned ternary codes in the end-to-end stage where they do not all fit the GPU: a rotating window.

Learning a layer's codes costs 16 bytes per weight on the GPU (float32 latent,
its gradient, two Adam moments): ~190 GB for FLUX.1-dev, against ~3 GB for the
packed model that the stage holds. So the stage learns the codes of a window of
consecutive layers at a time, in model order, each window for an equal share of
the steps, while every layer's scales and branches train throughout. A layer
entering the window gets its latent from the full-precision weight, clamped
into the bin of the code it has (the block stage's), so it starts where it is
and keeps how close each weight sits to a flip; leaving, its codes are packed
back into the 2-bit buffer, and the latent and its Adam state are freed. The
codes' learning rate follows its own cosine over each window's steps, so every
window starts at full rate and settles before it is frozen. A window has 1 / n
of the stage's steps; its rate is raised by sqrt(n) by default (engine.py,
e2e_window_lr): n times would let a code drift as far as when all learn at
once, but over few steps noisy gradients then flip codes at random. On the
testbed (12 windows) x1, x3 and x10 scored 71.2%, 74.0% and 66.0%, against
76.2% with every code at once and 66.0% with none.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .student import StudentLinear

BYTES_PER_CODE = 16  # float32 latent, gradient and two Adam moments


class CodeWindows:
    """Which layers learn their codes at which step of a stage of `steps` steps."""

    def __init__(self, layers: list[tuple[str, StudentLinear]], budget: int, steps: int,
                 load_weight: Callable[[str], Tensor], partition: Optional[list[list[str]]] = None) -> None:
        """`layers`: the ternary layers (name, module) in model order; `budget`: GPU bytes a window may
        take; `load_weight(name)`: a layer's full-precision weight. Layers larger than the budget keep
        their codes (see `skipped`). `partition`: the windows by layer name of an earlier run, taken where
        they are of these layers and every window fits the budget (a continued run keeps its windows)."""
        size = {name: BYTES_PER_CODE * lin.qweight.shape[0] * lin.in_features for name, lin in layers}
        by_name = dict(layers)
        if partition is not None and all(n in by_name for w in partition for n in w) and all(
            sum(size[n] for n in w) <= budget for w in partition
        ):
            self.windows = [[(n, by_name[n]) for n in w] for w in partition]
            kept = {n for w in partition for n in w}
            self.skipped = [name for name, _ in layers if name not in kept]
        else:
            self.windows, self.skipped = [], []
            cur: list[tuple[str, StudentLinear]] = []
            used = 0
            for name, lin in layers:
                if size[name] > budget:
                    self.skipped.append(name)
                    continue
                if cur and used + size[name] > budget:
                    self.windows.append(cur)
                    cur, used = [], 0
                cur.append((name, lin))
                used += size[name]
            if cur:
                self.windows.append(cur)
        self.steps, self.load_weight = steps, load_weight
        self.current = -1  # the window whose codes are being learned (-1: none)

    def __len__(self) -> int:
        return len(self.windows)

    def index(self, step: int) -> int:
        """The window of `step`: window i takes the steps from ceil(i * steps / n) on."""
        return step * len(self.windows) // self.steps

    def _start(self, i: int) -> int:
        return -(-i * self.steps // len(self.windows))

    def lr_factor(self, step: int) -> float:
        """Cosine from 1 to 0 over the steps of the window of `step`."""
        i = self.index(step)
        a, b = self._start(i), self._start(i + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - a) / max(b - a, 1)))

    def enter(self, i: int, opt: torch.optim.Optimizer, lr: float) -> None:
        """Starts learning window i's codes: their latents become a parameter group of `opt`."""
        params = [lin.learn_codes(self.load_weight(name)) for name, lin in self.windows[i]]
        opt.add_param_group({"params": params, "lr": lr, "base_lr": lr, "codes": True})
        self.current = i

    def leave(self, opt: torch.optim.Optimizer) -> None:
        """Freezes the current window's codes into the packed buffers and frees the latents."""
        if self.current < 0:
            return
        for group in opt.param_groups:
            if group.get("codes"):
                for p in group["params"]:
                    opt.state.pop(p, None)
        opt.param_groups[:] = [g for g in opt.param_groups if not g.get("codes")]
        for _, lin in self.windows[self.current]:
            lin.freeze_codes()
        self.current = -1

    def checkpoint(self, step: int) -> bool:
        """Whether the stage may save its progress before `step`: only between windows (no latent is
        alive then), about 20 times over the stage (with fewer windows, at each window's start)."""
        i = self.index(step)
        return step == self._start(i) and i % max(1, len(self.windows) // 20) == 0

    def buffers(self) -> dict[str, Tensor]:
        """The packed codes the windows change, by layer (saved with the stage's progress)."""
        return {f"{name}.qweight": lin.qweight for w in self.windows for name, lin in w}
