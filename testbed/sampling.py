"""Rectified-flow sampling with FLUX's schedule (BFL `sampling.py`).

Convention as BFL: t = 1 is pure noise, t = 0 the image, the model predicts the
velocity v = noise - image and Euler steps x <- x + (t_next - t) v.  The schedule
is BFL's `get_schedule` with the resolution-dependent shift (mu from the image
sequence length: 256 tokens -> mu = 0.5).  `model` can be any callable with BFL's
forward signature, so quantized models plug in unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from converter.flux_model import (
    LATENT_CHANNELS,
    get_schedule,
    latent_to_image,
    make_img_ids,
    make_txt_ids,
    pack,
    unpack,
)

from .scenes import IMAGE_SIZE

LATENT_SIZE = IMAGE_SIZE // 2
SEQ_LEN = (LATENT_SIZE // 2) ** 2  # image tokens: 256
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.5  # FLUX.1-dev's default; the testbed distils guidance in the same way


def get_noise(seeds: list[int], device: torch.device | str = "cpu") -> Tensor:
    """Noise latents [B, 12, 32, 32], one CPU generator per seed, so the noise of a
    prompt depends only on its seed (not on batch size, device or model)."""
    shape = (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(noise).to(device)


def denoise(
    model: Callable[..., Tensor], img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor,
    timesteps: list[float], guidance: float = DEFAULT_GUIDANCE,
) -> Tensor:
    """BFL's Euler loop over packed tokens."""
    guidance_vec = torch.full((img.shape[0],), guidance, device=img.device, dtype=img.dtype)
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
        t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
        pred = model(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, y=vec, timesteps=t_vec, guidance=guidance_vec)
        img = img + (t_prev - t_curr) * pred.to(img.dtype)
    return img


@torch.no_grad()
def sample(
    model: Callable[..., Tensor], text_encoder: torch.nn.Module, prompts: list[str],
    seeds: list[int] | None = None, noise: Tensor | None = None, steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE, device: torch.device | str = "cpu", autocast: bool | None = None,
) -> Tensor:
    """Images [B, 3, 64, 64] in [0, 1] for `prompts`.

    Noise comes from `noise` ([B, 12, 32, 32]) or per-prompt `seeds` (default
    0..B-1).  autocast: bf16 autocast around the model calls (default: on CUDA).
    """
    device = torch.device(device)
    if noise is None:
        noise = get_noise(seeds if seeds is not None else list(range(len(prompts))), device)
    x = pack(noise.to(device, torch.float32))
    b = x.shape[0]
    if autocast is None:
        autocast = device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        txt, vec = text_encoder.encode(prompts)
        x = denoise(
            model, x, make_img_ids(b, LATENT_SIZE, LATENT_SIZE, device), txt, make_txt_ids(b, txt.shape[1], device),
            vec, get_schedule(steps, SEQ_LEN), guidance,
        )
    return latent_to_image(unpack(x.float(), LATENT_SIZE, LATENT_SIZE))
