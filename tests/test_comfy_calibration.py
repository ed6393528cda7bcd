"""The "BitFlux Calibration Prompts" node inside ComfyUI (COMFYUI_DIR), through ComfyUI's own code path: the
repository loaded by `nodes.load_custom_node` as ComfyUI loads a custom node pack, prompts checked by
`execution.validate_prompt` and run by `execution.PromptExecutor` (in this process, no HTTP server), the CLIP
from the stock DualCLIPLoader. The file it writes must pass load_conditioning and hold exactly what the stock
CLIPTextEncode gives for the same prompts with the same CLIP.

Text encoders: the stand-ins of tests/comfy_standins.py under the names the shipped calibration workflow
references: CLIP-L (fp16, real size, random) and T5-XXL's 24 layers at width 64 (random), which ComfyUI builds
through its `t5xxl_model_config` option (set here as tests/test_comfy_server.py sets it). FLUX.1's T5 is 4096
wide, so the tests that need the node to accept the small T5 lower the node's expected context width to 64.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import json
import os
from typing import Any

import comfy_env as ce
import comfy_standins as standins
import pytest
import torch

from comfy_nodes import names
from converter.calibration.conditioning import default_prompts, load_conditioning

pytestmark = pytest.mark.comfyui

WORKFLOW = os.path.join(ce.REPO, "workflows", "calibration", "api", "flux1-dev_calibration-conditioning.json")
LONG = " ".join(["red apple"] * 150)  # over 256 T5 tokens: a longer context than the others
PROMPTS_TEXT = f"a red cube on a table\n\n# a comment line, skipped\n  zwei Katzen \u00fcber einem Zaun  \n{LONG}\n"
PROMPTS = ["a red cube on a table", "zwei Katzen \u00fcber einem Zaun", LONG]


class _Server:
    """What PromptExecutor needs of ComfyUI's PromptServer when no client listens."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    nodes = ce.import_comfy()  # skips without COMFYUI_DIR
    import comfy.sd
    import folder_paths

    base = tmp_path_factory.mktemp("calibration")
    te = base / "text_encoders"
    pool = standins.write_standin("t5_fp16", str(te / names.T5_FP16_FILE), ce.comfyui_dir(), tiny=True)
    standins.write_standin("clip_l", str(te / names.CLIP_L_FILE), ce.comfyui_dir(), pool=pool)
    del pool
    folder_paths.add_model_folder_path("text_encoders", str(te))
    old_output = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(base / "output"))

    load_encoders = comfy.sd.load_text_encoder_state_dicts

    def load_encoders_small_t5(state_dicts, *args, model_options=None, **kwargs):
        """ComfyUI's T5-XXL config is fixed at width 4096: the stand-in's shapes go through its own
        t5xxl_model_config option (as in tests/test_comfy_server.py)."""
        model_options = dict(model_options or {})
        for sd in state_dicts:
            cfg = standins.small_t5_config(sd)
            if cfg:
                model_options["t5xxl_model_config"] = cfg
        return load_encoders(state_dicts, *args, model_options=model_options, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(comfy.sd, "load_text_encoder_state_dicts", load_encoders_small_t5)
    # One thread: on a small machine shared with other work, torch's thread pool spinning against a busy core made
    # the real-size CLIP-L ~9x slower (115 s instead of 13 s for this file); results compared here are all
    # computed in this process under the same setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mappings, display = dict(nodes.NODE_CLASS_MAPPINGS), dict(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    assert asyncio.run(nodes.load_custom_node(ce.REPO))  # the pack as ComfyUI loads it (V3 entry point here)
    node_cls = nodes.NODE_CLASS_MAPPINGS[names.CALIBRATION_NODE]
    pack = node_cls.__module__.rsplit(".", 1)[0]  # the pack's own copy of comfy_nodes
    try:
        yield {
            "nodes": nodes,
            "base": base,
            "v3": node_cls,
            "v1": importlib.import_module(f"{pack}.nodes_v1").BitfluxCalibrationPrompts,
            "calibration": importlib.import_module(f"{pack}.calibration"),
        }
    finally:
        torch.set_num_threads(threads)
        mp.undo()
        folder_paths.set_output_directory(old_output)
        nodes.NODE_CLASS_MAPPINGS.clear()
        nodes.NODE_CLASS_MAPPINGS.update(mappings)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.clear()
        nodes.NODE_DISPLAY_NAME_MAPPINGS.update(display)


@pytest.fixture
def small_t5(env, monkeypatch):
    """The node's FLUX.1 width check, lowered to the T5 stand-in's width."""
    monkeypatch.setattr(env["calibration"], "FLUX_CONTEXT_DIM", standins.TINY_CONTEXT)


@pytest.fixture
def progress():
    import comfy.utils

    calls: list[tuple[int, int]] = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview=None, **kw: calls.append((value, total)))
    yield calls
    comfy.utils.set_progress_bar_global_hook(old)


