"""Pieces of the node pack against ComfyUI's own math (COMFYUI_DIR): LoRA patches as side branches,
the packed Linear's contract, and the errors the user reads."""

from __future__ import annotations

import sys

import comfy_env as ce
import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module", autouse=True)
def comfy():
    return ce.import_comfy()


def lora_patch(n, k, rank, strength=1.0, alpha=None, offset=None, seed=0):
    from comfy.weight_adapter.lora import LoRAAdapter

    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn(n, rank, generator=g).half(), torch.randn(rank, k, generator=g).half()
    return (strength, LoRAAdapter(set(), (up, down, alpha, None, None, None)), 1.0, offset, None)


def loha_adapter(n, k, rank=2, seed=1):
    from comfy.weight_adapter.loha import LoHaAdapter

    g = torch.Generator().manual_seed(seed)
    w1a, w1b, w2a, w2b = (0.3 * torch.randn(*s, generator=g) for s in [(n, rank), (rank, k), (n, rank), (rank, k)])
    return LoHaAdapter(set(), (w1a, w1b, None, w2a, w2b, None, None, None))


def comfy_weight(patches, w):
    import comfy.lora

    return comfy.lora.calculate_weight(patches, w.clone(), "k")


@pytest.mark.parametrize(
    "specs",  # lora_patch arguments: (n, k, rank, strength, alpha, offset, seed)
    [
        [(48, 32, 4, 0.7, 2.0, None, 0)],
        [(48, 32, 4, 1.0, None, None, 1), (48, 32, 2, -0.5, 1.0, None, 2)],
        [(16, 32, 3, 0.9, None, (0, 16, 16), 3)],  # diffusers to_k inside a fused qkv
        [(48, 8, 3, 0.9, None, (1, 24, 8), 4)],
        [(48, 32, 4, 0.0, None, None, 5)],
    ],
)
def test_lowrank_equals_comfy_calculate_weight(specs):
    patches = [lora_patch(*s) for s in specs]
    from comfy_nodes.lowrank import lowrank_from_patches

    w = torch.randn(48, 32)
    lr = lowrank_from_patches(patches, 48, 32)
    assert lr is not None
    dense = w + (lr.up @ lr.down if lr.rank else 0)
    torch.testing.assert_close(dense, comfy_weight(patches, w), atol=1e-5, rtol=1e-5)
    x = torch.randn(5, 32)
    from bitkernel.functional import add_lowrank

    y = add_lowrank(x @ w.T, x, lr.down, lr.up)
    torch.testing.assert_close(y, x @ comfy_weight(patches, w).T, atol=1e-4, rtol=1e-4)


def test_patches_that_are_not_low_rank_go_dense():
    from comfy_nodes.lowrank import PatchSet, is_plain_lora

    g = torch.Generator().manual_seed(0)
    loha = loha_adapter(48, 32)
    diff = ("diff", (torch.randn(48, 32, generator=g),))
    cases = [
        [(1.0, loha, 1.0, None, None)],
        [(0.5, diff, 1.0, None, None)],
        [lora_patch(48, 32, 4)[:2] + (0.5, None, None)],  # strength_model scales the base weight
        [lora_patch(48, 32, 4), (1.0, diff, 1.0, None, None)],
    ]
    w = torch.randn(48, 32)
    for patches in cases:
        ps = PatchSet.build("k", patches, 48, 32)
        assert ps.lowrank is None and not all(is_plain_lora(p) for p in patches)
        torch.testing.assert_close(ps.dense(w.clone()), comfy_weight(patches, w))


