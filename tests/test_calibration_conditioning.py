"""The calibration conditioning file (converter/calibration/conditioning.py), its shipped prompt list and the
testbed's producer (testbed/calibration_data.py). CPU only, no ComfyUI."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from converter.calibration import conditioning as cc
from converter.calibration.conditioning import (
    CalibrationConditioning,
    default_prompts,
    flux_image_tokens,
    load_conditioning,
    overlapping_prompts,
    parse_prompts,
    read_prompt_file,
    save_conditioning,
    stack_contexts,
)
from converter.errors import ConversionError, InputError

PROMPTS = ["a red cube", "zwei Katzen \u00fcber einem Zaun", 'a sign that says "HELLO"']


def make_cond(
    dtype: torch.dtype = torch.float32, ctx: int = 16, vec: int = 8, seed: int = 0
) -> CalibrationConditioning:
    """Three prompts with contexts of 5, 7 and 3 tokens, zero-padded to 7."""
    g = torch.Generator().manual_seed(seed)
    txt, txt_len = stack_contexts([torch.randn(n, ctx, generator=g).to(dtype) for n in (5, 7, 3)])
    return CalibrationConditioning(
        txt=txt, vec=torch.randn(3, vec, generator=g).to(dtype), prompts=PROMPTS, encoder="test encoder",
        image_tokens=(4, 6), guidance=3.5, txt_len=txt_len,
    )  # fmt: skip


def raw_file(path, tensors: dict[str, torch.Tensor], **meta_override: str | None) -> str:
    """A file written without save_conditioning's checks: valid metadata unless overridden (None drops a key)."""
    meta = {
        "format": "bitflux-calibration",
        "format_version": "1",
        "prompts": json.dumps(PROMPTS),
        "encoder": "test encoder",
        "image_tokens": "[4, 6]",
        "guidance": "3.5",
    }
    for k, v in meta_override.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return str(path)


def good_tensors() -> dict[str, torch.Tensor]:
    c = make_cond()
    return {"txt": c.txt, "vec": c.vec, "txt_len": c.txt_len}


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(tmp_path, dtype):
    cond = make_cond(dtype)
    path = tmp_path / "sub" / "c.safetensors"  # the folder is created
    save_conditioning(path, cond)
    back = load_conditioning(path, context_in_dim=16, vec_in_dim=8)
    assert back.txt.dtype == dtype and torch.equal(back.txt, cond.txt) and torch.equal(back.vec, cond.vec)
    assert back.txt_len.tolist() == [5, 7, 3] and back.txt_len.dtype == torch.int64
    assert back.prompts == PROMPTS and back.encoder == "test encoder"
    assert back.image_tokens == (4, 6) and back.guidance == 3.5
    assert len(back) == 3 and (back.context_dim, back.vec_dim, back.max_len) == (16, 8, 7)
    assert torch.equal(back.context(2), cond.txt[2, :3]) and not back.txt[2, 3:].any()
    with safe_open(str(path), "pt") as f:  # the metadata as the format documents it
        meta = f.metadata()
    assert meta["format"] == "bitflux-calibration" and meta["format_version"] == "1"
    assert json.loads(meta["prompts"]) == PROMPTS and json.loads(meta["image_tokens"]) == [4, 6]
    assert json.loads(meta["guidance"]) == 3.5 and meta["encoder"] == "test encoder"
    assert [p for p in os.listdir(path.parent)] == ["c.safetensors"]  # no temporary file left


def test_txt_len_is_optional(tmp_path):
    t = good_tensors()
    del t["txt_len"]
    cond = load_conditioning(raw_file(tmp_path / "c.safetensors", t))
    assert cond.txt_len.tolist() == [7, 7, 7] and cond.context(0).shape == (7, 16)


