"""Read-back of a freshly written file before it is given its final name.

Checks, in order: safetensors' own parser accepts the file and finds exactly
the planned tensors with their dtypes and shapes; the bitflux header decodes
to what was planned; every tensor's bytes on disk have the CRC-32 they were
written with; and a few layers, rebuilt through `fileformat.build_linear`,
dequantize to exactly the weights the quantizer produced.
"""

from __future__ import annotations

import zlib

import torch
from safetensors import safe_open

import bitkernel.functional as F
from bitkernel.formats import QuantizedWeight
from bitkernel.nn import QuantLinear

from .errors import ConversionError
from .fileformat import LayerSpec, build_linear, read_header
from .plan import Plan
from .safetensors_io import SafetensorsReader, tensor_bytes


def _fail(path: str, what: str) -> ConversionError:
    return ConversionError(f"verification of the written file failed ({what}); nothing was kept. File: {path}")


def verify_output(
    path: str,
    plan: Plan,
    metadata: dict[str, str],
    crcs: dict[str, int],
    samples: dict[str, tuple[LayerSpec, QuantizedWeight]],
) -> None:
    planned = {t.name: t for t in plan.tensors}
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        if keys != set(planned):
            raise _fail(path, f"tensor names differ from the plan: {sorted(keys ^ set(planned))[:5]}")
        if f.metadata() != metadata:
            raise _fail(path, "metadata differs from what was written")
        for name, t in planned.items():
            sl = f.get_slice(name)
            if tuple(sl.get_shape()) != t.shape:
                raise _fail(path, f"{name} has shape {sl.get_shape()}, planned {list(t.shape)}")
    header = read_header(path)
    if header.layers != plan.header.layers or header.architecture != plan.arch.to_dict():
        raise _fail(path, "the bitflux header does not decode to the planned layers and architecture")
    with SafetensorsReader(path) as reader:
        for name, t in planned.items():
            info = reader.tensors[name]
            if info.dtype != t.dtype or info.shape != t.shape:
                raise _fail(path, f"{name} is {info.dtype} {list(info.shape)}, planned {t.dtype} {list(t.shape)}")
            if zlib.crc32(tensor_bytes(reader.read(name))) != crcs[name]:
                raise _fail(path, f"the bytes of {name} on disk differ from those written")
        for prefix, (spec, qw) in samples.items():
            names = [t.name for item in plan.items if item.name == prefix for t in item.outputs]
            module = build_linear(prefix, spec, {n: reader.read(n) for n in names})
            if not isinstance(module, QuantLinear) or not torch.equal(
                module.dequantized_weight(torch.float32), F.dequantize(qw, torch.float32)
            ):
                raise _fail(path, f"layer {prefix} dequantizes to different weights than were quantized")
