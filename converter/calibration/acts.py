"""The calibration set as the blocks see it: one (img, txt, vec) stream state per sample.

A sample is one prompt at one timestep of its teacher trajectory. Prompts may
encode to different text lengths (ComfyUI pads T5 to 256 tokens and longer
prompts run longer), so `txt` is padded to the longest and each sample keeps
its length; micro-batches only ever hold samples of one length, so padding
never reaches the model. Positional embeddings depend only on the text length
(FLUX's text ids are all zero) and the image grid, so they are built per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..flux_model import EmbedND, make_img_ids, make_txt_ids


@dataclass
class Acts:
    img: Tensor  # [S, T, D]
    txt: Tensor  # [S, Lmax, D], zero beyond lens[i]
    lens: Tensor  # [S] int64
    vec: Tensor  # [S, D]

    def __len__(self) -> int:
        return self.img.shape[0]

    def clone_streams(self) -> Acts:
        return Acts(self.img.clone(), self.txt.clone(), self.lens, self.vec)

    def batch(self, idx: list[int], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        length = int(self.lens[idx[0]])
        i = torch.tensor(idx)
        return (
            self.img[i].to(device, dtype),
            self.txt[i, :length].to(device, dtype),
            self.vec[i].to(device, dtype),
        )

    def store(self, idx: list[int], img: Tensor, txt: Tensor) -> None:
        i = torch.tensor(idx)
        self.img[i] = img.to(self.img.device, self.img.dtype)
        self.txt[i, : txt.shape[1]] = txt.to(self.txt.device, self.txt.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"img": self.img, "txt": self.txt, "lens": self.lens, "vec": self.vec}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> Acts:
        return cls(t["img"], t["txt"], t["lens"], t["vec"])


def micro_batches(lens: Tensor, tokens_per_sample: int, max_tokens: int) -> list[list[int]]:
    """Sample indices grouped by text length, each group cut to at most max_tokens tokens."""
    per = max(1, max_tokens // max(tokens_per_sample, 1))
    out: list[list[int]] = []
    for length in sorted(set(lens.tolist())):
        idx = [i for i, n in enumerate(lens.tolist()) if n == length]
        out += [idx[j : j + per] for j in range(0, len(idx), per)]
    return out


class PositionCache:
    """RoPE tables per (batch, text length) for one image token grid."""

    def __init__(self, embedder: EmbedND, grid: tuple[int, int], device: torch.device) -> None:
        self.embedder, self.grid, self.device = embedder, grid, device
        self._cache: dict[tuple[int, int], Tensor] = {}

    def __call__(self, batch: int, length: int) -> Tensor:
        key = (batch, length)
        if key not in self._cache:
            h, w = self.grid
            ids = torch.cat(
                (make_txt_ids(batch, length, self.device), make_img_ids(batch, 2 * h, 2 * w, self.device)), dim=1
            )
            self._cache[key] = self.embedder(ids)
        return self._cache[key]