def clip_loader(node_id: str = "1") -> dict[str, Any]:
    inputs = {"clip_name1": names.CLIP_L_FILE, "clip_name2": names.T5_FP16_FILE, "type": "flux", "device": "default"}
    return {node_id: {"class_type": "DualCLIPLoader", "inputs": inputs}}


def calibration_prompt(prompts: str = PROMPTS_TEXT, **inputs: Any) -> dict[str, Any]:
    node = {"clip": ["1", 0], "prompts": prompts, "width": 512, "height": 768, "guidance": 2.5,
            "filename_prefix": "calib/run"}  # fmt: skip
    node.update(inputs)
    return {**clip_loader(), "2": {"class_type": names.CALIBRATION_NODE, "inputs": node}}


def run(prompt: dict[str, Any]):
    """(executor, error message or None) after ComfyUI validated and ran `prompt`."""
    import execution

    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("calibration-test", prompt, None))
    assert valid, (error, node_errors)
    executor = execution.PromptExecutor(_Server())
    executor.execute(prompt, "calibration-test", {}, outputs)
    errors = [m for event, m in executor.status_messages if event == "execution_error"]
    return executor, (errors[0]["exception_message"] if errors else None)


def node_output(executor, node_id: str = "2") -> str:
    entry = executor.caches.outputs.get(node_id)
    return getattr(entry, "outputs", entry)[0][0]  # newer ComfyUI wraps the output lists in a CacheEntry


