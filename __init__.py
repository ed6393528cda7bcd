"""ComfyUI node pack for 1.58-bit FLUX (bitflux files): ComfyUI loads this folder as a package.

V3 node API (comfy_api.latest) where this ComfyUI has it, the classic
NODE_CLASS_MAPPINGS otherwise; ComfyUI reads NODE_CLASS_MAPPINGS first, so
only one of the two is defined.
"""

try:
    import comfy  # noqa: F401  (probe only)
except ImportError:  # imported outside ComfyUI (pytest collects the repo root as a package): register nothing
    comfy = None

if comfy is not None:
    try:
        import comfy_api.latest  # noqa: F401  (probe only)

        _HAS_V3 = True
    except ImportError:
        _HAS_V3 = False

    if _HAS_V3:
        from .comfy_nodes.nodes_v3 import comfy_entrypoint

        __all__ = ["comfy_entrypoint"]
    else:
        from .comfy_nodes.nodes_v1 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

        __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
