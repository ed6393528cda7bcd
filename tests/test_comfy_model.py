"""The loader node and the MODEL it returns, in a CPU ComfyUI running in this process (COMFYUI_DIR).

Reference throughout: ComfyUI's stock ops running the file's dequantized weights as dense float32
`.weight` tensors in the same Flux, sampled with the same seed. The packed model runs bitkernel's
kernels, which sum in another order, so results agree to rounding, not bit for bit; removing a LoRA
must give the base output back bit for bit.
"""

from __future__ import annotations

import comfy_env as ce
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui

CFG = ce.FluxConfig(depth_single_blocks=2)  # testbed widths (hidden 256, 2 heads); fewer blocks for speed
ATOL, RTOL = 2e-5, 2e-5  # measured: 1e-6 against outputs of magnitude 1


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    nodes = ce.import_comfy()
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    unet_dir, lora_dir = root / "diffusion_models", root / "loras"
    unet_dir.mkdir()
    lora_dir.mkdir()
    header = ce.write_bitflux(str(unet_dir / "tiny.safetensors"), CFG)
    touched = ce.write_lora(str(lora_dir / "tiny_lora.safetensors"), header)
    folder_paths.add_model_folder_path("diffusion_models", str(unet_dir))
    folder_paths.add_model_folder_path("loras", str(lora_dir))
    return {"nodes": nodes, "header": header, "dir": unet_dir, "touched": touched}


@pytest.fixture(scope="module")
def ours(env):
    from comfy_nodes.nodes_v3 import BitfluxModelLoader

    return BitfluxModelLoader.execute(unet_name="tiny.safetensors").args[0]


@pytest.fixture(scope="module")
def reference(env):
    import comfy.model_patcher

    from comfy_nodes.loader import build_model

    tensors = load_file(str(env["dir"] / "tiny.safetensors"))
    model = build_model(env["header"], ce.dense_state_dict(tensors, env["header"]), packed=False)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def call(node_cls, **kwargs):
    """First output of a stock node, classic (FUNCTION) or V3 (execute) alike."""
    if hasattr(node_cls, "FUNCTION"):
        return getattr(node_cls(), node_cls.FUNCTION)(**kwargs)[0]
    return node_cls.execute(**kwargs).args[0]


def ksample(nodes, model, batch=2, seed=42, denoise=1.0, latent=None):
    cond = ce.conditioning(CFG, batch=1)
    latent = latent or {"samples": torch.zeros(batch, 4, 16, 16)}  # EmptyLatentImage's 4 channels
    return nodes.KSampler().sample(model, seed, 2, 1.0, "euler", "simple", cond, cond, latent, denoise)[0]["samples"]


def test_loader_builds_comfy_flux_from_metadata(env, ours):
    import comfy.model_base

    from comfy_nodes.ops import PackedLinearMixin

    assert isinstance(ours.model, comfy.model_base.Flux)
    dm = ours.model.diffusion_model
    assert dm.num_heads == 2 and dm.hidden_size == 256 and dm.patch_size == 2  # detection would say 24 heads
    assert ours.model.latent_format.latent_channels == 12
    for name, spec in env["header"].layers.items():
        m = dm.get_submodule(name)
        assert isinstance(m, PackedLinearMixin) and m.is_packed == spec.quantized, name
        if spec.quantized:
            assert m.spec == spec and m.weight is None


def test_memory_manager_sees_packed_bytes(env):
    from comfy_nodes.nodes_v3 import BitfluxModelLoader

    model = BitfluxModelLoader.execute(unet_name="tiny.safetensors", compute_dtype="bf16").args[0]
    file_bytes = sum(t.nelement() * t.element_size() for t in load_file(str(env["dir"] / "tiny.safetensors")).values())
    import comfy.model_management as mm

    # bf16 storage: ComfyUI counts exactly the file's tensors (plus its own sampling schedule buffer).
    assert mm.module_size(model.model.diffusion_model) == file_bytes
    assert model.model_size() == file_bytes + mm.module_size(model.model.model_sampling)
    layer = model.model.diffusion_model.double_blocks[0].img_attn.proj
    assert mm.module_size(layer) == 256 * 256 // 4 + 256 * 4 + 256 * 2  # 2-bit codes, fp32 scales, bias


def test_ksampler_batch2_matches_stock_ops(env, ours, reference):
    a = ksample(env["nodes"], ours)
    b = ksample(env["nodes"], reference)
    assert a.shape == (2, 12, 16, 16)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert not torch.equal(a[0], a[1])  # two different noises


