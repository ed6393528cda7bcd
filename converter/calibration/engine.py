"""Calibrated conversion: fit the quantized FLUX to the full-precision FLUX, block by block.

1. Teacher trajectories. The full-precision model samples its own images from
   the calibration conditioning (Euler, FLUX's shifted schedule, distilled
   guidance); at `timesteps` evenly spaced steps of each trajectory the inputs
   of the first block (img, txt, vec) are kept. No image data is involved.
2. Mixed precision (optional, `budget`): see sensitivity.py and mixed.py.
3. For each block in order, with the teacher's block inputs X_t and the
   quantized model's own inputs X_s (they drift apart as errors accumulate):
   - targets Y_t = block_fp(X_t);
   - Hessians of every linear's inputs from block_fp(X_s) (GPTQ's statistics);
   - quantization: ternary by GPTQ (or the plain method), int4 / int8 by the
     plain method, bf16 kept; an optional low-rank branch of rank r on ternary
     layers from the activation-aware SVD of the residual W - Q;
   - distillation: the per-row/group scales (in log space), the low-rank
     branch and (learn_codes, the default) the ternary codes through a
     straight-through estimator, by Adam on ||block_q(X_s) - Y_t||^2 / ||Y_t||^2;
     a block whose code latents do not fit the GPU keeps GPTQ's codes;
   - X_s <- block_q(X_s), X_t <- Y_t, and the block's layers go to the state
     folder (an interrupt restarts at the next block).
   Only one block's weights, its Hessians and the activations are on the GPU.
4. End-to-end velocity matching (optional, `e2e_steps`): every block's scales,
   branches (and with learn_codes the ternary codes) trained together by Adam
   on ||v_q(x_t) - v_fp(x_t)||^2 / ||v_fp||^2 over the teacher's trajectories
   (every step of every trajectory, kept at capture). The block stage fits each
   block to its teacher block; this stage fits what the sampler sees, the
   velocity, and lets blocks trade errors. It holds the whole quantized model
   on the GPU (packed: ~3 GB for FLUX.1-dev, plus one input per block per
   sample for the backward; with learn_codes 16 bytes per ternary weight more,
   which no single GPU has for FLUX.1-dev, so there the codes are learned a
   window of layers at a time: windows.py).

Targets are the teacher's outputs on the teacher's inputs, so each block also
learns to undo the error that reached its input, rather than to copy the
teacher's response to corrupted input.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import bitkernel.functional as BF
from bitkernel.formats import QuantizedWeight

from ..architecture import Architecture
from ..errors import ConversionError
from ..fileformat import LayerSpec
from ..flux_model import get_schedule
from ..hashing import sha256_files
from ..methods import quantize_weight
from ..progress import Progress
from ..sources import Source
from .actplan import plan_acts
from .acts import Acts, PositionCache, micro_batches
from .conditioning import load_conditioning
from .gptq import HessianAccumulator, gptq_ternary
from .lowrank import svd_lowrank_init, with_branch
from .sensitivity import plan_formats
from .state import E2E_FILE, E2E_PROGRESS_FILE, INPUTS_FILE, CalibrationState
from .streamed import StreamedFlux, block_layers, block_names, run_block
from .student import LayerResult, StudentLinear, act_rounding
from .windows import BYTES_PER_CODE, CodeWindows

# Hidden-sized tensors per token that one block's forward keeps for its backward (attention, MLP, norms,
# the float32 rotary copies): the activation estimate of both stages. At FLUX.1-dev's width under a
# 24 GiB cap the end-to-end stage's 3 samples from it peaked at 23.5 GiB reserved (H200).
BLOCK_ACT_TENSORS = 40
# The share of the free GPU memory the activation estimates may fill (the rest: what they leave out,
# fragmentation).
ACT_SHARE = 0.8


@dataclass
class CalibrationSettings:
    """What --calibrate does; every field is recorded in the file's metadata."""

    conditioning: str  # conditioning file (converter/calibration/conditioning.py)
    prompts: int = 0  # use the first N prompts of the file (0: all)
    steps: int = 20  # teacher sampling steps
    timesteps: int = 4  # samples kept per trajectory, evenly spaced over the steps
    seed: int = 0
    gptq: bool = True
    distill_steps: int = 300  # per block; 0 disables distillation
    learn_codes: bool = True  # distil the ternary codes too (straight-through), not only the scales
    code_lr: float = 1e-3  # per step, in units of the layer's scale (5e-3 measured worse than no code learning)
    distill_batch: int = 0  # samples per distillation step (0: as many as fit micro_batch_tokens)
    scale_lr: float = 2e-3
    lowrank_lr: float = 3e-4
    # rank of the bf16 branch on ternary layers (0: none). Testbed, 1200 held-out prompts: none 80.8%, 16 83.1%,
    # 32 86.7% against 89.4% (bench/results/quality_lowrank_h200.md); on FLUX.1-dev it adds 306 MB and ~6% to
    # an eager W1.58A16 step (flux_e2e_branch_fused_h200.md; rank 16 cost the same, flux_e2e_branch_h200.md)
    lowrank: int = 32
    # distil the quantized linears' biases too (both stages). Testbed, rank 32, two held-out sets of 1200 prompts
    # pooled: 86.5% against 86.2% without, counting 68.3 against 65.3 (full precision 89.1 / 72.8;
    # bench/results/quality_bias_h200.md)
    train_bias: bool = True
    bias_lr: float = 1e-3  # 1e-4 left the block errors unchanged (bench/results/calibration_ablation_cpu.md)
    e2e_steps: int = 2000  # Adam steps of end-to-end velocity matching over all blocks (0: off)
    e2e_batch: int = 0  # samples per end-to-end step (0: as many as fit micro_batch_tokens and the GPU; more
    # than fit the GPU at once are accumulated over several passes, in proportion more time)
    e2e_learn_codes: bool = True  # with learn_codes, learn them in the end-to-end stage too
    e2e_code_share: float = 1.0  # at most this share of them at once (a rotating window: windows.py); the
    # stage lowers it to what fits the GPU
    e2e_window_lr: float = 0.0  # the codes' learning rate in a window, as a multiple of their rate when all
    # learn at once (0: the square root of the number of windows; testbed, 12 windows: x1 71.2%, x3 74.0%,
    # x10 66.0%, all at once 76.2%, none 66.0%; bench/results/calibration_windows_h200.md)
    e2e_lr: float = 0.3  # end-to-end learning rates, as a multiple of the block stage's (1 and 3 measured worse)
    budget: Optional[str] = None  # mixed precision under this size (mixed.parse_budget)
    a8_keep: Optional[float] = None  # A8 on eligible layers but this most sensitive fraction (None: as specs say)
    candidates: tuple[str, ...] = ("ternary", "int4:64", "int8", "bf16")
    content_weight: float = 1.0  # mixed precision: weight of the text-stream (content) error
    micro_batch_tokens: int = 32768
    gpu_memory_gb: Optional[float] = None  # cap what calibration may use (default: what the GPU has free)
    state_dir: Optional[str] = None  # default: <output>.calib next to the output

    def e2e_key(self) -> dict[str, Any]:
        key = {"steps": self.e2e_steps, "batch": self.e2e_batch, "lr": self.e2e_lr}
        if not self.e2e_learn_codes:  # only when off: records made before the setting existed stay valid
            key["codes"] = False
        if self.e2e_code_share < 1:  # likewise
            key["code_share"] = self.e2e_code_share
        if self.e2e_window_lr:
            key["window_lr"] = self.e2e_window_lr
        return key

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without where the run keeps its files."""
        d = asdict(self)
        d.pop("state_dir")
        d["candidates"] = list(self.candidates)
        return d

    def key(self, source: Source, cond_sha: str) -> dict[str, Any]:
        """What makes a saved state reusable: same checkpoint, conditioning and settings."""
        d = self.to_dict()
        d.pop("gpu_memory_gb")  # where it runs, not what it computes
        # the end-to-end stage's settings do not change the block stage: whether it runs (its trajectories
        # are captured then) does; its own settings are checked against its saved result (e2e_key)
        d["e2e"] = bool(d.pop("e2e_steps"))
        for k in ("e2e_batch", "e2e_lr", "e2e_learn_codes", "e2e_code_share", "e2e_window_lr"):
            d.pop(k)
        if not d["train_bias"]:  # as before the option existed: folders of earlier runs stay usable
            d.pop("train_bias")
            d.pop("bias_lr")
        d["conditioning"] = cond_sha
        # the checkpoint's files by absolute path, size and modification time: another file of the same name
        # (or a rewritten one) must not pick up this run's layers
        d["source"] = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in source.files]
        return d


@dataclass
class CalibrationResult:
    specs: dict[str, LayerSpec]
    layers: dict[str, LayerResult]  # quantized layers only; bf16 layers are read from the source
    record: dict[str, Any] = field(default_factory=dict)  # the `calibration` metadata entry


def free_gpu_bytes(device: torch.device, cap_gb: Optional[float] = None) -> int:
    """What this process may still allocate on the device. Memory torch's caching allocator holds but
    no tensor uses counts as free: the allocator hands it out again (or releases it and retries) before
    it fails. Counting it as used made the block stage at FLUX.1-dev's depth under a 16 GiB cap see
    0-2.4 GiB free of the ~12 GiB that were, and skip learning every block's codes."""
    if device.type != "cuda":
        return 1 << 62
    free, _ = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    free += torch.cuda.memory_reserved(device) - allocated
    if cap_gb is not None:
        free = min(free, int(cap_gb * 2**30) - allocated)
    return max(free, 0)


