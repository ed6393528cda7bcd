"""Calibration conditioning: what the text encoders make of the calibration prompts, in one file.

The converter has no text encoders, so for `--calibrate` the prompts reach it
already encoded. Producers: the ComfyUI node "BitFlux Calibration Prompts"
(FLUX.1: T5-XXL + CLIP-L through ComfyUI's own CLIPTextEncode path) and
`python -m testbed.calibration_data` (the testbed model's own text encoder).

File format (safetensors, format_version 1)
-------------------------------------------

Tensors:

    txt      [P, L, C]  float16 / bfloat16 / float32  per-token context of each prompt (T5-XXL's role, FLUX's
                                                       `txt`, fed to `txt_in`); C = the model's context_in_dim
    vec      [P, V]     float16 / bfloat16 / float32  pooled vector (CLIP-L's role, FLUX's `y`, fed to
                                                       `vector_in`); V = the model's vec_in_dim
    txt_len  [P]        int64 (optional)               prompt i's context is txt[i, :txt_len[i]]; the rest of
                                                       row i is zero padding. Absent: every prompt uses all L.

Prompts can encode to contexts of different lengths (ComfyUI's T5 pads to 256
tokens and goes beyond for longer prompts), and FLUX takes a context of any
length, so no common length is forced onto the model: rows are zero-padded to
the longest one and consumers must run prompt i with `txt[i, :txt_len[i]]`
(`CalibrationConditioning.context(i)`), never with the zero rows (FLUX attends
to every text token it is given; zeros are not what T5's padding looks like).
Readers ignore tensors they do not know.

`__metadata__` (all values are strings, as safetensors requires):

    format          "bitflux-calibration"
    format_version  "1" (readers refuse a larger number: that file needs a newer reader)
    prompts         JSON list of the P prompt strings, in row order
    encoder         free text naming what encoded them ("comfyui t5xxl+clip_l", "testbed text encoder")
    image_tokens    JSON [h, w]: the token grid of the images the trajectories are to be sampled at
                    (pixels / 16 for FLUX.1: [64, 64] at 1024x1024; [16, 16] for the testbed's 64x64 images)
    guidance        JSON number: the distilled guidance to sample with (FLUX.1-dev's default 3.5)

API:

    CalibrationConditioning(txt, vec, prompts, encoder, image_tokens, guidance, txt_len=None)
        len(c), c.select(indices), c.context(i), c.context_dim, c.vec_dim, c.max_len
    save_conditioning(path, cond)       atomic: a temporary name in the same folder, then os.replace
    load_conditioning(path, context_in_dim=None, vec_in_dim=None) -> CalibrationConditioning
        safetensors only (never torch.load); converter.errors.InputError with what is wrong and the fix
    overlapping_prompts(cond, other_prompts) -> list[str]
        calibration prompts that are also in `other_prompts` (evaluation prompts must not be calibrated on)
    default_prompts() / read_prompt_file(path) / parse_prompts(text)
        the shipped FLUX.1-dev prompt list (prompts.txt); one prompt per line, blank and `#` lines skipped
    stack_contexts(contexts) -> (txt, txt_len)     variable-length [L_i, C] contexts -> zero-padded batch
    flux_image_tokens(width, height) -> (h, w)     FLUX.1's token grid for an image size
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import atomic_write
from ..errors import InputError
from ..safetensors_io import SafetensorsReader

FORMAT_NAME = "bitflux-calibration"
FORMAT_VERSION = 1
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_GUIDANCE = 3.5  # FLUX.1-dev's usual distilled guidance
FLUX_PIXELS_PER_TOKEN = 16  # the FLUX VAE's 8x downsampling times the transformer's 2x2 patches
DEFAULT_PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.txt")

# Widths the error messages can put a name to.
KNOWN_CONTEXT = {4096: "T5-XXL"}
KNOWN_VEC = {768: "CLIP-L"}
HOW_TO_MAKE = (
    "Make a conditioning file for the model you convert: for FLUX.1 with the ComfyUI node "
    '"BitFlux Calibration Prompts" fed by a DualCLIPLoader (clip_l + t5xxl, type flux); for the testbed '
    "model with python -m testbed.calibration_data."
)

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class CalibrationConditioning:
    """Encoded calibration prompts (module docstring: the meaning of each field).

    txt [P, L, C], vec [P, V], prompts (P strings), txt_len [P] int64 (None: all L).
    """

    txt: Tensor
    vec: Tensor
    prompts: list[str]
    encoder: str
    image_tokens: tuple[int, int]
    guidance: float
    txt_len: Optional[Tensor] = None

    def __post_init__(self) -> None:
        self.prompts = list(self.prompts)
        self.image_tokens = (int(self.image_tokens[0]), int(self.image_tokens[1]))
        self.guidance = float(self.guidance)
        if self.txt_len is None and self.txt.dim() == 3:
            self.txt_len = torch.full((self.txt.shape[0],), self.txt.shape[1], dtype=torch.int64)
        problem = _structure_problem(self.txt, self.vec, self.txt_len, self.prompts, self.image_tokens, self.guidance)
        if problem:
            raise ValueError(problem)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def context_dim(self) -> int:
        return int(self.txt.shape[2])

    @property
    def vec_dim(self) -> int:
        return int(self.vec.shape[1])

    @property
    def max_len(self) -> int:
        return int(self.txt.shape[1])

    def context(self, i: int) -> Tensor:
        """Prompt i's context [txt_len[i], C], without the zero padding."""
        assert self.txt_len is not None  # set in __post_init__
        return self.txt[i, : int(self.txt_len[i])]

    def select(self, indices: Union[Sequence[int], Tensor]) -> CalibrationConditioning:
        """The prompts at `indices`, in that order (a new object; tensors are indexed copies)."""
        idx = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices, dtype=torch.long)
        if idx.dim() != 1:
            raise ValueError(f"indices must be one-dimensional, got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise IndexError(f"indices out of range for {len(self)} prompts")
        if not idx.numel():
            raise ValueError("select needs at least one index (a conditioning holds at least one prompt)")
        assert self.txt_len is not None
        txt_len = self.txt_len[idx]
        # Keep L no longer than the longest selected prompt needs (the rest would be padding only).
        length = int(txt_len.max())
        return CalibrationConditioning(
            txt=self.txt[idx, :length],
            vec=self.vec[idx],
            prompts=[self.prompts[i] for i in idx.tolist()],
            encoder=self.encoder,
            image_tokens=self.image_tokens,
            guidance=self.guidance,
            txt_len=txt_len,
        )


def _structure_problem(
    txt: Tensor, vec: Tensor, txt_len: Optional[Tensor], prompts: list[str], image_tokens: tuple[int, int],
    guidance: float,
) -> Optional[str]:
    """What is inconsistent between the fields (None if nothing): shared by the constructor and the reader."""
    if txt.dim() != 3:
        return f"txt must be [prompts, tokens, width], got shape {tuple(txt.shape)}"
    if vec.dim() != 2:
        return f"vec must be [prompts, width], got shape {tuple(vec.shape)}"
    p = len(prompts)
    if txt.shape[0] != p or vec.shape[0] != p:
        return f"txt has {txt.shape[0]} rows and vec {vec.shape[0]}, but there are {p} prompts; they must match"
    if p == 0:
        return "there are no prompts"
    if not all(isinstance(s, str) for s in prompts):
        return "prompts must all be strings"
    if txt.shape[1] < 1 or txt.shape[2] < 1 or vec.shape[1] < 1:
        return f"txt {tuple(txt.shape)} and vec {tuple(vec.shape)} must have non-empty token and width axes"
    if txt.dtype not in FLOAT_DTYPES or vec.dtype not in FLOAT_DTYPES:
        return f"txt is {txt.dtype} and vec {vec.dtype}; both must be float16, bfloat16 or float32"
    if txt_len is not None:
        if txt_len.shape != (p,) or txt_len.dtype.is_floating_point or txt_len.dtype == torch.bool:
            return f"txt_len must be an integer tensor [{p}], got {txt_len.dtype} {tuple(txt_len.shape)}"
        lo, hi = int(txt_len.min()), int(txt_len.max())
        if lo < 1 or hi > txt.shape[1]:
            return f"txt_len must lie in 1..{txt.shape[1]} (the token axis of txt), got {lo}..{hi}"
    if len(image_tokens) != 2 or min(image_tokens) < 1:
        return f"image_tokens must be two positive integers [h, w], got {list(image_tokens)}"
    if not math.isfinite(guidance):
        return f"guidance must be a finite number, got {guidance}"
    return None


def _non_finite_problem(cond: CalibrationConditioning) -> Optional[str]:
    for name in ("txt", "vec"):
        t = getattr(cond, name)
        finite = torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            return (
                f"{name} has NaN or Inf values for {len(bad)} of {len(cond)} prompts (first: prompt {bad[0]}, "
                f"{cond.prompts[bad[0]]!r})"
            )
    return None


# ---------------------------------------------------------------------------- writing


def save_conditioning(path: PathLike, cond: CalibrationConditioning) -> None:
    """Write `cond` to `path` (module docstring: the format), replacing any file there.

    Atomic: the file is written under a temporary name in the same folder and
    renamed into place, so `path` is either the old file or the complete new one
    and a failed write leaves nothing behind. Refuses (ValueError) what
    load_conditioning would refuse, so no unreadable file is ever written.
    """
    path = os.fspath(path)
    problem = _structure_problem(cond.txt, cond.vec, cond.txt_len, cond.prompts, cond.image_tokens, cond.guidance)
    problem = problem or _non_finite_problem(cond)
    if problem:
        raise ValueError(f"not writing {path}: {problem}")
    assert cond.txt_len is not None
    tensors = {
        "txt": cond.txt.detach().to("cpu").contiguous(),
        "vec": cond.vec.detach().to("cpu").contiguous(),
        "txt_len": cond.txt_len.detach().to("cpu", torch.int64).contiguous(),
    }
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "prompts": json.dumps(cond.prompts, ensure_ascii=False),
        "encoder": str(cond.encoder),
        "image_tokens": json.dumps(list(cond.image_tokens)),
        "guidance": json.dumps(float(cond.guidance)),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ---------------------------------------------------------------------------- reading


def _width_name(width: int, known: dict[int, str]) -> str:
    return f"{width} ({known[width]})" if width in known else str(width)


def load_conditioning(
    path: PathLike, context_in_dim: Optional[int] = None, vec_in_dim: Optional[int] = None
) -> CalibrationConditioning:
    """Read and check a conditioning file (safetensors only; nothing is unpickled).

    context_in_dim / vec_in_dim: the widths of the checkpoint's txt_in and
    vector_in inputs; when given, the file must match them. Raises
    converter.errors.InputError naming the problem and what to do about it.
    """
    path = os.fspath(path)
    name = os.path.basename(path) or path
    if not os.path.exists(path):
        raise InputError(f"Calibration conditioning file {path} does not exist. {HOW_TO_MAKE}")
    if not os.path.isfile(path):
        raise InputError(f"{path} is a folder, not a calibration conditioning file. {HOW_TO_MAKE}")
    with SafetensorsReader(path) as reader:  # InputError for a file that is not safetensors or truncated
        meta, infos = reader.metadata, reader.tensors
        fmt = meta.get("format")
        if fmt != FORMAT_NAME:
            what = (
                "a converted bitflux model" if fmt == "bitflux"
                else f"metadata format {fmt!r}" if fmt is not None
                else "no metadata format"
            )  # fmt: skip
            raise InputError(
                f"{name} is not a calibration conditioning file: it has {what}, not format {FORMAT_NAME!r}. "
                f"{HOW_TO_MAKE}"
            )
        try:
            version = int(meta.get("format_version", ""))
        except ValueError:
            raise InputError(
                f"{name} has an unreadable format_version {meta.get('format_version')!r}; the file is damaged. "
                "Make it again."
            ) from None
        if version > FORMAT_VERSION:
            raise InputError(
                f"{name} has calibration format version {version}, newer than this converter reads "
                f"(up to {FORMAT_VERSION}). Update this repository (git pull), or make the file again with this "
                "version's tools."
            )
        if version < 1:
            raise InputError(f"{name} has an invalid format_version {version}; the file is damaged. Make it again.")

        def field(key: str) -> object:
            if key not in meta:
                raise InputError(f"{name} lacks the metadata field {key!r}; the file is damaged. Make it again.")
            if key == "encoder":
                return meta[key]
            try:
                return json.loads(meta[key])
            except json.JSONDecodeError:
                raise InputError(
                    f"{name}: metadata field {key!r} is not valid JSON ({meta[key][:80]!r}); the file is damaged. "
                    "Make it again."
                ) from None

        prompts, encoder = field("prompts"), str(field("encoder"))
        image_tokens, guidance = field("image_tokens"), field("guidance")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"{name}: metadata 'prompts' must be a JSON list of strings. Make the file again.")
        if not prompts:
            raise InputError(f"{name} holds no prompts. Make it again with at least one prompt.")
        if (
            not isinstance(image_tokens, list) or len(image_tokens) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_tokens)
        ):  # fmt: skip
            raise InputError(
                f"{name}: metadata 'image_tokens' must be [h, w], two positive integers (the image size in "
                f"pixels / 16 for FLUX.1), got {meta['image_tokens']!r}. Make the file again."
            )
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance):
            raise InputError(
                f"{name}: metadata 'guidance' must be a finite number, got {meta['guidance']!r}. Make the file again."
            )

        for key, what in (("txt", "per-token context [P, L, C]"), ("vec", "pooled vector [P, V]")):
            if key not in infos:
                raise InputError(
                    f"{name} lacks the tensor {key!r} ({what}); the file is damaged or was not written by this "
                    f"format's tools. {HOW_TO_MAKE}"
                )
            if infos[key].dtype not in FLOAT_DTYPES:
                raise InputError(
                    f"{name}: tensor {key!r} is {infos[key].dtype}; conditioning tensors must be float16, bfloat16 "
                    "or float32 (text-encoder outputs). Make the file again."
                )
        txt_shape, vec_shape = infos["txt"].shape, infos["vec"].shape
        p = len(prompts)
        if len(txt_shape) != 3 or len(vec_shape) != 2 or txt_shape[0] != p or vec_shape[0] != p:
            raise InputError(
                f"{name}: the tensors do not fit together: txt {list(txt_shape)} and vec {list(vec_shape)} must be "
                f"[P, L, C] and [P, V] with P = {p}, the number of prompts in its metadata. The file is damaged; "
                "make it again."
            )
        if min(txt_shape) < 1 or vec_shape[1] < 1:
            raise InputError(f"{name}: txt {list(txt_shape)} or vec {list(vec_shape)} is empty. Make it again.")
        c, v = txt_shape[2], vec_shape[1]
        if context_in_dim is not None and c != context_in_dim:
            raise InputError(
                f"{name}: this conditioning was made for a model with context {_width_name(c, KNOWN_CONTEXT)} "
                f"(encoder: {encoder}); the checkpoint expects {_width_name(context_in_dim, KNOWN_CONTEXT)}. "
                f"{HOW_TO_MAKE}"
            )
        if vec_in_dim is not None and v != vec_in_dim:
            raise InputError(
                f"{name}: this conditioning was made for a model with pooled vector {_width_name(v, KNOWN_VEC)} "
                f"(encoder: {encoder}); the checkpoint expects {_width_name(vec_in_dim, KNOWN_VEC)}. {HOW_TO_MAKE}"
            )
        txt_len = None
        if "txt_len" in infos:
            info = infos["txt_len"]
            if info.dtype.is_floating_point or info.dtype == torch.bool or info.shape != (p,):
                raise InputError(
                    f"{name}: tensor 'txt_len' must be integers [{p}], got {info.dtype} {list(info.shape)}. "
                    "The file is damaged; make it again."
                )
            txt_len = reader.read("txt_len").to(torch.int64)
            lo, hi = int(txt_len.min()), int(txt_len.max())
            if lo < 1 or hi > txt_shape[1]:
                raise InputError(
                    f"{name}: txt_len holds {lo}..{hi}, outside 1..{txt_shape[1]} (the token axis of txt). "
                    "The file is damaged; make it again."
                )
        txt, vec = reader.read("txt"), reader.read("vec")
    cond = CalibrationConditioning(
        txt=txt, vec=vec, prompts=prompts, encoder=encoder, image_tokens=tuple(image_tokens), guidance=guidance,
        txt_len=txt_len,
    )  # fmt: skip
    problem = _non_finite_problem(cond)
    if problem:
        raise InputError(
            f"{name}: {problem}. The text encoder overflowed or the file is damaged; make it again (in ComfyUI, "
            "setting DualCLIPLoader's device to cpu runs the text encoders in float32)."
        )
    return cond