def _layer(fmt="ternary", group=0, act="a16", n=64, k=128, seed=0):
    import comfy.ops

    import bitkernel.functional as bkf
    from comfy_nodes.fileformat import LayerSpec
    from comfy_nodes.ops import make_operations

    spec = LayerSpec(fmt, group_size=group, act=act)
    ops = make_operations(comfy.ops.disable_weight_init, {"l": spec}, torch.float32)
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    qw = bkf.quantize(w, fmt, group)
    layer = ops.Linear(k, n, bias=True, dtype=torch.float32)
    sd = {"l.qweight": qw.qweight, "l.scale": qw.scale, "l.bias": b}
    layer._load_from_state_dict(sd, "l.", {}, True, [], [], [])
    return layer, qw, b


def test_packed_linear_contract():
    import comfy.model_management as mm

    import bitkernel.functional as bkf
    from comfy_nodes.ops import WEIGHT_PLACEHOLDER

    layer, qw, b = _layer()
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "scale", "bias", "weight"}  # `weight`: key for LoRA mapping, zero bytes
    assert sd["weight"] is WEIGHT_PLACEHOLDER and layer.weight is None
    assert "weight" not in dict(layer.named_parameters())  # so a full load never bakes patches into it
    assert mm.module_size(layer) == qw.qweight.nbytes + qw.scale.nbytes + b.nbytes
    x = torch.randn(3, 7, 128)
    torch.testing.assert_close(layer(x), x @ bkf.dequantize(qw).T + b, atol=1e-4, rtol=1e-4)
    layer.to(torch.float16)  # ComfyUI may cast a model: the float32 scales must stay float32
    assert layer.scale.dtype == torch.float32 and layer.qweight.dtype == torch.uint8


def test_int8_activations_layer_runs_the_a8_kernel():
    from bitkernel.nn import TernaryLinear

    layer, qw, b = _layer(act="a8")
    ref = TernaryLinear.from_quantized(qw, b, act_int8=True)
    x = torch.randn(4, 128)
    assert torch.equal(layer(x), ref(x))


def test_weight_wrappers_and_non_lora_patches_use_the_dense_path():
    import comfy.model_patcher

    import bitkernel.functional as bkf

    layer, qw, b = _layer()
    patches = {"k": [(1.0, loha_adapter(64, 128), 1.0, None, None)]}
    layer.weight_function = [comfy.model_patcher.LowVramPatch("k", patches), lambda w: w * 0.5]
    layer.comfy_cast_weights = True
    x = torch.randn(2, 128)
    w = comfy_weight(patches["k"], bkf.dequantize(qw)) * 0.5
    torch.testing.assert_close(layer(x), x @ w.T + b, atol=1e-4, rtol=1e-4)
    assert layer.qweight.dtype == torch.uint8  # nothing was stored back


# ---------------------------------------------------------------------- errors the user reads


@pytest.fixture
def tiny(tmp_path):
    path = str(tmp_path / "tiny.safetensors")
    ce.write_bitflux(path, ce.FluxConfig(depth=1, depth_single_blocks=1), special={})
    return path