class Calibrator:
    def __init__(
        self, source: Source, arch: Architecture, specs: dict[str, LayerSpec], method: str,
        settings: CalibrationSettings, device: torch.device, progress: bool, pinned: frozenset[str] = frozenset(),
    ) -> None:
        self.pinned = pinned  # layers a --rule names: mixed precision leaves them alone
        self.source, self.arch, self.method, self.s, self.device = source, arch, method, settings, device
        self.specs = dict(specs)
        # bf16 on the GPU as FLUX runs; float32 on the CPU, where bf16 matmuls are slow and inexact
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.show_progress = progress
        self.blocks = block_names(arch)
        if settings.a8_keep is not None and not 0 <= settings.a8_keep <= 1:
            raise ConversionError(f"a8_keep must be a fraction in [0, 1], got {settings.a8_keep}")
        for name in ("e2e_steps", "e2e_batch", "distill_steps", "distill_batch", "steps", "prompts", "lowrank"):
            if getattr(settings, name) < 0:
                raise ConversionError(f"{name} must be 0 or more, got {getattr(settings, name)}")
        if settings.lowrank:  # before the capture, not at the first narrow layer's branch
            shapes = source.shapes()
            for layer in (layer for layer, spec in specs.items() if spec.quantized):
                side = min(shapes[f"{layer}.weight"])
                if side < settings.lowrank:
                    raise ConversionError(
                        f"--lowrank {settings.lowrank} is more than layer {layer}'s smaller dimension {side}: "
                        f"use --lowrank {side} or less (0: no branch)"
                    )
        if settings.e2e_lr <= 0:
            raise ConversionError(f"e2e_lr must be positive, got {settings.e2e_lr}")
        if not 0 < settings.e2e_code_share or settings.e2e_window_lr < 0:
            raise ConversionError(f"e2e_code_share must be positive and e2e_window_lr 0 or more, got "
                                  f"{settings.e2e_code_share} and {settings.e2e_window_lr}")
        if not os.path.isfile(settings.conditioning):
            raise ConversionError(
                f"calibration conditioning file {settings.conditioning} not found. Make one with the ComfyUI node "
                "'BitFlux Calibration Prompts' (FLUX.1-dev) or `python -m testbed.calibration_data` (testbed)."
            )
        self.cond = load_conditioning(settings.conditioning, arch.context_in_dim, arch.vec_in_dim)
        if settings.prompts:
            self.cond = self.cond.select(list(range(min(settings.prompts, len(self.cond)))))
        self.state = CalibrationState(
            settings.state_dir, settings.key(source, sha256_files([settings.conditioning]))
        )
        if device.type == "cuda" and settings.gpu_memory_gb:
            total = torch.cuda.get_device_properties(device).total_memory
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(min(1.0, settings.gpu_memory_gb * 2**30 / total), index)
        # blocks stay resident in up to half of the free memory, less 2 GiB for one block's working set
        resident = max(0, self._free() // 2 - (2 << 30)) if device.type == "cuda" else 1 << 62
        self.model = StreamedFlux(source, arch, device, self.dtype, resident)
        h, w = self.cond.image_tokens
        self.pos = PositionCache(self.model.model.pe_embedder, (h, w), device)
        self.seconds: dict[str, float] = {}
        self.trajectories: dict[str, Tensor] = {}  # traj_x, traj_v, traj_t, traj_prompt (with e2e_steps)

    # ------------------------------------------------------------------ helpers

    def _batches(self, acts: Acts) -> list[list[int]]:
        tokens = acts.img.shape[1] + int(acts.lens.max())
        return micro_batches(acts.lens, tokens, self.s.micro_batch_tokens)

    def _run(
        self, block: nn.Module, acts: Acts, out: Optional[Acts] = None, yt: Optional[Acts] = None, last: bool = False
    ) -> float:
        """block on every sample of acts (no gradients): the outputs go to out when given (out may be acts),
        and with yt the block error against it is measured on the way (mean over micro-batches, else nan)."""
        losses = []
        with torch.no_grad():
            for idx in self._batches(acts):
                img, txt, vec = acts.batch(idx, self.device, self.dtype)
                img, txt = run_block(block, img, txt, vec, self.pos(len(idx), txt.shape[1]))
                if yt is not None:
                    losses.append(self._error(img, txt, idx, yt, last))
                if out is not None:
                    out.store(idx, img, txt)
        return _mean(losses)

    def _forward(self, block: nn.Module, acts: Acts) -> Acts:
        """block applied to every sample of acts, as a new set."""
        out = acts.clone_streams()
        self._run(block, acts, out)
        return out

    def _embed(self, x: Tensor, prompts: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The model's embedders on latents x [B, T, C] at timesteps t [B] for the conditioning's prompts
        (one text length): the first block's (img, txt, vec)."""
        cond, dev, dt = self.cond, self.device, self.dtype
        length = int(cond.txt_len[prompts[0]])
        return self.model.embed(
            x.to(dev, dt), cond.txt[prompts, :length].to(dev, dt), t.to(dev, dt), cond.vec[prompts].to(dev, dt),
            torch.full((len(prompts),), cond.guidance, device=dev, dtype=dt),
        )

    # ------------------------------------------------------------------ 1. teacher trajectories

    def capture(self) -> Acts:
        saved = self.state.load_tensors(INPUTS_FILE)
        if saved is not None:
            self.trajectories = {k: v for k, v in saved.items() if k.startswith("traj_")}
            return Acts.from_tensors(saved)
        t0 = time.monotonic()
        cond, s = self.cond, self.s
        h, w = cond.image_tokens
        p, n_tok = len(cond), h * w
        gen = torch.Generator().manual_seed(s.seed)
        x = torch.randn(p, n_tok, self.arch.in_channels, generator=gen).to(self.device, torch.float32)
        schedule = get_schedule(s.steps, n_tok)
        keep = sorted({round(i * (s.steps - 1) / max(s.timesteps - 1, 1)) for i in range(s.timesteps)})
        lens = cond.txt_len  # int64, filled in by CalibrationConditioning when the file has none
        d, lmax = self.arch.hidden_size, int(lens.max())
        esize = torch.finfo(self.dtype).bits // 8
        store = torch.device("cpu") if self._too_big(len(keep) * p * self._hidden_bytes(n_tok + lmax)) else self.device
        kept = Acts(
            torch.zeros(len(keep) * p, n_tok, d, device=store, dtype=self.dtype),
            torch.zeros(len(keep) * p, lmax, d, device=store, dtype=self.dtype),
            lens.repeat(len(keep)), torch.zeros(len(keep) * p, d, device=store),
        )
        traj = None
        if s.e2e_steps:  # every step of every trajectory: the end-to-end stage's inputs and targets
            shape = (s.steps * p, n_tok, self.arch.in_channels)
            traj_store = torch.device("cpu") if self._too_big(2 * s.steps * p * n_tok * self.arch.in_channels * esize) \
                else self.device
            traj = {
                "traj_x": torch.zeros(shape, device=traj_store, dtype=self.dtype),
                "traj_v": torch.zeros(shape, device=traj_store, dtype=self.dtype),
                "traj_t": torch.tensor(schedule[: s.steps], dtype=torch.float32).repeat_interleave(p),
                "traj_prompt": torch.arange(p).repeat(s.steps),
            }
        bar = Progress(s.steps * len(self.blocks), self.show_progress, unit="block passes", per_unit=1)
        cur = Acts(
            torch.zeros(p, n_tok, d, device=self.device, dtype=self.dtype),
            torch.zeros(p, lmax, d, device=self.device, dtype=self.dtype), lens, torch.zeros(p, d, device=self.device),
        )
        with torch.no_grad():
            for step in range(s.steps):
                t = torch.full((p,), schedule[step], device=self.device)
                for idx in self._batches(cur):
                    i = torch.tensor(idx)
                    img, txt, vec = self._embed(x[i], i, t[i])
                    cur.store(idx, img, txt)
                    cur.vec[i] = vec.float()
                if step in keep:
                    k = keep.index(step)
                    sl = slice(k * p, (k + 1) * p)
                    kept.img[sl], kept.txt[sl], kept.vec[sl] = cur.img.to(store), cur.txt.to(store), cur.vec.to(store)
                for name in self.blocks:
                    self._run(self.model.block(name), cur, cur)
                    bar.advance(1, f"teacher step {step + 1}/{s.steps}")
                for idx in self._batches(cur):
                    i = torch.tensor(idx)
                    v = self.model.head(cur.img[i].to(self.dtype), cur.vec[i].to(self.dtype))
                    if traj is not None:
                        j = (step * p + i).to(traj["traj_x"].device)
                        traj["traj_x"][j], traj["traj_v"][j] = x[i].to(traj["traj_x"]), v.to(traj["traj_v"])
                    x[i] = x[i] + (schedule[step + 1] - schedule[step]) * v.float()
        bar.close()
        self.state.save_tensors(INPUTS_FILE, {**kept.tensors(), **(traj or {})})
        self.trajectories = traj or {}
        self.seconds["capture"] = time.monotonic() - t0
        return kept

    def _free(self) -> int:
        return free_gpu_bytes(self.device, self.s.gpu_memory_gb)

    def _too_big(self, nbytes: int) -> bool:
        # two streams (teacher and student) plus the targets: keep them on the GPU only with room to spare
        return self.device.type == "cuda" and 3 * nbytes > self._free() // 3

    # ------------------------------------------------------------------ 3. block-wise fitting

    def quantize_block(self, name: str, fp: nn.Module, xs: Acts) -> dict[str, LayerResult]:
        """GPTQ / plain quantization of the block's linears, Hessians from the student's inputs."""
        layers = [layer for layer in block_layers(name) if self.specs[layer].quantized]
        need_h = self.s.gptq or self.s.lowrank
        accs: dict[str, HessianAccumulator] = {}
        hooks = []
        if need_h:
            for layer in layers:
                mod = fp.get_submodule(layer[len(name) + 1 :])
                acc = accs[layer] = HessianAccumulator(mod.in_features, self.device)
                hooks.append(mod.register_forward_hook(lambda m, inp, out, acc=acc: acc.add(inp[0])))
            try:
                self._run(fp, xs)  # for the hooks only
            finally:
                for hk in hooks:
                    hk.remove()
        out: dict[str, LayerResult] = {}
        for layer in layers:
            spec = self.specs[layer]
            w = self.model.weight(layer)
            hess = accs[layer].hessian if need_h else None
            if spec.format == "ternary" and self.s.gptq:
                qw = gptq_ternary(w, hess, group_size=spec.group_size)
            else:
                qw = quantize_weight(w, spec, self.method)
            lora = None
            if spec.lora_rank:
                lora = svd_lowrank_init(w - BF.dequantize(qw), spec.lora_rank, hess)
            out[layer] = LayerResult(qw, lora)
            del w, hess
        return out

    def student_block(
        self, name: str, fp: nn.Module, layers: dict[str, LayerResult], learn_codes: bool = False
    ) -> nn.Module:
        """fp with its quantized linears replaced by StudentLinear. Only the module tree is copied: the
        tensors stay shared with fp (never trained, never modified), so no second copy of the block."""
        block = copy.deepcopy(fp, memo={id(t): t for t in itertools.chain(fp.parameters(), fp.buffers())})
        for layer, res in layers.items():
            path = layer[len(name) + 1 :]
            old = block.get_submodule(path)
            bias = res.bias if res.bias is not None else old.bias
            bias = None if bias is None else bias.detach()
            qw = res.qw
            qw = QuantizedWeight(  # a copy: learned codes are frozen into it in place (windows.py)
                qw.fmt, qw.qweight.to(self.device, copy=True), qw.scale.to(self.device),
                None if qw.zero is None else qw.zero.to(self.device), qw.in_features, qw.group_size,
            )
            latent = old.weight.detach() if learn_codes and qw.fmt == "ternary" else None
            rounding = act_rounding(qw.fmt, self.device) if self.specs[layer].act == "a8" else None
            block.set_submodule(path, StudentLinear(qw, bias, res.lora, latent, rounding, self.s.train_bias))
        return block

    def _hidden_bytes(self, tokens: int) -> int:
        """One hidden-sized tensor of a sample with `tokens` tokens."""
        return tokens * self.arch.hidden_size * (torch.finfo(self.dtype).bits // 8)

    def _samples_that_fit(self, sample_bytes: int, reserved: int) -> int:
        """Samples of `sample_bytes` activations that fit next to the `reserved` bytes yet to be taken."""
        return int((self._free() - reserved) * ACT_SHARE) // sample_bytes

    def _block_sample_bytes(self, acts: Acts) -> int:
        """One sample's activations in a distillation step of one block (forward kept for the backward)."""
        return self._hidden_bytes(acts.img.shape[1] + int(acts.lens.max())) * BLOCK_ACT_TENSORS

    def _block_batch_that_fits(self, acts: Acts, reserved: int) -> int:
        """Samples per distillation step that fit next to the `reserved` bytes the block has yet to take."""
        return self._samples_that_fit(self._block_sample_bytes(acts), reserved)

    def _codes_fit(self, name: str, need: int, acts: Acts, reserved: int) -> bool:
        """Whether learning the block's ternary codes (`need` bytes: float32 latent, gradient, two Adam moments,
        16 bytes per weight) beside the `reserved` bytes leaves room for one sample's activations; if not, says
        so."""
        if self._block_batch_that_fits(acts, reserved + need) >= 1:
            return True
        print(f"{name}: learning its ternary codes needs {need / 2**30:.1f} GiB and "
              f"{self._block_sample_bytes(acts) / 2**30:.1f} GiB per sample, {self._free() / 2**30:.1f} GiB are "
              "free; keeping GPTQ's codes for this block (a GPU with more memory learns them)", flush=True)
        return False

    def _distill_batches(self, name: str, acts: Acts, fit: int) -> list[list[int]]:
        """The micro-batches a distillation step draws from: at most distill_batch samples and at most
        `fit`, what the GPU holds (said where that cuts them)."""
        batches = self._batches(acts)
        most = max(map(len, batches))
        want = min(self.s.distill_batch or most, most)
        if fit < want:
            print(f"{name}: {max(fit, 0)} of {want} samples per distillation step fit the GPU by the estimate; "
                  f"taking {max(fit, 1)}", flush=True)
        size = max(1, min(want, fit))
        return _split(batches, size) if size < most else batches

    def distill(
        self, name: str, student: nn.Module, xs: Acts, yt: Acts, last: bool, batches: list[list[int]]
    ) -> float:
        """Adam on block `name`'s scales, branches and learned codes, a step on one of `batches`; returns
        its error before training."""
        before = self._run(student, xs, yt=yt, last=last)
        self._train(student, self.s.distill_steps, 1.0, batches,
                    lambda idx: _backward(self._loss(student, idx, xs, yt, last)))
        return before

    def _train(
        self, student: nn.Module, steps: int, lr_mult: float, batches: list[list[int]], loss_fn: Any,
        bar_label: Optional[str] = None, resume_key: Optional[dict[str, Any]] = None,
        windows: Optional[CodeWindows] = None,
    ) -> float:
        """Adam on the StudentLinears of `student` (log-scales, branches, code latents, biases), cosine
        schedule; `loss_fn(batch)` computes a batch's loss and its gradients (it runs the backward, so that
        a batch may be accumulated in parts) and returns the loss. Returns the seconds spent training.
        With bar_label a progress bar over the steps (the end-to-end stage can take hours). With
        resume_key (everything the run depends on beyond the parameters) the parameters, Adam's state and
        the batch sampler are saved 20 times over the run to the state folder, and a later run with the
        same key continues from the last save. With `windows` the codes are learned a window of layers at
        a time (windows.py), and saved between windows."""
        lins = [m for m in student.modules() if isinstance(m, StudentLinear)]
        params_s = [m.log_scale for m in lins]
        params_l = [p for m in lins if m.down is not None for p in (m.down, m.up)]
        params_u = [m.u for m in lins if m.u is not None]
        params_b = [m.bias for m in lins if isinstance(m.bias, nn.Parameter)]
        if not steps or not params_s:
            return 0.0
        groups: list[dict[str, Any]] = [{"params": params_s, "lr": self.s.scale_lr * lr_mult}]
        if params_l:
            groups.append({"params": params_l, "lr": self.s.lowrank_lr * lr_mult})
        if params_u:
            groups.append({"params": params_u, "lr": self.s.code_lr * lr_mult, "codes": True})
        if params_b:
            groups.append({"params": params_b, "lr": self.s.bias_lr * lr_mult})
        for g in groups:
            g["base_lr"] = g["lr"]
        opt = torch.optim.Adam(groups)
        names = {id(p): n for n, p in student.named_parameters()}
        params = {names[id(p)]: p for g in opt.param_groups for p in g["params"]}
        buffers = windows.buffers() if windows is not None else {}
        gen = torch.Generator().manual_seed(self.s.seed)
        start, before = (0, 0.0) if resume_key is None else self._load_progress(resume_key, params, opt, gen, buffers)
        t0 = time.monotonic()
        every = max(1, steps // 20)
        student.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        bar = Progress(steps, self.show_progress and bar_label is not None, unit="steps", per_unit=1, initial=start)
        shown = float("nan")
        for step in range(start, steps):
            if windows is not None and windows.current != (i := windows.index(step)):
                windows.enter(i, opt, self.s.code_lr * lr_mult * (self.s.e2e_window_lr or math.sqrt(len(windows))))
            cosine = 0.5 * (1 + math.cos(math.pi * step / steps))  # decay to 0
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * (windows.lr_factor(step) if windows and g.get("codes") else cosine)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(batches[int(torch.randint(len(batches), (1,), generator=gen))])
            opt.step()
            if bar.enabled:
                if (step - start) % 20 == 0:  # .item() waits for the GPU: not every step
                    shown = loss.item()
                bar.advance(1, f"{bar_label}: error {shown:.4f}")
            with torch.no_grad():
                for g in opt.param_groups:  # beyond +-1.5 a latent only stores momentum that no longer changes a code
                    if g.get("codes"):
                        for u in g["params"]:
                            u.clamp_(-1.5, 1.5)
            nxt = step + 1
            if windows is not None and (nxt == steps or windows.index(nxt) != windows.current):
                windows.leave(opt)
            save = windows.checkpoint(nxt) if windows is not None else nxt % every == 0
            if resume_key is not None and save and nxt < steps:
                self._save_progress(resume_key, nxt, before + time.monotonic() - t0, params, opt, gen, buffers)
        bar.close()
        opt.zero_grad(set_to_none=True)  # the last step's gradients (as large as the latents) go with Adam
        for p in params.values():
            p.requires_grad_(False)
        return before + time.monotonic() - t0

    def _save_progress(self, key: dict[str, Any], step: int, seconds: float, params: dict[str, Tensor],
                       opt: torch.optim.Optimizer, gen: torch.Generator, buffers: dict[str, Tensor]) -> None:
        # the step and seconds live in the tensor file itself: state.json is written after it and may lag
        t: dict[str, Tensor] = {"@sampler": gen.get_state(), "@step": torch.tensor([step]),
                                "@seconds": torch.tensor([seconds], dtype=torch.float64)}
        t.update({f"{name}@buffer": b for name, b in buffers.items()})
        for name, p in params.items():
            st = opt.state[p]
            t[f"{name}@param"], t[f"{name}@exp_avg"] = p.detach(), st["exp_avg"]
            t[f"{name}@exp_avg_sq"] = st["exp_avg_sq"]
            t[f"{name}@step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        self.state.save_tensors(E2E_PROGRESS_FILE, t)
        self.state.data["e2e_progress"] = {"key": key}
        self.state.save()

    def _load_progress(self, key: dict[str, Any], params: dict[str, Tensor], opt: torch.optim.Optimizer,
                       gen: torch.Generator, buffers: dict[str, Tensor]) -> tuple[int, float]:
        """(step, seconds) a saved run with the same key reached, its state restored; else (0, 0)."""
        saved = self.state.data.get("e2e_progress")
        if not saved:
            return 0, 0.0
        t = self.state.load_tensors(E2E_PROGRESS_FILE)
        expected = {"@sampler", "@step", "@seconds", *(f"{n}@buffer" for n in buffers),
                    *(f"{n}@{part}" for n in params for part in ("param", "exp_avg", "exp_avg_sq", "step"))}
        same = t is not None and saved.get("key") == key and set(t) == expected
        if same:
            pairs = [(t[f"{n}@param"], p) for n, p in params.items()]
            pairs += [(t[f"{n}@buffer"], b) for n, b in buffers.items()]
            same = all(a.shape == b.shape for a, b in pairs)
        if not same:
            print("end-to-end stage: the saved progress is of another run (settings, or what fitted the GPU: "
                  "learned codes, samples per step); starting the stage again", flush=True)
            return 0, 0.0
        with torch.no_grad():
            for n, b in buffers.items():
                b.copy_(t[f"{n}@buffer"])
            for n, p in params.items():
                p.copy_(t[f"{n}@param"])
                opt.state[p] = {"step": t[f"{n}@step"].reshape(()).clone(), "exp_avg": t[f"{n}@exp_avg"].to(p.device),
                                "exp_avg_sq": t[f"{n}@exp_avg_sq"].to(p.device)}
        gen.set_state(t["@sampler"])
        step = int(t["@step"])
        print(f"end-to-end stage: continuing at step {step}", flush=True)
        return step, float(t["@seconds"])

    def _loss(self, block: nn.Module, idx: list[int], xs: Acts, yt: Acts, last: bool) -> Tensor:
        img, txt, vec = xs.batch(idx, self.device, self.dtype)
        oi, ot = run_block(block, img, txt, vec, self.pos(len(idx), txt.shape[1]))
        return self._error(oi, ot, idx, yt, last)

    def _error(self, oi: Tensor, ot: Tensor, idx: list[int], yt: Acts, last: bool) -> Tensor:
        """||out - target||^2 / ||target||^2 over the batch's tokens."""
        ti, tt, _ = yt.batch(idx, self.device, torch.float32)
        err = (oi.float() - ti).pow(2).sum()
        ref = ti.pow(2).sum()
        if not last:  # the last block's text tokens are discarded by the model
            err = err + (ot.float() - tt).pow(2).sum()
            ref = ref + tt.pow(2).sum()
        return err / ref

    def end_to_end(self, results: dict[str, LayerResult]) -> dict[str, Any]:
        """Trains every block's StudentLinears together on the teacher's velocities; updates results."""
        t0 = time.monotonic()
        tr = self.trajectories
        if "traj_x" not in tr:
            raise ConversionError("the captured inputs hold no trajectories; delete the calibration folder")
        self.model.release()  # the teacher's blocks: the stage needs the room, and later reads build them anew
        gib, free = 2**30, self._free()
        need = self._e2e_weight_bytes(results)
        if need > free:
            msg = (f"end-to-end stage skipped: the quantized model needs {need / gib:.1f} GiB on the GPU, "
                   f"{free / gib:.1f} GiB are free; the file holds the block stage's layers (--e2e-steps 0 "
                   "silences this)")
            print(msg, flush=True)
            return {"skipped": msg}
        codes = self.s.learn_codes and self.s.e2e_learn_codes
        all_codes = _code_bytes(results)
        lens = self.cond.txt_len[tr["traj_prompt"]]
        tokens = tr["traj_x"].shape[1] + int(lens.max())
        one = self._e2e_sample_bytes(tokens) / ACT_SHARE  # one sample's activations, as _samples_that_fit counts
        # A continued run takes the plan it saved (windows, samples per step) where it still fits: the free
        # memory differs between runs (the trajectories may now be on the CPU, other processes).
        saved = (self.state.data.get("e2e_progress") or {}).get("key") or {}
        # every code at once where they fit next to one sample and the settings allow; else a rotating window
        # (windows.py) of at most half the room the model leaves, and never so much that no sample fits:
        # FLUX.1-dev's codes (~190 GB) fit no single GPU
        at_once = codes and self.s.e2e_code_share >= 1 and need + all_codes + one <= free
        at_once = at_once and saved.get("codes") != "windows"  # a continued run keeps its windows
        window_bytes = 0
        if codes and not at_once:
            window_bytes = int(max(0, min(self.s.e2e_code_share * all_codes, (free - need) / 2, free - need - one)))
        blocks = nn.ModuleList(
            self.student_block(name, self.model.block(name), _of_block(results, name), at_once)
            for name in self.blocks
        )
        windows = None
        if window_bytes:
            ternary = [(f"{name}.{path}", m) for name, block in zip(self.blocks, blocks)
                       for path, m in block.named_modules() if isinstance(m, StudentLinear) and m.fmt == "ternary"]
            windows = CodeWindows(ternary, window_bytes, self.s.e2e_steps, self.model.weight, saved.get("windows"))
            if len(windows) > self.s.e2e_steps:
                print(f"end-to-end stage: the learned codes take {len(windows)} windows, more than the "
                      f"{self.s.e2e_steps} steps; raise --e2e-steps to learn them", flush=True)
                windows = None
            elif not len(windows):
                windows = None
            else:
                print(f"end-to-end stage: all learned codes need {all_codes / gib:.1f} GiB, {free / gib:.1f} GiB "
                      f"are free; learning them in {len(windows)} windows of at most {window_bytes / gib:.2f} GiB at "
                      f"a time, {self.s.e2e_steps // len(windows)} steps each"
                      + (f" ({len(windows.skipped)} layers too large keep theirs)" if windows.skipped else ""),
                      flush=True)
        if codes and not at_once and windows is None:
            print(f"end-to-end stage: training the scales and branches only (learned codes need "
                  f"{all_codes / gib:.1f} GiB, {free / gib:.1f} GiB are free)", flush=True)
        codes_mode: Any = True if at_once else "windows" if windows is not None else False
        batches = micro_batches(lens, tokens, self.s.e2e_batch * tokens or self.s.micro_batch_tokens)
        if self.s.e2e_batch:
            batches = _split(batches, self.s.e2e_batch)
        # the memory the stage has yet to take: a window's latents and training state, or with every code
        # at once their gradients and Adam moments (the latents exist already)
        reserved = window_bytes if windows is not None else all_codes * 3 // 4 if at_once else 0
        fit = self._e2e_batch_that_fits(tokens, reserved)
        if fit < 1:
            msg = (f"end-to-end stage skipped: one sample's activations do not fit next to the model "
                   f"({self._free() / gib:.1f} GiB free); the file holds the block stage's layers")
            print(msg, flush=True)
            return {"skipped": msg}
        # samples asked for (e2e_batch) beyond what fits at once are accumulated over passes of `fit`; by
        # default a step takes what fits (testbed, 600 prompts: 4 samples per step 65.0%, 8 68.3%, ~120
        # 73.8%; bench/results/calibration_windows_h200.md)
        per_pass = 0
        if fit < max(len(b) for b in batches):
            if self.s.e2e_batch:
                per_pass = fit
                print(f"end-to-end stage: {fit} of the {self.s.e2e_batch} samples per step fit the GPU at once; "
                      f"the step accumulates them over {-(-self.s.e2e_batch // fit)} passes", flush=True)
            else:
                batches = _split(batches, min(fit, max(saved.get("batches") or [fit])))
        # a fixed sample of batches, the same before and after, measures the stage
        gen = torch.Generator().manual_seed(self.s.seed + 1)
        probe = [batches[int(i)] for i in torch.randperm(len(batches), generator=gen)[:16]]

        def error() -> float:
            with torch.no_grad():
                return _mean([self._velocity_step(blocks, idx, per_pass, grad=False) for idx in probe])

        before = error()
        # what a saved run must share to be continued: the settings and what fitted the GPU then
        resume_key = {**self.s.e2e_key(), "codes": codes_mode, "batches": [len(b) for b in batches]}
        if windows is not None:
            resume_key["windows"] = [[name for name, _ in w] for w in windows.windows]
        t_train = self._train(blocks, self.s.e2e_steps, self.s.e2e_lr, batches,
                              lambda idx: self._velocity_step(blocks, idx, per_pass), bar_label="end to end",
                              resume_key=resume_key, windows=windows)
        for name, block in zip(self.blocks, blocks):
            results.update(self._export(name, block))
        after = error()  # on what the file holds (export rounds the branch to bf16)
        self.seconds["e2e"] = time.monotonic() - t0
        return {"before": before, "after": after, "samples": len(lens), "codes": codes_mode,
                "code_windows": len(windows) if windows is not None else 0,
                "code_windows_skipped": windows.skipped if windows is not None else [],
                "samples_per_step": max(len(b) for b in batches), "samples_per_pass": per_pass or None,
                "seconds": round(self.seconds["e2e"], 1),
                "train_seconds": round(t_train, 1)}

    def _e2e_weight_bytes(self, results: dict[str, LayerResult]) -> int:
        """GPU bytes of the trainable quantized model without learned codes: per layer the packed weight
        and its scales (+ float32 weight, gradient and two Adam moments per weight of a low-rank branch),
        the blocks' full-precision tensors, and while a block is recomputed for the backward its decoded
        codes and weights (2 + 2 bytes a weight, kept until the block's backward is done) plus the largest
        layer's weight gradient (8 bytes a weight at most)."""
        total = 0
        for r in results.values():
            qw = r.qw
            total += qw.qweight.numel() + 5 * qw.scale.numel() * 4  # scale, log-scale, grad, 2 moments
            if r.lora is not None:
                total += 16 * r.lora[0].shape[0] * (qw.out_features + qw.in_features)
        total += max((_backward_weight_bytes(_of_block(results, b)) for b in self.blocks), default=0)
        shapes = self.source.shapes()
        esize = torch.finfo(self.dtype).bits // 8
        for key, shape in shapes.items():
            if key.startswith(("double_blocks.", "single_blocks.")) and key.rpartition(".")[0] not in results:
                total += math.prod(shape) * esize
        return total

    def _e2e_sample_bytes(self, tokens: int) -> int:
        """One sample's activations in an end-to-end step: one block input per block for the backward
        (checkpointing) and about 40 hidden-sized tensors inside the block being recomputed."""
        return self._hidden_bytes(tokens) * (len(self.blocks) + BLOCK_ACT_TENSORS)

    def _e2e_batch_that_fits(self, tokens: int, reserved: int) -> int:
        """Samples per step that fit next to the model and the `reserved` bytes it has yet to take."""
        if self.device.type != "cuda":
            return 1 << 30
        return self._samples_that_fit(self._e2e_sample_bytes(tokens), reserved)

    def _velocity_step(self, blocks: nn.ModuleList, idx: list[int], per_pass: int, grad: bool = True) -> Tensor:
        """The velocity loss of batch idx (with grad: and its gradients), in passes of `per_pass` samples (0:
        one pass): each pass's error over the whole batch's reference, so that the sum is the batch's loss."""
        ref = None
        if per_pass and len(idx) > per_pass:
            vt = self.trajectories["traj_v"]
            ref = vt[torch.tensor(idx).to(vt.device)].to(self.device, torch.float32).pow(2).sum()
        total = torch.zeros((), device=self.device)
        for part in _split([idx], per_pass) if ref is not None else [idx]:
            loss = self._velocity_loss(blocks, part, grad=grad, ref=ref)
            total = total + (_backward(loss) if grad else loss)
        return total

    def _velocity_loss(self, blocks: nn.ModuleList, idx: list[int], grad: bool = False,
                       ref: Optional[Tensor] = None) -> Tensor:
        """||v_q - v_teacher||^2 / ||v_teacher||^2 on trajectory samples idx (one text length); `ref`: the
        denominator instead (a larger batch's, of which idx is a part)."""
        tr = self.trajectories
        i = torch.tensor(idx)
        pr = tr["traj_prompt"][i]
        img, txt, vec = self._embed(tr["traj_x"][i.to(tr["traj_x"].device)], pr, tr["traj_t"][i])
        pe = self.pos(len(idx), txt.shape[1])
        for block in blocks:
            if grad:  # keep one block's activations at a time: the backward recomputes the rest
                img, txt = checkpoint(run_block, block, img, txt, vec, pe, use_reentrant=False)
            else:
                img, txt = run_block(block, img, txt, vec, pe)
        v = self.model.head(img, vec).float()
        vt = tr["traj_v"][i.to(tr["traj_v"].device)].to(self.device, torch.float32)
        return (v - vt).pow(2).sum() / (vt.pow(2).sum() if ref is None else ref)

    def _block_stage(self, xt: Acts, errors: dict[str, dict[str, float]]) -> dict[str, LayerResult]:
        """Step 3 over every block (finished blocks are loaded and only propagated)."""
        xs = xt.clone_streams()
        results: dict[str, LayerResult] = {}
        bar = Progress(len(self.blocks), self.show_progress, unit="blocks", per_unit=1)
        for i, name in enumerate(self.blocks):
            t0 = time.monotonic()
            fp = self.model.block(name)
            yt = self._forward(fp, xt)
            last = i == len(self.blocks) - 1
            if name in self.state.done:
                layers = self._load_block(name)
                self._run(self.student_block(name, fp, layers), xs, xs)  # its errors are in the state
            else:
                layers = self._calibrate_block(name, fp, xs, yt, last, errors)
                self.state.finish_block(name, _block_tensors(layers), time.monotonic() - t0)
            results.update(layers)
            xt = yt
            del fp
            self.model.done_with(name)
            e = errors.get(name, {})
            bar.advance(1, f"{name}: error {e.get('before', float('nan')):.4f} -> {e.get('after', float('nan')):.4f}")
        bar.close()
        return results

    def _calibrate_block(
        self, name: str, fp: nn.Module, xs: Acts, yt: Acts, last: bool, errors: dict[str, dict[str, Any]]
    ) -> dict[str, LayerResult]:
        """GPTQ, then distillation of block `name`; xs <- the student's outputs. A method of its own so that
        the student (its float32 code latents: 1.4 GiB for a FLUX.1-dev double block) is freed before the
        next block sizes its codes against the free memory: held over, it made every other double block keep
        GPTQ's codes under a 16 GiB cap (bench/results/calibration_cost_full_h200.md)."""
        quantized = self.quantize_block(name, fp, xs)
        weights = _backward_weight_bytes(quantized)
        need = _code_bytes(quantized)
        codes = self.s.learn_codes and self._codes_fit(name, need, xs, weights)
        fit = self._block_batch_that_fits(xs, weights + (need if codes else 0))
        batches = self._distill_batches(name, xs, fit)
        student = self.student_block(name, fp, quantized, codes)
        before = self.distill(name, student, xs, yt, last, batches)
        layers = self._export(name, student)
        # measured on what the file holds (export rounds the branch to bf16)
        after = self._run(student, xs, xs, yt, last)  # xs <- the student's outputs
        errors[name] = {"before": before, "after": after, "codes": codes, "samples_per_step": max(map(len, batches))}
        return layers

    def run(self) -> CalibrationResult:
        t_start = time.monotonic()
        xt = self.capture()
        plan = None
        if self.s.budget:
            self.specs, plan = plan_formats(self, xt)
        act_plan = None
        if self.s.a8_keep is not None:
            self.specs, act_plan = plan_acts(self, xt)
        self.specs = {k: with_branch(v, self.s.lowrank) for k, v in self.specs.items()}
        errors: dict[str, dict[str, float]] = self.state.data.setdefault("errors", {})
        e2e = self.state.data.get("e2e")
        if e2e is not None and e2e.get("settings") == self.s.e2e_key():  # finished before: its file is the result
            results = self._load_layers(E2E_FILE, [k for k, v in self.specs.items() if v.quantized])
        else:
            results = self._block_stage(xt, errors)
            e2e = None
            if self.s.e2e_steps:
                e2e = {**self.end_to_end(results), "settings": self.s.e2e_key()}
                if "skipped" not in e2e:  # a skipped stage is tried again by the next run
                    self.state.save_tensors(E2E_FILE, _block_tensors(results))
                    self.state.data["e2e"] = e2e
                    self.state.data.pop("e2e_progress", None)
                    self.state.remove(E2E_PROGRESS_FILE)
        self.state.save()
        record = {
            "settings": {**self.s.to_dict(), "state_dir": None},
            "conditioning": {
                "file": os.path.basename(self.s.conditioning), "sha256": self.state.key["conditioning"],
                "prompts": len(self.cond), "encoder": self.cond.encoder,
                "image_tokens": list(self.cond.image_tokens), "guidance": self.cond.guidance,
            },
            "samples": len(xt),
            "block_error": errors,
            "e2e_error": e2e,
            "seconds": round(time.monotonic() - t_start, 1),
            "stage_seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "block_seconds": self.state.data["seconds"],
            "mixed_precision": plan,
            "activations": act_plan,
        }
        return CalibrationResult(self.specs, results, record)

    def _export(self, name: str, block: nn.Module) -> dict[str, LayerResult]:
        """The trained layers of student block `name`, as the file holds them."""
        return {f"{name}.{path}": m.export() for path, m in block.named_modules() if isinstance(m, StudentLinear)}

    def _load_block(self, name: str) -> dict[str, LayerResult]:
        layers = [layer for layer in block_layers(name) if self.specs[layer].quantized]
        return self._load_layers(f"{name}.safetensors", layers)

    def _load_layers(self, file: str, layers: list[str]) -> dict[str, LayerResult]:
        t = self.state.load_tensors(file)
        if t is None:
            raise ConversionError(f"calibration folder {self.state.folder} lost {file}; delete the folder")
        out: dict[str, LayerResult] = {}
        shapes = self.source.shapes()
        for layer in layers:
            spec = self.specs[layer]
            k = shapes[f"{layer}.weight"][1]
            qw = QuantizedWeight(spec.format, t[f"{layer}.qweight"], t[f"{layer}.scale"], t.get(f"{layer}.zero"), k,
                                 spec.group_size)
            lora = (t[f"{layer}.lora_down"], t[f"{layer}.lora_up"]) if f"{layer}.lora_down" in t else None
            out[layer] = LayerResult(qw, lora, t.get(f"{layer}.bias"))
        return out


def _backward(loss: Tensor) -> Tensor:
    loss.backward()
    return loss.detach()


def _mean(losses: list[Tensor]) -> float:
    """Mean of scalar losses with one wait for the GPU (nan for none)."""
    return sum(torch.stack(losses).tolist()) / len(losses) if losses else float("nan")


def _code_bytes(layers: dict[str, LayerResult]) -> int:
    """GPU bytes for learning the ternary codes: float32 latent, gradient and two Adam moments per weight."""
    return BYTES_PER_CODE * sum(r.qw.out_features * r.qw.in_features for r in layers.values() if r.qw.fmt == "ternary")


def _backward_weight_bytes(layers: dict[str, LayerResult]) -> int:
    """GPU bytes a block's quantized layers take while its backward runs: their decoded codes and
    weights (2 + 2 bytes a weight, kept for the backward) and the largest layer's float32 weight gradient
    or straight-through temporaries (8 bytes a weight at most)."""
    sizes = [r.qw.out_features * r.qw.in_features for r in layers.values()]
    return 4 * sum(sizes) + 8 * max(sizes, default=0)


def _of_block(results: dict[str, LayerResult], name: str) -> dict[str, LayerResult]:
    return {k: v for k, v in results.items() if k.startswith(name + ".")}


def _split(batches: list[list[int]], size: int) -> list[list[int]]:
    """Micro-batches cut to at most `size` samples."""
    return [b[j : j + size] for b in batches for j in range(0, len(b), size)]


def _block_tensors(layers: dict[str, LayerResult]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for layer, r in layers.items():
        qw = r.qw
        out[f"{layer}.qweight"], out[f"{layer}.scale"] = qw.qweight, qw.scale
        if qw.zero is not None:
            out[f"{layer}.zero"] = qw.zero
        if r.lora is not None:
            out[f"{layer}.lora_down"], out[f"{layer}.lora_up"] = r.lora
        if r.bias is not None:
            out[f"{layer}.bias"] = r.bias
    return out


def calibrate(
    source: Source, arch: Architecture, specs: dict[str, LayerSpec], method: str, settings: CalibrationSettings,
    device: torch.device, progress: bool = True, pinned: frozenset[str] = frozenset(),
) -> CalibrationResult:
    """Runs (or resumes) the calibration; the layers it returns replace plain quantization."""
    cal = Calibrator(source, arch, specs, method, settings, device, progress, pinned)
    return cal.run()