def test_custom_advanced_img2img_matches_stock_ops(env, ours, reference):
    import comfy_extras.nodes_custom_sampler as cs
    import comfy_extras.nodes_flux as nf
    import comfy_extras.nodes_model_advanced as adv

    def run(model):
        model = call(adv.ModelSamplingFlux, model=model, max_shift=1.15, base_shift=0.5, width=128, height=128)
        cond = call(nf.FluxGuidance, conditioning=ce.conditioning(CFG, guidance=0.0), guidance=4.0)
        guider = call(cs.BasicGuider, model=model, conditioning=cond)
        sigmas = call(cs.BasicScheduler, model=model, scheduler="simple", steps=4, denoise=0.5)  # img2img
        sampler = call(cs.KSamplerSelect, sampler_name="euler")
        noise = call(cs.RandomNoise, noise_seed=7)
        init = ce.latent(1)  # stands in for a VAE-encoded image
        out = call(
            cs.SamplerCustomAdvanced, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent_image=init
        )
        return out["samples"], init["samples"]

    (a, init), (b, _) = run(ours), run(reference)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert (a - init).abs().mean() < (torch.randn_like(a) - init).abs().mean()  # started from the image


def test_stock_lora_loaders_match_dense_and_remove_exactly(env, ours, reference):
    nodes = env["nodes"]
    base = ksample(nodes, ours)
    with_lora = nodes.LoraLoaderModelOnly().load_lora_model_only(ours, "tiny_lora.safetensors", 0.8)[0]
    patched = {k.removeprefix("diffusion_model.").removesuffix(".weight") for k in with_lora.patches}
    assert set(env["touched"]) <= patched
    ref_lora = nodes.LoraLoaderModelOnly().load_lora_model_only(reference, "tiny_lora.safetensors", 0.8)[0]
    a, b = ksample(nodes, with_lora), ksample(nodes, ref_lora)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert (a - base).abs().max() > 1e-2  # the LoRA does something

    layer = ours.model.diffusion_model.single_blocks[1].linear1
    assert layer.resident is not None and layer.resident.lowrank.rank == 4  # side branch, not baked
    assert layer.weight is None

    # LoraLoader (model and CLIP), CLIP absent: same patches, same result.
    via_full = nodes.LoraLoader().load_lora(ours, None, "tiny_lora.safetensors", 0.8, 1.0)[0]
    torch.testing.assert_close(ksample(nodes, via_full), a, atol=0, rtol=0)

    again = ksample(nodes, ours)  # the base MODEL after the LoRA ones ran
    assert torch.equal(again, base)
    assert all(m.resident is None for m in _packed(ours))


def _packed(patcher):
    from comfy_nodes.ops import packed_layers

    return [m for _, m in packed_layers(patcher.model.diffusion_model) if m.is_packed]


