"""The FLUX transformer in pure torch, in Black Forest Labs' key layout.

Same modules, names and math as black-forest-labs/flux `src/flux/model.py` and
`modules/layers.py` (and ComfyUI's `comfy/ldm/flux`): RMSNorm on q/k, RoPE over
`axes_dim`, sinusoidal timestep embedding with time_factor 1000, adaLN
modulation (shift, scale, gate), double-stream then single-stream blocks.  Every
linear is built through `operations.Linear` (ComfyUI's `operations=` contract),
so a quantized Linear class can replace them.

Image path (pixel space, no VAE): a 64x64 RGB image in [-1, 1] is
pixel-unshuffled by 2 into a [12, 32, 32] "latent"; FLUX's own 2x2 patchify then
gives 256 tokens of 48 channels.  In BFL terms in_channels = 48; in ComfyUI
terms in_channels = 12 with patch_size = 2 (see FluxConfig.comfyui_params).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .architecture import AXES_DIM, PATCH_SIZE, THETA, TIME_EMBED_DIM

LATENT_CHANNELS = 12  # 3 RGB channels x 2x2 pixel unshuffle
PATCH = PATCH_SIZE  # FLUX's patchify


class TorchOps:
    """Default `operations`: plain torch layers (ComfyUI passes its ops classes)."""

    Linear = nn.Linear


@dataclass
class FluxConfig:
    """FLUX hyper-parameters (BFL's FluxParams; out_channels = in_channels)."""

    in_channels: int = 48
    vec_in_dim: int = 128
    context_in_dim: int = 128
    hidden_size: int = 256
    mlp_ratio: float = 4.0
    num_heads: int = 2
    depth: int = 2
    depth_single_blocks: int = 2  # 3 made the bf16 file 16,499,520 B, over the 16,000,000 B limit
    axes_dim: tuple[int, ...] = AXES_DIM
    theta: int = THETA
    qkv_bias: bool = True
    guidance_embed: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FluxConfig:
        """From `to_dict()` or from an architecture dict (a bitflux file's `architecture`
        metadata, `Architecture.to_dict()`): keys FluxConfig lacks, such as patch_size
        (fixed at PATCH here), are ignored."""
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["axes_dim"] = tuple(d["axes_dim"])
        return cls(**d)

    def comfyui_params(self) -> dict[str, Any]:
        """Keyword arguments for ComfyUI's `comfy.ldm.flux.model.Flux` (which
        patchifies itself, so it counts channels before the 2x2 patch)."""
        d = self.to_dict()
        d["in_channels"] = d["out_channels"] = self.in_channels // (PATCH * PATCH)
        d["patch_size"] = PATCH
        return d


# ---------------------------------------------------------------- math (BFL math.py)


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    assert dim % 2 == 0
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.view(*out.shape[:-1], 2, 2).float()


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    b, h, seq, d = x.shape
    return x.transpose(1, 2).reshape(b, seq, h * d)  # B H L D -> B L (H D)


def _split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """B L (K H D) -> three tensors B H L D."""
    b, seq, _ = qkv.shape
    q, k, v = qkv.view(b, seq, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        embedding = embedding.to(t)
    return embedding


# ---------------------------------------------------------------- layers (BFL layers.py)


class EmbedND(nn.Module):
    def __init__(self, dim: int, theta: int, axes_dim: tuple[int, ...]) -> None:
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, operations: Any = TorchOps, **kw: Any) -> None:
        super().__init__()
        self.in_layer = operations.Linear(in_dim, hidden_dim, bias=True, **kw)
        self.silu = nn.SiLU()
        self.out_layer = operations.Linear(hidden_dim, hidden_dim, bias=True, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, **kw: Any) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, **kw))

    def forward(self, x: Tensor) -> Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int, **kw: Any) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim, **kw)
        self.key_norm = RMSNorm(dim, **kw)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, operations: Any = TorchOps, **kw: Any) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = operations.Linear(dim, dim * 3, bias=qkv_bias, **kw)
        self.norm = QKNorm(dim // num_heads, **kw)
        self.proj = operations.Linear(dim, dim, **kw)


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool, operations: Any = TorchOps, **kw: Any) -> None:
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = operations.Linear(dim, self.multiplier * dim, bias=True, **kw)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def _mlp(hidden: int, mlp_hidden: int, operations: Any, **kw: Any) -> nn.Sequential:
    return nn.Sequential(
        operations.Linear(hidden, mlp_hidden, bias=True, **kw),
        nn.GELU(approximate="tanh"),
        operations.Linear(mlp_hidden, hidden, bias=True, **kw),
    )


