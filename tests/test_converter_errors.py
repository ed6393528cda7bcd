"""Refused inputs (each with its message, leaving no file), interrupted writes, --force, --dry-run."""

import errno
import os

import pytest
import torch
from safetensors.torch import save_file
from test_converter_support import make_state, save_bfl, tiny_config

import converter.pipeline
from converter import ConversionError, InputError, convert
from converter.safetensors_io import StreamingWriter

CFG = tiny_config()
STATE = make_state(CFG, seed=4)


@pytest.fixture()
def dirs(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    return src, out


def _run(src, out, **kw):
    kw.setdefault("device", "cpu")
    return convert(str(src), str(out), progress=False, **kw)


def _flux(path, **changes):
    tensors = {k: v.to(torch.bfloat16) for k, v in STATE.items()}
    for k, v in changes.items():
        if v is None:
            tensors.pop(k)
        else:
            tensors[k] = v
    save_file(tensors, str(path))


def _keys(path, keys):
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))


def _bytes(path, data):
    path.write_bytes(data)


def _truncated(path):
    _flux(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_json(path):
    path.write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 31 + b"\0" * 100)


def _converted(path):
    tmp = str(path) + ".src"
    _flux(tmp)
    convert(tmp, str(path), device="cpu", progress=False)
    os.unlink(tmp)


def _nan(path):
    w = STATE["single_blocks.0.linear2.weight"].clone()
    w[3, 5] = float("nan")
    _flux(path, **{"single_blocks.0.linear2.weight": w.to(torch.bfloat16)})


def _inf16(path):
    tensors = {k: v.to(torch.float16) for k, v in STATE.items()}
    tensors["double_blocks.0.txt_mlp.0.weight"][0, 0] = float("inf")
    save_file(tensors, str(path))


