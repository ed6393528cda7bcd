"""The converted-file container, `bitflux` version 1 (docs/FORMAT.md): names, header, layer loading.

This module is the loaders' API; the ComfyUI node pack and
`converter.diffusers_model` import these names, so they stay stable:

    FORMAT_NAME, FORMAT_VERSION        "bitflux", 1
    LayerSpec                          one layer's format (format, group_size, symmetric, act, lora_rank)
    BitfluxHeader                      the file's metadata (architecture, layers, method, source, converter_version)
    BitfluxFormatError                 ValueError raised for any file that is not a readable bitflux file
    read_header(path)                  -> BitfluxHeader, without reading tensor data
    load_tensors(path, device)         -> dict[str, Tensor], every tensor of the file
    build_linear(prefix, spec, tensors)-> bitkernel.nn module (or nn.Linear for "bf16")
    layer_tensors(prefix, spec, out_features, in_features, bias) -> the tensors a layer is stored as
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import torch
from torch import nn

from .errors import InputError
from .safetensors_io import PlannedTensor
from .safetensors_io import read_header as _read_safetensors_header

FORMAT_NAME = "bitflux"
FORMAT_VERSION = 1
QUANTIZED_FORMATS = ("ternary", "int8", "int4")
FORMATS = (*QUANTIZED_FORMATS, "bf16")
ACTS = ("a16", "a8")
# bitkernel.formats.WEIGHTS_PER_BYTE, repeated so that reading a header never loads the compiled bitkernel.
WEIGHTS_PER_BYTE = {"ternary": 4, "int8": 1, "int4": 2}
REQUIRED_ARCHITECTURE = (
    "in_channels",
    "vec_in_dim",
    "context_in_dim",
    "hidden_size",
    "mlp_ratio",
    "num_heads",
    "depth",
    "depth_single_blocks",
    "axes_dim",
    "theta",
    "qkv_bias",
    "guidance_embed",
)
_CONVERT_HINT = "Convert the FLUX checkpoint with `python converter/convert.py CHECKPOINT -o OUT.safetensors`."


class BitfluxFormatError(ValueError):
    """The file is not a bitflux file this code can read; the message says what to do."""


@dataclass(frozen=True)
class LayerSpec:
    """How one linear layer is stored (an entry of the `layers` metadata)."""

    format: str  # "ternary" | "int8" | "int4" | "bf16"
    group_size: int = 0  # 0: one scale per output row
    symmetric: bool = True  # False: int4 with zero points
    act: str = "a16"  # "a8": activations quantized to int8 inside the op
    lora_rank: int = 0  # rank of the stored low-rank branch, 0 if none

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise BitfluxFormatError(f"unknown layer format {self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.act not in ACTS:
            raise BitfluxFormatError(f"unknown activation mode {self.act!r}: expected a16 or a8")
        if self.group_size < 0 or self.lora_rank < 0:
            raise BitfluxFormatError(f"negative group_size or lora_rank in {self}")
        if not self.symmetric and self.format != "int4":
            raise BitfluxFormatError(f"only int4 can be asymmetric, got {self}")
        if self.act == "a8" and not self.a8_capable:
            raise BitfluxFormatError(f"a8 needs ternary or int8 weights with one scale per row, got {self}")

    @property
    def a8_capable(self) -> bool:
        """Whether the layer can run with 8-bit activations: ternary or int8 weights, one scale per row."""
        return self.format in ("ternary", "int8") and not self.group_size

    @property
    def quantized(self) -> bool:
        return self.format in QUANTIZED_FORMATS

    @property
    def label(self) -> str:
        """Short name as the converter's --rule takes it: ternary, int8, int4:64, int4a:64, bf16, ternary+a8."""
        name = "int4a" if not self.symmetric else self.format
        name = f"{name}:{self.group_size}" if self.group_size else name
        return name + ("+a8" if self.act == "a8" else "")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerSpec:
        try:
            return cls(
                format=str(d["format"]),
                group_size=int(d.get("group_size", 0)),
                symmetric=bool(d.get("symmetric", True)),
                act=str(d.get("act", "a16")),
                lora_rank=int(d.get("lora_rank", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BitfluxFormatError(f"invalid layer entry {d!r}: {exc}") from None


@dataclass
class BitfluxHeader:
    """A bitflux file's metadata, decoded."""

    architecture: dict[str, Any]
    layers: dict[str, LayerSpec]
    method: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    converter_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_metadata(self) -> dict[str, str]:
        """The safetensors `__metadata__` (string -> string) of this header."""
        return {
            "format": FORMAT_NAME,
            "format_version": str(self.format_version),
            "architecture": json.dumps(self.architecture, sort_keys=True),
            "layers": json.dumps({k: v.to_json() for k, v in self.layers.items()}),
            "method": json.dumps(self.method, sort_keys=True),
            "source": json.dumps(self.source, sort_keys=True),
            "converter_version": self.converter_version,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], name: str = "the file") -> BitfluxHeader:
        fmt = meta.get("format")
        if fmt != FORMAT_NAME:
            what = f"its format is {fmt!r}" if fmt else "it has no bitflux metadata"
            raise BitfluxFormatError(f"{name} is not a bitflux file ({what}). {_CONVERT_HINT}")
        try:
            version = int(meta.get("format_version", ""))
        except ValueError:
            raise BitfluxFormatError(f"{name}: invalid format_version {meta.get('format_version')!r}.") from None
        if version > FORMAT_VERSION:
            raise BitfluxFormatError(
                f"{name} is bitflux format version {version}, newer than this code reads ({FORMAT_VERSION}). "
                "Update the bitflux node pack / converter."
            )
        if version < 1:
            raise BitfluxFormatError(f"{name}: invalid format_version {version}.")

        def field_json(key: str) -> Any:
            try:
                return json.loads(meta[key])
            except KeyError:
                raise BitfluxFormatError(f"{name}: bitflux metadata lacks {key!r}; the file is damaged.") from None
            except ValueError as exc:
                raise BitfluxFormatError(f"{name}: bitflux metadata {key!r} is not valid JSON ({exc}).") from None

        arch = field_json("architecture")
        missing = [k for k in REQUIRED_ARCHITECTURE if not isinstance(arch, dict) or k not in arch]
        if missing:
            raise BitfluxFormatError(f"{name}: architecture metadata lacks {', '.join(missing)}.")
        layers = field_json("layers")
        if not isinstance(layers, dict):
            raise BitfluxFormatError(f"{name}: layers metadata is not a JSON object.")
        return cls(
            architecture=arch,
            layers={k: LayerSpec.from_json(v) for k, v in layers.items()},
            method=field_json("method") if "method" in meta else {},
            source=field_json("source") if "source" in meta else {},
            converter_version=meta.get("converter_version", ""),
            format_version=version,
        )


def read_header(path: Union[str, os.PathLike]) -> BitfluxHeader:
    """The header of a bitflux file (no tensor data is read); BitfluxFormatError if it is not one."""
    path = os.fspath(path)
    try:
        _, meta, _ = _read_safetensors_header(path)
    except InputError as exc:
        raise BitfluxFormatError(str(exc)) from None
    except OSError as exc:
        raise BitfluxFormatError(f"cannot read {path}: {exc}") from None
    return BitfluxHeader.from_metadata(meta, os.path.basename(path))


def load_tensors(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a bitflux file (after checking its header), on `device`."""
    from safetensors.torch import load_file

    read_header(path)
    return load_file(os.fspath(path), device=str(device))


def layer_tensors(prefix: str, spec: LayerSpec, out_features: int, in_features: int, bias: bool) -> list[PlannedTensor]:
    """The tensors (name, dtype, shape) one layer is stored as, in file order (docs/FORMAT.md)."""
    out: list[PlannedTensor] = []
    if spec.quantized:
        wpb = WEIGHTS_PER_BYTE[spec.format]
        groups = 1 if spec.group_size == 0 else -(-in_features // spec.group_size)
        qdtype = torch.int8 if spec.format == "int8" else torch.uint8
        out.append(PlannedTensor(f"{prefix}.qweight", qdtype, (out_features, in_features // wpb)))
        out.append(PlannedTensor(f"{prefix}.scale", torch.float32, (out_features, groups)))
        if not spec.symmetric:
            out.append(PlannedTensor(f"{prefix}.zero", torch.uint8, (out_features, groups)))
    else:
        out.append(PlannedTensor(f"{prefix}.weight", torch.bfloat16, (out_features, in_features)))
    if bias:
        out.append(PlannedTensor(f"{prefix}.bias", torch.bfloat16, (out_features,)))
    if spec.lora_rank:
        out.append(PlannedTensor(f"{prefix}.lora_down", torch.bfloat16, (spec.lora_rank, in_features)))
        out.append(PlannedTensor(f"{prefix}.lora_up", torch.bfloat16, (out_features, spec.lora_rank)))
    return out


def build_linear(prefix: str, spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The module for one stored layer: TernaryLinear / Int8Linear / Int4Linear (bitkernel.nn), or a
    plain nn.Linear for "bf16". Tensors stay on their device; `prefix` has no trailing dot."""
    from bitkernel.formats import QuantizedWeight
    from bitkernel.nn import Int4Linear, Int8Linear, TernaryLinear

    def get(name: str, required: bool = True) -> Union[torch.Tensor, None]:
        t = tensors.get(f"{prefix}.{name}")
        if t is None and required:
            raise BitfluxFormatError(
                f"layer {prefix} ({spec.label}) has no tensor {prefix}.{name}; the file is damaged."
            )
        return t

    bias = get("bias", required=False)
    if not spec.quantized:
        weight = get("weight")
        assert weight is not None
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        module: nn.Module = layer
    else:
        cls = {"ternary": TernaryLinear, "int8": Int8Linear, "int4": Int4Linear}[spec.format]
        qweight, scale = get("qweight"), get("scale")
        assert qweight is not None and scale is not None
        zero = None if spec.symmetric else get("zero")
        qw = QuantizedWeight(
            spec.format, qweight, scale, zero, qweight.shape[1] * WEIGHTS_PER_BYTE[spec.format], spec.group_size
        )
        try:
            module = cls.from_quantized(qw, bias, act_int8=spec.act == "a8")
        except ValueError as exc:
            raise BitfluxFormatError(f"layer {prefix}: {exc}") from None
    down, up = get("lora_down", required=False), get("lora_up", required=False)
    if down is not None and up is not None:
        if not spec.quantized:
            raise BitfluxFormatError(f"layer {prefix}: a low-rank branch on a bf16 layer is not part of format v1.")
        module.set_lora(down, up)
    return module


def install_layers(
    model: nn.Module, layers: dict[str, LayerSpec], tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> tuple[list[str], list[str]]:
    """Puts tensors in BFL keys (a whole file's or one block's) into a BFL-code model built on the meta device:
    each layer of `layers` becomes its build_linear module, every other tensor is assigned (cast to `dtype`
    when given). Returns load_state_dict's (missing, unexpected) for the other tensors."""
    for prefix, spec in layers.items():
        model.set_submodule(prefix, build_linear(prefix, spec, tensors))
    rest = {k: v if dtype is None else v.to(dtype) for k, v in tensors.items() if k.rpartition(".")[0] not in layers}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    return missing, unexpected