# ---------------------------------------------------------------------------- helpers


def _prompt_key(prompt: str) -> str:
    # Case and spacing differences do not make a prompt a different one.
    return " ".join(prompt.split()).casefold()


def overlapping_prompts(
    cond: Union[CalibrationConditioning, Iterable[str]], other_prompts: Iterable[str]
) -> list[str]:
    """The prompts of `cond` (or a list of prompts) that also occur in `other_prompts`.

    Compared ignoring case and runs of whitespace; each overlapping prompt is
    listed once, in `cond`'s order. Calibrating on evaluation prompts would
    overstate quality, so callers refuse a non-empty result.
    """
    prompts = cond.prompts if isinstance(cond, CalibrationConditioning) else list(cond)
    others = {_prompt_key(p) for p in other_prompts}
    out: list[str] = []
    seen: set[str] = set()
    for p in prompts:
        key = _prompt_key(p)
        if key in others and key not in seen:
            seen.add(key)
            out.append(p)
    return out


def parse_prompts(text: str) -> list[str]:
    """Prompts from text with one prompt per line; blank lines and lines starting with `#` are skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def read_prompt_file(path: PathLike) -> list[str]:
    """The prompts of a UTF-8 text file, one per line (`#` lines and blank lines skipped).

    Raises InputError for a missing, unreadable or empty file.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputError(f"Prompt file {path} does not exist.") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder, not a prompt file (UTF-8 text, one prompt per line).") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"Prompt file {path} is not UTF-8 text ({exc}). Save it as UTF-8.") from None
    prompts = parse_prompts(text)
    if not prompts:
        raise InputError(
            f"Prompt file {path} has no prompts: every line is blank or a # comment. Write one prompt per line."
        )
    return prompts