class DoubleStreamBlock(nn.Module):
    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
        operations: Any = TorchOps, **kw: Any,
    ) -> None:
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, True, operations, **kw)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias, operations, **kw)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_hidden, operations, **kw)
        self.txt_mod = Modulation(hidden_size, True, operations, **kw)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias, operations, **kw)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden, operations, **kw)

    def _qkv(self, x: Tensor, mod: ModulationOut, norm: nn.Module, attn: SelfAttention) -> tuple[Tensor, ...]:
        x = (1 + mod.scale) * norm(x) + mod.shift
        q, k, v = _split_qkv(attn.qkv(x), self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv(img, img_mod1, self.img_norm1, self.img_attn)
        txt_q, txt_k, txt_v = self._qkv(txt, txt_mod1, self.txt_norm1, self.txt_attn)

        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe=pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp((1 + img_mod2.scale) * self.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp((1 + txt_mod2.scale) * self.txt_norm2(txt) + txt_mod2.shift)
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, operations: Any = TorchOps, **kw: Any):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = operations.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim, **kw)  # qkv + mlp in
        self.linear2 = operations.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, **kw)  # proj + mlp out
        self.norm = QKNorm(hidden_size // num_heads, **kw)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, False, operations, **kw)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        mod, _ = self.modulation(vec)
        x_mod = (1 + mod.scale) * self.pre_norm(x) + mod.shift
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = _split_qkv(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe)
        output = self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))
        return x + mod.gate * output


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, operations: Any = TorchOps, **kw: Any) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = operations.Linear(hidden_size, out_channels, bias=True, **kw)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), operations.Linear(hidden_size, 2 * hidden_size, bias=True, **kw)
        )

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)


class Flux(nn.Module):
    """Transformer model for flow matching on sequences (BFL's `Flux`)."""

    def __init__(
        self, config: FluxConfig, operations: Any = TorchOps,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        p = self.params = config
        kw = {"dtype": dtype, "device": device}
        if p.hidden_size % p.num_heads:
            raise ValueError(f"hidden size {p.hidden_size} not divisible by num_heads {p.num_heads}")
        pe_dim = p.hidden_size // p.num_heads
        if sum(p.axes_dim) != pe_dim:
            raise ValueError(f"got axes_dim {p.axes_dim} but expected positional dim {pe_dim}")
        self.in_channels = self.out_channels = p.in_channels
        self.hidden_size, self.num_heads = p.hidden_size, p.num_heads
        self.pe_embedder = EmbedND(pe_dim, p.theta, p.axes_dim)
        self.img_in = operations.Linear(p.in_channels, p.hidden_size, bias=True, **kw)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, p.hidden_size, operations, **kw)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size, operations, **kw)
        self.guidance_in = (
            MLPEmbedder(TIME_EMBED_DIM, p.hidden_size, operations, **kw) if p.guidance_embed else nn.Identity()
        )
        self.txt_in = operations.Linear(p.context_in_dim, p.hidden_size, **kw)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias, operations, **kw)
            for _ in range(p.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, operations, **kw)
            for _ in range(p.depth_single_blocks)
        )
        self.final_layer = LastLayer(p.hidden_size, p.in_channels, operations, **kw)

    def embed(
        self, img: Tensor, txt: Tensor, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Everything before the blocks but the positional table: (img, txt, vec). Split from forward so
        the calibrating converter can run the blocks one at a time with the same math (it keeps its
        positional tables per batch shape)."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("Input img and txt tensors must have 3 dimensions.")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, TIME_EMBED_DIM))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("Didn't get guidance strength for guidance distilled model.")
            vec = vec + self.guidance_in(timestep_embedding(guidance, TIME_EMBED_DIM))
        vec = vec + self.vector_in(y)
        return img, self.txt_in(txt), vec

    def forward(
        self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        img, txt, vec = self.embed(img, txt, timesteps, y, guidance)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        # One concatenation for all single blocks (run_single, per block, is for callers that
        # run the blocks one at a time).
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec=vec, pe=pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)


def run_single(block: SingleStreamBlock, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
    """A single-stream block on the (img, txt) pair the double blocks pass along: text
    tokens first, as BFL concatenates them, split again after."""
    x = block(torch.cat((txt, img), 1), vec=vec, pe=pe)
    return x[:, txt.shape[1] :], x[:, : txt.shape[1]]


def block_linear_names(model: Flux) -> list[str]:
    """Names of the linears inside the double/single blocks (what a ternary
    quantizer replaces; embedders and final_layer stay 16-bit)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(("double_", "single_"))]


# ---------------------------------------------------------------- image <-> tokens


def image_to_latent(images: Tensor) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> "latent" [B, 12, H/2, W/2] in [-1, 1]."""
    return F.pixel_unshuffle(images * 2 - 1, 2)


def latent_to_image(latent: Tensor) -> Tensor:
    """Inverse of image_to_latent, clamped to [0, 1]."""
    return ((F.pixel_shuffle(latent, 2) + 1) / 2).clamp(0, 1)


def pack(latent: Tensor) -> Tensor:
    """BFL patchify: b c (h ph) (w pw) -> b (h w) (c ph pw)."""
    b, c, h, w = latent.shape
    x = latent.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of pack for a latent of spatial size (height, width)."""
    b, _, d = x.shape
    h, w, c = height // PATCH, width // PATCH, d // (PATCH * PATCH)
    x = x.view(b, h, w, c, PATCH, PATCH)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def make_img_ids(batch: int, height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids [B, (h/2)(w/2), 3] for a latent of (height, width): (0, row, col),
    as BFL's `prepare`."""
    h, w = height // PATCH, width // PATCH
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.view(1, h * w, 3).expand(batch, -1, -1)


def make_txt_ids(batch: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """Text position ids: all zero, as in FLUX (text order lives in the encoder)."""
    return torch.zeros(batch, length, 3, device=device)


# ---------------------------------------------------------------- sampling schedule (BFL sampling.py)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(
    x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15
) -> Callable[[float], float]:
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(
    num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True
) -> list[float]:
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()
