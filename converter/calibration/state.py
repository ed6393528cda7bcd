"""The calibration's working folder, so an interrupted run restarts where it stopped.

    state.json              the settings key, blocks finished, the format plan, timings
    inputs.safetensors      the captured block-0 inputs (teacher trajectories are the slowest part to redo)
    sensitivity.json        per-layer sensitivities (mixed precision), once measured
    act_sensitivity.json    per-layer sensitivities to 8-bit activations (a8_keep), once measured
    <block>.safetensors     one finished block's layers: qweight, scale, zero, lora_down, lora_up, bias (trained)
    e2e_progress.safetensors  the end-to-end stage mid-way: parameters, Adam state, batch sampler, step
    e2e.safetensors         every layer after the end-to-end stage, once finished

Every file is written under a temporary name and renamed, so a kill leaves
either the old or the new file. A folder made with other settings (another
checkpoint, conditioning file or option) is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write
from ..errors import ConversionError

STATE_FILE = "state.json"
INPUTS_FILE = "inputs.safetensors"
SENSITIVITY_FILE = "sensitivity.json"
E2E_FILE = "e2e.safetensors"
E2E_PROGRESS_FILE = "e2e_progress.safetensors"  # the end-to-end stage's parameters and Adam state mid-way
ACT_SENSITIVITY_FILE = "act_sensitivity.json"


def remove_state(folder: str) -> None:
    """Deletes the files a calibration wrote in `folder` (nothing else), then the folder if it is empty."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        done = json.load(f).get("done", [])
    files = [INPUTS_FILE, SENSITIVITY_FILE, ACT_SENSITIVITY_FILE, E2E_FILE, E2E_PROGRESS_FILE,
             *(f"{b}.safetensors" for b in done)]
    for name in [*files, STATE_FILE]:
        p = os.path.join(folder, name)
        if os.path.exists(p):
            os.unlink(p)
    if not os.listdir(folder):
        os.rmdir(folder)


def _differences(saved: Any, now: dict[str, Any]) -> str:
    """The settings in which a saved run key and this run's differ."""
    if not isinstance(saved, dict):
        return "an unreadable key"
    names = {"source": "the checkpoint file", "conditioning": "the conditioning file"}
    out = [names.get(k) or f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
           for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if "train_bias" not in saved and now.get("train_bias"):  # keys of runs before trained biases were the default
        out.append("a run from before biases were trained by default continues with --no-train-bias")
    return "; ".join(out)


class CalibrationState:
    def __init__(self, folder: str, key: dict[str, Any]) -> None:
        self.folder, self.key = folder, key
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, STATE_FILE)
        self.data: dict[str, Any] = {"key": key, "done": [], "seconds": {}}
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old.get("key") != key:
                what = _differences(old.get("key"), key)
                raise ConversionError(
                    f"the calibration folder {folder} holds a run with other settings ({what}); run with the saved "
                    "settings to continue it, or delete the folder, or choose another with --calib-dir."
                )
            self.data = old

    @property
    def done(self) -> list[str]:
        return list(self.data["done"])

    def save(self) -> None:
        self.save_json(STATE_FILE, self.data)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic_write(os.path.join(self.folder, name), lambda tmp: save_file(cpu, tmp))

    def remove(self, name: str) -> None:
        path = os.path.join(self.folder, name)
        if os.path.exists(path):
            os.unlink(path)

    def load_tensors(self, name: str) -> Optional[dict[str, torch.Tensor]]:
        path = os.path.join(self.folder, name)
        return load_file(path) if os.path.exists(path) else None

    def save_json(self, name: str, obj: Any) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=1)

        atomic_write(os.path.join(self.folder, name), write)

    def load_json(self, name: str) -> Any:
        path = os.path.join(self.folder, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def finish_block(self, block: str, tensors: dict[str, torch.Tensor], seconds: float) -> None:
        self.save_tensors(f"{block}.safetensors", tensors)
        self.data["done"].append(block)
        self.data["seconds"][block] = round(seconds, 2)
        self.save()
