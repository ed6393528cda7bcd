"""Opens a FLUX checkpoint (BFL file, diffusers folder or diffusers file) as lazy BFL-keyed tensors.

Whatever the layout, the rest of the converter sees one view: BFL key ->
shape, and `load(key)` giving that tensor in float32 (fp8 "scaled" weights
multiplied by their scale, diffusers' q/k/v rows concatenated, norm_out's
halves swapped). Nothing is read before it is asked for.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch

from . import keymap
from .detect import check_not_pickle, classify
from .errors import ConversionError, InputError
from .safetensors_io import SafetensorsReader

DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)
# ComfyUI "scaled fp8" files: <layer>.scale_weight (older) or <layer>.weight_scale (newer) multiplies the fp8 weight.
_WEIGHT_SCALES = (".scale_weight", ".weight_scale")
# Activation scales and markers of those files: meaningless once the weights are dequantized.
_IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
_IGNORED_KEYS = ("scaled_fp8",)


@dataclass
class _Part:
    reader: SafetensorsReader
    key: str  # key in that file
    scale_key: str = ""  # fp8 per-tensor (or per-row) scale, if any
    scale_reader: Optional[SafetensorsReader] = None  # the file holding it (a shard may differ)


@dataclass
class SourceTensor:
    """One BFL tensor of the source and where its bytes are."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # as stored (of the first part)
    nbytes: int  # bytes read to load it
    parts: list[_Part]
    swap_halves: bool = False
    scaled: bool = False


