"""The FLUX transformer: BFL key layout, shapes, config round trip, ops factory, sampling."""

import json

import pytest
import torch
from torch import nn

from converter.flux_model import (
    Flux,
    FluxConfig,
    block_linear_names,
    image_to_latent,
    latent_to_image,
    make_img_ids,
    make_txt_ids,
    pack,
    unpack,
)
from testbed.checkpoint import MAX_FILE_BYTES
from testbed.sampling import denoise, get_noise, get_schedule, sample
from testbed.text import TextEncoder


def _bfl_keys(cfg: FluxConfig) -> set[str]:
    """The state-dict keys of BFL's Flux, written out from its source layout."""
    keys = {"img_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
            "guidance_in.in_layer", "guidance_in.out_layer", "txt_in", "final_layer.linear",
            "final_layer.adaLN_modulation.1"}
    for i in range(cfg.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            keys |= {f"{p}_mod.lin", f"{p}_attn.qkv", f"{p}_attn.proj", f"{p}_mlp.0", f"{p}_mlp.2"}
    for i in range(cfg.depth_single_blocks):
        keys |= {f"single_blocks.{i}.{n}" for n in ("linear1", "linear2", "modulation.lin")}
    out = {f"{k}.{w}" for k in keys for w in ("weight", "bias")}
    for i in range(cfg.depth):
        for s in ("img", "txt"):
            out |= {f"double_blocks.{i}.{s}_attn.norm.{n}_norm.scale" for n in ("query", "key")}
    for i in range(cfg.depth_single_blocks):
        out |= {f"single_blocks.{i}.norm.{n}_norm.scale" for n in ("query", "key")}
    return out


def _inputs(cfg: FluxConfig, b: int = 2, t: int = 12):
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(b, 12, 32, 32, generator=g)
    return dict(img=pack(lat), img_ids=make_img_ids(b, 32, 32), txt=torch.randn(b, t, cfg.context_in_dim, generator=g),
                txt_ids=make_txt_ids(b, t), timesteps=torch.rand(b, generator=g),
                y=torch.randn(b, cfg.vec_in_dim, generator=g), guidance=torch.full((b,), 3.5))


def test_state_dict_is_bfl_layout_and_fits():
    cfg = FluxConfig()
    model = Flux(cfg)
    assert set(model.state_dict()) == _bfl_keys(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 2 * n + 64_000 <= MAX_FILE_BYTES == 16_000_000  # bf16 file (plus header) under 16,000,000 B
    assert cfg.hidden_size // cfg.num_heads == 128 == sum(cfg.axes_dim)
    assert model.img_in.in_features == 48


def test_forward_shapes_and_guidance_required():
    cfg = FluxConfig()
    model = Flux(cfg)
    for p in model.parameters():
        nn.init.normal_(p, std=0.02)
    inp = _inputs(cfg)
    out = model(**inp)
    assert out.shape == (2, 256, 48)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError):
        model(**{**inp, "guidance": None})


def test_config_round_trip():
    cfg = FluxConfig(depth=1, depth_single_blocks=1, guidance_embed=False)
    assert FluxConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    comfy = cfg.comfyui_params()
    assert comfy["in_channels"] == comfy["out_channels"] == 12 and comfy["patch_size"] == 2


def test_operations_factory_replaces_every_linear():
    class MarkedLinear(nn.Linear):
        pass

    class Ops:
        Linear = MarkedLinear

    model = Flux(FluxConfig(), operations=Ops)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, MarkedLinear) for m in linears)
    names = block_linear_names(model)
    assert len(names) == 2 * 2 * 5 + 2 * 3
    assert "single_blocks.0.linear1" in names and "img_in" not in names


def test_pack_unpack_and_latent_round_trip():
    img = torch.rand(2, 3, 64, 64)
    lat = image_to_latent(img)
    assert lat.shape == (2, 12, 32, 32)
    assert torch.allclose(latent_to_image(lat), img, atol=1e-6)
    tokens = pack(lat)
    assert tokens.shape == (2, 256, 48)
    assert torch.equal(unpack(tokens, 32, 32), lat)
    # BFL order: token (h, w) holds channels (c, ph, pw)
    assert torch.equal(tokens[0, 1, :4], lat[0, 0, 0:2, 2:4].reshape(-1))
    ids = make_img_ids(1, 32, 32)
    assert ids[0, 17].tolist() == [0.0, 1.0, 1.0]


def test_schedule_is_bfl_shifted():
    ts = get_schedule(4, 256)
    assert ts[0] == 1.0 and ts[-1] == 0.0
    mu = 0.5  # 256 tokens -> base shift
    t = 0.5
    expected = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / t - 1))
    assert abs(ts[2] - expected.item()) < 1e-6


def test_sampling_runs_and_noise_depends_only_on_seed():
    torch.manual_seed(0)
    model, enc = Flux(FluxConfig()).eval(), TextEncoder().eval()
    a = get_noise([3, 4])
    assert torch.equal(a[1], get_noise([4])[0])
    images = sample(model, enc, ["a red circle", "two squares"], seeds=[3, 4], steps=2, guidance=3.5)
    assert images.shape == (2, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1


def test_euler_with_exact_velocity_recovers_the_image():
    # training uses x_t = (1 - t) x0 + t noise and target v = noise - x0; with that exact
    # velocity, the sampler's schedule and step direction must land on x0
    x0 = pack(torch.rand(2, 12, 32, 32) * 2 - 1)
    noise = pack(torch.randn(2, 12, 32, 32))

    def oracle(img, timesteps, **_):
        return (img - x0) / timesteps.view(-1, 1, 1)

    b = 2
    out = denoise(oracle, noise, make_img_ids(b, 32, 32), torch.zeros(b, 12, 8), make_txt_ids(b, 12),
                  torch.zeros(b, 8), get_schedule(7, 256))
    assert torch.allclose(out, x0, atol=1e-4)