def default_prompts() -> list[str]:
    """The shipped calibration prompts for FLUX.1-dev (converter/calibration/prompts.txt)."""
    return read_prompt_file(DEFAULT_PROMPTS_FILE)


def stack_contexts(contexts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Contexts [L_i, C] (or [1, L_i, C]) of different lengths -> (txt [P, max L_i, C] zero-padded, txt_len [P])."""
    if not contexts:
        raise ValueError("no contexts to stack")
    rows = [c[0] if c.dim() == 3 and c.shape[0] == 1 else c for c in contexts]
    if any(r.dim() != 2 for r in rows):
        raise ValueError(f"contexts must be [L, C] or [1, L, C], got {[tuple(c.shape) for c in contexts]}")
    widths = {int(r.shape[1]) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"contexts have different widths {sorted(widths)}")
    lengths = torch.tensor([int(r.shape[0]) for r in rows], dtype=torch.int64)
    txt = torch.zeros(len(rows), int(lengths.max()), widths.pop(), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        txt[i, : r.shape[0]] = r
    return txt, lengths


def flux_image_tokens(width: int, height: int) -> tuple[int, int]:
    """FLUX.1's token grid (h, w) for an image of width x height pixels (both multiples of 16)."""
    if width % FLUX_PIXELS_PER_TOKEN or height % FLUX_PIXELS_PER_TOKEN or width <= 0 or height <= 0:
        raise ValueError(
            f"width and height must be positive multiples of {FLUX_PIXELS_PER_TOKEN} (FLUX.1: 8x VAE, 2x2 patches), "
            f"got {width}x{height}"
        )
    return height // FLUX_PIXELS_PER_TOKEN, width // FLUX_PIXELS_PER_TOKEN
