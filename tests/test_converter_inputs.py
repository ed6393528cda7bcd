"""Accepted inputs: every dtype (fp8 and ComfyUI scaled fp8 included), ComfyUI prefixes, and the
BFL / diffusers layouts giving identical files."""

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_converter_support import make_state, save_bfl, save_diffusers_folder, tiny_config, to_diffusers

import bitkernel.functional as BF
from converter import InputError, convert
from converter.fileformat import read_header
from converter.methods import mse_ternary_scale

CFG = tiny_config()
STATE = make_state(CFG, seed=2)
LAYERS = [k[: -len(".weight")] for k in STATE if k.startswith(("double_", "single_")) and k.endswith(".weight")]
LAYERS = [p for p in LAYERS if "norm" not in p]


def _run(src, out, **kw):
    return convert(src, out, device="cpu", progress=False, **kw)


def _check_against(out: str, effective: dict[str, torch.Tensor]) -> None:
    """The file holds mse-ternary of the effective float32 block weights and bf16 of the rest."""
    tensors = load_file(out)
    for prefix in LAYERS:
        w = effective[f"{prefix}.weight"]
        ref = BF.quantize(w, "ternary", scale=mse_ternary_scale(w))
        assert torch.equal(tensors[f"{prefix}.qweight"], ref.qweight), prefix
        assert torch.equal(tensors[f"{prefix}.scale"], ref.scale), prefix
        assert torch.equal(tensors[f"{prefix}.bias"], effective[f"{prefix}.bias"].to(torch.bfloat16))
    for k, v in effective.items():
        if k.rsplit(".", 1)[0] not in LAYERS:
            assert tensors[k].dtype == torch.bfloat16 and torch.equal(tensors[k], v.to(torch.bfloat16)), k


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2], ids=str
)
def test_every_source_dtype(tmp_path, dtype):
    src, out = str(tmp_path / "src.safetensors"), str(tmp_path / "out.safetensors")
    save_bfl(STATE, src, dtype)
    report = _run(src, out)
    _check_against(out, {k: v.to(dtype).float() for k, v in STATE.items()})
    assert report.source_dtype == str(dtype).replace("torch.", "")
    assert read_header(out).source["dtype"] == report.source_dtype


@pytest.mark.parametrize("style", ["scale_weight", "weight_scale"])
def test_comfyui_scaled_fp8_with_prefix_and_other_models(tmp_path, style):
    # A ComfyUI "scaled fp8" save: per-tensor scales next to fp8 weights, input scales and a marker,
    # the model.diffusion_model. prefix, and a VAE / text encoder in the same file (ignored).
    p = "model.diffusion_model."
    tensors, effective = {}, {}
    for k, v in STATE.items():
        if k.endswith(".weight") and v.dim() == 2:
            s = v.abs().max() / 448
            q = (v / s).to(torch.float8_e4m3fn)
            tensors[p + k] = q
            tensors[p + k[: -len("weight")] + style] = s.reshape(())
            tensors[p + k[: -len("weight")] + ("scale_input" if style == "scale_weight" else "input_scale")] = (
                torch.ones(())
            )
            if style == "weight_scale":
                conf = json.dumps({"format": "float8_e4m3fn"}).encode()
                tensors[p + k[: -len("weight")] + "comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
            effective[k] = q.float() * s
        else:
            tensors[p + k] = v.to(torch.bfloat16)
            effective[k] = v.to(torch.bfloat16).float()
    tensors[p + "scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4)
    tensors["text_encoders.t5xxl.shared.weight"] = torch.zeros(4, 4)
    src, out = str(tmp_path / "scaled.safetensors"), str(tmp_path / "out.safetensors")
    save_file(tensors, src)
    report = _run(src, out)
    _check_against(out, effective)
    assert report.ignored_tensors == 2 and "scaled" in report.source_dtype


def test_comfy_quant_other_than_fp8_is_refused(tmp_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in STATE.items()}
    conf = json.dumps({"format": "nvfp4"}).encode()
    tensors["double_blocks.0.img_attn.qkv.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    src = str(tmp_path / "nvfp4.safetensors")
    save_file(tensors, src)
    with pytest.raises(InputError, match="nvfp4"):
        _run(src, str(tmp_path / "out.safetensors"))


def _all(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_bfl_and_diffusers_layouts_give_identical_files(tmp_path):
    bfl = str(tmp_path / "flux.safetensors")
    save_bfl(STATE, bfl)
    pipeline = tmp_path / "pipeline"
    save_diffusers_folder(STATE, CFG, str(pipeline / "transformer"), shards=3)
    single = str(tmp_path / "diffusers_single.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in to_diffusers(STATE, CFG).items()}, single)
    index = str(pipeline / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    inputs = {"bfl": bfl, "folder": str(pipeline / "transformer"), "pipeline": str(pipeline), "single": single,
              "index": index}
    outs = {}
    for name, src in inputs.items():
        out = str(tmp_path / f"out_{name}.safetensors")
        report = _run(src, out, rules=["*_mod.lin=int8"])
        assert report.layout == ("bfl" if name == "bfl" else "diffusers")
        outs[name] = _all(out)
    ref_tensors, ref_meta = outs["bfl"]
    for name, (tensors, meta) in outs.items():
        assert tensors.keys() == ref_tensors.keys()
        for k in tensors:
            assert torch.equal(tensors[k], ref_tensors[k]), (name, k)
        assert {k: v for k, v in meta.items() if k != "source"} == {
            k: v for k, v in ref_meta.items() if k != "source"
        }
        source = json.loads(meta["source"])
        assert source["layout"] == ("bfl" if name == "bfl" else "diffusers") and len(source["sha256"]) == 64
    # the hash is of the source bytes (shards concatenated in name order for a folder)
    assert json.loads(outs["bfl"][1]["source"])["sha256"] == hashlib.sha256(open(bfl, "rb").read()).hexdigest()
    shards = sorted(f for f in os.listdir(pipeline / "transformer") if f.endswith(".safetensors"))
    h = hashlib.sha256()
    for s in shards:
        h.update((pipeline / "transformer" / s).read_bytes())
    assert json.loads(outs["folder"][1]["source"])["sha256"] == h.hexdigest()


def test_schnell_style_without_guidance_and_qkv_bias(tmp_path):
    cfg = tiny_config(guidance_embed=False, qkv_bias=False, depth=2, depth_single_blocks=3, mlp_ratio=2.0)
    state = make_state(cfg, seed=5)
    src, out = str(tmp_path / "schnell.safetensors"), str(tmp_path / "out.safetensors")
    save_bfl(state, src)
    report = _run(src, out)
    arch = read_header(out).architecture
    assert arch == {**cfg.to_dict(), "patch_size": 2}
    assert not any(k.startswith("guidance_in") for k in load_file(out))
    assert report.formats == {"ternary": 2 * 10 + 3 * 3}
