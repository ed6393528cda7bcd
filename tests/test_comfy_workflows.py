"""The shipped workflows (workflows/*.json UI form, workflows/api/*.json API form): up to date with
their generator, links consistent, both forms saying the same, every node class known. Runs without
ComfyUI; with COMFYUI_DIR set, stock node names are also looked up in ComfyUI's source.
(tests/test_comfy_server.py checks them against a running ComfyUI's node definitions.)"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import sys

import pytest

from comfy_nodes import names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WF = os.path.join(REPO, "workflows")

# Stock nodes the workflows use; all in ComfyUI since 2024 (FLUX.1 support).
STOCK = {
    "DualCLIPLoader", "CLIPTextEncode", "FluxGuidance", "ConditioningZeroOut", "EmptySD3LatentImage", "KSampler",
    "VAELoader", "VAEDecode", "VAEDecodeTiled", "VAEEncode", "SaveImage", "LoadImage", "ImageScaleToTotalPixels",
    "ModelSamplingFlux", "BasicGuider", "RandomNoise", "KSamplerSelect", "BasicScheduler", "SamplerCustomAdvanced",
    "LoraLoaderModelOnly",
}  # fmt: skip
OURS = {names.LOADER_NODE, names.INFO_NODE}
UI_ONLY = {"Note"}


def _generator():
    spec = importlib.util.spec_from_file_location("build_workflows", os.path.join(WF, "build_workflows.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_workflows"] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def _pairs():
    ui = sorted(glob.glob(os.path.join(WF, "*.json")))
    assert len(ui) >= 4
    for path in ui:
        api = os.path.join(WF, "api", os.path.basename(path))
        with open(path) as f, open(api) as g:
            yield os.path.basename(path), json.load(f), json.load(g)


def test_files_are_what_the_generator_writes():
    files = _generator().build_all()
    on_disk = {os.path.relpath(p, WF) for p in glob.glob(os.path.join(WF, "**", "*.json"), recursive=True)}
    assert on_disk == set(files), "run: python workflows/build_workflows.py"
    for rel, text in files.items():
        with open(os.path.join(WF, rel)) as f:
            assert f.read() == text, f"{rel} is stale: run python workflows/build_workflows.py"


def test_names_say_what_they_do():
    for name, _, _ in _pairs():
        assert re.fullmatch(r"flux1-dev-1\.58bit_(text|image)-to-image(_LoRA)?_(8|16)GB\.json", name), name


@pytest.mark.parametrize("name,ui,api", list(_pairs()), ids=lambda v: v if isinstance(v, str) else "")
def test_ui_links_are_consistent(name, ui, api):
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == len(ui["links"])
    seen_links = set()
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id, (name, link_id)
        assert out["type"] == inp["type"] == typ, (name, link_id)
        seen_links.add(link_id)
    for n in nodes.values():
        for inp in n["inputs"]:
            assert inp["link"] in seen_links, (name, n["type"], inp["name"], "unconnected input")
        for out in n["outputs"]:
            assert set(out["links"]) <= seen_links
    orders = sorted(n["order"] for n in nodes.values())
    assert orders == list(range(len(nodes)))
    for _, src, _, dst, _, _ in ui["links"]:
        assert nodes[src]["order"] < nodes[dst]["order"]


@pytest.mark.parametrize("name,ui,api", list(_pairs()), ids=lambda v: v if isinstance(v, str) else "")
def test_api_form_matches_ui_form(name, ui, api):
    ui_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in UI_ONLY}
    assert set(api) == set(ui_nodes)
    for node_id, a in api.items():
        u = ui_nodes[node_id]
        assert a["class_type"] == u["type"]
        links = {k: v for k, v in a["inputs"].items() if isinstance(v, list)}
        widgets = [v for k, v in a["inputs"].items() if not isinstance(v, list)]
        ui_links = {}
        for inp in u["inputs"]:
            link = next(lk for lk in ui["links"] if lk[0] == inp["link"])
            ui_links[inp["name"]] = [str(link[1]), link[2]]
        assert links == ui_links, (name, node_id)
        values = [v for v in u["widgets_values"] if v not in ("randomize", "fixed", "increment", "decrement")]
        if u["type"] == "LoadImage":
            values = values[:-1]  # the upload widget
        assert values == widgets, (name, node_id)


def _comfy_source_text() -> str:
    root = os.environ.get("COMFYUI_DIR")
    if not root or not os.path.isdir(os.path.join(root, "comfy_extras")):
        return ""
    parts = []
    for path in [os.path.join(root, "nodes.py"), *glob.glob(os.path.join(root, "comfy_extras", "*.py"))]:
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


def test_every_node_class_exists():
    used = set()
    for _, ui, api in _pairs():
        used |= {n["type"] for n in ui["nodes"]} | {n["class_type"] for n in api.values()}
    unknown = used - STOCK - OURS - UI_ONLY
    assert not unknown
    source = _comfy_source_text()
    if source:  # the stock names really are ComfyUI's (classic mapping key or V3 node_id)
        for t in used & STOCK:
            assert re.search(rf'"{t}"\s*:|node_id="{t}"', source), t


def test_workflows_use_the_documented_files():
    for name, _, api in _pairs():
        inputs = {n["class_type"]: n["inputs"] for n in api.values()}
        assert inputs[names.LOADER_NODE]["unet_name"] == names.MODEL_FILE
        clip = inputs["DualCLIPLoader"]
        assert (clip["clip_name1"], clip["type"]) == (names.CLIP_L_FILE, "flux")
        assert clip["clip_name2"] == (names.T5_FP8_FILE if "8GB" in name else names.T5_FP16_FILE)
        assert inputs["VAELoader"]["vae_name"] == names.VAE_FILE
        if "8GB" in name:
            assert "VAEDecodeTiled" in inputs  # bounds the decoder's peak memory at 1024x1024
        if "LoRA" in name:
            assert inputs["LoraLoaderModelOnly"]["lora_name"] == names.LORA_FILE
        if "image-to-image" in name:
            assert inputs["KSampler"]["denoise"] < 1 and "VAEEncode" in inputs
        sampler = inputs.get("KSampler") or inputs["BasicScheduler"]
        assert sampler.get("cfg", 1.0) == 1.0
