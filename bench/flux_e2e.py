"""Full-size FLUX.1-dev transformer, random weights, one denoising step at 1024x1024, batch 1, through the
model code users run: BFL layout, diffusers, ComfyUI; bf16, W1.58A16 and W1.58A8, the latter two also with a
rank-16 or rank-32 low-rank branch (+r16, +r32); eager, compiled and compiled with CUDA graphs.

Device machine (H200), one call of at most 10 minutes, carry [".whl", ".comfyui"] (the .whl folder is
diffusers 0.42.1 with its requirements; pip takes only what the machine lacks, else all into /tmp/site):

    set -o pipefail; python3 -m pip install -q --no-index --find-links .whl --no-compile --no-cache-dir \\
    diffusers==0.42.1 einops || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH; }; (cd bitkernel && \\
    BITKERNEL_CUDA_ARCHS=90 python3 -m pip install --no-build-isolation --no-deps -q .) && COMFYUI_DIR=$PWD/.comfyui \\
    PYTHONUNBUFFERED=1 python3 bench/flux_e2e.py --modes eager compiled --out $OUT/flux_e2e.md \\
    --json $OUT/flux_e2e.json 2>&1 | tee $OUT/flux_e2e.log

    python bench/flux_e2e.py [--path bfl diffusers comfy] [--variants bf16 w158a16 w158a16+r16 w158a8 w158a8+r16 ...]
                             [--modes eager compiled graphs | --compile] [--steps 10] [--budget-s 420] [--tiny]

One weight source for every path: FLUX.1-dev's tensors in BFL keys, random (seeded; weights and biases
N(0, 0.02), q/k norm scales N(1, 0.1)), made on the GPU one module group (an embedder, a block) at a
time. For W1.58 every block linear is packed right away as a converted file stores it (ternary codes +
float32 row scales, docs/FORMAT.md) with the layer spec's `act` "a16" or "a8" (W1.58A8: activations
quantized to 8 bits inside bitkernel's op, FP8 e4m3 on sm_89+), so the quantized variants never hold
the dense model. The +rN variants (N = 16, 32) give every ternary layer `lora_rank` N and the low-rank branch a
converted file stores for it (docs/FORMAT.md; the calibrated converter's quality-recovery branch):
`<layer>.lora_down` [N, in] and `<layer>.lora_up` [out, N], N(0, 0.02) from a generator of their own,
so every other tensor equals the variant's without the branch. Each path loads those tensors the way it
loads a converted file:

- bfl: converter/flux_model.py (BFL's model code), block linears from converter.fileformat.install_layers
  (bitkernel.nn.TernaryLinear, act_int8 for a8, the branch through set_lora; nn.Linear for bf16);
- diffusers: diffusers' FluxTransformer2DModel built on the meta device and filled group by group by
  converter.diffusers_model.install_tensors (BFL's fused qkv / linear1 split by rows into to_q / to_k /
  to_v (/ proj_mlp), lora_up with them and lora_down shared (each of them computes x @ lora_down.T), as
  load_diffusers_transformer does for a file); called as FluxPipeline calls it;
- comfy (only when COMFYUI_DIR is set): ComfyUI's own Flux (comfy.model_base.Flux around
  comfy.ldm.flux.model.Flux) configured by the node pack (comfy_nodes.loader) with its operations
  (comfy_nodes.ops: packed layers, a8 from the layer spec, the branch from the lora tensors) for W1.58
  and ComfyUI's stock operations for bf16; called as ComfyUI's sampler calls it:
  BaseModel.apply_model(latent, sigma, c_crossattn=context, y=pooled, guidance=guidance).

Measured per (mode, path, variant), all eager runs first, then the compiled ones (ComfyUI is imported
at its first run, after the other paths' eager runs): ms per step (median of CUDA-event timings of
--steps calls after 2 warm-up calls), resident weights (allocated after building minus before) and peak
VRAM (max allocated over the timed calls minus the allocation before building; peak stats reset after
the warm-up). Between variants the model is freed, dynamo reset and the cache emptied. Ratios are
against bf16 of the same path and mode; a +rN variant is also compared with the same variant without
the branch (what the branch costs). `compiled`: torch.compile (inductor, mode "default") applied to
each transformer block (regional compilation, as diffusers' compile_repeated_blocks: the blocks are
nearly all of the time, and the compile takes seconds instead of minutes), the same for bf16 and ours;
`graphs`: the same with mode "reduce-overhead", which replays each block as a CUDA graph, so the step
measures the GPU's work without the host's per-op time (ComfyUI's stock TorchCompileModel node offers
a "cudagraphs" backend for the same reason); graph breaks and dynamo warnings go into the notes, never
fail the run. --budget-s starts nothing after that many seconds, and --out / --json are rewritten after
every variant, so a time limit leaves a partial table.

Every path gets the same inputs and weights, so their outputs must agree to rounding: the report gives
max |out - out_bfl| / max |out_bfl| per variant, and what each quantization step and the branch change.
--tiny runs a small FLUX (hidden 256, 2 + 3 blocks, 16 image + 8 text tokens) on the CPU, for
tests/test_bench_flux_e2e.py. Random weights say nothing about quality; time and memory do not depend
on the values.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import importlib
import itertools
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):  # the repository root (converter, comfy_nodes) and bench/ (report_table)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from report_table import emit, markdown_table, write_json  # noqa: E402  (bench/, put on sys.path above)

from converter.architecture import FLUX1_DEV, Architecture, block_linears, expected_shapes  # noqa: E402
from converter.diffusers_model import meta_tensors  # noqa: E402
from converter.fileformat import LayerSpec, install_layers  # noqa: E402
from converter.flux_model import Flux, FluxConfig, make_img_ids, make_txt_ids, pack, unpack  # noqa: E402

GIB = 2**30
RANKS = (16, 32)  # of the low-rank branch variants (+rN): the converter's --lowrank values measured for quality
PATHS = ("bfl", "diffusers", "comfy")
# variant -> the layer spec of every block linear: dense bf16, or ternary with its activation precision and
# the rank of its low-rank branch (0: none)
VARIANTS = {
    "bf16": LayerSpec("bf16"),
    "w158a16": LayerSpec("ternary", act="a16"),
    "w158a8": LayerSpec("ternary", act="a8"),
    **{f"w158{a}+r{r}": LayerSpec("ternary", act=a, lora_rank=r) for a in ("a16", "a8") for r in RANKS},
}
# variant -> the variant it differs from by one step: ternary weights, 8-bit activations, the low-rank branch
STEPS = {"w158a16": "bf16", "w158a8": "w158a16", **{v: v.split("+")[0] for v in VARIANTS if "+" in v}}
MODES = ("eager", "compiled", "graphs")
# torch.compile's mode per compiled mode: "graphs" replays each block as a CUDA graph (inductor's cudagraph trees),
# so a step no longer waits for the host's ~500 Python-level op calls (bench/NOTES.md, session 11).
COMPILE_MODE = {"compiled": "default", "graphs": "reduce-overhead"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# FLUX.1-dev's layout at the testbed's width, for the CPU mode the tests run
TINY = dataclasses.replace(
    FLUX1_DEV, in_channels=48, vec_in_dim=128, context_in_dim=128, hidden_size=256, num_heads=2, depth=2,
    depth_single_blocks=3,
)
PATH_CODE = {
    "bfl": "converter/flux_model.py (BFL's model code)",
    "diffusers": "diffusers FluxTransformer2DModel",
    "comfy": "ComfyUI comfy.ldm.flux Flux via BaseModel.apply_model",
}


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------- profile

# (category, substrings of a GPU kernel's lower-cased name), first match wins: bitkernel's own kernels
# first (their names are ours), then attention before GEMMs (flash kernels' names hold "gemm" too).
KERNEL_CATEGORIES = (
    ("FP8 operands (activation quant + weight expansion, one kernel)", ("fp8_operands",)),
    ("weight expansion", ("ternary_to_fp8", "dequantize")),
    ("activation quant", ("quantize_rows_fp8", "quantize_act")),
    ("small-M kernels", ("gemv",)),
    ("int8 GEMM", ("gemm_s8",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "f8f8bf16")),
)
OTHER = "other (norms, RoPE, elementwise, copies)"


def kernel_category(name: str) -> str:
    """Which part of the step a GPU kernel is, from its name."""
    low = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), OTHER)


def profile_step(forward: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """GPU time of one call by kernel category (ms), with the five largest kernels of the 'other' part."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        _sync(device)
    per_kernel: collections.Counter[str] = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name] += e.time_range.elapsed_us() / 1e3
    category = {name: kernel_category(name) for name in per_kernel}
    cats: collections.Counter[str] = collections.Counter()
    for name, ms in per_kernel.items():
        cats[category[name]] += ms
    top = [(name, ms) for name, ms in per_kernel.most_common() if category[name] == OTHER][:5]
    return {"ms": dict(cats), "top_other": [[name[:90], ms] for name, ms in top]}


