"""ComfyUI's own Flux class, given our config and state dict, computes what converter.flux_model computes."""

import comfy_env as ce
import pytest
import torch

from converter.flux_model import FluxConfig, make_img_ids, make_txt_ids, pack, unpack

pytestmark = pytest.mark.comfyui


def test_comfyui_flux_matches():
    ce.import_comfy()  # skips without COMFYUI_DIR
    import comfy.ldm.flux.model
    import comfy.ops

    cfg = FluxConfig()
    ours = ce.random_flux(cfg)
    theirs = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, **cfg.comfyui_params()).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)

    b = 2
    gen = torch.Generator().manual_seed(0)
    lat, ctx = torch.randn(b, 12, 32, 32, generator=gen), torch.randn(b, 12, cfg.context_in_dim, generator=gen)
    y, t, g = torch.randn(b, cfg.vec_in_dim, generator=gen), torch.rand(b, generator=gen), torch.full((b,), 3.5)
    with torch.no_grad():
        ref = unpack(ours(pack(lat), make_img_ids(b, 32, 32), ctx, make_txt_ids(b, 12), t, y, g), 32, 32)
        out = theirs(lat, t, ctx, y=y, guidance=g)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
