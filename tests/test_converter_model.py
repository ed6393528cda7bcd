"""Loading a converted file: fileformat.build_linear per layer, and the whole tiny model (testbed
Flux with its block linears replaced) against the dense model with the dequantized weights."""

import pytest
import torch
from safetensors.torch import load_file
from test_converter_support import dense_state, make_state, save_bfl, tiny_config
from torch import nn

from bitkernel.nn import Int4Linear, Int8Linear, TernaryLinear
from converter import convert
from converter.fileformat import BitfluxFormatError, LayerSpec, build_linear, load_tensors, read_header
from converter.flux_model import Flux, FluxConfig, make_img_ids, make_txt_ids

RULES = [
    "double_blocks.*.img_mod.lin=int8",
    "*.txt_mod.lin=int4:64",
    "*.img_mlp.0=int4a:128",
    "*.txt_mlp.2=ternary:64",
    "single_blocks.0.linear2=bf16",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    cfg = tiny_config(depth=2, depth_single_blocks=2)
    src, out = str(folder / "flux.safetensors"), str(folder / "flux-bitflux.safetensors")
    save_bfl(make_state(cfg, seed=7), src)
    report = convert(src, out, device="cpu", progress=False, rules=RULES)
    return out, report


def test_build_linear_gives_the_format_modules(converted):
    path, report = converted
    header, tensors = read_header(path), load_tensors(path)
    kinds = {"ternary": TernaryLinear, "int8": Int8Linear, "int4": Int4Linear, "bf16": nn.Linear}
    for prefix, spec in header.layers.items():
        module = build_linear(prefix, spec, tensors)
        assert type(module) is kinds[spec.format], prefix
        if spec.quantized:
            assert module.group_size == spec.group_size and (module.zero is None) == spec.symmetric
    assert header.layers["double_blocks.1.img_mod.lin"] == LayerSpec("int8")
    assert header.layers["double_blocks.0.txt_mod.lin"] == LayerSpec("int4", 64)
    assert header.layers["double_blocks.0.img_mlp.0"] == LayerSpec("int4", 128, symmetric=False)
    assert header.layers["double_blocks.0.txt_mlp.2"] == LayerSpec("ternary", 64)
    assert header.layers["single_blocks.0.linear2"] == LayerSpec("bf16")
    assert header.layers["single_blocks.1.linear2"] == LayerSpec("ternary")
    assert "single_blocks.0.linear2.weight" in tensors and "single_blocks.1.linear2.weight" not in tensors
    assert report.formats == {"int8": 2, "int4:64": 2, "int4a:128": 2, "ternary:64": 2, "bf16": 1, "ternary": 17}


def test_build_linear_low_rank_branch_and_errors():
    w = torch.randn(64, 128)
    from bitkernel.functional import quantize

    qw = quantize(w, "ternary")
    tensors = {
        "l.qweight": qw.qweight, "l.scale": qw.scale, "l.bias": torch.zeros(64, dtype=torch.bfloat16),
        "l.lora_down": torch.randn(8, 128, dtype=torch.bfloat16), "l.lora_up": torch.randn(64, 8, dtype=torch.bfloat16),
    }
    module = build_linear("l", LayerSpec("ternary", lora_rank=8), tensors)
    assert module.lora_down.shape == (8, 128)
    with pytest.raises(BitfluxFormatError, match="has no tensor l.scale"):
        build_linear("l", LayerSpec("ternary"), {"l.qweight": qw.qweight})
    with pytest.raises(BitfluxFormatError, match="l.zero"):
        build_linear("l", LayerSpec("int4", 64, symmetric=False), tensors)


def _quantized_flux(path: str) -> Flux:
    """testbed Flux built from the file's architecture metadata, block linears from build_linear."""
    header = read_header(path)
    arch = {k: v for k, v in header.architecture.items() if k != "patch_size"}
    model = Flux(FluxConfig.from_dict(arch), device="meta")
    tensors = load_file(path)
    for prefix, spec in header.layers.items():
        parent, _, leaf = prefix.rpartition(".")
        setattr(model.get_submodule(parent), leaf, build_linear(prefix, spec, tensors))
    rest = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in header.layers}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    assert not unexpected and all(k.rsplit(".", 1)[0] in header.layers for k in missing)
    return model.float().eval()


def test_whole_converted_model_matches_dense_dequantized(converted):
    path, _ = converted
    header = read_header(path)
    cfg = FluxConfig.from_dict({k: v for k, v in header.architecture.items() if k != "patch_size"})
    dense = Flux(cfg)
    dense.load_state_dict(dense_state(path), strict=True)
    dense = dense.float().eval()
    quant = _quantized_flux(path)
    gen = torch.Generator().manual_seed(0)
    b, h, w, t = 2, 8, 8, 12
    img = torch.randn(b, h * w // 4, cfg.in_channels, generator=gen)
    txt = torch.randn(b, t, cfg.context_in_dim, generator=gen)
    args = dict(
        img=img, img_ids=make_img_ids(b, h, w), txt=txt, txt_ids=make_txt_ids(b, t),
        timesteps=torch.tensor([0.3, 0.8]), y=torch.randn(b, cfg.vec_in_dim, generator=gen),
        guidance=torch.tensor([3.5, 1.0]),
    )
    with torch.no_grad():
        want, got = dense(**args), quant(**args)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
