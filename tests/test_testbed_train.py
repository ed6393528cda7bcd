"""CPU training runs: files load back and evaluate; a checkpointed run resumes."""

import json
import os

import pytest
import torch

from converter.flux_model import Flux, FluxConfig
from testbed import resume, train
from testbed.checkpoint import FLUX_FILE, MAX_FILE_BYTES, TEXT_FILE, load_testbed, read_metadata
from testbed.evaluate import evaluate, format_table
from testbed.scenes import CATEGORIES
from testbed.text import TextEncoder

SMOKE = ["--device", "cpu", "--batch", "2", "--eval-n", "6", "--eval-steps", "1", "--eval-guidance", "3.5",
         "--log-every", "1"]


def test_smoke_training_run_round_trip(tmp_path):
    out = str(tmp_path / "w")
    summary = train.main(["--out", out, "--steps", "4", *SMOKE])  # distill-frac 0.15: 3 + 1
    assert summary["training"]["teacher_steps"] == 3 and summary["training"]["distill_steps"] == 1
    for name in (FLUX_FILE, TEXT_FILE):
        assert os.path.getsize(os.path.join(out, name)) <= MAX_FILE_BYTES
    meta = read_metadata(os.path.join(out, FLUX_FILE))
    assert FluxConfig.from_dict(meta["config"]) == FluxConfig()
    assert meta["training"]["guidance_distilled"] is True
    with open(os.path.join(out, "train_log.json")) as f:
        log = json.load(f)
    assert log["parameters"]["flux"] == summary["parameters"]["flux"] and log["eval"]

    model, enc = load_testbed(out)
    assert next(model.parameters()).dtype == torch.float32
    res = evaluate(model, enc, n=6, steps=1, guidance=3.5, return_images=True)
    assert set(res["categories"]) == set(CATEGORIES)
    assert res["images"].shape == (6, 3, 64, 64)
    assert 0.0 <= res["overall"] <= 1.0 and "overall" in format_table(res)
    again = evaluate(model, enc, n=6, steps=1, guidance=3.5, return_images=True)
    assert torch.equal(res["images"], again["images"])  # same seeds -> same noise -> same images


def test_checkpoint_and_resume(tmp_path):
    ck, out = str(tmp_path / "ck"), str(tmp_path / "w")
    first = train.main(["--steps", "8", "--run-steps", "3", "--checkpoint", ck, "--seed", "3", *SMOKE])
    assert first["teacher_steps"] == 3 and not os.path.exists(out)
    files = sorted(os.listdir(ck))
    assert resume.STATE_FILE in files and 1 <= len(files) - 1 <= resume.MAX_SHARDS
    tensors, state = resume.load_training_state(ck)
    assert state["args"]["seed"] == 3 and len(state["runs"]) == 1
    assert any(k.startswith("exp_avg_sq/model/") for k in tensors) and "rng/data" in tensors

    # the resumed command takes the schedule from the checkpoint, not from its own flags
    summary = train.main(["--resume", ck, "--out", out, "--seed", "99", *SMOKE])
    assert summary["args"]["seed"] == 3 and summary["args"]["steps"] == 8
    assert summary["training"]["teacher_steps"] == 7 and summary["training"]["distill_steps"] == 1
    assert summary["training"]["commands"] == 2 and len(summary["runs"]) == 2
    steps = [h["step"] for h in summary["history"] if h["stage"] == "teacher"]
    assert steps == list(range(1, 8))  # the loss history continues across commands
    assert os.path.getsize(os.path.join(out, FLUX_FILE)) <= MAX_FILE_BYTES


def test_non_final_command_needs_a_checkpoint_dir(tmp_path):
    with pytest.raises(SystemExit):
        train.main(["--steps", "7", "--run-steps", "3", "--out", str(tmp_path / "w"), *SMOKE])
    with pytest.raises(SystemExit):
        train.main(["--minutes", "7.5", "--total-minutes", "15", *SMOKE])


def test_training_state_round_trip(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, enc = Flux(FluxConfig(depth=1, depth_single_blocks=1)), TextEncoder()
    params = list(model.parameters()) + list(enc.parameters())
    names = [f"model/{n}" for n, _ in model.named_parameters()] + [f"text/{n}" for n, _ in enc.named_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    torch.rand(3, generator=gen)
    tensors = resume.module_tensors("model", model) | resume.module_tensors("text", enc)
    tensors |= resume.optimizer_tensors(opt, names)
    tensors["rng/data"] = resume.generator_tensor(gen)
    monkeypatch.setattr(resume, "SHARD_BYTES", 6_000_000)  # force several shards
    monkeypatch.setattr(resume, "MAX_SHARDS", 20)
    paths = resume.save_training_state(str(tmp_path), tensors, {"step": 1})
    assert len(paths) >= 4 and all(os.path.getsize(p) <= 6_100_000 for p in paths[:-1])

    loaded, state = resume.load_training_state(str(tmp_path))
    assert state["step"] == 1
    model2, enc2 = Flux(FluxConfig(depth=1, depth_single_blocks=1)), TextEncoder()
    resume.load_module("model", model2, loaded)
    resume.load_module("text", enc2, loaded)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-6)  # bf16 storage
    params2 = list(model2.parameters()) + list(enc2.parameters())
    opt2 = torch.optim.AdamW(params2, lr=1e-3)
    resume.load_optimizer(opt2, names, loaded, step=1)
    p0, p0b = params[0], params2[0]
    assert torch.allclose(opt2.state[p0b]["exp_avg_sq"], opt.state[p0]["exp_avg_sq"], rtol=1e-2, atol=1e-12)
    assert float(opt2.state[p0b]["step"]) == 1.0
    gen2 = torch.Generator()
    resume.restore_generator(gen2, loaded["rng/data"])
    assert torch.equal(torch.rand(4, generator=gen2), torch.rand(4, generator=gen))
