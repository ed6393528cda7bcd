"""FLUX checkpoint -> bitflux (1.58-bit) converter.

    from converter import convert
    report = convert("flux1-dev.safetensors", "flux1-dev-bitflux.safetensors", method="mse")
    print(report.to_text())

Loaders import `converter.fileformat` (the container's API); diffusers users
`converter.diffusers_model.load_diffusers_transformer`. The command line is
`python converter/convert.py` (or `python -m converter`).
"""

from __future__ import annotations

from ._version import __version__
from .errors import ConversionError, InputError
from .pipeline import convert
from .report import ConversionReport

__all__ = ["ConversionError", "ConversionReport", "InputError", "__version__", "convert"]
