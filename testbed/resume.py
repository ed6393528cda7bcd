"""Compact training checkpoints, so that training can span several GPU commands.

One device command may run at most 10 minutes, its machine is wiped afterwards,
and what it leaves under $OUT comes back only as at most 8 files of at most
16 MiB each, 64 MiB together; the next command gets it back through `carry`,
which is also limited to 64 MiB.  So a checkpoint is

    state.json                  step, seconds trained, run count, arguments, loss history
    ckpt-00000.safetensors ...  at most MAX_SHARDS shards of at most SHARD_BYTES each

holding the trained weights of transformer and text encoder, AdamW's two moments
(all bf16: one rounding of the fp32 master weights costs about one optimizer
step of noise), and the data generator's state.  Not saved: the EMA (decay
0.999, a horizon of 1,000 steps, about 15 s of training on an H100), which
restarts from the weights on resume.  For the testbed's 7.7 M parameters that is
46.2 MB in 4 shards.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
SHARD_PATTERN = "ckpt-{:05d}.safetensors"
SHARD_BYTES = 15_000_000  # tensor bytes per shard: with its header, under 16 MiB and 16,000,000 B
MAX_SHARDS = 6
FORMAT = "testbed-train-v1"


def save_training_state(directory: str, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> list[str]:
    """Write `tensors` (already in their stored dtypes) into shards and `state`
    (JSON-serialisable) into state.json; returns the paths written.  Earlier
    shards in `directory` are removed first."""
    os.makedirs(directory, exist_ok=True)
    for old in glob.glob(os.path.join(directory, "ckpt-*.safetensors")) + [os.path.join(directory, STATE_FILE)]:
        if os.path.exists(old):
            os.remove(old)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        if size > SHARD_BYTES:
            raise ValueError(f"tensor {name} has {size} bytes, more than a shard ({SHARD_BYTES})")
        if used + size > SHARD_BYTES:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += size
    if len(shards) > MAX_SHARDS:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        raise ValueError(f"checkpoint of {total} bytes needs {len(shards)} shards, more than {MAX_SHARDS}")
    paths = []
    for i, shard in enumerate(shards):
        path = os.path.join(directory, SHARD_PATTERN.format(i))
        save_file(shard, path, metadata={"format": FORMAT})
        os.chmod(path, 0o644)
        paths.append(path)
    state = {"format": FORMAT, "shards": [os.path.basename(p) for p in paths], **state}
    state_path = os.path.join(directory, STATE_FILE)
    with open(state_path, "w") as f:
        json.dump(state, f, indent=1)
    return [*paths, state_path]


def load_training_state(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state) as written by save_training_state."""
    with open(os.path.join(directory, STATE_FILE)) as f:
        state = json.load(f)
    if state.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a {FORMAT} checkpoint (format {state.get('format')!r})")
    tensors: dict[str, torch.Tensor] = {}
    for name in state["shards"]:
        tensors.update(load_file(os.path.join(directory, name)))
    return tensors, state


def module_tensors(
    prefix: str, module: torch.nn.Module, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v.detach().to(dtype) for k, v in module.state_dict().items()}


def load_module(prefix: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    sd = {k: tensors[f"{prefix}/{k}"].to(own[k].dtype) for k in own}
    module.load_state_dict(sd, strict=True)


def optimizer_tensors(
    opt: torch.optim.Optimizer, names: list[str], dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """AdamW's moments per parameter name (`names` in the order of the optimizer's params)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if len(params) != len(names):
        raise ValueError(f"{len(names)} names for {len(params)} parameters")
    out = {}
    for name, p in zip(names, params):
        st = opt.state.get(p)
        if st:
            out[f"exp_avg/{name}"] = st["exp_avg"].detach().to(dtype)
            out[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].detach().to(dtype)
    return out


def load_optimizer(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor], step: int) -> None:
    """Restores the moments saved by optimizer_tensors; `step` is AdamW's step
    count (for its bias correction).  Parameters without saved moments start fresh."""
    sd = opt.state_dict()
    state = {}
    for i, name in enumerate(names):
        if f"exp_avg/{name}" in tensors:
            state[i] = {"step": torch.tensor(float(step)), "exp_avg": tensors[f"exp_avg/{name}"].float(),
                        "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].float()}
    sd["state"] = state
    opt.load_state_dict(sd)


def generator_tensor(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()


def restore_generator(gen: torch.Generator, state: torch.Tensor) -> None:
    gen.set_state(state.to(torch.uint8).cpu())