class Source:
    """A FLUX transformer checkpoint seen through BFL keys."""

    def __init__(self, name: str, layout: str, files: list[str], readers: list[SafetensorsReader]) -> None:
        self.name = name
        self.layout = layout
        self.files = files
        self._readers = readers
        self.tensors: dict[str, SourceTensor] = {}
        self.ignored: list[str] = []  # keys outside the transformer (e.g. VAE in an all-in-one file)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}

    def total_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    def load(self, key: str) -> torch.Tensor:
        """The tensor in float32 (CPU); ConversionError if it holds NaN or Inf."""
        t = self.tensors[key]
        pieces = []
        for part in t.parts:
            x = part.reader.read(part.key).to(torch.float32)
            if part.scale_key and part.scale_reader is not None:
                s = part.scale_reader.read(part.scale_key).to(torch.float32)
                x = x * (s.reshape(-1, *([1] * (x.dim() - 1))) if s.numel() > 1 else s.reshape(()))
            pieces.append(x)
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        if t.swap_halves:
            out = keymap.swap_halves(out)
        # A float32 sum is cheap and non-finite whenever an element is (NaN and Inf propagate); only
        # then (or on overflow) is the elementwise check run, to count the bad values.
        if not math.isfinite(out.sum().item()) and not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            where = ", ".join(f"{os.path.basename(p.reader.path)}:{p.key}" for p in t.parts)
            raise ConversionError(
                f"tensor {key} ({where}) holds {bad} NaN/Inf values: the checkpoint is damaged. Nothing was written."
            )
        return out

    def dtype_summary(self) -> str:
        """The stored dtype of the weights, e.g. "bfloat16" or "float8_e4m3fn (scaled)"."""
        by_bytes: Counter[str] = Counter()
        for t in self.tensors.values():
            by_bytes[str(t.dtype).replace("torch.", "") + (" (scaled)" if t.scaled else "")] += t.nbytes
        names = [n for n, _ in by_bytes.most_common()]
        return names[0] if len(names) == 1 else "mixed: " + " + ".join(names)

    def close(self) -> None:
        for r in self._readers:
            r.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resolve_files(path: str) -> tuple[str, list[str]]:
    """(display name, safetensors files) for a file, a diffusers folder or its index file."""
    if not os.path.exists(path):
        raise InputError(f"{path} does not exist.")
    if os.path.isfile(path) and path.endswith(".index.json"):
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(path):
        return os.path.basename(path), [path]
    folder = path
    if not os.path.exists(os.path.join(folder, DIFFUSERS_INDEX)) and os.path.isdir(os.path.join(folder, "transformer")):
        folder = os.path.join(folder, "transformer")  # a whole diffusers pipeline folder was given
    index = os.path.join(folder, DIFFUSERS_INDEX)
    name = os.path.basename(os.path.normpath(folder))
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as exc:
                raise InputError(f"{index} is not a valid safetensors index ({exc}).") from None
        files = [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
        absent = [os.path.basename(f) for f in files if not os.path.exists(f)]
        if absent:
            raise InputError(f"{name}: the index lists shards that are missing: {', '.join(absent)}.")
        return name, files
    if os.path.exists(os.path.join(folder, DIFFUSERS_FILE)):
        return name, [os.path.join(folder, DIFFUSERS_FILE)]
    found = sorted(os.listdir(folder))
    pickles = [f for f in found if f.endswith((".bin", ".ckpt", ".pt", ".pth"))]
    if pickles:
        check_not_pickle(os.path.join(folder, pickles[0]))  # raises with the pickle advice
    raise InputError(
        f"{path} is a folder without {DIFFUSERS_INDEX} or {DIFFUSERS_FILE}; give a FLUX .safetensors file or a "
        f"diffusers transformer/ folder. It holds: {', '.join(found[:8]) or 'nothing'}."
    )


def _open_readers(files: list[str]) -> list[SafetensorsReader]:
    readers: list[SafetensorsReader] = []
    try:
        for f in files:
            check_not_pickle(f)
            readers.append(SafetensorsReader(f))
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


def open_source(path: str) -> Source:
    """Opens a checkpoint lazily; InputError says why a file is not a FLUX transformer."""
    name, files = _resolve_files(path)
    readers = _open_readers(files)
    try:
        location: dict[str, SafetensorsReader] = {}
        metadata: dict[str, str] = {}
        for r in readers:
            metadata.update(r.metadata)
            for k in r.tensors:
                location[k] = r
        layout, prefix = classify(list(location), metadata, name)
        source = Source(name, layout, files, readers)
        raw = _strip_prefix(location, prefix, source)
        if layout == "bfl":
            _add_bfl(source, raw)
        else:
            _add_diffusers(source, raw)
        return source
    except BaseException:
        for r in readers:
            r.close()
        raise


def _strip_prefix(location: dict[str, SafetensorsReader], prefix: str, source: Source) -> dict[str, _Part]:
    """Transformer keys without the prefix, fp8 scales attached to their weights."""
    keys: dict[str, SafetensorsReader] = {}
    for k, r in location.items():
        if not k.startswith(prefix):
            source.ignored.append(k)
        elif k[len(prefix) :] not in _IGNORED_KEYS:
            keys[k[len(prefix) :]] = r
    parts: dict[str, _Part] = {}
    for k, r in keys.items():
        if k.endswith(_IGNORED_SUFFIXES):
            if k.endswith(".comfy_quant"):
                _check_comfy_quant(r, prefix + k)
            continue
        if k.endswith(_WEIGHT_SCALES):
            continue
        info = r.tensors[prefix + k]
        if info.dtype not in FLOAT_DTYPES:
            raise InputError(
                f"{source.name}: tensor {prefix + k} is stored as {str(info.dtype).replace('torch.', '')}, a "
                "quantized format this converter cannot read. Convert from the bf16, fp16, fp32 or fp8 checkpoint."
            )
        scale_key, scale_reader = "", None
        if k.endswith(".weight"):
            for suffix in _WEIGHT_SCALES:
                cand = k[: -len(".weight")] + suffix
                if cand in keys:
                    scale_key, scale_reader = prefix + cand, keys[cand]
                    n = scale_reader.tensors[scale_key].shape
                    if math.prod(n) not in (1, info.shape[0]):
                        raise InputError(
                            f"{source.name}: {scale_key} has shape {list(n)}; expected a per-tensor scale."
                        )
        parts[k] = _Part(r, prefix + k, scale_key, scale_reader)
    return parts


def _check_comfy_quant(reader: SafetensorsReader, key: str) -> None:
    try:
        conf = json.loads(bytes(reader.read(key).to(torch.uint8).tolist()).decode("utf-8"))
        fmt = str(conf.get("format", ""))
    except (ValueError, AttributeError):
        fmt = "unknown"
    if not fmt.startswith("float8"):
        raise InputError(
            f"{key}: the layer is quantized with ComfyUI's {fmt!r} format, which this converter cannot read. "
            "Convert from the bf16, fp16, fp32 or fp8 checkpoint."
        )


def _tensor(key: str, parts: list[_Part], swap: bool = False) -> SourceTensor:
    infos = [p.reader.tensors[p.key] for p in parts]
    shapes = [i.shape for i in infos]
    if len({s[1:] for s in shapes}) > 1:
        raise InputError(
            f"the parts of {key} ({', '.join(p.key for p in parts)}) have shapes {shapes} that do not stack."
        )
    shape = (sum(s[0] for s in shapes), *shapes[0][1:])
    nbytes = sum(i.nbytes for i in infos)
    scaled = any(p.scale_key for p in parts)
    return SourceTensor(key, shape, infos[0].dtype, nbytes, parts, swap, scaled)


def _add_bfl(source: Source, raw: dict[str, _Part]) -> None:
    for k, part in raw.items():
        source.tensors[k] = _tensor(k, [part])


def _add_diffusers(source: Source, raw: dict[str, _Part]) -> None:
    depth, depth_single = keymap.diffusers_depths(list(raw))
    used: set[str] = set()
    for bfl, m in keymap.tensor_map(depth, depth_single).items():
        present = [d for d in m.diffusers if d in raw]
        if not present:
            continue
        if len(present) != len(m.diffusers):
            missing = [d for d in m.diffusers if d not in raw]
            raise InputError(f"{source.name}: incomplete diffusers transformer, {', '.join(missing)} missing.")
        source.tensors[bfl] = _tensor(bfl, [raw[d] for d in m.diffusers], m.swap_halves)
        used.update(m.diffusers)
    extra = sorted(set(raw) - used)
    if extra:
        raise InputError(
            f"{source.name}: the diffusers transformer has {len(extra)} tensors FLUX.1 does not have, e.g. "
            f"{', '.join(extra[:5])}; this model variant is not supported."
        )
