"""The container pieces: the streaming safetensors writer/reader, the bitflux header, rules,
architecture detection at FLUX.1-dev's real shapes."""

import io
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter.architecture import AXES_DIM, Architecture, block_linears, detect_architecture, expected_shapes
from converter.errors import ConversionError, InputError
from converter.fileformat import FORMAT_NAME, FORMAT_VERSION, BitfluxFormatError, BitfluxHeader, LayerSpec, read_header
from converter.progress import Progress
from converter.rules import Rule, assign_formats, parse_format
from converter.safetensors_io import PlannedTensor, SafetensorsReader, StreamingWriter, planned_file_size

FLUX_DEV = Architecture(64, 768, 4096, 3072, 4.0, 24, 19, 38, AXES_DIM, 10_000, True, True)


def _sample_tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=gen),
        "bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2, generator=gen).to(torch.float16),
        "i8": torch.randint(-128, 127, (4, 3), dtype=torch.int8, generator=gen),
        "u8": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=gen),
        "i64": torch.arange(5),
        "fp8": torch.randn(6, generator=gen).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(6, generator=gen).to(torch.float8_e5m2),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def _raw(t):
    return t.reshape(-1).view(torch.uint8)


def test_streaming_writer_round_trips_through_safetensors(tmp_path):
    tensors = _sample_tensors()
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    path = str(tmp_path / "w.safetensors")
    writer = StreamingWriter(path, plan, {"a": "1"})
    for k, v in tensors.items():
        writer.write(k, v)
    writer.rewrite_metadata({"a": "2", "b": "x" * 100})  # filled in after the data, in the reserved space
    writer.finish()
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(_raw(loaded[k]), _raw(v)), k
    with SafetensorsReader(path) as r:
        assert r.metadata == {"a": "2", "b": "x" * 100}
        assert all(torch.equal(_raw(r.read(k)), _raw(v)) for k, v in tensors.items())
    assert os.path.getsize(path) == planned_file_size(plan, {"a": "1"})


def test_streaming_writer_refuses_off_plan_writes(tmp_path):
    plan = [PlannedTensor("a", torch.float32, (2,)), PlannedTensor("b", torch.bfloat16, (3,))]
    path = str(tmp_path / "w.safetensors")
    w = StreamingWriter(path, plan, {})
    with pytest.raises(ValueError, match="plan expects a"):
        w.write("b", torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="plan expects a"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="only 1 of 2"):
        w.finish()
    with pytest.raises(ValueError, match="does not fit"):
        w.rewrite_metadata({"x": "y" * 1000})
    w.close()
    with pytest.raises(FileExistsError):
        StreamingWriter(path, plan, {})


def test_read_header_rejects_what_is_not_bitflux(tmp_path):
    plain = str(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(1)}, plain, metadata={"format": "pt"})
    with pytest.raises(BitfluxFormatError, match="not a bitflux file.*convert.py"):
        read_header(plain)
    header = BitfluxHeader(FLUX_DEV.to_dict(), {"single_blocks.0.linear1": LayerSpec("ternary")})
    meta = header.to_metadata()
    assert meta["format"] == FORMAT_NAME and meta["format_version"] == str(FORMAT_VERSION)
    for change, message in [
        ({"format_version": "2"}, "newer than this code reads"),
        ({"format_version": "x"}, "invalid format_version"),
        ({"architecture": "{"}, "not valid JSON"),
        ({"architecture": json.dumps({"hidden_size": 3072})}, "lacks in_channels"),
        ({"layers": json.dumps({"a": {"format": "int3"}})}, "unknown layer format"),
    ]:
        path = str(tmp_path / "h.safetensors")
        save_file({"x": torch.zeros(1)}, path, metadata={**meta, **change})
        with pytest.raises(BitfluxFormatError, match=message):
            read_header(path)
    path = str(tmp_path / "ok.safetensors")
    save_file({"x": torch.zeros(1)}, path, metadata=meta)
    assert read_header(path) == header
    (tmp_path / "cut.safetensors").write_bytes(open(path, "rb").read()[:20])
    with pytest.raises(ValueError, match="truncated"):  # BitfluxFormatError is a ValueError
        read_header(str(tmp_path / "cut.safetensors"))


