"""FLUX.1-dev in ComfyUI, end to end on one GPU: the bitflux loader vs ComfyUI's stock bf16 Flux, and the
whole text-to-image graph under a VRAM cap (8 GiB by default).

    # full size (H100 / H200). bitkernel with CUDA kernels; the random checkpoint and its conversion
    # (bench/convert_memory.py --keep leaves both in out/convert_memory/; not part of this benchmark's time)
    pip install ./bitkernel && python bench/convert_memory.py --layouts bfl --keep
    COMFYUI_DIR=$PWD/.comfyui python bench/comfy_e2e.py \\
        --file out/convert_memory/bitflux-from-bfl.safetensors \\
        --dense-checkpoint out/convert_memory/flux1-dev-random.safetensors \\
        --cap-gib 8 --out bench/results/comfy_e2e_h100.md

    # reduced mode (about a minute on 2 CPU cores): a small FLUX-architecture model made here, a tiny T5
    COMFYUI_DIR=$PWD/.comfyui python bench/comfy_e2e.py --device cpu --tiny

Part 1, transformer only (1024x1024, batch 1). Our loader node (BitfluxModelLoader) and ComfyUI's
"Load Diffusion Model" node (UNETLoader -> comfy.sd.load_diffusion_model, weight dtype default = bf16)
each give a MODEL; ModelSamplingFlux (max_shift 1.15, base_shift 0.5, 1024x1024), EmptySD3LatentImage
and the stock KSampler (euler, simple, cfg 1.0) sample it with hand-made conditioning: a random bf16
T5 context [1, 512, 4096], a pooled CLIP vector [1, 768], guidance 3.5. A first KSampler run moves
the weights to the GPU; then `--repeat` runs of `--steps` steps are measured: peak VRAM
(torch.cuda.max_memory_allocated over the measured runs: weights + activations), weights resident on
the GPU, and ms per step (each transformer call timed with CUDA synchronisation through ComfyUI's
model_function_wrapper; cfg 1 makes one call per step; median). Each model runs in a fresh child
process, so neither sees the other's allocations.

Part 2, the graph an 8 GB user runs: our loader; DualCLIPLoader's path (comfy.sd.load_clip, type flux)
with T5-XXL stored as float8_e4m3fn (like t5xxl_fp8_e4m3fn.safetensors) and CLIP-L in fp16; VAELoader
with the FLUX autoencoder (ae.safetensors layout: ComfyUI detects its config from the keys);
CLIPTextEncode -> FluxGuidance 3.5 -> ModelSamplingFlux -> EmptySD3LatentImage -> KSampler (4 steps,
euler, simple, cfg 1) -> VAEDecode (which ComfyUI retries tiled when the plain decode runs out of
memory; reported). The child caps PyTorch's allocator with
torch.cuda.set_per_process_memory_fraction(cap / total) before importing ComfyUI, and makes
torch.cuda.mem_get_info report a card of `cap` bytes (free = cap - reserved) so that ComfyUI's memory
manager decides exactly as on such a card: which model to offload before the next loads, full or
partial (low-VRAM) loading. Reported per stage: wall time, peak allocated and peak reserved bytes (the
cap applies to reserved), what each model has on the GPU afterwards, and ComfyUI's own loading log.
Any out-of-memory error that ComfyUI does not handle itself ends the child, and this script exits 1.

What is real: ComfyUI's own model code for everything (its Flux with our packed Linear, its T5 / CLIP /
AutoencoderKL, all built by ComfyUI from the files), its loaders' detection and dtype choices, its
samplers, its memory manager and offloading, our node pack unchanged, bitkernel's kernels. Stand-in:
every weight is random (the converter's output of a random checkpoint, random T5 / CLIP / VAE files
written into --workdir by tests/comfy_standins.py, shared with the server test), so images are noise
and say nothing about quality; time and memory do not depend on the values. The cap emulates an 8 GB
card within a larger GPU: it bounds PyTorch's allocator only; the CUDA context, cuBLAS handles and
loaded kernels of a real card live outside it (measured and shown as "outside the allocator"), as do
the display and other programs.
Part 1 uses 512 hand-made T5 tokens (FLUX.1-dev's maximum); in part 2 ComfyUI's tokenizer decides
(256 for a short prompt). ComfyUI packages that its Flux path imports but this machine lacks are
import-stubbed (torchsde, av, torchvision: only when missing; none is used on this path; any use raises).

--tiny: a FLUX-architecture model (hidden 256, 2 heads, 2 + 4 blocks, 16 latent channels, context
width 64) built with converter.flux_model and converted with converter.convert; T5 with T5-XXL's 24 layers but
width 64 (ComfyUI's t5xxl_model_config option); real CLIP-L and FLUX VAE sizes; 128x128 images. Its
dense reference is built through the loader's own config with ComfyUI's stock ops, because ComfyUI's
shape detection hard-codes 24 heads.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402
from comfy_standins import TINY_T5, make_tiny_files, write_random_encoders  # noqa: E402  (tests/, put on sys.path above)
from report_table import markdown_table, write_json  # noqa: E402  (bench/ is on sys.path when this script runs)

GIB = 2**30
PROMPT = "a red cube on top of a blue sphere on a wooden table, studio photo, soft light"
STUB_CANDIDATES = ("torchsde", "av", "torchvision")  # imported at module level on the Flux path, never used there


# ------------------------------------------------------------------------------------------ environment


class _Missing(type):
    """A stand-in for any name taken from a stubbed package (type annotations, base classes)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(name, (), {"__module__": cls.__module__})

    def __call__(cls, *args, **kwargs):
        raise ImportError(f"{cls.__module__}.{cls.__name__}: the package is not installed (import stub of comfy_e2e)")


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(name, (), {"__module__": self.__name__})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def install_stubs() -> list[str]:
    """Stubs for the candidates that do not import here (missing, or built for another torch)."""
    missing = []
    for name in STUB_CANDIDATES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001
            missing.append(name)
            for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[mod]
    if missing:
        sys.meta_path.insert(0, _StubFinder(set(missing)))
    return missing