def test_select_and_defaults():
    cond = make_cond()
    sub = cond.select([2, 0])
    assert sub.prompts == [PROMPTS[2], PROMPTS[0]] and sub.txt_len.tolist() == [3, 5]
    assert sub.max_len == 5  # trimmed to the longest selected prompt: the rest was padding only
    assert torch.equal(sub.context(1), cond.context(0)) and torch.equal(sub.vec[0], cond.vec[2])
    assert sub.image_tokens == cond.image_tokens and sub.guidance == cond.guidance and sub.encoder == cond.encoder
    assert len(cond.select(torch.tensor([1]))) == 1
    with pytest.raises(IndexError):
        cond.select([3])
    with pytest.raises(ValueError, match="at least one"):
        cond.select([])
    full = CalibrationConditioning(cond.txt, cond.vec, PROMPTS, "x", (1, 1), 1.0)
    assert full.txt_len.tolist() == [7, 7, 7]


def test_constructor_refuses_inconsistent_fields():
    c = make_cond()
    with pytest.raises(ValueError, match="3 rows.*but there are 2 prompts"):
        CalibrationConditioning(c.txt, c.vec, PROMPTS[:2], "x", (4, 6), 3.5)
    with pytest.raises(ValueError, match="txt_len must lie in 1..7"):
        CalibrationConditioning(c.txt, c.vec, PROMPTS, "x", (4, 6), 3.5, torch.tensor([1, 8, 2]))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        CalibrationConditioning(c.txt.double(), c.vec, PROMPTS, "x", (4, 6), 3.5)


def test_stack_contexts_and_image_tokens():
    txt, n = stack_contexts([torch.ones(1, 2, 4), torch.ones(3, 4)])
    assert txt.shape == (2, 3, 4) and n.tolist() == [2, 3] and txt[0, 2].abs().sum() == 0
    with pytest.raises(ValueError, match="different widths"):
        stack_contexts([torch.ones(2, 4), torch.ones(2, 5)])
    assert flux_image_tokens(1024, 1024) == (64, 64) and flux_image_tokens(1280, 768) == (48, 80)
    with pytest.raises(ValueError, match="multiples of 16"):
        flux_image_tokens(1000, 1024)


# ---------------------------------------------------------------------------- rejections


def expect(path, pattern: str, **dims) -> InputError:
    with pytest.raises(InputError, match=pattern) as e:
        load_conditioning(path, **dims)
    assert isinstance(e.value, ConversionError)
    return e.value


def test_missing_file_and_folder(tmp_path):
    err = expect(tmp_path / "nope.safetensors", r"does not exist")
    assert "BitFlux Calibration Prompts" in str(err) and "testbed.calibration_data" in str(err)  # how to make one
    expect(tmp_path, r"is a folder")


def test_not_safetensors_is_never_unpickled(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    torch.save({"txt": torch.zeros(1, 2, 3)}, path)

    def no_pickles(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickles)
    expect(path, r"does not start with a safetensors header|corrupt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    expect(tmp_path / "empty.safetensors", r"too short to be a safetensors file")


def test_truncated(tmp_path):
    path = raw_file(tmp_path / "c.safetensors", good_tensors())
    data = open(path, "rb").read()
    for cut in (len(data) - 10, 20):
        with open(path, "wb") as f:
            f.write(data[:cut])
        expect(path, r"truncated")


def test_wrong_format(tmp_path):
    expect(raw_file(tmp_path / "a.safetensors", good_tensors(), format="bitflux"), r"a converted bitflux model")
    expect(raw_file(tmp_path / "b.safetensors", good_tensors(), format="other"), r"metadata format 'other'")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "c.safetensors"))
    err = expect(tmp_path / "c.safetensors", r"not a calibration conditioning file: it has no metadata format")
    assert "DualCLIPLoader" in str(err)


def test_newer_and_bad_version(tmp_path):
    expect(raw_file(tmp_path / "a.safetensors", good_tensors(), format_version="2"), r"version 2, newer.*Update")
    expect(raw_file(tmp_path / "b.safetensors", good_tensors(), format_version="one"), r"unreadable format_version")


