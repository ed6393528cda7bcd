"""install.py: what it decides on each kind of machine, and that it says what to do when it cannot.

Runs without ComfyUI. The decisions are tested on described machines (no GPU here); the real
check of the installed wheel runs on this one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

import install

CPU_BOX = install.Machine(python=(3, 11), executable=sys.executable, torch_version="2.13.0", torch_cuda=None)
NVCC_13 = [str(a) for a in (75, 80, 86, 87, 89, 90, 100, 120)]
GPU_BOX = replace(
    CPU_BOX,
    torch_cuda="12.8",
    gpus=[("NVIDIA GeForce RTX 4070", (8, 9))],
    nvcc="/usr/local/cuda/bin/nvcc",
    nvcc_version="13.0",
    nvcc_archs=NVCC_13,
)


def test_cpu_machine_builds_cpu_kernels():
    plan = install.make_plan(CPU_BOX)
    assert plan.env == {"BITKERNEL_CUDA": "OFF"} and not plan.expect_cuda


def test_gpu_machine_builds_for_its_gpu():
    plan = install.make_plan(GPU_BOX)
    assert plan.env["BITKERNEL_CUDA"] == "ON" and plan.env["BITKERNEL_CUDA_ARCHS"] == "89"
    assert plan.env["CUDACXX"] == GPU_BOX.nvcc and plan.expect_cuda
    assert any("r580" in w for w in plan.warnings)  # CUDA 13 needs a recent driver
    every = install.make_plan(replace(GPU_BOX, nvcc_archs=[a for a in NVCC_13 if a != "120"]), all_archs=True)
    assert every.env["BITKERNEL_CUDA_ARCHS"] == "75;80;86;89;90"  # what this nvcc can target


def test_gpu_without_nvcc_refuses_a_silent_cpu_build():
    with pytest.raises(install.InstallError) as e:
        install.make_plan(replace(GPU_BOX, nvcc=None, nvcc_version=None, nvcc_archs=[]))
    assert e.value.code == 2
    msg = str(e.value)
    assert "RTX 4070" in msg and "CUDA toolkit" in msg and "nvcc" in msg and "--cpu-only" in msg
    assert install.make_plan(replace(GPU_BOX, nvcc=None), cpu_only=True).env["BITKERNEL_CUDA"] == "OFF"


def test_nvcc_too_old_for_the_gpu():
    box = replace(GPU_BOX, gpus=[("NVIDIA GeForce RTX 5080", (12, 0))], nvcc_version="12.4",
                  nvcc_archs=["75", "80", "86", "89", "90"])  # fmt: skip
    with pytest.raises(install.InstallError, match=r"cannot compile for sm_120(.|\n)*12\.8") as e:
        install.make_plan(box)
    assert e.value.code == 2


@pytest.mark.parametrize(
    "box,pattern",
    [
        (replace(CPU_BOX, python=(3, 8)), "too old"),
        (replace(CPU_BOX, torch_version=None), "not the Python that runs ComfyUI"),
        (replace(CPU_BOX, portable_python=r"C:\ComfyUI_windows_portable\python_embeded\python.exe"), "python_embeded"),
    ],
)
def test_wrong_python(box, pattern):
    with pytest.raises(install.InstallError, match=pattern) as e:
        install.make_plan(box)
    assert e.value.code == 2


def test_pip_command_never_touches_torch():
    cmd = install.pip_command(CPU_BOX, "/tmp/b")
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and "--no-deps" in cmd
    assert cmd[-1] == install.KERNEL_DIR and not any("torch" in c for c in cmd)


def test_build_failure_says_what_to_do(monkeypatch):
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="CMake Error: CMAKE_CXX_COMPILER not set\n")
    monkeypatch.setattr(install.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(install.InstallError, match=r"CMAKE_CXX_COMPILER(.|\n)*C\+\+17 compiler") as e:
        install.build(CPU_BOX, install.make_plan(CPU_BOX))
    assert e.value.code == 1


def test_main_exit_codes(monkeypatch, capsys):
    assert install.main(["--dry-run"]) == 0
    assert "BITKERNEL_CUDA=OFF" in capsys.readouterr().out
    monkeypatch.setattr(install, "inspect_machine", lambda: replace(GPU_BOX, nvcc=None))
    assert install.main([]) == 2
    assert "FAILED" in capsys.readouterr().err


def test_torch_replaced_during_install_fails(monkeypatch):
    monkeypatch.setattr(install, "inspect_machine", lambda: CPU_BOX)
    monkeypatch.setattr(install, "build", lambda m, plan: None)
    monkeypatch.setattr(install, "torch_version_now", lambda m: "2.9.0+cu128")
    assert install.main([]) == 1


def test_check_verifies_the_installed_wheel(capsys):
    pytest.importorskip("bitkernel")
    assert install.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "check on cpu: ok" in out and "bitkernel" in out


def _verify_output(info, devices):
    line = "BITKERNEL_VERIFY " + json.dumps({"info": info, "devices": devices})
    return subprocess.CompletedProcess([], 0, stdout=line + "\n", stderr="")


def test_driver_older_than_the_build_is_reported(monkeypatch):
    info = {"version": "0.1.0", "cuda": True, "cuda_archs": "89", "cuda_runtime": 13000, "cuda_driver": 12080,
            "cpu_features": "avx2", "gpus": ["NVIDIA GeForce RTX 4070"]}  # fmt: skip
    monkeypatch.setattr(install.subprocess, "run", lambda *a, **k: _verify_output(info, {"cpu": "ok"}))
    with pytest.raises(install.InstallError, match=r"CUDA 13\.0(.|\n)*driver(.|\n)*12\.8"):
        install.verify(GPU_BOX, expect_cuda=True)


def test_a_failing_gpu_check_fails_the_install(monkeypatch):
    info = {"version": "0.1.0", "cuda": True, "cuda_archs": "89", "cpu_features": "avx2", "gpus": ["x"]}
    out = _verify_output(info, {"cpu": "ok", "cuda": "RuntimeError: CUDA driver version is insufficient"})
    monkeypatch.setattr(install.subprocess, "run", lambda *a, **k: out)
    with pytest.raises(install.InstallError, match="does not work(.|\n)*update the driver"):
        install.verify(GPU_BOX, expect_cuda=True)
    cpu_only = _verify_output(dict(info, cuda=False), {"cpu": "ok"})
    monkeypatch.setattr(install.subprocess, "run", lambda *a, **k: cpu_only)
    with pytest.raises(install.InstallError, match="without CUDA kernels"):
        install.verify(GPU_BOX, expect_cuda=True)
