"""ComfyUI node pack for 1.58-bit FLUX (bitflux files): ComfyUI loads this folder as a package.

V3 node API (comfy_api.latest) where this ComfyUI has it, the classic
NODE_CLASS_MAPPINGS otherwise; ComfyUI reads NODE_CLASS_MAPPINGS first, so
only one of the two is defined. Imported outside ComfyUI (pytest collects the
repository root as a package), it registers nothing.
"""

import importlib


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


if _importable("comfy_api.latest"):
    from .comfy_nodes.nodes_v3 import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
elif _importable("comfy"):
    from .comfy_nodes.nodes_v1 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
