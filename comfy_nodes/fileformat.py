"""The converter's container API (converter/fileformat.py), from wherever this package sits.

ComfyUI imports the repository root as one package, so the converter is a
sibling package (`..converter`); tests and scripts put the repository root on
sys.path and import it as `converter`. A relative import keeps the node pack
from picking up some other custom node's top-level `converter` module; the
choice follows from this package's own name, so an error inside the converter
surfaces as itself instead of as a missing top-level `converter`.
"""

from __future__ import annotations

if __package__ == "comfy_nodes":  # imported as a top-level package (tests, scripts)
    from converter import fileformat as _fileformat
else:  # inside ComfyUI: <pack>.comfy_nodes
    from ..converter import fileformat as _fileformat  # type: ignore[import-not-found]

BitfluxFormatError = _fileformat.BitfluxFormatError
BitfluxHeader = _fileformat.BitfluxHeader
LayerSpec = _fileformat.LayerSpec
load_tensors = _fileformat.load_tensors
read_header = _fileformat.read_header
