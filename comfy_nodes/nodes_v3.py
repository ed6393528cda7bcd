"""The nodes in ComfyUI's V3 node API (comfy_api.latest), used where ComfyUI has it."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io, ui

from .calibration import default_prompt_text, write_calibration_file
from .common import (
    CALIBRATION_DESCRIPTION,
    CALIBRATION_GUIDANCE,
    CALIBRATION_OUTPUT_TOOLTIP,
    CALIBRATION_SIZE,
    CALIBRATION_TOOLTIPS,
    DTYPE_TOOLTIP,
    INFO_DESCRIPTION,
    LOADER_DESCRIPTION,
    UNET_TOOLTIP,
    check_choices,
    diffusion_model_files,
    load_model,
)
from .names import (
    CALIBRATION_CATEGORY,
    CALIBRATION_NODE,
    CALIBRATION_PREFIX,
    CATEGORY,
    COMPUTE_DTYPES,
    DISPLAY_NAMES,
    INFO_NODE,
    LOADER_NODE,
)
from .report import model_report


class BitfluxModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=LOADER_NODE,
            display_name=DISPLAY_NAMES[LOADER_NODE],
            category=CATEGORY,
            description=LOADER_DESCRIPTION,
            inputs=[
                io.Combo.Input("unet_name", options=diffusion_model_files(), tooltip=UNET_TOOLTIP),
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
        text = model_report(model, per_layer)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


class BitfluxCalibrationPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        tips = CALIBRATION_TOOLTIPS
        return io.Schema(
            node_id=CALIBRATION_NODE,
            display_name=DISPLAY_NAMES[CALIBRATION_NODE],
            category=CALIBRATION_CATEGORY,
            description=CALIBRATION_DESCRIPTION,
            inputs=[
                io.Clip.Input("clip", tooltip=tips["clip"]),
                # dynamic_prompts off: the list is taken literally, {a|b} is not expanded by the frontend.
                io.String.Input(
                    "prompts", multiline=True, dynamic_prompts=False, default=default_prompt_text(),
                    tooltip=tips["prompts"],
                ),  # fmt: skip
                io.Int.Input("width", **CALIBRATION_SIZE, tooltip=tips["width"]),
                io.Int.Input("height", **CALIBRATION_SIZE, tooltip=tips["height"]),
                io.Float.Input("guidance", **CALIBRATION_GUIDANCE, tooltip=tips["guidance"]),
                io.String.Input("filename_prefix", default=CALIBRATION_PREFIX, tooltip=tips["filename_prefix"]),
            ],
            outputs=[io.String.Output(display_name="path", tooltip=CALIBRATION_OUTPUT_TOOLTIP)],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls, clip, prompts: str, width: int = 1024, height: int = 1024, guidance: float = 3.5,
        filename_prefix: str = CALIBRATION_PREFIX,
    ) -> io.NodeOutput:
        path, summary = write_calibration_file(clip, prompts, width, height, guidance, filename_prefix)
        return io.NodeOutput(path, ui=ui.PreviewText(summary))


class BitfluxExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [BitfluxModelLoader, BitfluxModelInfo, BitfluxCalibrationPrompts]


async def comfy_entrypoint() -> BitfluxExtension:
    return BitfluxExtension()