def comfyui_dir() -> str:
    root = os.environ.get("COMFYUI_DIR") or os.path.join(ROOT, ".comfyui")
    if not os.path.isfile(os.path.join(root, "comfy", "model_patcher.py")):
        raise SystemExit(f"no ComfyUI at {root}: set COMFYUI_DIR to a ComfyUI checkout")
    return root


class LogLines(logging.Handler):
    """ComfyUI's log lines about loading and memory, kept for the report."""

    KEYS = ("load", "Load", "offload", "memory", "tiled", "VRAM", "lowvram", "unload")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if any(k in msg for k in self.KEYS):
            self.lines.append(msg)

    def take(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


class Comfy:
    """ComfyUI imported in this process (a child), after the device and memory cap are set up."""

    def __init__(self, device: str, vram_mode: str) -> None:
        self.stubbed = install_stubs()
        root = comfyui_dir()
        if root not in sys.path:
            sys.path.insert(0, root)
        logging.basicConfig(level=logging.INFO, format="  [comfy] %(message)s", force=True)
        self.log = LogLines()
        logging.getLogger().addHandler(self.log)
        import comfy.cli_args

        a = comfy.cli_args.args
        a.cpu = device == "cpu"
        a.lowvram = vram_mode == "low"
        a.normalvram = vram_mode == "normal"
        import comfy.model_management as mm
        import comfy.sd
        import comfy.utils
        import folder_paths
        import nodes
        from comfy_extras import nodes_flux, nodes_model_advanced, nodes_sd3

        self.mm, self.sd, self.utils, self.folder_paths, self.nodes = mm, comfy.sd, comfy.utils, folder_paths, nodes
        self.nodes_flux, self.nodes_adv, self.nodes_sd3 = nodes_flux, nodes_model_advanced, nodes_sd3
        comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars in the benchmark's output
        self.device = mm.get_torch_device()
        try:
            from comfyui_version import __version__ as version
        except ImportError:
            version = "?"
        self.version = version

    def add_folder(self, kind: str, path: str) -> None:
        self.folder_paths.add_model_folder_path(kind, os.path.dirname(os.path.abspath(path)))

    @staticmethod
    def call(node_cls, **kwargs):
        """First output of a stock node, classic (FUNCTION) or V3 (execute) alike."""
        if hasattr(node_cls, "FUNCTION"):
            return getattr(node_cls(), node_cls.FUNCTION)(**kwargs)[0]
        return node_cls.execute(**kwargs).args[0]

    def load_ours(self, path: str):
        self.add_folder("diffusion_models", path)
        try:
            from comfy_nodes.nodes_v3 import BitfluxModelLoader
        except ImportError:  # ComfyUI without comfy_api.latest
            from comfy_nodes.nodes_v1 import BitfluxModelLoader
        return self.call(BitfluxModelLoader, unet_name=os.path.basename(path), compute_dtype="default")

    def load_dense(self, path: str, bitflux_path: str, tiny: bool):
        if not tiny:  # ComfyUI's "Load Diffusion Model" node, shape detection and all
            self.add_folder("diffusion_models", path)
            return self.call(self.nodes.UNETLoader, unet_name=os.path.basename(path), weight_dtype="default")
        # ComfyUI's detection hard-codes 24 heads: build the small model from the bitflux file's config instead.
        import comfy.model_patcher
        from safetensors.torch import load_file

        from comfy_nodes.fileformat import read_header
        from comfy_nodes.loader import build_model

        sd = load_file(path)
        model = build_model(read_header(bitflux_path), sd, None, False, self.device, os.path.getsize(path))
        return comfy.model_patcher.ModelPatcher(model, self.device, self.mm.unet_offload_device())

    def flux_model(self, model, width: int, height: int):
        return self.call(
            self.nodes_adv.ModelSamplingFlux, model=model, max_shift=1.15, base_shift=0.5, width=width, height=height
        )

    def ksample(self, model, cond, width: int, height: int, steps: int, seed: int = 0):
        latent = self.call(self.nodes_sd3.EmptySD3LatentImage, width=width, height=height, batch_size=1)
        return self.call(
            self.nodes.KSampler,
            model=model,
            seed=seed,
            steps=steps,
            cfg=1.0,
            sampler_name="euler",
            scheduler="simple",
            positive=cond,
            negative=cond,
            latent_image=latent,
            denoise=1.0,
        )


class StepTimer:
    """ComfyUI model_function_wrapper: times each transformer call (one per step at cfg 1)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.ms: list[float] = []

    def __call__(self, apply_model, args):
        sync(self.cuda)
        t = time.perf_counter()
        out = apply_model(args["input"], args["timestep"], **args["c"])
        sync(self.cuda)
        self.ms.append((time.perf_counter() - t) * 1e3)
        return out


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def outside_allocator_bytes() -> int:
    """Device memory in use that PyTorch's allocator does not hold: CUDA context, library handles, kernels."""
    free, total = _REAL_MEM_GET_INFO()
    return max(0, total - free - torch.cuda.memory_reserved())


_REAL_MEM_GET_INFO = torch.cuda.mem_get_info


def cap_device_memory(cap: int) -> dict[str, Any]:
    """Allocator cap plus a mem_get_info that reports a card of `cap` bytes (before ComfyUI is imported)."""
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    total = torch.cuda.get_device_properties(0).total_memory
    if cap >= total:
        raise SystemExit(f"--cap-gib {cap / GIB:.2f} is not below this GPU's {total / GIB:.2f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap / total)

    def mem_get_info(device=None):
        free, _ = _REAL_MEM_GET_INFO(device)
        return max(0, min(free, cap - torch.cuda.memory_reserved(device))), cap

    torch.cuda.mem_get_info = mem_get_info
    return {
        "cap_bytes": cap,
        "gpu_total_bytes": total,
        "fraction": cap / total,
        "outside_allocator_start": outside_allocator_bytes(),
    }


def mem_stats(cuda: bool) -> dict[str, int]:
    if not cuda:
        return {}
    return {
        "peak_alloc": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "alloc": torch.cuda.memory_allocated(),
    }


def reset_peak(cuda: bool) -> None:
    if cuda:
        sync(True)
        torch.cuda.reset_peak_memory_stats()


def on_gpu(patcher) -> dict[str, float]:
    """(bytes on the load device, total bytes) of a ModelPatcher as ComfyUI counts them."""
    return {"loaded": int(patcher.loaded_size()), "size": int(patcher.model_size())}


# ------------------------------------------------------------------------------------------ stages (children)


def stage_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Part 1 for one model (`--_variant ours|dense`), in a fresh process."""
    c = Comfy(args.device, "auto")
    from comfy_nodes.fileformat import read_header

    cuda = c.device.type == "cuda"
    arch = read_header(args.file).architecture
    t = time.monotonic()
    if args._variant == "ours":
        model = c.load_ours(args.file)
        path = args.file
    else:
        model = c.load_dense(args.dense_checkpoint, args.file, args.tiny)
        path = args.dense_checkpoint
    load_s = time.monotonic() - t
    model = c.flux_model(model, args.width, args.height).clone()
    timer = StepTimer(c.device)
    model.set_model_unet_function_wrapper(timer)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 512, int(arch["context_in_dim"]), generator=g).to(torch.bfloat16)
    pooled = torch.randn(1, int(arch["vec_in_dim"]), generator=g)
    cond = [[ctx, {"pooled_output": pooled, "guidance": 3.5}]]

    reset_peak(cuda)
    base = torch.cuda.memory_allocated() if cuda else 0
    t = time.monotonic()
    out = c.ksample(model, cond, args.width, args.height, args.steps)  # moves the weights to the GPU
    sync(cuda)
    first_s = time.monotonic() - t
    first = mem_stats(cuda)
    resident = (torch.cuda.memory_allocated() - base) if cuda else 0
    timer.ms.clear()
    c.log.take()
    reset_peak(cuda)
    t = time.monotonic()
    for r in range(args.repeat):
        out = c.ksample(model, cond, args.width, args.height, args.steps, seed=r)
    sync(cuda)
    wall = (time.monotonic() - t) / (args.repeat * args.steps)
    measured = mem_stats(cuda)
    latent = out["samples"]
    return {
        "variant": args._variant,
        "path": path,
        "file_bytes": os.path.getsize(path),
        "load_s": load_s,
        "first_run_s": first_s,
        "first_run": first,
        "resident_bytes": resident,
        "measured": measured,
        "ms_per_step": statistics.median(timer.ms),
        "ms_all": timer.ms,
        "wall_s_per_step": wall,
        "model_bytes": on_gpu(model),
        "dtype": str(model.model_dtype()),
        "latent_shape": list(latent.shape),
        "latent_finite": bool(torch.isfinite(latent).all()),
        "comfy_log": c.log.take(),
        "stubbed": c.stubbed,
        "comfyui_version": c.version,
    }


def stage_graph(args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: the text-to-image graph, under the cap, in a fresh process."""
    cap_info = cap_device_memory(int(args.cap_gib * GIB)) if args.device == "cuda" else None
    c = Comfy(args.device, args.vram_mode)
    import comfy.model_management as mm

    cuda = c.device.type == "cuda"
    t = time.monotonic()
    files = write_random_encoders(args.workdir, comfyui_dir(), args.tiny)
    gen_s = time.monotonic() - t
    c.add_folder("text_encoders", files["t5"])
    c.add_folder("vae", files["vae"])
    c.log.take()
    stages: list[dict[str, Any]] = []
    models: dict[str, Any] = {}

    def snapshot() -> dict[str, dict[str, float]]:
        return {name: on_gpu(p) for name, p in models.items()}

    def run(name: str, fn):
        reset_peak(cuda)
        t = time.monotonic()
        try:
            result = fn()
        except torch.cuda.OutOfMemoryError as exc:
            stages.append({"stage": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            raise
        sync(cuda)
        stages.append(
            {"stage": name, "s": time.monotonic() - t, **mem_stats(cuda), "on_gpu": snapshot(), "log": c.log.take()}
        )
        return result

    def load():
        models["transformer"] = c.load_ours(args.file)
        te_options = {"t5xxl_model_config": dict(TINY_T5)} if args.tiny else {}
        # DualCLIPLoader (type flux, device default) calls exactly this; the tiny T5 needs ComfyUI's config option.
        clip = c.sd.load_clip(
            ckpt_paths=[files["clip_l"], files["t5"]],
            embedding_directory=c.folder_paths.get_folder_paths("embeddings"),
            clip_type=c.sd.CLIPType.FLUX,
            model_options=te_options,
        )
        vae = c.call(c.nodes.VAELoader, vae_name=os.path.basename(files["vae"]))
        models["text encoders"], models["vae"] = clip.patcher, vae.patcher
        return clip, vae

    timer = StepTimer(c.device)
    try:
        clip, vae = run("load files into RAM (our loader, DualCLIPLoader path, VAELoader)", load)

        def encode():
            cond = c.call(c.nodes.CLIPTextEncode, clip=clip, text=args.prompt)
            return c.call(c.nodes_flux.FluxGuidance, conditioning=cond, guidance=3.5), int(cond[0][0].shape[1])

        cond, tokens = run("text encode: CLIPTextEncode (T5-XXL fp8 + CLIP-L) + FluxGuidance 3.5", encode)

        def sample():
            model = c.flux_model(models["transformer"], args.width, args.height).clone()
            model.set_model_unet_function_wrapper(timer)
            return c.ksample(model, cond, args.width, args.height, args.graph_steps)

        latent = run(f"sampling: KSampler {args.graph_steps} steps euler/simple, our 1.58-bit transformer", sample)
        image = run("VAE decode: VAEDecode (FLUX VAE)", lambda: c.call(c.nodes.VAEDecode, vae=vae, samples=latent))
    except torch.cuda.OutOfMemoryError:
        write_json(args._result, _graph_result(args, c, cap_info, gen_s, stages, timer, None, None, failed=True))
        raise
    result = _graph_result(args, c, cap_info, gen_s, stages, timer, image, tokens)
    result["vram_state"] = str(mm.vram_state.name)
    result["comfy_total_vram_mb"] = float(mm.total_vram)
    return result


def _graph_result(args, c, cap_info, gen_s, stages, timer, image, tokens, failed=False) -> dict[str, Any]:
    cuda = c.device.type == "cuda"
    res: dict[str, Any] = {
        "failed": failed,
        "cap": cap_info,
        "random_files_s": gen_s,
        "stages": stages,
        "ms_per_step": statistics.median(timer.ms) if timer.ms else None,
        "t5_tokens": tokens,
        "image_shape": list(image.shape) if image is not None else None,
        "tiled_decode": any("tiled" in line for s in stages for line in s.get("log", [])),
        "stubbed": c.stubbed,
        "comfyui_version": c.version,
    }
    if cuda:
        res["outside_allocator_end"] = outside_allocator_bytes()
    return res


# ------------------------------------------------------------------------------------------ report


def _g(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(args, env: dict[str, Any], sampling: list[dict[str, Any]], graph: Optional[dict[str, Any]]) -> str:
    out = [
        f"# ComfyUI end to end: bitflux 1.58-bit FLUX vs ComfyUI's bf16 Flux{' (tiny mode)' if args.tiny else ''}",
        "",
        f"{env['device']}; torch {torch.__version__}; Python {platform.python_version()}; "
        f"ComfyUI {env.get('comfyui')}; bitkernel {env.get('bitkernel')}; import stubs: "
        f"{', '.join(env.get('stubbed') or []) or 'none'}. All weights random (timing and memory only).",
        "",
    ]
    cuda = args.device == "cuda"
    if sampling:
        out.append(
            f"## 1. Transformer sampling, {args.width}x{args.height}, batch 1\n\n"
            "KSampler euler/simple, cfg 1, ModelSamplingFlux (1.15, 0.5), hand-made conditioning (context "
            f"[1, 512, C] bf16, pooled, guidance 3.5); first run moves the weights, then {args.repeat} runs of "
            f"{args.steps} steps measured. ms/step: transformer call, median; wall: KSampler time / steps.\n"
        )
        head = [
            "model",
            "file GB",
            "load s",
            "dtype",
            "weights on GPU GiB",
            "peak VRAM sampling GiB",
            "peak - weights GiB",
            "peak reserved GiB",
            "ms/step",
            "wall ms/step",
            "first run s",
        ]
        rows, by = [], {}
        for r in sampling:
            by[r["variant"]] = r
            m = r["measured"]
            name = (
                "bitflux 1.58-bit (BitfluxModelLoader)"
                if r["variant"] == "ours"
                else ("ComfyUI stock Flux (UNETLoader, default dtype)" if not args.tiny else "stock ops, dense (tiny)")
            )
            rows.append(
                [
                    name,
                    f"{r['file_bytes'] / 1e9:.2f}",
                    f"{r['load_s']:.1f}",
                    r["dtype"].replace("torch.", ""),
                    _g(r["resident_bytes"]) if cuda else "-",
                    _g(m.get("peak_alloc")),
                    _g(m["peak_alloc"] - r["resident_bytes"]) if cuda else "-",
                    _g(m.get("peak_reserved")),
                    f"{r['ms_per_step']:.1f}",
                    f"{r['wall_s_per_step'] * 1e3:.1f}",
                    f"{r['first_run_s']:.1f}",
                ]
            )
        if "ours" in by and "dense" in by:
            o, d = by["ours"], by["dense"]
            om, dm = o["measured"], d["measured"]
            rows.append(
                [
                    "**ratio bitflux / bf16**",
                    _ratio(o["file_bytes"], d["file_bytes"]),
                    "",
                    "",
                    _ratio(o["resident_bytes"], d["resident_bytes"]),
                    _ratio(om.get("peak_alloc"), dm.get("peak_alloc")),
                    "",
                    "",
                    _ratio(o["ms_per_step"], d["ms_per_step"]),
                    _ratio(o["wall_s_per_step"], d["wall_s_per_step"]),
                    "",
                ]
            )
        out.append(markdown_table(head, rows))
        bad = [r["variant"] for r in sampling if not r["latent_finite"]]
        if bad:
            out.append(f"\nNon-finite latents from {', '.join(bad)} (random weights; timing unaffected).")
        out.append("")
    if graph:
        cap = graph.get("cap")
        out.append(
            f"## 2. Text-to-image graph, {args.width}x{args.height}, {args.graph_steps} steps"
            + (f", {cap['cap_bytes'] / GIB:.2f} GiB cap" if cap else " (CPU: no cap)")
            + "\n"
        )
        if cap:
            out.append(
                f"Allocator cap {_g(cap['cap_bytes'])} GiB = {cap['fraction']:.4f} of "
                f"{_g(cap['gpu_total_bytes'])} GiB; ComfyUI saw {graph.get('comfy_total_vram_mb', 0):.0f} MB total, "
                f"VRAM state {graph.get('vram_state', '?')}. Outside the allocator (CUDA context, handles, "
                f"kernels): {_g(cap['outside_allocator_start'])} GiB at start, "
                f"{_g(graph.get('outside_allocator_end'))} GiB at end.\n"
            )
        head = [
            "stage",
            "s",
            "peak allocated GiB",
            "peak reserved GiB",
            "allocated after GiB",
            "on GPU after: TE / transformer / VAE GiB (of total)",
        ]
        rows = []
        for s in graph["stages"]:
            if "error" in s:
                rows.append([s["stage"], "**OOM**", "", "", "", s["error"][:120]])
                continue
            og = s["on_gpu"]
            where = (
                "-"
                if not cuda
                else " / ".join(
                    f"{og[k]['loaded'] / GIB:.2f} ({og[k]['size'] / GIB:.2f})" if k in og else "-"
                    for k in ("text encoders", "transformer", "vae")
                )
            )
            rows.append(
                [
                    s["stage"],
                    f"{s['s']:.2f}",
                    _g(s.get("peak_alloc")),
                    _g(s.get("peak_reserved")),
                    _g(s.get("alloc")),
                    where,
                ]
            )
        done = [s for s in graph["stages"] if "error" not in s]
        run = [s for s in done if not s["stage"].startswith("load")]
        peak = max((s.get("peak_reserved", 0) for s in done), default=0)
        rows.append(
            [
                "**total (encode + sample + decode)**",
                f"{sum(s['s'] for s in run):.2f}",
                _g(max((s.get("peak_alloc", 0) for s in done), default=0)) if cuda else "-",
                _g(peak) if cuda else "-",
                "",
                f"with loads: {sum(s['s'] for s in done):.2f} s",
            ]
        )
        out.append(markdown_table(head, rows))
        notes = [
            f"T5 tokens: {graph['t5_tokens']}; image {graph['image_shape']}; transformer ms/step at the cap: "
            + (f"{graph['ms_per_step']:.1f}" if graph["ms_per_step"] else "-")
            + f"; VAE decode fell back to tiled: {'yes' if graph['tiled_decode'] else 'no'}; random TE/VAE "
            f"files: {graph['random_files_s']:.1f} s (not counted)."
        ]
        if cap and not graph["failed"]:
            phys = peak + (graph.get("outside_allocator_end") or 0)
            notes.append(
                f"Result: no out-of-memory error. Peak reserved {_g(peak)} GiB + outside the allocator "
                f"{_g(graph.get('outside_allocator_end'))} GiB = {_g(phys)} GiB of device memory "
                f"({'within' if phys <= cap['cap_bytes'] else 'ABOVE'} {cap['cap_bytes'] / GIB:.2f} GiB)."
            )
        if graph["failed"]:
            notes.append("**Result: OUT OF MEMORY** (see the stage marked OOM).")
        out.append("\n" + " ".join(notes))
        log = [f"- {s['stage'].split(':')[0]}: {line}" for s in graph["stages"] for line in s.get("log", [])]
        if log:
            out.append("\nComfyUI's memory log:\n\n" + "\n".join(log[:40]))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ driver


def run_child(args: argparse.Namespace, stage: str, variant: str = "") -> tuple[int, Optional[dict[str, Any]]]:
    fd, result = tempfile.mkstemp(prefix="comfy_e2e_", suffix=".json")
    os.close(fd)
    os.unlink(result)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_stage",
        stage,
        "--_result",
        result,
        "--file",
        args.file,
        "--device",
        args.device,
        "--width",
        str(args.width),
        "--height",
        str(args.height),
        "--steps",
        str(args.steps),
        "--repeat",
        str(args.repeat),
        "--graph-steps",
        str(args.graph_steps),
        "--cap-gib",
        str(args.cap_gib),
        "--workdir",
        args.workdir,
        "--prompt",
        args.prompt,
        "--vram-mode",
        args.vram_mode,
    ]
    if args.dense_checkpoint:
        cmd += ["--dense-checkpoint", args.dense_checkpoint]
    if args.tiny:
        cmd.append("--tiny")
    if variant:
        cmd += ["--_variant", variant]
    print(f"\n=== {stage} {variant}".rstrip(), flush=True)
    t = time.monotonic()
    rc = subprocess.call(cmd)
    print(f"=== {stage} {variant}: exit {rc}, {time.monotonic() - t:.0f} s".replace("  ", " "), flush=True)
    data = None
    if os.path.exists(result):
        with open(result) as f:
            data = json.load(f)
        os.unlink(result)
    return rc, data


def environment(args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    env: dict[str, Any] = {"device": "CPU"}
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env["device"] = f"{p.name} ({p.total_memory / GIB:.1f} GiB)"
    try:
        import bitkernel

        env["bitkernel"] = getattr(bitkernel, "__version__", "?")
    except ImportError:
        env["bitkernel"] = "not installed"
    for r in results:
        env.setdefault("comfyui", r.get("comfyui_version"))
        env.setdefault("stubbed", r.get("stubbed"))
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file", help="bitflux file (converter output); made here with --tiny")
    p.add_argument("--dense-checkpoint", help="the BFL checkpoint it was converted from, for the bf16 comparison")
    p.add_argument("--cap-gib", type=float, default=8.0, help="VRAM cap for the graph (part 2), GiB")
    p.add_argument("--out", help="also write the Markdown report here")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="reduced mode: small models made here (testable on CPU)")
    p.add_argument("--width", type=int, help="image width (default 1024, tiny 128)")
    p.add_argument("--height", type=int, help="image height (default 1024, tiny 128)")
    p.add_argument("--steps", type=int, default=2, help="KSampler steps per measured run (part 1)")
    p.add_argument("--repeat", type=int, default=2, help="measured runs per model (part 1)")
    p.add_argument("--graph-steps", type=int, default=4, help="KSampler steps of the graph (part 2)")
    p.add_argument("--parts", default="1,2", help="which parts to run: 1, 2 or 1,2")
    p.add_argument(
        "--vram-mode",
        choices=("auto", "normal", "low"),
        default="auto",
        help="ComfyUI's VRAM mode for part 2 (auto: what ComfyUI picks for a card of --cap-gib)",
    )
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument(
        "--workdir",
        default=os.path.join(ROOT, "out", "comfy_e2e"),
        help="random text encoder / VAE files (cached) and --tiny models",
    )
    p.add_argument("--_stage", choices=("sample", "graph"), help=argparse.SUPPRESS)
    p.add_argument("--_variant", choices=("ours", "dense"), help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.width = args.width or (128 if args.tiny else 1024)
    args.height = args.height or (128 if args.tiny else 1024)

    if args._stage:  # child process
        data = stage_sample(args) if args._stage == "sample" else stage_graph(args)
        write_json(args._result, data)
        return

    comfyui_dir()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU (use --device cpu --tiny for the reduced mode)")
    start = time.monotonic()
    if args.tiny and not args.file:
        args.file, dense = make_tiny_files(os.path.join(args.workdir, "tiny"), args.device)
        args.dense_checkpoint = args.dense_checkpoint or dense
    if not args.file or not os.path.isfile(args.file):
        raise SystemExit(f"--file: no bitflux file at {args.file!r} (make one: bench/convert_memory.py --keep)")
    if args.dense_checkpoint and not os.path.isfile(args.dense_checkpoint):
        raise SystemExit(f"--dense-checkpoint: no file at {args.dense_checkpoint}")
    parts = {s.strip() for s in args.parts.split(",")}
    sampling, graph, failures = [], None, []
    if "1" in parts:
        for variant in ("ours", "dense") if args.dense_checkpoint else ("ours",):
            rc, data = run_child(args, "sample", variant)
            if rc or data is None:
                failures.append(f"part 1 ({variant}) exited {rc}")
            else:
                sampling.append(data)
    if "2" in parts:
        rc, graph = run_child(args, "graph")
        if rc or graph is None or graph.get("failed"):
            failures.append(f"part 2 (graph under the cap) exited {rc}" + (" with OOM" if graph else ""))
    text = report(args, environment(args, sampling + ([graph] if graph else [])), sampling, graph)
    text += f"\nTotal time of this benchmark: {time.monotonic() - start:.0f} s.\n"
    if failures:
        text += "\n**FAILED:** " + "; ".join(failures) + "\n"
    print("\n" + text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