# ---------------------------------------------------------------------------------------- weights


def layer_specs(arch: Architecture, variant: str) -> dict[str, LayerSpec]:
    """The `layers` metadata a converted file of this variant has: every block linear, one format."""
    return {name: VARIANTS[variant] for name in block_linears(arch)}


def _group(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] in ("double_blocks", "single_blocks") else parts[0]


def weight_groups(
    arch: Architecture, specs: dict[str, LayerSpec], device: torch.device, dtype: torch.dtype, seed: int = 0
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(group, tensors) for each module group (an embedder, a block, the final layer) in model order:
    random tensors in BFL keys on `device`, the same values for every path and variant; the layers in
    `specs` that are quantized come packed (qweight, float32 scale, bias), with their low-rank branch
    (lora_down [r, in], lora_up [out, r]) where the spec has a lora_rank, as a converted file has them."""
    import bitkernel.functional as bkf

    gen = torch.Generator(device=device).manual_seed(seed)
    # The branches draw from a generator of their own: the other tensors stay those of the variant without
    # them, so comparing the two measures the branch alone.
    lora_gen = torch.Generator(device=device).manual_seed(seed + 2)  # seed + 1 is make_inputs'
    shapes = expected_shapes(arch)
    for group, keys in itertools.groupby(shapes, key=_group):
        tensors: dict[str, torch.Tensor] = {}
        for key in keys:
            t = torch.empty(shapes[key], dtype=dtype, device=device)
            if key.endswith(".scale"):  # RMSNorm of q / k
                t.normal_(1.0, 0.1, generator=gen)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            tensors[key] = t
        for prefix, spec in specs.items():
            w = tensors.get(f"{prefix}.weight")
            if w is None or not spec.quantized:
                continue
            qw = bkf.quantize(w, spec.format, spec.group_size, spec.symmetric)
            del tensors[f"{prefix}.weight"]
            tensors[f"{prefix}.qweight"], tensors[f"{prefix}.scale"] = qw.qweight, qw.scale
            if spec.lora_rank:
                r, (out_f, in_f) = spec.lora_rank, w.shape
                for name, shape in (("lora_down", (r, in_f)), ("lora_up", (out_f, r))):
                    t = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=lora_gen)
                    tensors[f"{prefix}.{name}"] = t
        yield group, tensors


def _layers_of(group: str, specs: dict[str, LayerSpec]) -> dict[str, LayerSpec]:
    return {p: s for p, s in specs.items() if p.startswith(group + ".")}


def _check_loaded(what: str, model_keys: set[str], loaded: set[str], left: list[str]) -> None:
    """Every generated tensor found a home, and the model has nothing left unfilled."""
    unplaced = sorted(loaded - model_keys)
    if unplaced or left:
        raise RuntimeError(f"{what}: tensors without a place {unplaced[:4]}, parameters not filled {left[:4]}")


# ---------------------------------------------------------------------------------------- paths


@dataclass
class Built:
    """A model ready to run: `forward()` is one denoising step's transformer call (what is timed),
    `tokens(out)` turns its output into [B, L, C] tokens comparable across paths."""

    model: Any
    blocks: list[nn.Module]
    forward: Callable[[], Any]
    tokens: Callable[[Any], torch.Tensor]
    notes: list[str] = field(default_factory=list)


@dataclass
class Inputs:
    img: torch.Tensor  # [1, L, C] packed latent tokens
    img_ids: torch.Tensor
    txt: torch.Tensor
    txt_ids: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    g: torch.Tensor
    height: int  # latent height / width (before FLUX's 2x2 patchify)
    width: int


def make_inputs(arch: Architecture, latent_hw: int, txt_len: int, device: torch.device, dtype: torch.dtype) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = (latent_hw // 2) ** 2

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    return Inputs(
        img=randn(1, tokens, arch.in_channels),
        img_ids=make_img_ids(1, latent_hw, latent_hw, device),
        txt=randn(1, txt_len, arch.context_in_dim),
        txt_ids=make_txt_ids(1, txt_len, device),
        t=torch.full((1,), 0.5, device=device, dtype=dtype),
        y=randn(1, arch.vec_in_dim),
        g=torch.full((1,), 3.5, device=device, dtype=dtype),
        height=latent_hw,
        width=latent_hw,
    )


def build_bfl(arch: Architecture, variant: str, x: Inputs, device: torch.device, dtype: torch.dtype) -> Built:
    specs = layer_specs(arch, variant)
    model = Flux(FluxConfig.from_dict(arch.to_dict()), dtype=dtype, device="meta")
    loaded: set[str] = set()
    for group, tensors in weight_groups(arch, specs, device, dtype):
        install_layers(model, _layers_of(group, specs), tensors)  # the tensors are in dtype already
        loaded.update(tensors)
    _check_loaded("bfl", set(model.state_dict()), loaded, meta_tensors(model))
    model.requires_grad_(False).eval()
    return Built(
        model,
        [*model.double_blocks, *model.single_blocks],
        lambda: model(x.img, x.img_ids, x.txt, x.txt_ids, x.t, x.y, x.g),
        lambda out: out,
    )


def build_diffusers(arch: Architecture, variant: str, x: Inputs, device: torch.device, dtype: torch.dtype) -> Built:
    from converter.diffusers_model import empty_transformer, install_tensors

    a = arch.to_dict()
    specs = layer_specs(arch, variant)
    model = empty_transformer(a)
    for group, tensors in weight_groups(arch, specs, device, dtype):
        install_tensors(model, a, _layers_of(group, specs), tensors, dtype)  # raises for a tensor without a place
    _check_loaded("diffusers", set(), set(), meta_tensors(model))
    model.requires_grad_(False).eval()
    img_ids, txt_ids = x.img_ids[0], x.txt_ids[0]  # diffusers takes 2-D ids
    return Built(
        model,
        [*model.transformer_blocks, *model.single_transformer_blocks],
        lambda: model(
            hidden_states=x.img,
            encoder_hidden_states=x.txt,
            pooled_projections=x.y,
            timestep=x.t,  # FluxPipeline passes t in [0, 1] (sigma) and guidance as is; the model scales by 1000
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=x.g,
            return_dict=False,
        )[0],
        lambda out: out,
    )


_COMFY: dict[str, Any] = {}


def comfy_problem() -> Optional[str]:
    """Why the comfy path cannot run here (None: it can)."""
    root = os.environ.get("COMFYUI_DIR")
    if not root:
        return "COMFYUI_DIR is not set"
    if not os.path.isfile(os.path.join(root, "comfy", "model_patcher.py")):
        return f"COMFYUI_DIR={root} is not a ComfyUI checkout"
    return None


def import_comfy(device: torch.device) -> dict[str, Any]:
    """ComfyUI in this process, for `device` (import stubs for its unused imports, as bench/comfy_e2e.py)."""
    if _COMFY:
        return _COMFY
    from comfy_e2e import install_stubs  # bench/

    stubbed = install_stubs()
    root = os.environ["COMFYUI_DIR"]
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = device.type == "cpu"
    import comfy.model_management  # noqa: F401  (reads args.cpu when first imported)

    from comfy_nodes import loader
    from comfy_nodes.fileformat import BitfluxHeader
    from comfy_nodes.ops import make_operations

    try:
        from comfyui_version import __version__ as version
    except ImportError:
        version = "?"
    import comfy.ops

    prio = getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", None)
    _COMFY.update(loader=loader, header=BitfluxHeader, ops=make_operations, version=version, stubbed=stubbed,
                  sdpa=[getattr(b, "name", str(b)) for b in prio] if prio else None)
    return _COMFY


def build_comfy(arch: Architecture, variant: str, x: Inputs, device: torch.device, dtype: torch.dtype) -> Built:
    c = import_comfy(device)
    loader = c["loader"]
    specs = layer_specs(arch, variant)
    quantized = VARIANTS[variant].quantized
    header = c["header"](architecture=arch.to_dict(), layers=specs if quantized else {})
    name = {v: k for k, v in DTYPES.items()}[dtype]
    # The loader node's model with its compute_dtype option set (the default picks bf16 on an H200); bf16
    # keeps ComfyUI's stock operations. Built on the GPU: 12B parameters are not materialised on the CPU.
    model = loader.empty_model(header, name, quantized, device, 0, device=device)
    unet_dtype, manual_cast = model.model_config.unet_config.get("dtype"), model.manual_cast_dtype
    dm = model.diffusion_model
    loaded: set[str] = set()
    for _, tensors in weight_groups(arch, specs, device, dtype):
        dm.load_state_dict(tensors, strict=False)
        loaded.update(tensors)
    keys = set(dm.state_dict())
    packed = {k[: -len(".qweight")] for k in loaded if k.endswith(".qweight")}
    left = sorted(k for k in keys - loaded if not (k.endswith(".weight") and k[: -len(".weight")] in packed))
    _check_loaded("comfy", keys, loaded, left)
    model.requires_grad_(False).eval()
    latent = unpack(x.img.float(), x.height, x.width)  # ComfyUI's sampler holds float32 latents
    sigma = x.t.float()
    notes = []
    if manual_cast is not None:
        notes.append(f"comfy: weights {unet_dtype}, compute {manual_cast} (ComfyUI's manual cast on {device.type})")
    return Built(
        model,
        [*dm.double_blocks, *dm.single_blocks],
        lambda: model.apply_model(latent, sigma, c_crossattn=x.txt, y=x.y, guidance=x.g),
        # apply_model returns the denoised latent x - v * sigma (CONST); v is what the other paths return
        lambda den: pack((latent - den.float()) / sigma.view(-1, 1, 1, 1)),
        notes,
    )


BUILDERS = {"bfl": build_bfl, "diffusers": build_diffusers, "comfy": build_comfy}


def path_problem(path: str) -> Optional[str]:
    if path == "diffusers":
        try:
            import diffusers  # noqa: F401
        except ImportError as exc:
            return f"diffusers does not import here ({exc})"
    if path == "comfy":
        return comfy_problem()
    return None


# ---------------------------------------------------------------------------------------- running


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _graph_stats() -> tuple[int, dict[str, int]]:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0)), {str(k): int(v) for k, v in counters["graph_break"].items()}


class _DynamoWarnings(logging.Handler):
    """dynamo's warnings (a recompile limit hit means code past it runs eager), kept for the notes."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().split("\n")[0][:200])


_DYNAMO_WARNINGS = _DynamoWarnings()
logging.getLogger("torch._dynamo").addHandler(_DYNAMO_WARNINGS)


def _check_branches(path: str, variant: str, arch: Architecture, model: nn.Module) -> None:
    """A +rN row must time the branch: every ternary layer of the model code holds it (bitkernel.nn's
    QuantLinear and comfy_nodes' packed Linear both as `lora_down`)."""
    want = sum(1 for s in layer_specs(arch, variant).values() if s.lora_rank)
    have = sum(isinstance(getattr(m, "lora_down", None), torch.Tensor) for m in model.modules())
    if have < want:  # more is right for diffusers, which splits a fused layer (and its branch) into several
        raise RuntimeError(f"{path} {variant}: {have} layers carry the low-rank branch, the variant has {want}")


def _new_graph_step(forward: Callable[[], Any]) -> Callable[[], Any]:
    """forward, telling the CUDA graph trees first that a new step begins: the last step's graph outputs are dead,
    so the replays may reuse their memory."""

    def step() -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return forward()

    return step


def run_variant(
    path: str, variant: str, mode: str, arch: Architecture, x: Inputs, steps: int, device: torch.device,
    dtype: torch.dtype, profile: bool = False,
) -> tuple[dict[str, Any], Optional[torch.Tensor]]:
    cuda = device.type == "cuda"
    row: dict[str, Any] = {"mode": mode, "path": path, "variant": variant}
    if mode in COMPILE_MODE:
        importlib.import_module("torch._dynamo")  # reset in `finally`, whatever happens before the compile
    _free(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    built: Optional[Built] = None
    forward: Optional[Callable[[], Any]] = None  # holds the model: deleted with it
    out = tokens = None
    try:
        t0 = time.perf_counter()
        built = BUILDERS[path](arch, variant, x, device, dtype)
        _check_branches(path, variant, arch, built.model)
        _sync(device)
        row["build_s"] = time.perf_counter() - t0
        row["weights_gib"] = (torch.cuda.memory_allocated(device) - base) / GIB if cuda else None
        row["notes"] = list(built.notes)
        forward = built.forward
        if mode in COMPILE_MODE:
            from torch._dynamo.utils import counters

            torch._dynamo.reset()
            counters.clear()
            _DYNAMO_WARNINGS.lines.clear()
            for block in built.blocks:
                block.compile(mode=COMPILE_MODE[mode])  # inductor
        if mode == "graphs":
            forward = _new_graph_step(built.forward)

        with torch.inference_mode():
            t0 = time.perf_counter()
            out = forward()
            _sync(device)
            row["first_s"] = time.perf_counter() - t0
            out = forward()
            _sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(steps):
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    out = forward()
                    b.record()
                    torch.cuda.synchronize(device)
                    times.append(a.elapsed_time(b))
                else:
                    t0 = time.perf_counter()
                    out = forward()
                    times.append((time.perf_counter() - t0) * 1e3)
            row["ms"] = statistics.median(times)
            row["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / GIB if cuda else None
            if profile and cuda:  # after the timing, which the profiler would slow
                row["profile"] = profile_step(forward, device)
            tokens = built.tokens(out).detach().float().cpu()
        row["finite"] = bool(torch.isfinite(tokens).all())
        if not row["finite"]:
            row["notes"].append(f"{path} {variant} ({mode}): non-finite output (random weights; timing unaffected)")
        if mode in COMPILE_MODE:
            graphs, breaks = _graph_stats()
            row["graphs"], row["graph_breaks"] = graphs, breaks
            if breaks:
                why = "; ".join(f"{' '.join(k.split())[:200]} (x{v})" for k, v in list(breaks.items())[:3])
                row["notes"].append(f"{path} {variant} ({mode}): {sum(breaks.values())} graph breaks: {why}")
            for line in dict.fromkeys(_DYNAMO_WARNINGS.lines):
                row["notes"].append(f"{path} {variant} ({mode}): dynamo: {line}")
    except Exception as exc:  # noqa: BLE001  (one variant failing must not lose the others)
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        tokens = None
    finally:
        del built, out, forward
        if mode in COMPILE_MODE:
            torch._dynamo.reset()
        _free(device)
    left = (torch.cuda.memory_allocated(device) - base) / GIB if cuda else 0.0
    if left > 0.05:
        row.setdefault("notes", []).append(f"{path} {variant} ({mode}): {left:.2f} GiB still allocated after freeing")
    return row, tokens


def _relative(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def agreement(outputs: dict[tuple[str, str, str], torch.Tensor]) -> list[dict[str, Any]]:
    """max |out - ref| / max |ref| between paths (reference bfl, else the first path) per mode and
    variant, between eager and compiled per path and variant, and (mode "variants") between the
    variants of one path: W1.58A16 against bf16, W1.58A8 against W1.58A16, +rN against the same variant
    without the branch (what each step changes)."""
    out = []
    for (mode, path, variant), t in outputs.items():
        base = outputs.get((mode, path, STEPS.get(variant, "")))
        if base is not None:
            out.append({"mode": f"variants ({mode})", "variant": variant, "path": path, "ref": STEPS[variant],
                        "rel": _relative(t, base)})
        refs = [p for (m, p, v) in outputs if m == mode and v == variant]
        if refs and refs[0] != path:
            ref = outputs[(mode, refs[0], variant)]
            out.append({"mode": mode, "variant": variant, "path": path, "ref": refs[0], "rel": _relative(t, ref)})
        if mode in COMPILE_MODE and ("eager", path, variant) in outputs:
            ref = outputs[("eager", path, variant)]
            out.append({"mode": f"{mode}-vs-eager", "variant": variant, "path": path, "ref": path,
                        "rel": _relative(t, ref)})
    return out


# ---------------------------------------------------------------------------------------- report


def _f(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _measured(rows: list[dict[str, Any]], path: str, variant: str) -> Optional[dict[str, Any]]:
    return next((r for r in rows if r["path"] == path and r["variant"] == variant and "ms" in r), None)


def _branch_cost(r: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """What a +rN row adds to the same variant without the branch: ms per step and peak VRAM."""
    if not VARIANTS[r["variant"]].lora_rank:
        return ""
    ref = _measured(rows, r["path"], STEPS[r["variant"]])
    if ref is None:
        return "-"
    ms = r["ms"] - ref["ms"]
    cost = f"{ms:+.1f} ms ({ms / ref['ms']:+.1%})"
    if r.get("peak_gib") is not None and ref.get("peak_gib") is not None:
        cost += f", peak {r['peak_gib'] - ref['peak_gib']:+.2f} GiB"
    return cost


def report(args: argparse.Namespace, device: torch.device, rows: list[dict[str, Any]],
           diffs: list[dict[str, Any]], notes: list[str], done: bool) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        dev = f"{p.name} ({p.total_memory / GIB:.1f} GiB)"
    else:
        dev = f"CPU ({platform.processor() or platform.machine()})"
    size = (
        "tiny FLUX (hidden 256, 2 heads, 2 + 3 blocks), 16 image + 8 text tokens"
        if args.tiny
        else "FLUX.1-dev architecture, 1024x1024 (4096 image + 512 text tokens)"
    )
    comfy = _COMFY.get("version")
    out = [
        f"# FLUX transformer step: bf16 vs W1.58A16 vs W1.58A8 through each model code{'' if done else ' (PARTIAL)'}",
        "",
        f"{dev} | torch {torch.__version__} | Python {platform.python_version()}"
        + (f" | ComfyUI {comfy}" if comfy else "")
        + f" | {size}, batch 1, random weights, {args.dtype} | median of {args.steps} steps after 2 warm-up calls",
        "",
        "Paths: " + "; ".join(f"**{p}**: {PATH_CODE[p]}" for p in PATHS) + ". Ratios against bf16 of the same "
        "path and mode (speed: bf16 ms / ms; peak: peak / bf16 peak).",
    ]
    if any(VARIANTS[v].lora_rank for v in args.variants):
        out += ["", f"+rN: every ternary layer also runs a rank-N low-rank branch (lora_down, lora_up in "
                f"{args.dtype}, as a converted file stores it in bf16); branch cost: the row minus the same variant "
                "without the branch (same path and mode)."]
    for mode in args.modes:
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        how = {
            "eager": "eager",
            "compiled": "compiled: torch.compile (inductor, mode default) of every transformer block, bf16 and W1.58 "
            "alike",
            "graphs": "graphs: torch.compile (inductor, mode reduce-overhead: each block replayed as a CUDA graph) of "
            "every transformer block, bf16 and W1.58 alike",
        }[mode]
        out += ["", f"## {how}", ""]
        branch = any(VARIANTS[r["variant"]].lora_rank for r in mrows)
        head = ["path", "variant", "ms / step", "speed vs bf16", "weights GiB", "peak VRAM GiB", "peak vs bf16",
                "first call s"] + (["branch cost"] if branch else [])
        table = []
        for r in mrows:
            if "error" in r:
                table.append([r["path"], r["variant"], "failed", "", "", "", "", r["error"][:100].replace("|", "/")]
                             + ([""] if branch else []))
                continue
            ref = _measured(mrows, r["path"], "bf16")
            speed = f"{ref['ms'] / r['ms']:.2f}x" if ref else "-"
            peak = f"{r['peak_gib'] / ref['peak_gib']:.2f}x" if ref and ref.get("peak_gib") else "-"
            table.append([r["path"], r["variant"], f"{r['ms']:.1f}", speed, _f(r.get("weights_gib")),
                          _f(r.get("peak_gib")), peak, _f(r.get("first_s"), "{:.1f}")]
                         + ([_branch_cost(r, mrows)] if branch else []))
        out.append(markdown_table(head, table))
    if diffs:
        out += [
            "",
            "Agreement (max |out - out_ref| / max |out_ref|; same weights and inputs). The paths order their "
            "floating-point work differently, so they agree to rounding, amplified by the random blocks; W1.58A8 "
            "rounds activations to 8 bits, a step function, so rounding-level differences upstream flip some codes "
            "and it agrees less closely:",
            "",
        ]
        for d in diffs:
            if d["mode"].startswith("variants"):
                continue
            out.append(f"- {d['mode']} {d['variant']}: {d['path']} vs {d['ref']}: {d['rel']:.2e}")
        effect = [d for d in diffs if d["mode"].startswith("variants")]
        if effect:
            out += ["", "What each step changes (same measure, within a path: ternary weights, 8-bit activations, "
                    "the low-rank branch):", ""]
        for d in effect:
            out.append(f"- {d['mode']} {d['path']}: {d['variant']} vs {d['ref']}: {d['rel']:.2e}")
    out += profile_report(rows)
    all_notes = list(dict.fromkeys([n for r in rows for n in r.get("notes", [])] + notes))
    if all_notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in all_notes]
    return "\n".join(out) + "\n"


def profile_report(rows: list[dict[str, Any]]) -> list[str]:
    """--profile's section: one row per profiled call, GPU ms per kernel category (they sum to the GPU busy
    time, below the wall time when the host does not keep the GPU fed)."""
    prof = [r for r in rows if "profile" in r]
    if not prof:
        return []
    cats = [c for c, _ in KERNEL_CATEGORIES] + [OTHER]
    cats = [c for c in cats if any(c in r["profile"]["ms"] for r in prof)]
    table = []
    for r in prof:
        ms = r["profile"]["ms"]
        table.append([r["mode"], r["path"], r["variant"], f"{r['ms']:.1f}", f"{sum(ms.values()):.1f}"]
                     + [f"{ms[c]:.1f}" if c in ms else "" for c in cats])
    out = ["", "## GPU time by kernel category (--profile: one call under torch.profiler, ms)", "",
           markdown_table(["mode", "path", "variant", "step ms (timed)", "GPU busy"] + cats, table), "",
           "Largest kernels in the 'other' part:", ""]
    for r in prof:
        top = ", ".join(f"{name} {ms:.1f}" for name, ms in r["profile"]["top_other"])
        out.append(f"- {r['mode']} {r['path']} {r['variant']}: {top}")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", nargs="+", default=list(PATHS), choices=PATHS, help="model codes (default: all)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--modes", nargs="+", default=None, choices=MODES, help="default: eager")
    ap.add_argument("--compile", action="store_true", help="same as --modes compiled")
    ap.add_argument("--steps", type=int, default=10, help="timed calls per variant (median)")
    ap.add_argument("--tiny", action="store_true", help="small FLUX on the CPU (tests)")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda, cpu with --tiny")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="16-bit tensors and activations")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no variant after this many seconds (default 420; none with --tiny)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one call per variant: GPU time by kernel category (CUDA only)")
    ap.add_argument("--out", help="also write the report to this Markdown file (rewritten after every variant)")
    ap.add_argument("--json", help="also write the rows, agreement and notes to this JSON file")
    args = ap.parse_args(argv)
    if args.modes and args.compile:
        ap.error("--compile and --modes exclude each other")
    args.modes = args.modes or (["compiled"] if args.compile else ["eager"])
    args.modes = [m for m in MODES if m in args.modes]
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/flux_e2e.py needs a CUDA GPU (or --tiny for the CPU)")
    if device.type == "cpu":
        torch.set_num_threads(1)  # a smoke test there; OpenMP's spinning threads made tiny calls 30x slower
    budget = args.budget_s if args.budget_s is not None else (None if args.tiny else 420.0)
    dtype = DTYPES[args.dtype]
    arch = TINY if args.tiny else FLUX1_DEV
    x = make_inputs(arch, 8 if args.tiny else 128, 8 if args.tiny else 512, device, dtype)
    start = time.monotonic()

    notes: list[str] = []
    paths = [p for p in PATHS if p in args.path]
    for p in list(paths):
        why = path_problem(p)
        if why:
            notes.append(f"{p} path skipped: {why}")
            log(f"NOTE: {p} path skipped: {why}")
            paths.remove(p)
    rows: list[dict[str, Any]] = []
    outputs: dict[tuple[str, str, str], torch.Tensor] = {}

    def flush(done: bool) -> str:
        diffs = agreement(outputs)
        text = report(args, device, rows, diffs, notes, done)
        emit(text, args.out, quiet=True)
        if args.json:
            write_json(args.json, {"rows": rows, "agreement": diffs, "notes": notes, "done": done,
                                   "device": str(device), "dtype": args.dtype, "tiny": args.tiny, "steps": args.steps})
        return text

    for mode in args.modes:
        for path in paths:
            for variant in [v for v in VARIANTS if v in args.variants]:
                elapsed = time.monotonic() - start
                if budget is not None and elapsed > budget:
                    msg = f"{mode} {path} {variant} skipped: {elapsed:.0f} s elapsed, over --budget-s {budget:.0f}"
                    notes.append(msg)
                    log("NOTE: " + msg)
                    continue
                row, tokens = run_variant(path, variant, mode, arch, x, args.steps, device, dtype, args.profile)
                rows.append(row)
                if tokens is not None:
                    outputs[(mode, path, variant)] = tokens
                if "error" in row:
                    log(f"[{mode}] {path} {variant}: FAILED {row['error']}")
                else:
                    log(
                        f"[{mode}] {path} {variant}: {row['ms']:.1f} ms/step, weights {_f(row['weights_gib'])} GiB, "
                        f"peak {_f(row['peak_gib'])} GiB, build {row['build_s']:.1f} s, first call "
                        f"{row['first_s']:.1f} s" + (f", {row['graphs']} graphs, "
                                                      f"{sum(row['graph_breaks'].values())} breaks"
                                                      if mode in COMPILE_MODE else "")
                        + f" (t={time.monotonic() - start:.0f} s)"
                    )
                flush(False)
    if "comfy" in paths and _COMFY.get("stubbed"):
        notes.append(f"ComfyUI import stubs (unused modules missing here): {', '.join(_COMFY['stubbed'])}")
    if "comfy" in paths and _COMFY.get("sdpa"):
        notes.append(
            "comfy: ComfyUI runs attention under sdpa_kernel with backend priority "
            f"{' > '.join(_COMFY['sdpa'])} (comfy.ops.scaled_dot_product_attention); bfl and diffusers call "
            "torch's scaled_dot_product_attention with torch's default choice"
        )
    notes.append(f"total time {time.monotonic() - start:.0f} s")
    text = flush(True)
    print("\n" + text, flush=True)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