@pytest.fixture(scope="module")
def stock(env) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(context [L, C], pooled [V]) per prompt of PROMPTS from stock DualCLIPLoader + CLIPTextEncode."""
    nodes = env["nodes"]
    clip = nodes.DualCLIPLoader().load_clip(names.CLIP_L_FILE, names.T5_FP16_FILE, "flux")[0]
    out = []
    for p in PROMPTS:
        [[context, extra]] = nodes.CLIPTextEncode().encode(clip, p)[0]
        out.append((context[0], extra["pooled_output"][0]))
    return out


def test_node_is_registered_in_both_apis(env):
    nodes, v3, v1 = env["nodes"], env["v3"], env["v1"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS[names.CALIBRATION_NODE] == "BitFlux Calibration Prompts"
    new, classic = v3.INPUT_TYPES(), v1.INPUT_TYPES()
    order = ["clip", "prompts", "width", "height", "guidance", "filename_prefix"]
    assert list(new["required"]) == list(classic["required"]) == order
    for name in order:
        assert new["required"][name][0] == classic["required"][name][0], name
    for api in (new, classic):
        opts = {k: v[1] for k, v in api["required"].items()}
        assert opts["prompts"]["multiline"] and opts["prompts"]["default"] == "\n".join(default_prompts())
        assert (opts["width"]["default"], opts["width"]["step"], opts["height"]["default"]) == (1024, 16, 1024)
        assert opts["guidance"]["default"] == 3.5 and opts["filename_prefix"]["default"] == "bitflux_calibration"
    assert tuple(v3.RETURN_TYPES) == v1.RETURN_TYPES == ("STRING",)  # V3 gives lists
    assert tuple(v3.RETURN_NAMES) == v1.RETURN_NAMES == ("path",)
    assert v3.OUTPUT_NODE is True and v1.OUTPUT_NODE is True
    assert names.CALIBRATION_NODE in importlib.import_module(v1.__module__).NODE_CLASS_MAPPINGS


@pytest.mark.parametrize("api", ["v3", "v1"])
def test_file_equals_stock_clip_text_encode(env, small_t5, progress, stock, monkeypatch, api):
    nodes = env["nodes"]
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, names.CALIBRATION_NODE, env[api])
    prefix = f"calib/{api}"
    executor, error = run(calibration_prompt(filename_prefix=prefix))
    assert error is None, error
    path = node_output(executor)
    assert path == os.path.join(str(env["base"]), "output", "calib", f"{api}_00001.safetensors")
    assert executor.history_result["outputs"]["2"]["text"][0].startswith(path + "\n3 prompts")
    assert progress[-1] == (3, 3) and [v for v, _ in progress] == [1, 2, 3]

    cond = load_conditioning(path, context_in_dim=standins.TINY_CONTEXT, vec_in_dim=768)
    assert cond.prompts == PROMPTS and cond.encoder == "comfyui t5xxl+clip_l"
    assert cond.image_tokens == (768 // 16, 512 // 16) and cond.guidance == 2.5
    assert cond.txt_len.tolist() == [c.shape[0] for c, _ in stock] and cond.txt_len[2] > 256 == cond.txt_len[0]
    for i, (context, pooled) in enumerate(stock):
        assert cond.txt.dtype == context.dtype and torch.equal(cond.context(i), context), i
        assert torch.equal(cond.vec[i], pooled), i
        assert not cond.txt[i, context.shape[0] :].any()  # zero padding only past the prompt's own length

    executor, error = run(calibration_prompt(PROMPTS[0], filename_prefix=prefix))  # the next free counter
    assert error is None and node_output(executor).endswith(f"{api}_00002.safetensors")
    assert load_conditioning(node_output(executor)).prompts == PROMPTS[:1]


def test_clip_that_is_not_fluxs_is_refused(env):
    # FLUX.1's own widths (no lowered check): the stand-in T5 is 64 wide, not T5-XXL's 4096.
    _, error = run(calibration_prompt(filename_prefix="refused/a"))
    assert "DualCLIPLoader with clip_l and t5xxl and type flux" in error and "context of width 64" in error
    single = {"1": {"class_type": "CLIPLoader",
                    "inputs": {"clip_name": names.CLIP_L_FILE, "type": "stable_diffusion", "device": "default"}}}
    _, error = run({**calibration_prompt(filename_prefix="refused/b"), **single})
    assert "type flux" in error and "context of width 768" in error
    refused = env["base"] / "output" / "refused"
    assert not refused.exists() or not os.listdir(refused)  # nothing written


@pytest.mark.parametrize(
    "inputs,message",
    [
        ({"prompts": "# only a comment\n\n   \n"}, "No calibration prompts"),
        ({"width": 1000}, "multiples of 16"),
        ({"filename_prefix": "../outside"}, "outside the output folder"),
        ({"filename_prefix": "  "}, "filename_prefix is empty"),
    ],
)
def test_input_errors_reach_the_user(env, small_t5, inputs, message):
    _, error = run(calibration_prompt(**inputs))
    assert message in error


def test_shipped_workflow_runs(env, small_t5):
    """The shipped API-form workflow as is, but for its prompt list (first 3 of the 128, for CPU time)."""
    with open(WORKFLOW) as f:
        prompt = json.load(f)
    node = next(n for n in prompt.values() if n["class_type"] == names.CALIBRATION_NODE)
    assert node["inputs"]["prompts"] == "\n".join(default_prompts())  # the node's default, the shipped list
    shrunk = copy.deepcopy(prompt)
    next(n for n in shrunk.values() if n["class_type"] == names.CALIBRATION_NODE)["inputs"]["prompts"] = "\n".join(
        default_prompts()[:3]
    )
    executor, error = run(shrunk)
    assert error is None, error
    path = node_output(executor)
    assert os.path.basename(path) == f"{names.CALIBRATION_PREFIX}_00001.safetensors"
    cond = load_conditioning(path, context_in_dim=standins.TINY_CONTEXT, vec_in_dim=768)
    assert cond.prompts == default_prompts()[:3] and cond.image_tokens == (64, 64) and cond.guidance == 3.5