@pytest.mark.parametrize("name", ["txt", "vec"])
def test_missing_tensor(tmp_path, name):
    t = good_tensors()
    del t[name]
    expect(raw_file(tmp_path / "c.safetensors", t), rf"lacks the tensor '{name}'")


@pytest.mark.parametrize("key", ["prompts", "encoder", "image_tokens", "guidance"])
def test_missing_metadata(tmp_path, key):
    expect(raw_file(tmp_path / "c.safetensors", good_tensors(), **{key: None}), rf"lacks the metadata field '{key}'")


def test_bad_metadata_values(tmp_path):
    t = good_tensors()
    expect(raw_file(tmp_path / "a.safetensors", t, prompts="[1, 2, 3]"), r"JSON list of strings")
    expect(raw_file(tmp_path / "b.safetensors", t, prompts="not json"), r"'prompts' is not valid JSON")
    expect(raw_file(tmp_path / "c.safetensors", t, image_tokens="[64]"), r"'image_tokens' must be \[h, w\]")
    expect(raw_file(tmp_path / "d.safetensors", t, image_tokens="[0, 4]"), r"'image_tokens' must be \[h, w\]")
    expect(raw_file(tmp_path / "e.safetensors", t, guidance='"high"'), r"'guidance' must be a finite number")
    expect(raw_file(tmp_path / "f.safetensors", t, prompts="[]"), r"holds no prompts")


def test_shape_mismatches(tmp_path):
    t = good_tensors()
    cases = {
        "prompts": dict(t, txt=t["txt"][:2]),
        "vec rows": dict(t, vec=t["vec"][:2]),
        "txt rank": dict(t, txt=t["txt"][:, 0]),
        "vec rank": dict(t, vec=t["vec"][:, :, None]),
    }
    for i, tensors in enumerate(cases.values()):
        expect(raw_file(tmp_path / f"{i}.safetensors", tensors), r"do not fit together.*P = 3")
    expect(raw_file(tmp_path / "len.safetensors", dict(t, txt_len=torch.tensor([1, 2]))), r"'txt_len' must be integers")
    expect(raw_file(tmp_path / "lenf.safetensors", dict(t, txt_len=torch.ones(3))), r"'txt_len' must be integers")
    expect(raw_file(tmp_path / "len8.safetensors", dict(t, txt_len=torch.tensor([1, 8, 2]))), r"txt_len holds 1..8")
    expect(raw_file(tmp_path / "len0.safetensors", dict(t, txt_len=torch.tensor([0, 7, 2]))), r"txt_len holds 0..7")


def test_widths_must_match_the_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"txt": torch.randn(3, 5, 4096, generator=g), "vec": torch.randn(3, 768, generator=g)}
    path = raw_file(tmp_path / "flux.safetensors", t, encoder="comfyui t5xxl+clip_l")
    err = expect(path, r"made for a model with context 4096 \(T5-XXL\).*the checkpoint expects 128", context_in_dim=128)
    assert "comfyui t5xxl+clip_l" in str(err) and "testbed.calibration_data" in str(err)
    expect(path, r"pooled vector 768 \(CLIP-L\).*the checkpoint expects 128", context_in_dim=4096, vec_in_dim=128)
    assert load_conditioning(path, 4096, 768).context_dim == 4096
    small = raw_file(tmp_path / "small.safetensors", good_tensors())
    expect(small, r"context 16 .*the checkpoint expects 4096 \(T5-XXL\)", context_in_dim=4096)


@pytest.mark.parametrize("name,dtype", [("txt", torch.int32), ("vec", torch.int64), ("txt", torch.float64)])
def test_non_float_dtype(tmp_path, name, dtype):
    t = good_tensors()
    t[name] = t[name].to(dtype)
    expect(raw_file(tmp_path / "c.safetensors", t), rf"tensor '{name}' is torch.{str(dtype)[6:]}.*float16, bfloat16")


@pytest.mark.parametrize("name,value", [("txt", float("nan")), ("vec", float("inf")), ("txt", -float("inf"))])
def test_non_finite(tmp_path, name, value):
    t = good_tensors()
    t[name][1, 0] = value
    err = expect(raw_file(tmp_path / "c.safetensors", t), rf"{name} has NaN or Inf values for 1 of 3 prompts")
    assert "prompt 1" in str(err) and PROMPTS[1] in str(err)


