"""The text the info node shows: what the MODEL holds, what ComfyUI's memory manager sees, what is patched."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from .lowrank import is_plain_lora
from .ops import packed_layers


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _module_bytes(m: torch.nn.Module) -> int:
    return sum(t.nelement() * t.element_size() for t in m.state_dict().values())


def _bitkernel_line() -> str:
    try:
        import bitkernel

        i: dict[str, Any] = bitkernel.info()
    except ImportError:
        return "bitkernel: not installed"
    cuda = f"CUDA archs {i.get('cuda_archs') or '-'}" if i.get("cuda") else "CPU-only build"
    return f"bitkernel {i.get('version')}: {cuda}; CPU kernels {i.get('cpu_features')}"


def model_report(patcher, per_layer: bool = False) -> str:
    model = patcher.model
    dm = model.diffusion_model
    info = getattr(model, "bitflux", None)
    lines: list[str] = []
    if info is not None:
        h = info.header
        method = h.method.get("name", "?") if isinstance(h.method, dict) else h.method
        lines.append(
            f"1.58-bit FLUX: {info.path.replace(chr(92), '/').rsplit('/', 1)[-1]} "
            f"(bitflux v{h.format_version}, converter {h.converter_version or '?'}, method {method})"
        )
    else:
        lines.append("This MODEL was not loaded by the bitflux loader.")
    p = getattr(dm, "params", None)
    if p is not None and hasattr(p, "depth_single_blocks"):  # a Flux-type model
        lines.append(
            f"architecture: hidden {p.hidden_size}, {p.num_heads} heads, {p.depth} double + {p.depth_single_blocks} "
            f"single blocks, {p.out_channels} latent channels, guidance embedding {'yes' if p.guidance_embed else 'no'}"
        )

    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # label -> layers, params, bytes
    ranks: list[int] = []  # of the low-rank branches stored in the file
    packed_keys: set[str] = set()  # ModelPatcher keys of the packed layers
    rows = []
    logical = 0
    for name, m in packed_layers(dm):
        n_params = m.in_features * m.out_features
        nbytes = _module_bytes(m)
        rank = 0
        if m.is_packed:
            label = m.spec.label + (" a8" if m.spec.act == "a8" else "")
            packed_keys.add(getattr(m, "patch_key", ""))
            if m.lora_down is not None:
                rank = int(m.lora_down.shape[0])
                ranks.append(rank)
        else:
            label = "16-bit"
        g = groups[label]
        g[0], g[1], g[2] = g[0] + 1, g[1] + n_params, g[2] + nbytes
        logical += n_params
        if per_layer:
            rows.append(
                f"  {name:<40} {label:<12} {m.out_features}x{m.in_features:<7} {_gib(nbytes):>10}"
                + (f"  adapter rank {rank}" if rank else "")
            )

    total = patcher.model_size()
    other = total - sum(g[2] for g in groups.values())
    dense_equiv = 2 * (logical + other // 2)
    lines.append(
        f"weights: {_gib(total)} as ComfyUI's memory manager counts them (16-bit equivalent {_gib(dense_equiv)}, "
        f"{dense_equiv / max(total, 1):.1f}x smaller)"
    )
    for label, (count, n_params, nbytes) in sorted(groups.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"  {label:<14} {count:>4} linear layers  {n_params / 1e9:7.3f} B params  {_gib(nbytes):>10}")
    lines.append(f"  {'other':<14} norms and non-linear tensors  {_gib(other):>10}")
    if ranks:
        lines.append(f"  quality-recovery low-rank branches in the file: {len(ranks)} layers, rank up to {max(ranks)}")

    loaded = patcher.loaded_size()
    dev = patcher.current_loaded_device()
    state = "not loaded" if loaded == 0 else ("partially loaded" if loaded < total else "fully loaded")
    compute = model.manual_cast_dtype or model.get_dtype()
    lines.append(
        f"device: {state} on {patcher.load_device} ({_gib(loaded)} there, now at {dev}); offload device "
        f"{patcher.offload_device}; compute dtype {str(compute).replace('torch.', '')}"
    )

    patched = [k for k in patcher.patches if k in packed_keys]
    if patched:
        branch = sum(all(is_plain_lora(p) for p in patcher.patches[k]) for k in patched)
        lines.append(
            f"LoRA patches on packed layers: {len(patched)} ({branch} as run-time low-rank branches, "
            f"{len(patched) - branch} applied to a dequantized copy per use)"
        )
    else:
        lines.append("LoRA patches on packed layers: none")
    lines.append(_bitkernel_line())
    if per_layer:
        lines.append("layers:")
        lines.extend(rows)
    return "\n".join(lines)
