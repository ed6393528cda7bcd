"""converter.diffusers_model: a bitflux file as diffusers' FluxTransformer2DModel (skipped without diffusers).

Two checks: the key map itself (a dense diffusers model fed the BFL weights through it computes what
testbed's BFL Flux computes), and the quantized diffusers model against the dense diffusers model with
the dequantized weights.
"""

import pytest
import torch
from test_converter_support import dense_state, make_state, save_bfl, tiny_config, to_diffusers

from converter import convert
from converter.diffusers_model import diffusers_config, load_diffusers_transformer
from converter.fileformat import read_header
from converter.flux_model import Flux, make_img_ids, make_txt_ids

diffusers = pytest.importorskip("diffusers")

RULES = ["*.txt_mod.lin=int8", "*.img_mlp.0=int4a:64", "single_blocks.1.linear1=bf16", "*.linear2=ternary:64"]


def _inputs(cfg, b=1, h=8, w=8, t=6):
    gen = torch.Generator().manual_seed(1)
    return dict(
        img=torch.randn(b, h * w // 4, cfg.in_channels, generator=gen),
        img_ids=make_img_ids(b, h, w),
        txt=torch.randn(b, t, cfg.context_in_dim, generator=gen),
        txt_ids=make_txt_ids(b, t),
        timesteps=torch.tensor([0.4] * b),
        y=torch.randn(b, cfg.vec_in_dim, generator=gen),
        guidance=torch.tensor([3.5] * b),
    )


def _run_diffusers(model, a):
    return model(
        hidden_states=a["img"], encoder_hidden_states=a["txt"], pooled_projections=a["y"], timestep=a["timesteps"],
        img_ids=a["img_ids"][0], txt_ids=a["txt_ids"][0], guidance=a["guidance"], return_dict=False,
    )[0]


def _dense_diffusers(state, cfg, arch):
    model = diffusers.FluxTransformer2DModel(**diffusers_config(arch))
    model.load_state_dict(to_diffusers(state, cfg), strict=True)
    return model.float().eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers")
    cfg = tiny_config(depth=1, depth_single_blocks=2)
    src, out = str(folder / "flux.safetensors"), str(folder / "bitflux.safetensors")
    save_bfl(make_state(cfg, seed=9), src)
    convert(src, out, device="cpu", progress=False, rules=RULES)
    return cfg, out


def test_key_map_matches_bfl_model(converted):
    cfg, path = converted
    state = dense_state(path)
    bfl = Flux(cfg)
    bfl.load_state_dict(state)
    a = _inputs(cfg)
    with torch.no_grad():
        want = bfl.float().eval()(**a)
        got = _run_diffusers(_dense_diffusers(state, cfg, read_header(path).architecture), a)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_quantized_diffusers_model_matches_dense(converted):
    cfg, path = converted
    quant = load_diffusers_transformer(path, dtype=torch.float32)
    blk = quant.single_transformer_blocks[0]
    assert type(blk.attn.to_q).__name__ == "TernaryLinear" and type(blk.proj_mlp).__name__ == "TernaryLinear"
    assert type(quant.single_transformer_blocks[1].attn.to_k) is torch.nn.Linear  # the bf16 rule
    assert type(quant.transformer_blocks[0].norm1_context.linear).__name__ == "Int8Linear"
    assert quant.transformer_blocks[0].ff.net[0].proj.zero is not None  # int4a
    assert blk.attn.to_q.scale.dtype == torch.float32
    dense = _dense_diffusers(dense_state(path), cfg, read_header(path).architecture)
    a = _inputs(cfg, b=2)
    with torch.no_grad():
        want, got = _run_diffusers(dense, a), _run_diffusers(quant, a)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
