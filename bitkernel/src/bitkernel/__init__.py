"""bitkernel: ternary (1.58-bit), INT4 and INT8 linear layers for CUDA and CPU.

The compiled module takes raw pointers and never links libtorch, so one build
serves every torch version; `bitkernel.functional` and `bitkernel.nn` are the
torch-facing API (they import torch when first used).
"""

from __future__ import annotations

from typing import Any

from ._lib import HAS_CUDA
from ._lib import C as _C

__version__: str = _C.info()["version"]
__all__ = ["HAS_CUDA", "__version__", "info"]


def info() -> dict[str, Any]:
    """What this build has: version, CUDA archs built, GPUs it sees, CPU features."""
    return dict(_C.info())
