"""The nodes in ComfyUI's V3 node API (comfy_api.latest), used where ComfyUI has it."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io, ui

from .common import (
    DTYPE_TOOLTIP,
    INFO_DESCRIPTION,
    LOADER_DESCRIPTION,
    check_choices,
    describe_model,
    diffusion_model_files,
    load_model,
)
from .names import CATEGORY, COMPUTE_DTYPES, DISPLAY_NAMES, INFO_NODE, LOADER_NODE


class BitfluxModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=LOADER_NODE,
            display_name=DISPLAY_NAMES[LOADER_NODE],
            category=CATEGORY,
            description=LOADER_DESCRIPTION,
            inputs=[
                io.Combo.Input("unet_name", options=diffusion_model_files(), tooltip="A bitflux file."),
                io.Combo.Input("compute_dtype", options=list(COMPUTE_DTYPES), default="default", tooltip=DTYPE_TOOLTIP),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, unet_name: str, compute_dtype: str = "default") -> bool | str:
        # Checked before the prompt runs (this ComfyUI does not check V3 combo values itself).
        return check_choices(unet_name, compute_dtype)

    @classmethod
    def execute(cls, unet_name: str, compute_dtype: str = "default") -> io.NodeOutput:
        return io.NodeOutput(load_model(unet_name, compute_dtype))


class BitfluxModelInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=INFO_NODE,
            display_name=DISPLAY_NAMES[INFO_NODE],
            category=CATEGORY,
            description=INFO_DESCRIPTION,
            inputs=[
                io.Model.Input("model"),
                io.Boolean.Input("per_layer", default=False, tooltip="List every linear layer."),
            ],
            outputs=[io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, per_layer: bool = False) -> io.NodeOutput:
        text = describe_model(model, per_layer)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


class BitfluxExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [BitfluxModelLoader, BitfluxModelInfo]


async def comfy_entrypoint() -> BitfluxExtension:
    return BitfluxExtension()