# ---------------------------------------------------------------------------- writing


def test_save_refuses_what_load_would_refuse(tmp_path):
    cond = make_cond()
    cond.vec[0, 0] = float("nan")
    path = tmp_path / "c.safetensors"
    with pytest.raises(ValueError, match="not writing.*NaN or Inf"):
        save_conditioning(path, cond)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("where", ["save_file", "replace"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, where):
    path = tmp_path / "c.safetensors"
    old = make_cond(seed=1)
    save_conditioning(path, old)
    before = path.read_bytes()
    real_save = cc.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a partial file on disk, then the failure
            f.truncate(100)
        raise OSError("disk full")

    def fail_replace(src, dst):
        raise OSError("rename failed")

    if where == "save_file":
        monkeypatch.setattr(cc, "save_file", half_then_fail)
    else:
        monkeypatch.setattr(cc.os, "replace", fail_replace)
    with pytest.raises(OSError):
        save_conditioning(path, make_cond(seed=2))
    assert os.listdir(tmp_path) == ["c.safetensors"]  # the temporary file is gone
    assert path.read_bytes() == before  # the old file is untouched
    monkeypatch.undo()
    new_path = tmp_path / "new.safetensors"
    monkeypatch.setattr(cc, "save_file", half_then_fail)
    with pytest.raises(OSError):
        save_conditioning(new_path, make_cond())
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no partial file under any name


# ---------------------------------------------------------------------------- prompt files


def test_prompt_file_parsing(tmp_path):
    path = tmp_path / "p.txt"
    text = "# header\r\n\r\n  a red cube  \r\n\t# indented comment\n   \nzwei Katzen \u00fcber einem Zaun\n"
    path.write_bytes(text.encode())
    assert read_prompt_file(path) == ["a red cube", "zwei Katzen \u00fcber einem Zaun"]
    assert parse_prompts("a\n\n#b\nc # not a comment") == ["a", "c # not a comment"]
    (tmp_path / "empty.txt").write_text("# only comments\n\n   \n")
    with pytest.raises(InputError, match="has no prompts: every line is blank or a # comment"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_prompt_file(tmp_path / "latin1.txt")


def test_shipped_prompt_list():
    prompts = default_prompts()
    assert len(prompts) == 128 and len({p.casefold() for p in prompts}) == 128
    with open(cc.DEFAULT_PROMPTS_FILE, encoding="utf-8") as f:
        first = f.readline()
    assert first.startswith("#") and "GenEval" in open(cc.DEFAULT_PROMPTS_FILE, encoding="utf-8").read()
    # GenEval's prompts all follow its "a photo of ..." templates; none of ours do.
    assert not [p for p in prompts if p.lower().startswith(("a photo of", "a photo"))]
    words = [len(p.split()) for p in prompts]
    assert min(words) <= 2 and max(words) >= 50  # very short and long detailed prompts
    text = "\n".join(prompts).lower()
    for needle in ("three red apples", "to the left of", '"', "portrait", "watercolor"):
        assert needle in text, needle


def test_overlapping_prompts():
    cond = make_cond()
    assert overlapping_prompts(cond, ["A  RED cube", "something else", "a red cube"]) == ["a red cube"]
    assert overlapping_prompts(cond, []) == []
    assert overlapping_prompts(["x", "y", "X"], ["x"]) == ["x"]


# ---------------------------------------------------------------------------- the testbed's producer


@pytest.fixture(scope="module")
def testbed_encoder():
    from testbed.calibration_data import WEIGHTS_DIR
    from testbed.checkpoint import TEXT_FILE, load_text_encoder

    path = os.path.join(WEIGHTS_DIR, TEXT_FILE)
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing")
    return load_text_encoder(path)


def test_testbed_file_equals_the_text_encoder(tmp_path, testbed_encoder):
    from testbed import calibration_data
    from testbed.checkpoint import FLUX_FILE, read_metadata
    from testbed.prompts import calibration_prompts, eval_prompts
    from testbed.sampling import DEFAULT_GUIDANCE, SEQ_LEN

    out = tmp_path / "tb.safetensors"
    calibration_data.main(["-o", str(out), "--n", "40", "--seed", "5"])
    config = read_metadata(os.path.join(calibration_data.WEIGHTS_DIR, FLUX_FILE))["config"]
    cond = load_conditioning(out, config["context_in_dim"], config["vec_in_dim"])
    prompts = calibration_prompts(40, 5)
    assert cond.prompts == prompts and cond.encoder == "testbed text encoder"
    assert cond.image_tokens == (16, 16) and cond.image_tokens[0] * cond.image_tokens[1] == SEQ_LEN
    assert cond.guidance == DEFAULT_GUIDANCE
    with torch.no_grad():  # recomputed here, as the model is fed in testbed.sampling: encode(prompts)
        txt, vec = testbed_encoder(testbed_encoder.tokenize(prompts))
    torch.testing.assert_close(cond.txt, txt, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.vec, vec, rtol=0, atol=1e-6)
    assert cond.txt_len.tolist() == [txt.shape[1]] * 40
    assert overlapping_prompts(cond, eval_prompts(1200)) == []
    # The Python API gives the same.
    again = calibration_data.testbed_conditioning(40, 5, calibration_data.WEIGHTS_DIR, "cpu")
    assert again.prompts == prompts and torch.equal(again.txt, cond.txt) and torch.equal(again.vec, cond.vec)


def test_testbed_file_runs_the_model(tmp_path, testbed_encoder):
    """The file's tensors are what the testbed FLUX takes: one denoising call on prompt contexts from it."""
    from converter.flux_model import make_img_ids, make_txt_ids, pack
    from testbed import calibration_data
    from testbed.checkpoint import FLUX_FILE, load_flux
    from testbed.sampling import LATENT_SIZE, get_noise

    cond = calibration_data.testbed_conditioning(2, 0)
    model = load_flux(os.path.join(calibration_data.WEIGHTS_DIR, FLUX_FILE))
    x = pack(get_noise([0, 1]))
    assert x.shape[1] == cond.image_tokens[0] * cond.image_tokens[1]
    txt = torch.stack([cond.context(i) for i in range(2)])
    with torch.no_grad():
        img_ids, txt_ids = make_img_ids(2, LATENT_SIZE, LATENT_SIZE), make_txt_ids(2, txt.shape[1])
        v = model(img=x, img_ids=img_ids, txt=txt, txt_ids=txt_ids, y=cond.vec, timesteps=torch.full((2,), 0.5),
                  guidance=torch.full((2,), cond.guidance))  # fmt: skip
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_testbed_refuses_evaluation_prompts(tmp_path, testbed_encoder):
    from testbed import calibration_data
    from testbed.prompts import calibration_prompts, eval_prompts

    held_out = eval_prompts(1200)[7]
    with pytest.raises(ValueError, match=re.escape(repr(held_out)) + r".*overstate"):
        calibration_data.testbed_conditioning(prompts=[calibration_prompts(1)[0], held_out])
    path = tmp_path / "p.txt"
    path.write_text(f"# mine\n{calibration_prompts(3)[2]}\n{held_out.upper()}\n")
    with pytest.raises(ValueError, match="1 calibration prompt\\(s\\) are evaluation prompts"):
        calibration_data.main(["-o", str(tmp_path / "x.safetensors"), "--prompts", str(path)])
    assert not (tmp_path / "x.safetensors").exists()
    path.write_text(f"# mine\n{calibration_prompts(3)[2]}\n")
    calibration_data.main(["-o", str(tmp_path / "ok.safetensors"), "--prompts", str(path)])
    assert load_conditioning(tmp_path / "ok.safetensors").prompts == [calibration_prompts(3)[2]]