def test_not_a_bitflux_file(tmp_path):
    from comfy_nodes.fileformat import BitfluxFormatError
    from comfy_nodes.loader import load_bitflux

    path = str(tmp_path / "flux1-dev.safetensors")
    save_file({"img_in.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(BitfluxFormatError, match="not a bitflux file.*Convert"):
        load_bitflux(path)


def test_newer_format_version(tmp_path):
    from comfy_nodes.fileformat import BitfluxFormatError
    from comfy_nodes.loader import load_bitflux

    path = str(tmp_path / "future.safetensors")
    ce.write_bitflux(
        path, ce.FluxConfig(depth=1, depth_single_blocks=1), special={}, metadata_override={"format_version": "2"}
    )
    with pytest.raises(BitfluxFormatError, match="version 2, newer.*Update"):
        load_bitflux(path)


def test_damaged_file_names_the_layer(tmp_path, tiny):
    from comfy_nodes.fileformat import BitfluxFormatError, read_header
    from comfy_nodes.loader import load_bitflux

    tensors = load_file(tiny)
    del tensors["single_blocks.0.linear1.scale"]
    path = str(tmp_path / "damaged.safetensors")
    save_file(tensors, path, metadata=read_header(tiny).to_metadata())
    with pytest.raises(BitfluxFormatError, match="single_blocks.0.linear1 lacks its scale"):
        load_bitflux(path)


def test_cpu_only_bitkernel_on_a_gpu_machine(tiny, monkeypatch):
    import comfy.model_management as mm

    import bitkernel
    from comfy_nodes.errors import BitfluxLoadError
    from comfy_nodes.loader import load_bitflux

    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(bitkernel, "info", lambda: {"version": "x", "cuda": False, "cuda_archs": "", "gpus": []})
    with pytest.raises(BitfluxLoadError, match=r"without CUDA kernels(.|\n)*CUDA toolkit(.|\n)*install\.py"):
        load_bitflux(tiny)


def test_driver_older_than_the_kernel_build(tiny, monkeypatch):
    import comfy.model_management as mm

    import bitkernel
    from comfy_nodes.errors import BitfluxLoadError
    from comfy_nodes.loader import load_bitflux

    info = {"version": "x", "cuda": True, "cuda_archs": "89", "cuda_runtime": 13000, "cuda_driver": 12080}
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(bitkernel, "info", lambda: info)
    with pytest.raises(BitfluxLoadError, match=r"CUDA 13\.0, newer than the NVIDIA driver supports \(CUDA 12\.8\)"):
        load_bitflux(tiny)


def test_bitkernel_missing(tiny, monkeypatch):
    from comfy_nodes.errors import BitfluxLoadError
    from comfy_nodes.loader import load_bitflux

    monkeypatch.setitem(sys.modules, "bitkernel", None)
    with pytest.raises(BitfluxLoadError, match=r"not installed(.|\n)*install\.py"):
        load_bitflux(tiny)


def test_out_of_memory_gets_advice_and_keeps_its_type(tiny):
    from comfy_nodes.errors import BitfluxOutOfMemoryError
    from comfy_nodes.loader import load_bitflux

    model = load_bitflux(tiny)
    dm = model.model.diffusion_model

    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    dm._forward = boom
    opts = {"wrappers": model.wrappers}
    with pytest.raises(BitfluxOutOfMemoryError, match=r"Tried to allocate 2\.00 GiB(.|\n)*--lowvram") as e:
        dm(torch.zeros(1, 12, 8, 8), torch.zeros(1), torch.zeros(1, 4, 128), transformer_options=opts)
    assert isinstance(e.value, torch.cuda.OutOfMemoryError)  # ComfyUI's OOM handling still applies


def test_lora_hooks_are_refused_with_a_message(tiny, tmp_path):
    import comfy.hooks

    from comfy_nodes.errors import BitfluxLoadError
    from comfy_nodes.fileformat import read_header
    from comfy_nodes.loader import load_bitflux

    lora_path = str(tmp_path / "l.safetensors")
    ce.write_lora(lora_path, read_header(tiny))
    model = load_bitflux(tiny)
    hooks = comfy.hooks.create_hook_lora(load_file(lora_path), strength_model=1.0, strength_clip=0.0)
    target = comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model)
    with pytest.raises(BitfluxLoadError, match="LoraLoaderModelOnly"):
        model.register_all_hook_patches(hooks, target)


def test_loader_node_error_reaches_the_ui(tmp_path, monkeypatch):
    """ComfyUI shows str(exception) of a failing node: the V3 node passes the message through."""
    import folder_paths

    from comfy_nodes.nodes_v3 import BitfluxModelLoader

    d = tmp_path / "dm"
    d.mkdir()
    save_file({"x": torch.zeros(1)}, str(d / "plain.safetensors"))
    folder_paths.add_model_folder_path("diffusion_models", str(d))
    with pytest.raises(ValueError, match="plain.safetensors is not a bitflux file"):
        BitfluxModelLoader.execute(unet_name="plain.safetensors")