def test_lowvram_partial_load_runs_patches_per_call(env, ours, monkeypatch):
    """ComfyUI's low-VRAM path: layers beyond the budget keep comfy_cast_weights and get the LoRA as
    LowVramPatch in weight_function. On CPU the budget is forced (ComfyUI never goes partial there)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    nodes = env["nodes"]
    with_lora = nodes.LoraLoaderModelOnly().load_lora_model_only(ours, "tiny_lora.safetensors", 0.8)[0]
    full = ksample(nodes, with_lora)

    budget = with_lora.model_size() // 3
    monkeypatch.setattr(
        mm.LoadedModel,
        "model_use_more_vram",
        lambda self, extra, force_patch_weights=False: self.model.partially_load(
            self.device, budget, force_patch_weights=force_patch_weights
        ),
    )
    mm.unload_all_models()
    partial = ksample(nodes, with_lora)
    assert with_lora.model.model_lowvram and 0 < with_lora.loaded_size() < with_lora.model_size()
    layers = _packed(with_lora)
    lowvram = [m for m in layers if m.comfy_cast_weights]
    assert lowvram and len(lowvram) < len(layers)
    via_patch = [m for m in lowvram if any(isinstance(f, comfy.model_patcher.LowVramPatch) for f in m.weight_function)]
    assert via_patch and all(m.resident is None for m in via_patch)
    torch.testing.assert_close(partial, full, atol=1e-6, rtol=1e-6)
    monkeypatch.undo()

    # ComfyUI frees memory mid-run by partially unloading: moved layers get LowVramPatch appended.
    mm.unload_all_models()
    mm.load_models_gpu([with_lora])
    x = ce.latent(1)["samples"]
    cond = ce.conditioning(CFG)[0]
    kw = {"c_crossattn": cond[0], "y": cond[1]["pooled_output"], "guidance": torch.tensor([3.5])}
    t = torch.tensor([0.7])
    before = with_lora.model.apply_model(x, t, **kw)
    freed = with_lora.partially_unload(torch.device("cpu"), with_lora.model_size() // 2)
    assert freed > 0
    after = with_lora.model.apply_model(x, t, **kw)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    mm.unload_all_models()


def test_info_node_reports_formats_memory_and_lora(env, ours):
    from comfy_nodes.nodes_v3 import BitfluxModelInfo

    nodes = env["nodes"]
    with_lora = nodes.LoraLoaderModelOnly().load_lora_model_only(ours, "tiny_lora.safetensors", 1.0)[0]
    out = BitfluxModelInfo.execute(with_lora, True)
    text = out.args[0]
    assert "tiny.safetensors" in text and "2 heads" in text
    assert "ternary" in text and "int4a:64" in text and "int8" in text
    assert f"{with_lora.model_size() / 2**20:.1f} MiB" in text
    assert "LoRA patches on packed layers: 6 (6 as run-time low-rank branches" in text
    assert "single_blocks.0.linear2" in text and "adapter rank 8" in text
    assert out.ui.as_dict()["text"] == (text,)


def test_info_node_on_a_stock_model(reference):
    from comfy_nodes.report import model_report

    text = model_report(reference)
    assert "not loaded by the bitflux loader" in text and "16-bit" in text


def test_classic_node_api_matches(env):
    from comfy_nodes import nodes_v1

    model = nodes_v1.BitfluxModelLoader().load("tiny.safetensors", "default")[0]
    res = nodes_v1.BitfluxModelInfo().describe(model)
    assert "ternary" in res["result"][0]
    assert set(nodes_v1.NODE_CLASS_MAPPINGS) == {"BitfluxModelLoader", "BitfluxModelInfo", "BitfluxCalibrationPrompts"}
    assert "tiny.safetensors" in nodes_v1.BitfluxModelLoader.INPUT_TYPES()["required"]["unet_name"][0]


def test_other_flux_sizes_load(env, tmp_path):
    """No 24-head assumption anywhere: 4 heads of 64, no guidance embedder (schnell-like), 16 channels."""
    import comfy.model_base
    import comfy.supported_models

    from comfy_nodes.loader import load_bitflux

    cfg = ce.FluxConfig(
        hidden_size=256,
        num_heads=4,
        axes_dim=(16, 24, 24),
        guidance_embed=False,
        in_channels=64,
        depth=1,
        depth_single_blocks=1,
    )
    path = str(tmp_path / "schnellish.safetensors")
    ce.write_bitflux(path, cfg, special={})
    model = load_bitflux(path)
    assert isinstance(model.model, comfy.model_base.Flux)
    assert isinstance(model.model.model_config, comfy.supported_models.FluxSchnell)
    assert model.model.diffusion_model.num_heads == 4
    assert model.model.latent_format.latent_channels == 16  # FLUX.1's own latent format
    cond = ce.conditioning(cfg)
    out = (
        env["nodes"]
        .KSampler()
        .sample(model, 1, 1, 1.0, "euler", "simple", cond, cond, {"samples": torch.zeros(1, 4, 8, 8)}, 1.0)[0][
            "samples"
        ]
    )
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()


def test_converter_output_loads_and_matches_stock_ops(env, tmp_path):
    """End to end with the real converter: a testbed-shaped BFL checkpoint -> bitflux -> this loader."""
    import comfy.model_patcher
    from safetensors.torch import save_file

    from comfy_nodes.fileformat import read_header
    from comfy_nodes.loader import build_model, load_bitflux
    from converter import convert

    src, out = str(tmp_path / "src.safetensors"), str(tmp_path / "out.safetensors")
    save_file({k: v.bfloat16().contiguous() for k, v in ce.random_flux(CFG, seed=11).state_dict().items()}, src)
    convert(src, out, progress=False, rules=["double_blocks.0.*_mod.lin=int8", "single_blocks.1.*=int4:64"])
    header = read_header(out)
    assert header.architecture["num_heads"] == 2
    ours = load_bitflux(out)
    dense = build_model(header, ce.dense_state_dict(load_file(out), header), packed=False)
    reference = comfy.model_patcher.ModelPatcher(dense, torch.device("cpu"), torch.device("cpu"))
    torch.testing.assert_close(ksample(env["nodes"], ours), ksample(env["nodes"], reference), atol=ATOL, rtol=RTOL)


def test_stock_torch_compile_node_matches_eager(env, ours):
    # ComfyUI's TorchCompileModel node (backend inductor) on our MODEL: bitkernel's custom ops inside inductor's graph
    # sample what the eager model does.
    import comfy_extras.nodes_torch_compile as tc

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = call(tc.TorchCompileModel, model=ours, backend="inductor")
    a = ksample(env["nodes"], compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    b = ksample(env["nodes"], ours)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert compiled.model_options["torch_compile_kwargs"]["backend"] == "inductor"
