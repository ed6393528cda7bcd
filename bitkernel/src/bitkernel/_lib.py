"""Loads the compiled module and turns a missing capability into an actionable error."""

from __future__ import annotations

from types import ModuleType

try:
    from . import _C as _compiled
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "bitkernel's compiled module is missing or does not load for this Python "
        f"({exc}). Reinstall it with `pip install ./bitkernel` from the repository, "
        "which builds it for this interpreter."
    ) from exc

C: ModuleType = _compiled
HAS_CUDA: bool = bool(C.info()["cuda"])


def require_cuda() -> ModuleType:
    """The compiled module, after checking that it has CUDA kernels."""
    if not HAS_CUDA:
        raise RuntimeError(
            "bitkernel was built without CUDA kernels (no nvcc was found when it was built), "
            "so it cannot run on a GPU tensor. Install a CUDA toolkit (nvcc 12.x or 13.x), then "
            "rebuild: `pip install --force-reinstall --no-cache-dir ./bitkernel`; or move the "
            "tensors to the CPU."
        )
    return C
