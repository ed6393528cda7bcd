"""The FLUX architecture, read from tensor shapes (BFL keys) and checked against them.

`detect_architecture` reads every hyper-parameter from the shapes, then
`expected_shapes` rebuilds the complete key/shape list from those parameters
and the two must agree exactly: a file with a missing, extra or misshapen
tensor is rejected with a message naming it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from .errors import InputError

HEAD_DIM = 128  # every FLUX.1 model; the rotary axes (16, 56, 56) sum to it
AXES_DIM = (16, 56, 56)
THETA = 10_000
PATCH_SIZE = 2
TIME_EMBED_DIM = 256  # sinusoidal timestep / guidance embedding width

DOUBLE_LINEARS = tuple(
    f"{s}_{m}" for s in ("img", "txt") for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")
)
SINGLE_LINEARS = ("linear1", "linear2", "modulation.lin")


@dataclass(frozen=True)
class Architecture:
    """BFL's FluxParams plus patch_size (docs/FORMAT.md, metadata `architecture`)."""

    in_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: tuple[int, ...]
    theta: int
    qkv_bias: bool
    guidance_embed: bool
    patch_size: int = PATCH_SIZE

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d


# FLUX.1-dev's transformer (the full-size model the benchmarks build with random weights).
FLUX1_DEV = Architecture(
    in_channels=64,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=AXES_DIM,
    theta=THETA,
    qkv_bias=True,
    guidance_embed=True,
)


def block_linears(arch: Architecture) -> list[str]:
    """BFL prefixes of the linears inside the blocks (what gets quantized), in model order."""
    names = [f"double_blocks.{i}.{m}" for i in range(arch.depth) for m in DOUBLE_LINEARS]
    return names + [f"single_blocks.{i}.{m}" for i in range(arch.depth_single_blocks) for m in SINGLE_LINEARS]


def expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every tensor of this architecture's BFL state dict with its shape, in model order."""
    h, mlp, hd = arch.hidden_size, arch.mlp_hidden, arch.hidden_size // arch.num_heads
    out: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int, bias: bool = True) -> None:
        out[f"{name}.weight"] = (n_out, n_in)
        if bias:
            out[f"{name}.bias"] = (n_out,)

    linear("img_in", h, arch.in_channels)
    linear("time_in.in_layer", h, TIME_EMBED_DIM)
    linear("time_in.out_layer", h, h)
    linear("vector_in.in_layer", h, arch.vec_in_dim)
    linear("vector_in.out_layer", h, h)
    if arch.guidance_embed:
        linear("guidance_in.in_layer", h, TIME_EMBED_DIM)
        linear("guidance_in.out_layer", h, h)
    linear("txt_in", h, arch.context_in_dim)
    for i in range(arch.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            linear(f"{p}_mod.lin", 6 * h, h)
            linear(f"{p}_attn.qkv", 3 * h, h, arch.qkv_bias)
            out[f"{p}_attn.norm.query_norm.scale"] = (hd,)
            out[f"{p}_attn.norm.key_norm.scale"] = (hd,)
            linear(f"{p}_attn.proj", h, h)
            linear(f"{p}_mlp.0", mlp, h)
            linear(f"{p}_mlp.2", h, mlp)
    for i in range(arch.depth_single_blocks):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * h + mlp, h)
        linear(f"{p}.linear2", h, h + mlp)
        out[f"{p}.norm.query_norm.scale"] = (hd,)
        out[f"{p}.norm.key_norm.scale"] = (hd,)
        linear(f"{p}.modulation.lin", 3 * h, h)
    linear("final_layer.linear", arch.in_channels, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return out


def _depth(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    idx = {int(m.group(1)) for k in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    if idx and idx != set(range(max(idx) + 1)):
        missing = sorted(set(range(max(idx) + 1)) - idx)
        raise InputError(
            f"the checkpoint has {prefix} up to {max(idx)} but lacks {prefix} {missing}: it is incomplete."
        )
    return len(idx)


def _need(shapes: dict[str, tuple[int, ...]], key: str, ndim: int) -> tuple[int, ...]:
    shape = shapes.get(key)
    if shape is None:
        raise InputError(f"not a FLUX transformer: tensor {key} is missing.")
    if len(shape) != ndim:
        raise InputError(f"not a FLUX transformer: {key} has shape {list(shape)}, expected {ndim} dimensions.")
    return shape


def detect_architecture(shapes: dict[str, tuple[int, ...]]) -> Architecture:
    """Reads the FLUX hyper-parameters from BFL-keyed shapes and checks every tensor.

    Raises InputError naming what was found and what FLUX has.
    """
    hidden, in_channels = _need(shapes, "img_in.weight", 2)
    context_in_dim = _need(shapes, "txt_in.weight", 2)[1]
    vec_in_dim = _need(shapes, "vector_in.in_layer.weight", 2)[1]
    depth = _depth(shapes, "double_blocks")
    depth_single = _depth(shapes, "single_blocks")
    if depth == 0 and depth_single == 0:
        raise InputError("not a FLUX transformer: it has img_in but no double_blocks or single_blocks.")
    norm_key = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    head_dim = _need(shapes, norm_key, 1)[0]
    if head_dim != HEAD_DIM or hidden % HEAD_DIM:
        raise InputError(
            f"unsupported FLUX variant: hidden size {hidden} with query-norm width (head dim) {head_dim}; "
            f"FLUX.1 has head dim {HEAD_DIM} and a hidden size that is a multiple of it."
        )
    if depth:
        mlp_hidden = _need(shapes, "double_blocks.0.img_mlp.0.weight", 2)[0]
    else:
        mlp_hidden = _need(shapes, "single_blocks.0.linear1.weight", 2)[0] - 3 * hidden
    mlp_ratio = mlp_hidden / hidden
    if mlp_hidden <= 0 or int(hidden * mlp_ratio) != mlp_hidden:
        raise InputError(f"unsupported FLUX variant: MLP width {mlp_hidden} for hidden size {hidden}.")
    out_channels = _need(shapes, "final_layer.linear.weight", 2)[0]
    if out_channels != in_channels:
        raise InputError(
            f"unsupported FLUX variant: img_in takes {in_channels} channels but final_layer gives {out_channels}; "
            "only models with equal input and output channels (FLUX.1-dev / schnell and their fine-tunes) are "
            "supported, not Fill-style models."
        )
    arch = Architecture(
        in_channels=in_channels,
        vec_in_dim=vec_in_dim,
        context_in_dim=context_in_dim,
        hidden_size=hidden,
        mlp_ratio=mlp_ratio,
        num_heads=hidden // HEAD_DIM,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=AXES_DIM,
        theta=THETA,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )
    check_shapes(shapes, arch)
    return arch


def check_shapes(shapes: dict[str, tuple[int, ...]], arch: Architecture) -> None:
    """Every expected tensor present with its shape, nothing else."""
    want = expected_shapes(arch)
    summary = (
        f"hidden {arch.hidden_size}, {arch.depth} double + {arch.depth_single_blocks} single blocks, "
        f"MLP ratio {arch.mlp_ratio:g}"
    )
    missing = [k for k in want if k not in shapes]
    if missing:
        raise InputError(
            f"incomplete FLUX transformer ({summary}): {len(missing)} tensors missing, e.g. {', '.join(missing[:5])}."
        )
    extra = [k for k in shapes if k not in want]
    if extra:
        raise InputError(
            f"the FLUX transformer ({summary}) has {len(extra)} tensors FLUX does not have, e.g. "
            f"{', '.join(sorted(extra)[:5])}; this model variant is not supported."
        )
    wrong = [f"{k} {list(shapes[k])} (expected {list(v)})" for k, v in want.items() if tuple(shapes[k]) != v]
    if wrong:
        raise InputError(f"FLUX transformer ({summary}) with tensors of unexpected shape: {'; '.join(wrong[:5])}.")
