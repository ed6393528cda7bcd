"""The converter's container API (converter/fileformat.py), from wherever this package sits.

ComfyUI imports the repository root as one package, so the converter is a
sibling package (`..converter`); tests and scripts put the repository root on
sys.path and import it as `converter`. A relative import keeps the node pack
from picking up some other custom node's top-level `converter` module.
"""

from __future__ import annotations

try:
    from ..converter.fileformat import (  # type: ignore[import-not-found]
        FORMAT_NAME,
        FORMAT_VERSION,
        BitfluxFormatError,
        BitfluxHeader,
        LayerSpec,
        load_tensors,
        read_header,
    )
except ImportError:  # comfy_nodes imported as a top-level package (tests, scripts)
    from converter.fileformat import (
        FORMAT_NAME,
        FORMAT_VERSION,
        BitfluxFormatError,
        BitfluxHeader,
        LayerSpec,
        load_tensors,
        read_header,
    )

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "BitfluxFormatError",
    "BitfluxHeader",
    "LayerSpec",
    "load_tensors",
    "read_header",
]
