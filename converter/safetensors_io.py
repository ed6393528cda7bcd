"""Reading and writing safetensors files one tensor at a time.

Reading: the header is parsed and checked here (so that a truncated or corrupt
file gets a clear message), and each tensor is read with plain positioned reads
into fresh memory. safetensors' own `safe_open` memory-maps the file, and every
page it touches stays in the process's resident set until the map is closed;
on a 23.8 GB checkpoint that makes the measured peak RSS approach the file
size. Explicit reads keep the resident set to the tensors actually held.

Writing: safetensors' Python writer needs every tensor in memory at once. The
file layout is simple (8-byte little-endian header length, a JSON header, then
the tensors' bytes in offset order), so `StreamingWriter` writes the header
from a plan of (name, dtype, shape) and then takes the tensors one by one.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Optional

import torch

from .errors import InputError

# safetensors dtype names (the spec's list) and their torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# safetensors refuses headers above 100 MB; a larger length field means the file is not safetensors.
MAX_HEADER_BYTES = 100_000_000
_READ_CHUNK = 1 << 30  # Linux returns at most ~2 GiB per read(); stay well below


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header; offsets are absolute file positions."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parses and checks a safetensors header: (tensors, metadata, data start).

    Raises InputError saying whether the file is truncated, corrupt or not a
    safetensors file at all.
    """
    size = os.path.getsize(path)
    name = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{name} is {size} bytes long: too short to be a safetensors file (empty or truncated).")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n < 2:
            raise InputError(
                f"{name} does not start with a safetensors header (its first 8 bytes give a header length of {n}). "
                "It is corrupt or not a safetensors file."
            )
        if 8 + n > size:
            raise InputError(
                f"{name} is truncated: its header alone needs {8 + n} bytes but the file has {size}. "
                "Download or copy it again."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{name} has a corrupt safetensors header ({exc}). Download or copy it again.") from None
    if not isinstance(header, dict):
        raise InputError(f"{name} has a corrupt safetensors header (not a JSON object).")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise InputError(f"{name} has a corrupt safetensors header (__metadata__ is not an object).")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(
                f"{name} has a corrupt or unsupported safetensors header entry for {key!r}: {entry!r}"
            ) from None
        if end - begin != math.prod(shape) * _element_size(dtype) or begin < 0:
            raise InputError(f"{name} is corrupt: tensor {key!r} has offsets {begin}..{end} for shape {shape}.")
        tensors[key] = TensorInfo(key, dtype, shape, data_start + begin, data_start + end)
    data_end = max((t.end for t in tensors.values()), default=data_start)
    if data_end > size:
        raise InputError(
            f"{name} is truncated: its header says the data ends at byte {data_end} but the file has {size} bytes "
            f"({100 * size / data_end:.1f}% of it). Download or copy it again."
        )
    if data_end < size:
        raise InputError(
            f"{name} is corrupt: it has {size - data_end} bytes after the last tensor its header describes."
        )
    return tensors, {str(k): str(v) for k, v in meta.items()}, data_start


def _read_exact(f: BinaryIO, offset: int, out: memoryview) -> None:
    f.seek(offset)
    done = 0
    while done < len(out):
        got = f.readinto(out[done : done + _READ_CHUNK])
        if not got:
            raise InputError(f"unexpected end of file while reading {len(out)} bytes at offset {offset}")
        done += got


class SafetensorsReader:
    """Lazy tensor reads from one safetensors file (header checked on open)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tensors, self.metadata, self.data_start = read_header(path)
        self._file: Optional[BinaryIO] = open(path, "rb", buffering=0)  # closed in close()

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` in its stored dtype, in newly allocated CPU memory."""
        info = self.tensors[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            assert self._file is not None, "reader is closed"
            _read_exact(self._file, info.start, memoryview(buf.numpy()))
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of a file to be written: its header entry before its data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _element_size(self.dtype)


def encode_header(tensors: list[PlannedTensor], metadata: dict[str, str], min_length: int = 0) -> bytes:
    """The 8-byte length plus the JSON header, padded with spaces to a multiple of 8
    (and to at least `min_length` bytes, so a header can be rewritten in place)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    length = max(len(raw), min_length - 8)
    length += -length % 8  # safetensors aligns the data start to 8 bytes
    return struct.pack("<Q", length) + raw + b" " * (length - len(raw))


HEADER_RESERVE = 256  # header bytes left free for metadata filled in after the data (the source hash)


def _reserved_header_length(tensors: list[PlannedTensor], metadata: dict[str, str], reserve: int) -> int:
    """The length of the header StreamingWriter writes: this metadata's plus `reserve` bytes, aligned."""
    return len(encode_header(tensors, metadata, len(encode_header(tensors, metadata)) + reserve))


def planned_file_size(tensors: list[PlannedTensor], metadata: dict[str, str], reserve: int = HEADER_RESERVE) -> int:
    """The exact size of the file StreamingWriter writes for this plan."""
    return _reserved_header_length(tensors, metadata, reserve) + sum(t.nbytes for t in tensors)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's raw bytes (CPU, C order), without a copy when it is already contiguous."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class StreamingWriter:
    """Writes a safetensors file from a plan: header first, then each tensor in plan order.

    Every tensor's CRC-32 is kept (`crcs`) so a read-back can check the bytes
    on disk. `rewrite_metadata` replaces the metadata in place at the end (the
    header was padded to leave room), which lets values computed during the
    conversion, such as the source's hash, go into the header.
    """

    def __init__(
        self, path: str, tensors: list[PlannedTensor], metadata: dict[str, str], reserve: int = HEADER_RESERVE
    ) -> None:
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the plan")
        self.path = path
        self.tensors = tensors
        self._header_len = _reserved_header_length(tensors, metadata, reserve)
        self._next = 0
        self.crcs: dict[str, int] = {}
        self._file: Optional[BinaryIO] = open(path, "xb")  # "x": never overwrite; closed in close()
        self._file.write(encode_header(tensors, metadata, self._header_len))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Writes the next planned tensor; its name, dtype and shape must match the plan."""
        assert self._file is not None, "writer is closed"
        if self._next >= len(self.tensors):
            raise ValueError(f"tensor {name!r} is not in the plan (all planned tensors are written)")
        want = self.tensors[self._next]
        if name != want.name or tensor.dtype != want.dtype or tuple(tensor.shape) != want.shape:
            raise ValueError(
                f"plan expects {want.name} {want.dtype} {want.shape} next, got {name} {tensor.dtype} "
                f"{tuple(tensor.shape)}"
            )
        data = tensor_bytes(tensor)
        self._file.write(data)
        self.crcs[name] = zlib.crc32(data)
        self._next += 1

    def rewrite_metadata(self, metadata: dict[str, str]) -> None:
        assert self._file is not None, "writer is closed"
        header = encode_header(self.tensors, metadata, self._header_len)
        if len(header) != self._header_len:
            raise ValueError("the new metadata does not fit the space reserved in the header")
        pos = self._file.tell()
        self._file.seek(0)
        self._file.write(header)
        self._file.seek(pos)

    def finish(self) -> None:
        """Checks every planned tensor was written, flushes to disk and closes."""
        assert self._file is not None, "writer is closed"
        if self._next != len(self.tensors):
            raise ValueError(f"only {self._next} of {len(self.tensors)} planned tensors were written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
