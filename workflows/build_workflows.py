"""Writes the shipped workflows, each in both JSON forms, from one description.

    python workflows/build_workflows.py          # rewrite workflows/*.json and workflows/api/*.json
                                                 # (and calibration/*.json, calibration/api/*.json)

UI form (what users drag into ComfyUI): LiteGraph graph, version 0.4, with
widget values in each node's widget order. API form (what `POST /prompt`
takes): node id -> class_type and inputs by name. Writing both from one
description keeps them identical in content; tests/test_comfy_workflows.py
checks the files are up to date and consistent, and (with ComfyUI running)
that ComfyUI accepts them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from comfy_nodes import names  # noqa: E402  (repository root put on sys.path just above)

# Per node type: linked inputs (name, type), widgets in the node's widget order, outputs (name, type).
# Seed widgets get ComfyUI's "control after generate" value in the UI form; LoadImage its upload widget.
NODE_SPECS: dict[str, dict[str, Any]] = {
    names.LOADER_NODE: {"inputs": [], "widgets": ["unet_name", "compute_dtype"], "outputs": [("MODEL", "MODEL")]},
    "DualCLIPLoader": {
        "inputs": [],
        "widgets": ["clip_name1", "clip_name2", "type", "device"],
        "outputs": [("CLIP", "CLIP")],
    },
    "CLIPTextEncode": {
        "inputs": [("clip", "CLIP")],
        "widgets": ["text"],
        "outputs": [("CONDITIONING", "CONDITIONING")],
    },
    "FluxGuidance": {
        "inputs": [("conditioning", "CONDITIONING")],
        "widgets": ["guidance"],
        "outputs": [("CONDITIONING", "CONDITIONING")],
    },
    "ConditioningZeroOut": {
        "inputs": [("conditioning", "CONDITIONING")],
        "widgets": [],
        "outputs": [("CONDITIONING", "CONDITIONING")],
    },
    "EmptySD3LatentImage": {
        "inputs": [],
        "widgets": ["width", "height", "batch_size"],
        "outputs": [("LATENT", "LATENT")],
    },
    "KSampler": {
        "inputs": [
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
        ],
        "widgets": ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
        "seeds": ["seed"],
        "outputs": [("LATENT", "LATENT")],
    },
    "VAELoader": {"inputs": [], "widgets": ["vae_name"], "outputs": [("VAE", "VAE")]},
    "VAEDecode": {"inputs": [("samples", "LATENT"), ("vae", "VAE")], "widgets": [], "outputs": [("IMAGE", "IMAGE")]},
    "VAEDecodeTiled": {
        "inputs": [("samples", "LATENT"), ("vae", "VAE")],
        "widgets": ["tile_size", "overlap", "temporal_size", "temporal_overlap"],
        "outputs": [("IMAGE", "IMAGE")],
    },
    "VAEEncode": {"inputs": [("pixels", "IMAGE"), ("vae", "VAE")], "widgets": [], "outputs": [("LATENT", "LATENT")]},
    "SaveImage": {"inputs": [("images", "IMAGE")], "widgets": ["filename_prefix"], "outputs": []},
    "LoadImage": {
        "inputs": [],
        "widgets": ["image"],
        "upload": True,
        "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    },
    "ImageScaleToTotalPixels": {
        "inputs": [("image", "IMAGE")],
        "widgets": ["upscale_method", "megapixels"],
        "outputs": [("IMAGE", "IMAGE")],
    },
    "ModelSamplingFlux": {
        "inputs": [("model", "MODEL")],
        "widgets": ["max_shift", "base_shift", "width", "height"],
        "outputs": [("MODEL", "MODEL")],
    },
    "BasicGuider": {
        "inputs": [("model", "MODEL"), ("conditioning", "CONDITIONING")],
        "widgets": [],
        "outputs": [("GUIDER", "GUIDER")],
    },
    "RandomNoise": {"inputs": [], "widgets": ["noise_seed"], "seeds": ["noise_seed"], "outputs": [("NOISE", "NOISE")]},
    "KSamplerSelect": {"inputs": [], "widgets": ["sampler_name"], "outputs": [("SAMPLER", "SAMPLER")]},
    "BasicScheduler": {
        "inputs": [("model", "MODEL")],
        "widgets": ["scheduler", "steps", "denoise"],
        "outputs": [("SIGMAS", "SIGMAS")],
    },
    "SamplerCustomAdvanced": {
        "inputs": [
            ("noise", "NOISE"),
            ("guider", "GUIDER"),
            ("sampler", "SAMPLER"),
            ("sigmas", "SIGMAS"),
            ("latent_image", "LATENT"),
        ],
        "widgets": [],
        "outputs": [("output", "LATENT"), ("denoised_output", "LATENT")],
    },
    "LoraLoaderModelOnly": {
        "inputs": [("model", "MODEL")],
        "widgets": ["lora_name", "strength_model"],
        "outputs": [("MODEL", "MODEL")],
    },
    names.CALIBRATION_NODE: {
        "inputs": [("clip", "CLIP")],
        "widgets": ["prompts", "width", "height", "guidance", "filename_prefix"],
        "outputs": [("path", "STRING")],
    },
}
UI_ONLY = {"Note"}  # frontend-only nodes: not part of the API form

PROMPT = (
    "a red fox sitting in a snowy birch forest at golden hour, soft light, detailed fur, "
    "shallow depth of field, photograph"
)
IMG2IMG_PROMPT = "the same scene as a watercolor painting, soft washes of color, paper texture"
CALIBRATION_PROMPTS_FILE = os.path.join(os.path.dirname(HERE), "converter", "calibration", "prompts.txt")


def shipped_calibration_prompts() -> str:
    """The calibration node's default prompts text: prompts.txt without its blank and # lines, one per line
    (the rules of converter.calibration.conditioning.parse_prompts, read here without importing torch)."""
    with open(CALIBRATION_PROMPTS_FILE, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return "\n".join(line for line in lines if line and not line.startswith("#"))


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input name -> (source node id, output slot)
    title: Optional[str] = None
    size: tuple[int, int] = (320, 130)


def note(node_id: int, pos: tuple[int, int], text: str) -> Node:
    return Node(node_id, "Note", pos, {"text": text}, size=(420, 260))


def files_note(node_id: int, pos: tuple[int, int], t5: str, extra: str = "") -> Node:
    return note(
        node_id,
        pos,
        "1.58-bit FLUX.1-dev needs these files:\n"
        f"  models/diffusion_models/{names.MODEL_FILE}  (converted with this node pack's converter)\n"
        f"  models/text_encoders/{names.CLIP_L_FILE}\n"
        f"  models/text_encoders/{t5}\n"
        f"  models/vae/{names.VAE_FILE}  (FLUX.1's VAE)\n"
        f"{extra}"
        "cfg stays 1.0: FLUX.1-dev takes its guidance from FluxGuidance.\n"
        "Out of GPU memory? Start ComfyUI with --lowvram, lower the size, or set DualCLIPLoader's device to cpu.",
    )


def _loader(node_id: int, pos=(0, 0)) -> Node:
    return Node(node_id, names.LOADER_NODE, pos, {"unet_name": names.MODEL_FILE, "compute_dtype": "default"})


def _clip(node_id: int, t5: str, pos=(0, 200)) -> Node:
    widgets = {"clip_name1": names.CLIP_L_FILE, "clip_name2": t5, "type": "flux", "device": "default"}
    return Node(node_id, "DualCLIPLoader", pos, widgets)


def text_to_image_8gb(lora: bool = False) -> list[Node]:
    model_src = (12, 0) if lora else (1, 0)
    nodes = [
        _loader(1),
        _clip(2, names.T5_FP8_FILE),
        Node(3, "CLIPTextEncode", (380, 200), {"text": PROMPT}, {"clip": (2, 0)}, "Prompt", (420, 200)),
        Node(4, "FluxGuidance", (860, 150), {"guidance": 3.5}, {"conditioning": (3, 0)}),
        Node(5, "ConditioningZeroOut", (860, 300), {}, {"conditioning": (3, 0)}, "Negative (unused at cfg 1)"),
        Node(6, "EmptySD3LatentImage", (860, 430), {"width": 1024, "height": 1024, "batch_size": 1}),
        Node(
            7,
            "KSampler",
            (1220, 150),
            {"seed": 0, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0},
            {"model": model_src, "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)},
            size=(320, 270),
        ),
        Node(8, "VAELoader", (1220, 470), {"vae_name": names.VAE_FILE}),
        Node(
            9,
            "VAEDecodeTiled",
            (1580, 150),
            {"tile_size": 512, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8},
            {"samples": (7, 0), "vae": (8, 0)},
        ),
        Node(
            10, "SaveImage", (1940, 150), {"filename_prefix": "flux1-dev-1.58bit"}, {"images": (9, 0)}, size=(512, 560)
        ),
        files_note(
            11,
            (0, 400),
            names.T5_FP8_FILE,
            f"  models/loras/{names.LORA_FILE}  (any FLUX.1 LoRA)\n" if lora else "",
        ),
    ]
    if lora:
        nodes.append(
            Node(
                12,
                "LoraLoaderModelOnly",
                (380, 0),
                {"lora_name": names.LORA_FILE, "strength_model": 1.0},
                {"model": (1, 0)},
            )
        )
    return nodes


def text_to_image_16gb() -> list[Node]:
    return [
        _loader(1),
        _clip(2, names.T5_FP16_FILE),
        Node(3, "CLIPTextEncode", (380, 200), {"text": PROMPT}, {"clip": (2, 0)}, "Prompt", (420, 200)),
        Node(4, "FluxGuidance", (860, 200), {"guidance": 3.5}, {"conditioning": (3, 0)}),
        Node(
            5,
            "ModelSamplingFlux",
            (380, 0),
            {"max_shift": 1.15, "base_shift": 0.5, "width": 1024, "height": 1024},
            {"model": (1, 0)},
        ),
        Node(6, "BasicGuider", (1220, 0), {}, {"model": (5, 0), "conditioning": (4, 0)}),
        Node(7, "RandomNoise", (1220, 120), {"noise_seed": 0}),
        Node(8, "KSamplerSelect", (1220, 260), {"sampler_name": "euler"}),
        Node(9, "BasicScheduler", (1220, 380), {"scheduler": "simple", "steps": 20, "denoise": 1.0}, {"model": (5, 0)}),
        Node(10, "EmptySD3LatentImage", (1220, 540), {"width": 1024, "height": 1024, "batch_size": 1}),
        Node(
            11,
            "SamplerCustomAdvanced",
            (1580, 0),
            {},
            {"noise": (7, 0), "guider": (6, 0), "sampler": (8, 0), "sigmas": (9, 0), "latent_image": (10, 0)},
            size=(320, 330),
        ),
        Node(12, "VAELoader", (1580, 380), {"vae_name": names.VAE_FILE}),
        Node(13, "VAEDecode", (1940, 0), {}, {"samples": (11, 0), "vae": (12, 0)}),
        Node(
            14, "SaveImage", (2300, 0), {"filename_prefix": "flux1-dev-1.58bit"}, {"images": (13, 0)}, size=(512, 560)
        ),
        files_note(15, (0, 400), names.T5_FP16_FILE),
    ]


def image_to_image_8gb() -> list[Node]:
    return [
        _loader(1),
        _clip(2, names.T5_FP8_FILE),
        Node(3, "CLIPTextEncode", (380, 200), {"text": IMG2IMG_PROMPT}, {"clip": (2, 0)}, "Prompt", (420, 200)),
        Node(4, "FluxGuidance", (860, 150), {"guidance": 3.5}, {"conditioning": (3, 0)}),
        Node(5, "ConditioningZeroOut", (860, 300), {}, {"conditioning": (3, 0)}, "Negative (unused at cfg 1)"),
        Node(6, "LoadImage", (0, 700), {"image": names.INPUT_IMAGE}, size=(320, 360)),
        Node(
            7,
            "ImageScaleToTotalPixels",
            (380, 700),
            {"upscale_method": "lanczos", "megapixels": 1.0},
            {"image": (6, 0)},
        ),
        Node(8, "VAELoader", (380, 880), {"vae_name": names.VAE_FILE}),
        Node(9, "VAEEncode", (860, 700), {}, {"pixels": (7, 0), "vae": (8, 0)}),
        Node(
            10,
            "KSampler",
            (1220, 150),
            {"seed": 0, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 0.75},
            {"model": (1, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (9, 0)},
            size=(320, 270),
        ),
        Node(
            11,
            "VAEDecodeTiled",
            (1580, 150),
            {"tile_size": 512, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8},
            {"samples": (10, 0), "vae": (8, 0)},
        ),
        Node(
            12,
            "SaveImage",
            (1940, 150),
            {"filename_prefix": "flux1-dev-1.58bit-img2img"},
            {"images": (11, 0)},
            size=(512, 560),
        ),
        files_note(13, (0, 400), names.T5_FP8_FILE, "denoise 0.75: lower keeps more of the input image.\n"),
    ]


def calibration_conditioning() -> list[Node]:
    """FLUX.1's text encoders -> the converter's calibration conditioning file (no transformer, no sampling)."""
    return [
        _clip(1, names.T5_FP16_FILE),
        Node(
            2,
            names.CALIBRATION_NODE,
            (380, 0),
            {
                "prompts": shipped_calibration_prompts(),
                "width": 1024,
                "height": 1024,
                "guidance": 3.5,
                "filename_prefix": names.CALIBRATION_PREFIX,
            },
            {"clip": (1, 0)},
            size=(560, 520),
        ),
        note(
            3,
            (0, 400),
            "Makes the calibration conditioning file for the converter's --calibrate run: the converter has no "
            "text encoders, so FLUX.1's T5-XXL and CLIP-L encode the calibration prompts here.\n"
            f"Needs models/text_encoders/{names.CLIP_L_FILE} and models/text_encoders/{names.T5_FP16_FILE} "
            f"({names.T5_FP8_FILE} works too).\n"
            f"Writes output/{names.CALIBRATION_PREFIX}_00001.safetensors (about 4 MiB per prompt) and shows its path.\n"
            "The prompts are the shipped list, one per line: edit them freely, but never use prompts you evaluate "
            "the converted model with. width / height / guidance: what the converter samples its trajectories at.",
        ),
    ]


WORKFLOWS = {
    "flux1-dev-1.58bit_text-to-image_8GB": text_to_image_8gb,
    "flux1-dev-1.58bit_text-to-image_16GB": text_to_image_16gb,
    "flux1-dev-1.58bit_image-to-image_8GB": image_to_image_8gb,
    "flux1-dev-1.58bit_text-to-image_LoRA_8GB": lambda: text_to_image_8gb(lora=True),
}
# Tool workflows that make no image, kept out of the image workflows' folder (whose tests run each one as an
# image workflow): written to calibration/ and calibration/api/.
CALIBRATION_WORKFLOWS = {
    "flux1-dev_calibration-conditioning": calibration_conditioning,
}


def _order(nodes: list[Node]) -> dict[int, int]:
    """Topological execution order (the UI form stores it per node)."""
    done: dict[int, int] = {}
    pending = sorted(nodes, key=lambda n: n.id)
    while pending:
        ready = [n for n in pending if all(src in done for src, _ in n.links.values())]
        if not ready:
            raise ValueError("workflow has a cycle")
        for n in ready:
            done[n.id] = len(done)
        pending = [n for n in pending if n.id not in done]
    return done


def to_api(nodes: list[Node]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in sorted(nodes, key=lambda n: n.id):
        if n.type in UI_ONLY:
            continue
        inputs: dict[str, Any] = dict(n.widgets)
        inputs.update({name: [str(src), slot] for name, (src, slot) in n.links.items()})
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return out


def to_ui(nodes: list[Node]) -> dict[str, Any]:
    by_id = {n.id: n for n in nodes}
    order = _order(nodes)
    links: list[list[Any]] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    for n in sorted(nodes, key=lambda n: n.id):
        spec = NODE_SPECS.get(n.type, {"inputs": []})
        for target_slot, (name, typ) in enumerate(spec["inputs"]):
            if name not in n.links:
                continue
            src, slot = n.links[name]
            src_type = NODE_SPECS[by_id[src].type]["outputs"][slot][1]
            if src_type != typ:
                raise ValueError(f"node {n.id} input {name} is {typ}, node {src} output {slot} is {src_type}")
            link_id = len(links) + 1
            links.append([link_id, src, slot, n.id, target_slot, typ])
            out_links.setdefault((src, slot), []).append(link_id)
            in_links[(n.id, name)] = link_id
    ui_nodes = []
    for n in sorted(nodes, key=lambda n: n.id):
        if n.type in UI_ONLY:
            widgets_values: list[Any] = [n.widgets["text"]]
            inputs, outputs = [], []
        else:
            spec = NODE_SPECS[n.type]
            widgets_values = []
            for w in spec["widgets"]:
                widgets_values.append(n.widgets[w])
                if w in spec.get("seeds", ()):
                    widgets_values.append("randomize")
            if spec.get("upload"):
                widgets_values.append("image")
            inputs = [{"name": name, "type": typ, "link": in_links.get((n.id, name))} for name, typ in spec["inputs"]]
            outputs = [
                {"name": name, "type": typ, "links": out_links.get((n.id, i), []), "slot_index": i}
                for i, (name, typ) in enumerate(spec["outputs"])
            ]
        node: dict[str, Any] = {
            "id": n.id,
            "type": n.type,
            "pos": list(n.pos),
            "size": list(n.size),
            "flags": {},
            "order": order[n.id],
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "properties": {"Node name for S&R": n.type},
            "widgets_values": widgets_values,
        }
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    return {
        "last_node_id": max(by_id),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}},
        "version": 0.4,
    }


def build_all() -> dict[str, str]:
    """Relative path -> file text, for every shipped workflow file."""
    files = {}
    for folder, workflows in (("", WORKFLOWS), ("calibration/", CALIBRATION_WORKFLOWS)):
        for name, make in workflows.items():
            nodes = make()
            files[f"{folder}{name}.json"] = json.dumps(to_ui(nodes), indent=2) + "\n"
            files[f"{folder}api/{name}.json"] = json.dumps(to_api(nodes), indent=2) + "\n"
    return files


def main() -> None:
    for rel, text in build_all().items():
        path = os.path.join(HERE, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        print(path)


if __name__ == "__main__":
    main()
