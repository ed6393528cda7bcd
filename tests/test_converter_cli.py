"""The command line: `python converter/convert.py`, exit codes, report, dry run, signals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_converter_support import make_state, save_bfl, tiny_config

from converter.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "converter", "convert.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "flux.safetensors")
    save_bfl(make_state(tiny_config(), seed=11), path)
    return path


def test_script_converts_and_reports(checkpoint, tmp_path):
    out, report = str(tmp_path / "out.safetensors"), str(tmp_path / "report.json")
    cmd = [sys.executable, SCRIPT, checkpoint, "-o", out, "--device", "cpu", "--rule", "*_mod.lin=int8",
           "--report-json", report]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "worst layers" in proc.stdout and "peak RSS" in proc.stdout
    assert "100.0%" in proc.stderr  # the progress display
    data = json.loads(open(report).read())
    assert data["formats"] == {"int8": 2, "ternary": 11} and data["output_bytes"] == os.path.getsize(out)
    assert data["peak_rss_bytes"] > 0 and len(data["layers"]) == 13
    proc = subprocess.run(cmd, capture_output=True, text=True)  # again: the output exists now
    assert proc.returncode == 2 and "already exists; pass --force" in proc.stderr


def test_main_dry_run_and_errors(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "out.safetensors")
    assert main([checkpoint, "-o", out, "--dry-run", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "output:" in printed and "ternary" in printed and "nothing was written" in printed
    assert os.listdir(tmp_path) == []
    assert main([checkpoint, "-o", out, "--device", "cpu", "--rule", "*=int3"]) == 2
    assert "unknown format" in capsys.readouterr().err
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x80\x04")
    assert main([str(bad), "-o", out, "--device", "cpu"]) == 2
    assert "pickle" in capsys.readouterr().err
    assert main([checkpoint, "-o", out, "--quiet", "--device", "cpu", "--method", "absmean"]) == 0
    assert "method absmean" in capsys.readouterr().out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_conversion_leaves_no_file(tmp_path, sig):
    src = str(tmp_path / "big.safetensors")
    save_bfl(make_state(tiny_config(hidden_size=512, num_heads=4, depth=2, depth_single_blocks=4)), src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, src, "-o", str(out_dir / "out.safetensors"), "--device", "cpu", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not any(".partial-" in f for f in os.listdir(out_dir)):  # writing has started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the conversion finished before the signal arrived")
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), err
    assert os.listdir(out_dir) == []
