"""bench/flux_e2e.py --tiny on the CPU: every path (bfl; diffusers where it imports; ComfyUI where
COMFYUI_DIR points to a checkout) and every variant runs and is in the table, and the paths compute the
same model: fed the same weights and inputs, their outputs agree to float32 rounding, far closer than
what W1.58A8 changes against W1.58A16 (so a path that ran A16 for A8, or mapped a layer wrongly, fails),
and the low-rank branch of the +r16 / +r32 variants changes each path's output (so no path drops it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "flux_e2e.py")
BRANCHED = ("w158a16+r16", "w158a16+r32", "w158a8+r16", "w158a8+r32")
VARIANTS = ("bf16", "w158a16", "w158a8", *BRANCHED)
# float32: the paths agree to ~3e-7 (measured; bfl and diffusers bit for bit). What quantization changes
# (measured): W1.58A16 vs bf16 ~4e-2, W1.58A8 vs W1.58A16 ~3e-4; a q/k mix-up in one block ~3e-3.
# W1.58A8 rounds activations to 8 bits: an input 1e-5 off flips codes and moves the output ~6e-5
# (measured), so A8 gets a tolerance that a few such flips pass and a path running A16 (3e-4 off) fails.
AGREE = {"bf16": 1e-5, "w158a16": 1e-5, "w158a8": 1e-4, **{v: 1e-5 if "a16" in v else 1e-4 for v in BRANCHED}}
A8_EFFECT = 2e-4
TERNARY_EFFECT = 1e-3
# The +r16 / +r32 branch (N(0, 0.02) down and up) moves the output ~3e-3 (measured) from the same variant without
# it, whose other weights are identical: a path that dropped the branch would differ by 0.
BRANCH_EFFECT = 1e-3


def _comfy_ready() -> bool:
    root = os.environ.get("COMFYUI_DIR")
    return bool(root) and os.path.isfile(os.path.join(root, "comfy", "model_patcher.py"))


def available_paths() -> list[str]:
    paths = ["bfl"]
    if importlib.util.find_spec("diffusers") is not None:
        paths.append("diffusers")
    if _comfy_ready():
        paths.append("comfy")
    return paths


def run_bench(tmp_path, *args: str, env=None) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "flux_e2e.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--tiny", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env=env,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def table_rows(stdout: str) -> set[tuple[str, str]]:
    return {(m.group(1), m.group(2)) for m in re.finditer(r"^\| (\w+) \| ([\w+]+) \| [\d.]+ \|", stdout, re.M)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = available_paths()
    proc, data = run_bench(tmp_path_factory.mktemp("flux_e2e"), "--dtype", "fp32", "--steps", "2", "--path", *paths)
    return paths, proc, data


def test_every_path_and_variant_is_in_the_table(tiny):
    paths, proc, data = tiny
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert data["done"]
    for r in data["rows"]:
        assert "error" not in r, r
        assert r["finite"], r
    want = {(p, v) for p in paths for v in VARIANTS}
    assert table_rows(proc.stdout) == want
    assert {(r["path"], r["variant"]) for r in data["rows"]} == want
    assert "## eager" in proc.stdout


def test_paths_compute_the_same_model(tiny):
    paths, _, data = tiny
    if len(paths) < 2:
        pytest.skip("only the bfl path runs here (no diffusers, no COMFYUI_DIR)")
    pairs = [d for d in data["agreement"] if d["mode"] == "eager"]
    assert {(d["path"], d["variant"]) for d in pairs} == {(p, v) for p in paths[1:] for v in VARIANTS}
    for d in pairs:
        assert d["ref"] == "bfl"
        assert d["rel"] < AGREE[d["variant"]], d


def test_each_variant_changes_the_output(tiny):
    """The agreement above means something only if the variants differ by more than it."""
    paths, _, data = tiny
    effect = {(d["path"], d["variant"]): d["rel"] for d in data["agreement"] if d["mode"] == "variants (eager)"}
    for p in paths:
        assert effect[(p, "w158a16")] > TERNARY_EFFECT
        assert effect[(p, "w158a8")] > A8_EFFECT


@pytest.mark.parametrize("path", ["bfl", "diffusers", "comfy"])
def test_low_rank_branch_changes_the_output(tiny, path):
    """Each path runs the +r16 / +r32 variants with their branch, not silently without it, and reports its cost."""
    paths, proc, data = tiny
    if path not in paths:
        why = {"diffusers": "diffusers does not import", "comfy": "COMFYUI_DIR is not set to a ComfyUI checkout"}[path]
        pytest.skip(f"the {path} path does not run here: {why}")
    effect = {d["variant"]: d for d in data["agreement"] if d["mode"] == "variants (eager)" and d["path"] == path}
    for variant in BRANCHED:
        assert effect[variant]["ref"] == variant.split("+")[0]
        assert effect[variant]["rel"] > BRANCH_EFFECT, effect[variant]
        assert re.search(rf"^\| {path} \| {re.escape(variant)} \|.* ms \([+-][\d.]+%\) \|$", proc.stdout, re.M)


def test_comfy_path_is_skipped_without_comfyui_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_DIR"}
    proc, data = run_bench(tmp_path, "--path", "bfl", "comfy", "--variants", "bf16", "--steps", "1", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "comfy path skipped: COMFYUI_DIR is not set" in proc.stdout
    assert table_rows(proc.stdout) == {("bfl", "bf16")}


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_ternary_blocks_trace_without_graph_breaks(tmp_path):
    """bitkernel's op (a torch custom op with a fake implementation) inside compiled blocks, in both compiled modes
    (on the CPU "graphs" compiles as "compiled" does; CUDA graphs need a GPU)."""
    paths = [p for p in available_paths() if p != "comfy"]  # ComfyUI's CPU attention breaks graphs by design
    proc, data = run_bench(
        tmp_path, "--modes", "compiled", "graphs", "--dtype", "fp32", "--steps", "1", "--variants", "w158a8",
        "--path", *paths,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "## compiled" in proc.stdout and "## graphs" in proc.stdout
    assert {r["mode"] for r in data["rows"]} == {"compiled", "graphs"}
    for r in data["rows"]:
        assert "error" not in r, r
        assert r["graph_breaks"] == {}, r
        assert r["graphs"] >= 2  # one per block type at least: the blocks did compile
    assert table_rows(proc.stdout) == {(p, "w158a8") for p in paths}