def test_layer_spec_labels_and_validation():
    names = ("ternary", "ternary:64", "int8", "int4", "int4:128", "int4a:64", "bf16")
    assert [parse_format(s).label for s in names] == [
        "ternary", "ternary:64", "int8", "int4:64", "int4:128", "int4a:64", "bf16"]
    assert LayerSpec.from_json(LayerSpec("int4", 64, False).to_json()) == LayerSpec("int4", 64, False)
    assert parse_format("ternary+a8") == LayerSpec("ternary", act="a8") and parse_format("int8+a8").label == "int8+a8"
    for bad in [dict(format="int8", symmetric=False), dict(format="int4", group_size=64, act="a8"),
                dict(format="ternary", act="a4")]:
        with pytest.raises(BitfluxFormatError):
            LayerSpec(**bad)
    for bad in ["int8:64", "int4:x", "fp8", "ternary:-4", "int4:64+a8", "ternary:64+a8", "ternary+a4"]:
        with pytest.raises(ConversionError):
            parse_format(bad)


def test_rules_last_match_wins():
    layers = {name: (3072, 3072) for name in block_linears(FLUX_DEV)}
    rules = [Rule.parse(r) for r in ["double_blocks.*.img_mod.lin=int8", "single_blocks.37.*=bf16",
                                     "*_mod.lin=int4:64", "double_blocks.0.*=int8"]]
    specs = assign_formats(layers, rules, LayerSpec("ternary"))
    assert specs["double_blocks.3.img_mod.lin"].label == "int4:64"  # the later rule wins
    assert specs["double_blocks.0.img_mod.lin"].label == "int8"
    assert specs["single_blocks.37.linear1"].label == "bf16"
    assert specs["single_blocks.36.modulation.lin"].label == "ternary"  # *_mod.lin does not match modulation.lin
    assert specs["double_blocks.5.img_attn.qkv"].label == "ternary"


def test_flux_dev_architecture_from_its_shapes():
    shapes = expected_shapes(FLUX_DEV)
    assert detect_architecture(shapes) == FLUX_DEV
    assert shapes["single_blocks.0.linear1.weight"] == (21504, 3072)
    assert shapes["double_blocks.0.img_mod.lin.weight"] == (18432, 3072)
    assert shapes["single_blocks.0.linear2.weight"] == (3072, 15360)
    block = sum(shapes[f"{p}.weight"][0] * shapes[f"{p}.weight"][1] for p in block_linears(FLUX_DEV))
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert block == 11_834_228_736 and total == 11_901_408_320  # GUIDE section 1: 11.834B of 11.901B
    schnell = {k: v for k, v in shapes.items() if not k.startswith("guidance_in")}
    assert detect_architecture(schnell).guidance_embed is False
    with pytest.raises(InputError, match="tensors missing"):
        detect_architecture({k: v for k, v in shapes.items() if k != "double_blocks.7.txt_attn.proj.bias"})


def test_progress_bar_lines():
    stream = io.StringIO()
    bar = Progress(1000, stream=stream)
    for _ in range(10):
        bar.advance(100, "layer")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert 10 <= len(lines) <= 11 and "100.0%" in lines[-1] and "left" in lines[-1]


def test_progress_bar_of_a_resumed_run_estimates_from_this_runs_rate(monkeypatch):
    """Work done before a restart shows as done but took no time in this run: the time left comes from
    the rate of this run (100 steps in 10 s, 400 left: 40 s)."""
    clock = iter([0.0, 10.0, 10.0])
    monkeypatch.setattr("converter.progress.time.monotonic", lambda: next(clock))
    stream = io.StringIO()
    bar = Progress(1000, stream=stream, unit="steps", per_unit=1, initial=500)
    bar.advance(100)
    line = stream.getvalue().splitlines()[-1]
    assert "600.00/1000.00 steps" in line and "40s left" in line, line
