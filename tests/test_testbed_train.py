"""A 3-step CPU training run writes files that load back and evaluate."""

import json
import os

import torch

from testbed import train
from testbed.checkpoint import FLUX_FILE, MAX_FILE_BYTES, TEXT_FILE, load_testbed, read_metadata
from testbed.evaluate import evaluate, format_table
from testbed.flux import FluxConfig
from testbed.scenes import CATEGORIES


def test_smoke_training_run_round_trip(tmp_path):
    out = str(tmp_path / "w")
    summary = train.main(["--out", out, "--steps", "3", "--device", "cpu", "--batch", "2", "--eval-n", "6",
                          "--eval-steps", "1", "--eval-guidance", "3.5", "--log-every", "1"])
    assert summary["training"]["teacher_steps"] == 2 and summary["training"]["distill_steps"] == 1
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
