"""ComfyUI integration of 1.58-bit FLUX (bitflux files).

Modules, fewest dependencies first:

- `names`: node ids and the file names the workflows use (no imports; plain CI tests read it);
- `fileformat`: the converter's container API (converter/fileformat.py);
- `errors`: the messages users read (missing or CPU-only bitkernel, old driver, out of memory);
- `lowrank`: ComfyUI weight patches (LoRAs) as a run-time low-rank side branch;
- `ops`: the packed Linear that ComfyUI builds its own Flux with;
- `loader`: bitflux file -> comfy.model_base.Flux in a ModelPatcher, and the patcher callbacks;
- `report`: the info node's text;
- `calibration`: the calibration-prompts node's work (FLUX.1 text encoders -> the converter's
  calibration conditioning file, converter/calibration/conditioning.py);
- `common`, `nodes_v3` (comfy_api.latest), `nodes_v1` (classic mappings): the nodes.

Nothing here imports ComfyUI at package import time.
"""
