"""The node pack inside a real headless ComfyUI server (COMFYUI_DIR), driven through its HTTP API.

The repository is linked into a temporary custom_nodes folder and `python main.py --cpu` serves it,
started once for the whole module. What runs end to end:

- every shipped API-form workflow (workflows/api/*.json), as shipped except for size and steps
  (`shrink`: 64x64 or about 0.01 megapixels, 2 steps), on small stand-ins under the exact file names
  the workflows reference (tests/comfy_standins.py): the 1.58-bit transformer is a small
  FLUX-architecture model converted by converter.convert; CLIP-L (fp16) and the FLUX VAE are random
  files of their real sizes; T5-XXL (fp8 and fp16) keeps its 24 layers at width 64, which ComfyUI
  builds through its own `t5xxl_model_config` option (the test node file below passes it for a T5
  narrower than T5-XXL); the LoRA is a random one in two stock key styles; the img2img input is a
  generated image. Each writes an image, which the test opens;
- our loader -> stock LoRA loader -> stock KSampler (batch 2) -> SaveImage, plus the info node, on a
  model with every layer format.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import comfy_env as ce
import comfy_standins as standins
import pytest
from PIL import Image

from comfy_nodes import names
from converter.fileformat import read_header

pytestmark = pytest.mark.comfyui

TEST_NODES = '''"""Test-only nodes (hand-made conditioning, a decoder for the test model's pixel-space latents) and
the one ComfyUI setting the small T5 stand-in needs."""
import sys

import comfy.sd
import torch

sys.path.insert(0, TESTS_DIR)
from comfy_standins import small_t5_config  # noqa: E402

_load_text_encoders = comfy.sd.load_text_encoder_state_dicts


def _load_text_encoders_small_t5(state_dicts, *args, model_options=None, **kwargs):
    """ComfyUI's T5-XXL config is fixed at width 4096: for a narrower T5 file (the test stand-in) pass
    its shapes through ComfyUI's own t5xxl_model_config option. Real T5-XXL files are untouched."""
    model_options = dict(model_options or {})
    for sd in state_dicts:
        cfg = small_t5_config(sd)
        if cfg:
            model_options["t5xxl_model_config"] = {**cfg, **model_options.get("t5xxl_model_config", {})}
    return _load_text_encoders(state_dicts, *args, model_options=model_options, **kwargs)


comfy.sd.load_text_encoder_state_dicts = _load_text_encoders_small_t5


class BitfluxTestConditioning:
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        i = ("INT", {"default": 8, "min": 1, "max": 8192})
        return {"required": {"context_dim": i, "pooled_dim": i, "tokens": i, "seed": i}}

    def make(self, context_dim, pooled_dim, tokens, seed):
        g = torch.Generator().manual_seed(seed)
        ctx, pooled = torch.randn(1, tokens, context_dim, generator=g), torch.randn(1, pooled_dim, generator=g)
        return ([[ctx, {"pooled_output": pooled}]],)


class BitfluxTestLatentToImage:
    """The testbed model's latent is a pixel-unshuffled RGB image: shuffle it back."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def decode(self, samples):
        rgb = torch.nn.functional.pixel_shuffle(samples["samples"].float(), 2)
        return (((rgb.clamp(-1, 1) + 1) / 2).movedim(1, -1),)


NODE_CLASS_MAPPINGS = {"BitfluxTestConditioning": BitfluxTestConditioning,
                       "BitfluxTestLatentToImage": BitfluxTestLatentToImage}
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: str, log_path: str) -> None:
        self.base, self.log_path, self.port = base, log_path, _free_port()
        env = dict(os.environ)
        stubs = ce.stub_dir()
        if stubs:
            env["PYTHONPATH"] = stubs + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--base-directory", base, "--database-url", "sqlite:///:memory:",
        ]  # fmt: skip
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ce.comfyui_dir(), env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url(path), timeout=10) as r:
            return json.load(r)

    def post(self, path: str, body) -> tuple[int, dict]:
        req = urllib.request.Request(self.url(path), json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, text = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        return status, json.loads(text) if text.strip() else {}

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                self.get("/object_info/KSampler")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not come up in {timeout} s:\n{self.tail()}")

    def run(self, prompt: dict, timeout: float = 60) -> dict:
        status, body = self.post("/prompt", {"prompt": prompt})
        assert status == 200, body
        pid = body["prompt_id"]
        end = time.time() + timeout
        while time.time() < end:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") == "success":
                    return entry
                raise AssertionError(f"prompt failed: {json.dumps(entry['status'])[:3000]}\n{self.tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt did not finish in {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return "".join(f.readlines()[-n:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


STANDINS = (  # (stand-in kind, file the shipped workflows reference)
    ("t5", f"text_encoders/{names.T5_FP8_FILE}"),
    ("t5_fp16", f"text_encoders/{names.T5_FP16_FILE}"),
    ("clip_l", f"text_encoders/{names.CLIP_L_FILE}"),
    ("vae", f"vae/{names.VAE_FILE}"),
)
INPUT_SIZE = (160, 120)  # the img2img input image


def write_shipped_files(base, comfyui_root: str) -> None:
    """Small stand-ins under the exact names the shipped workflows reference (module docstring)."""
    ce.import_comfy()  # the T5 / CLIP / VAE stand-ins are built by ComfyUI's own modules
    models = base / "models"
    model, _ = standins.make_tiny_files(str(base / "standin-build"), "cpu", out_name=names.MODEL_FILE)
    shutil.move(model, models / "diffusion_models" / names.MODEL_FILE)
    ce.write_lora(str(models / "loras" / names.LORA_FILE), read_header(models / "diffusion_models" / names.MODEL_FILE))
    pool = None
    for kind, rel in STANDINS:
        pool = standins.write_standin(kind, str(models / rel), comfyui_root, tiny=True, pool=pool)
    del pool
    w, h = INPUT_SIZE
    ramp = Image.linear_gradient("L").resize((w, h))
    Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT), Image.new("L", (w, h), 90))).save(
        base / "input" / names.INPUT_IMAGE
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = ce.comfyui_dir()  # skips, with the reason, when COMFYUI_DIR is unset
    base = tmp_path_factory.mktemp("comfy")
    models = base / "models"
    for d in ("diffusion_models", "loras", "text_encoders", "vae"):
        (models / d).mkdir(parents=True)
    (base / "input").mkdir()
    (base / "custom_nodes").mkdir()
    os.symlink(ce.REPO, base / "custom_nodes" / "bitflux-nodes")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    (base / "custom_nodes" / "bitflux_test_nodes.py").write_text(TEST_NODES.replace("TESTS_DIR", repr(tests_dir)))

    header = ce.write_bitflux(str(models / "diffusion_models" / "tiny.safetensors"))
    ce.write_lora(str(models / "loras" / "tiny_lora.safetensors"), header)
    # The server starts while the stand-ins are written (ComfyUI lists model folders on each request).
    srv = Server(str(base), str(base / "comfyui.log"))
    try:
        write_shipped_files(base, root)
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_nodes_are_registered(server):
    info = server.get(f"/object_info/{names.LOADER_NODE}")[names.LOADER_NODE]
    assert info["display_name"] == names.DISPLAY_NAMES[names.LOADER_NODE]
    choices = info["input"]["required"]["unet_name"][1]["options"]
    assert "tiny.safetensors" in choices and names.MODEL_FILE in choices
    assert names.INFO_NODE in server.get(f"/object_info/{names.INFO_NODE}")
    log = server.tail(100_000).splitlines()
    assert not [line for line in log if "bitflux-nodes" in line and ("Cannot import" in line or "FAILED" in line)]


def test_lora_ksampler_batch2_writes_images(server):
    prompt = {
        "1": {"class_type": names.LOADER_NODE, "inputs": {"unet_name": "tiny.safetensors", "compute_dtype": "default"}},
        "2": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": "tiny_lora.safetensors", "strength_model": 0.8}},
        "3": {"class_type": "BitfluxTestConditioning",
              "inputs": {"context_dim": 128, "pooled_dim": 128, "tokens": 8, "seed": 3}},
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": 3.5}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 2}},
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
                         "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                         "denoise": 1.0}},
        "8": {"class_type": "BitfluxTestLatentToImage", "inputs": {"samples": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bitflux_test"}},
        "10": {"class_type": names.INFO_NODE, "inputs": {"model": ["2", 0], "per_layer": False}},
    }  # fmt: skip
    entry = server.run(prompt)
    images = entry["outputs"]["9"]["images"]
    assert len(images) == 2
    for img in images:
        path = os.path.join(server.base, "output", img["subfolder"], img["filename"])
        with Image.open(path) as im:
            assert im.size == (64, 64)  # 256 / 8 latent, pixel-shuffled by 2
    report = entry["outputs"]["10"]["text"][0]
    assert "LoRA patches on packed layers: 6" in report and "ternary" in report


SHIPPED = sorted(f for f in os.listdir(os.path.join(ce.REPO, "workflows", "api")) if f.endswith(".json"))
SIZE, STEPS, MEGAPIXELS = 64, 2, 0.01
# What changes for the small model and CPU time; every other input runs as shipped.
SHRINK = {
    "EmptySD3LatentImage": {"width": SIZE, "height": SIZE},
    "ImageScaleToTotalPixels": {"megapixels": MEGAPIXELS},
    "KSampler": {"steps": STEPS},
    "BasicScheduler": {"steps": STEPS},
}


def shrink(prompt: dict) -> set[str]:
    """Size and steps of an API-form workflow, changed in place. Returns the node types changed."""
    changed = set()
    for node in prompt.values():
        for name, value in SHRINK.get(node["class_type"], {}).items():
            assert name in node["inputs"], (node["class_type"], name)
            node["inputs"][name] = value
            changed.add(node["class_type"])
    return changed


def load_shipped(name: str) -> dict:
    with open(os.path.join(ce.REPO, "workflows", "api", name)) as f:
        return json.load(f)


def test_every_shipped_workflow_is_run():
    assert len(SHIPPED) >= 4, SHIPPED
    for name in SHIPPED:
        changed = shrink(load_shipped(name))
        # A workflow whose size or steps this test cannot lower would run at 1024x1024 and 20 steps.
        assert changed & {"KSampler", "BasicScheduler"}, (name, changed)
        assert changed & {"EmptySD3LatentImage", "ImageScaleToTotalPixels"}, (name, changed)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_workflow_writes_an_image(server, name):
    prompt = load_shipped(name)
    shrink(prompt)
    savers = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    assert savers, name
    entry = server.run(prompt, timeout=180)
    for node_id in savers:
        images = entry["outputs"][node_id]["images"]
        assert len(images) == 1, images
        prefix = prompt[node_id]["inputs"]["filename_prefix"]
        assert images[0]["filename"].startswith(prefix) and images[0]["type"] == "output", images
        path = os.path.join(server.base, "output", images[0]["subfolder"], images[0]["filename"])
        with Image.open(path) as im:
            w, h = im.size
            extrema = im.convert("RGB").getextrema()
        if "ImageScaleToTotalPixels" in {v["class_type"] for v in prompt.values()}:
            # scaled to about MEGAPIXELS, then cropped by the VAE encoder to multiples of 8
            assert w % 8 == 0 and h % 8 == 0 and 0.6 < w * h / (MEGAPIXELS * 2**20) <= 1.05, (w, h)
            assert abs(w / h - INPUT_SIZE[0] / INPUT_SIZE[1]) < 0.15, (w, h)
        else:
            assert (w, h) == (SIZE, SIZE)
        assert any(lo < hi for lo, hi in extrema), f"{name}: a flat image (non-finite latents?) {extrema}"


def test_server_refuses_a_workflow_naming_a_missing_file(server):
    """ComfyUI validates a prompt before running it: a file name the server does not have is refused."""
    prompt = load_shipped(SHIPPED[0])
    prompt[next(k for k, v in prompt.items() if v["class_type"] == names.LOADER_NODE)]["inputs"]["unet_name"] = "x"
    status, body = server.post("/prompt", {"prompt": prompt})
    assert status == 400 and body.get("node_errors"), body


def test_generator_node_specs_match_comfyui(server):
    """The widget and socket order the UI-form files were written with is ComfyUI's own."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_workflows", os.path.join(ce.REPO, "workflows", "build_workflows.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_workflows"] = mod
    spec.loader.exec_module(mod)
    all_info = server.get("/object_info")
    link_types = set()
    for node_type, s in mod.NODE_SPECS.items():
        info = all_info[node_type]
        widgets, links = [], []
        for section in ("required", "optional"):
            for name in info["input_order"].get(section, []):
                typ = info["input"][section][name][0]
                if isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                    widgets.append(name)
                else:
                    links.append((name, typ))
                    link_types.add(typ)
        assert widgets == s["widgets"], node_type
        assert links == [tuple(x) for x in s["inputs"]], node_type
        assert list(zip(info["output_name"], info["output"])) == [tuple(x) for x in s["outputs"]], node_type
        for seed in s.get("seeds", []):
            seed_opts = next(
                info["input"][sec][seed][1] for sec in ("required", "optional") if seed in info["input"].get(sec, {})
            )
            assert seed_opts.get("control_after_generate"), (node_type, seed)
