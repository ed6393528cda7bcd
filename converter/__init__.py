"""FLUX checkpoint -> bitflux (1.58-bit) converter.

    from converter import convert
    report = convert("flux1-dev.safetensors", "flux1-dev-bitflux.safetensors", method="mse")
    print(report.to_text())

Loaders import `converter.fileformat` (the container's API); diffusers users
`converter.diffusers_model.load_diffusers_transformer`. The command line is
`python converter/convert.py` (or `python -m converter`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import ConversionError, InputError

if TYPE_CHECKING:
    from .pipeline import convert
    from .report import ConversionReport


def __getattr__(name: str) -> Any:
    # The pipeline (and with it the calibration engine) loads on first use: the ComfyUI node pack
    # imports this package for converter.fileformat alone, at every ComfyUI start.
    if name == "convert":
        from .pipeline import convert

        return convert
    if name == "ConversionReport":
        from .report import ConversionReport

        return ConversionReport
    raise AttributeError(f"module 'converter' has no attribute {name!r}")


__all__ = ["ConversionError", "ConversionReport", "InputError", "__version__", "convert"]