CASES = {
    "sd15_unet": ("m.safetensors", lambda p: _keys(p, [
        "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.0.in_layers.0.weight"]),
        "Stable Diffusion 1.x/2.x UNet"),
    "sdxl_unet": ("m.safetensors", lambda p: _keys(p, [
        "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.0.in_layers.0.weight",
        "model.diffusion_model.label_emb.0.0.weight"]), "SDXL UNet"),
    "diffusers_unet": ("m.safetensors", lambda p: _keys(p, [
        "conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "mid_block.resnets.0.conv1.weight"]), "UNet"),
    "vae": ("ae.safetensors", lambda p: _keys(p, [
        "encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight", "quant_conv.weight"]), "VAE"),
    "t5": ("t5xxl.safetensors", lambda p: _keys(p, [
        "encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"]), "T5 text encoder"),
    "clip": ("clip_l.safetensors", lambda p: _keys(p, [
        "text_model.encoder.layers.0.mlp.fc1.weight", "text_model.embeddings.token_embedding.weight"]),
        "CLIP text encoder"),
    "lora": ("lora.safetensors", lambda p: _keys(p, [
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_double_blocks_0_img_attn_qkv.alpha"]),
        "is a LoRA"),
    "lora_diffusers": ("lora.safetensors", lambda p: _keys(p, [
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]), "is a LoRA"),
    "unknown": ("x.safetensors", lambda p: _keys(p, ["foo.weight", "bar.bias"]), "not a FLUX transformer"),
    "converted": ("bitflux.safetensors", _converted, "already a converted bitflux file"),
    "truncated": ("flux.safetensors", _truncated, "truncated"),
    "empty": ("flux.safetensors", lambda p: _bytes(p, b""), "too short"),
    "not_safetensors": ("flux.safetensors", lambda p: _bytes(p, b"\xff" * 64), "does not start with a safetensors"),
    "corrupt_json": ("flux.safetensors", _garbage_json, "corrupt safetensors header"),
    "pickle_ckpt": ("flux.ckpt", lambda p: _bytes(p, b"\x80\x04\x95" + b"\0" * 20), "pickle checkpoint"),
    "pickle_pt": ("flux.pt", lambda p: _bytes(p, b"PK\x03\x04" + b"\0" * 20), "pickle checkpoint"),
    "pickle_bin": ("diffusion_pytorch_model.bin", lambda p: _bytes(p, b"PK\x03\x04" + b"\0" * 20), "never opens"),
    "zip_named_safetensors": ("flux.safetensors", lambda p: _bytes(p, b"PK\x03\x04" + b"\0" * 20),
                              "PyTorch pickle file"),
    "gguf": ("flux.safetensors", lambda p: _bytes(p, b"GGUF" + b"\0" * 20), "GGUF"),
    "missing_tensor": ("flux.safetensors", lambda p: _flux(p, **{"double_blocks.0.img_mlp.2.bias": None}),
                       "tensors missing, e.g. double_blocks.0.img_mlp.2.bias"),
    "extra_tensor": ("flux.safetensors", lambda p: _flux(p, **{"double_blocks.0.img_extra.weight": torch.zeros(2)}),
                     "tensors FLUX does not have"),
    "wrong_shape": ("flux.safetensors", lambda p: _flux(p, **{"txt_in.bias": torch.zeros(255)}),
                    "txt_in.bias [255] (expected [256])"),
    "head_dim_64": ("flux.safetensors", lambda p: save_bfl(
        make_state(tiny_config(num_heads=4, axes_dim=(8, 28, 28))), str(p)), "(head dim) 64"),
    "fill_model": ("flux.safetensors", lambda p: _flux(p, **{"img_in.weight": torch.zeros(256, 32)}),
                   "img_in takes 32 channels but final_layer gives 16"),
    "gap_in_blocks": ("flux.safetensors", lambda p: save_bfl(
        {k.replace("single_blocks.1.", "single_blocks.2."): v for k, v in
         make_state(tiny_config(depth_single_blocks=2)).items()}, str(p)), "lacks single_blocks [1]"),
    "int8_weights": ("flux.safetensors", lambda p: _flux(
        p, **{"single_blocks.0.linear1.weight": torch.zeros(1792, 256, dtype=torch.int8)}), "quantized format"),
    "nan_weight": ("flux.safetensors", _nan, "NaN/Inf"),
    "inf_fp16_weight": ("flux.safetensors", _inf16, "double_blocks.0.txt_mlp.0.weight"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_inputs_leave_no_file(dirs, case):
    name, make, message = CASES[case]
    src, out = dirs
    make(src / name)
    with pytest.raises(ConversionError) as info:
        _run(src / name, out / "out.safetensors")
    assert message in str(info.value), str(info.value)
    assert os.listdir(out) == []


def test_folders_without_safetensors(dirs):
    src, out = dirs
    with pytest.raises(InputError, match="folder without"):
        _run(src, out / "o.safetensors")
    (src / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(InputError, match="pickle"):
        _run(src, out / "o.safetensors")
    with pytest.raises(InputError, match="does not exist"):
        _run(src / "nothing.safetensors", out / "o.safetensors")


@pytest.mark.parametrize(
    "exc", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device"), RuntimeError("boom")], ids=repr
)
def test_interrupted_write_leaves_no_file(dirs, monkeypatch, exc):
    src, out = dirs
    _flux(src / "flux.safetensors")
    calls = {"n": 0}
    real = StreamingWriter.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 20:  # mid-stream, after some bytes are on disk
            raise exc
        return real(self, name, tensor)

    monkeypatch.setattr(StreamingWriter, "write", failing)
    with pytest.raises(type(exc)):
        _run(src / "flux.safetensors", out / "out.safetensors")
    assert calls["n"] == 20 and os.listdir(out) == []


def test_failed_verification_leaves_no_file(dirs, monkeypatch):
    src, out = dirs
    _flux(src / "flux.safetensors")

    def bad(*args, **kwargs):
        raise ConversionError("verification of the written file failed (simulated)")

    monkeypatch.setattr(converter.pipeline, "verify_output", bad)
    with pytest.raises(ConversionError, match="simulated"):
        _run(src / "flux.safetensors", out / "out.safetensors")
    assert os.listdir(out) == []


def test_force_and_existing_output(dirs, monkeypatch):
    src, out = dirs
    _flux(src / "flux.safetensors")
    target = out / "out.safetensors"
    target.write_bytes(b"keep me")
    with pytest.raises(ConversionError, match="already exists; pass --force"):
        _run(src / "flux.safetensors", target)
    assert target.read_bytes() == b"keep me"
    # a failing --force run keeps the old file too
    monkeypatch.setattr(converter.pipeline, "verify_output", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        _run(src / "flux.safetensors", target, force=True)
    assert target.read_bytes() == b"keep me" and os.listdir(out) == ["out.safetensors"]
    monkeypatch.undo()
    report = _run(src / "flux.safetensors", target, force=True)
    assert os.path.getsize(target) == report.output_bytes and os.listdir(out) == ["out.safetensors"]
    with pytest.raises(ConversionError, match="is the input"):
        _run(src / "flux.safetensors", src / "flux.safetensors", force=True)


def test_dry_run_writes_nothing_and_predicts_the_size(dirs):
    src, out = dirs
    _flux(src / "flux.safetensors")
    rules = ["*.linear1=int4a:64", "*_mod.lin=int8", "single_blocks.0.linear2=bf16"]
    dry = _run(src / "flux.safetensors", out / "out.safetensors", dry_run=True, rules=rules)
    assert os.listdir(out) == [] and dry.dry_run and "int4a:64" in dry.plan
    real = _run(src / "flux.safetensors", out / "out.safetensors", rules=rules)
    assert real.output_bytes == dry.output_bytes == os.path.getsize(out / "out.safetensors")


def test_stale_partial_of_a_killed_run_is_removed(dirs):
    src, out = dirs
    _flux(src / "flux.safetensors")
    stale = out / ".out.safetensors.partial-999999999"
    stale.write_bytes(b"half")
    _run(src / "flux.safetensors", out / "out.safetensors")
    assert os.listdir(out) == ["out.safetensors"]


def test_bad_options(dirs):
    src, out = dirs
    _flux(src / "flux.safetensors")
    for kwargs, message in [
        ({"rules": ["nothing.*=int8"]}, "matches no quantizable layer"),
        ({"rules": ["img_in=int8"]}, "matches no quantizable layer"),
        ({"rules": ["*=int3"]}, "unknown format"),
        ({"rules": ["int8"]}, "expected PATTERN=FORMAT"),
        ({"rules": ["*=ternary:96"]}, "does not divide"),
        ({"method": "gptq"}, "unknown method"),
        ({"device": "tpu"}, "unsupported device"),
    ]:
        with pytest.raises(ConversionError, match=message):
            _run(src / "flux.safetensors", out / "out.safetensors", **kwargs)
    assert os.listdir(out) == []
    with pytest.raises(ConversionError, match="does not exist"):
        _run(src / "flux.safetensors", out / "nope" / "out.safetensors")
    if not torch.cuda.is_available():
        with pytest.raises(ConversionError, match="no CUDA GPU"):
            _run(src / "flux.safetensors", out / "out.safetensors", device="cuda")


def test_verification_catches_a_corrupted_byte(dirs, monkeypatch):
    src, out = dirs
    _flux(src / "flux.safetensors")
    real = converter.pipeline.verify_output

    def corrupt_then_verify(path, *args):
        with open(path, "r+b") as f:  # flip one byte of the last tensor's data
            f.seek(-3, os.SEEK_END)
            b = f.read(1)
            f.seek(-3, os.SEEK_END)
            f.write(bytes([b[0] ^ 0x40]))
        return real(path, *args)

    monkeypatch.setattr(converter.pipeline, "verify_output", corrupt_then_verify)
    with pytest.raises(ConversionError, match="differ from those written"):
        _run(src / "flux.safetensors", out / "out.safetensors")
    assert os.listdir(out) == []
