"""Installs the bitkernel wheel (./bitkernel, built from source) into the Python that runs ComfyUI.

ComfyUI-Manager runs this file after cloning the node pack; by hand:

    <python that runs ComfyUI> install.py              # build for the GPUs this machine has
    <python> install.py --all-archs                    # build for every supported GPU architecture
    <python> install.py --cpu-only                     # CPU kernels only (ComfyUI started with --cpu)
    <python> install.py --check                        # only verify what is installed
    <python> install.py --dry-run                      # print the plan, change nothing

It builds with `pip install --no-deps ./bitkernel` for this interpreter (pip
fetches the build tools it needs into a temporary environment), never touches
torch, and checks the result in a fresh interpreter: it imports, reports what
it was built for (bitkernel.info()), and multiplies a small matrix on every
device it should run on. Whatever stops it, it says what to do and exits
non-zero: 1 when the build or the check failed, 2 when this machine cannot
build what it needs (wrong Python, a GPU but no CUDA compiler, a CUDA
compiler too old for the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_DIR = os.path.join(HERE, "bitkernel")
MIN_PYTHON = (3, 9)
DEFAULT_ARCHS = "75;80;86;89;90;120"  # bitkernel's own default list
PREFIX = "[bitflux install]"

CUDA_TOOLKIT_HELP = (
    "Install the NVIDIA CUDA toolkit, 12.8 or newer (https://developer.nvidia.com/cuda-downloads; on Linux the "
    "distribution's cuda-toolkit package works too), make sure `nvcc --version` runs in a new terminal (or set "
    "CUDACXX to the full path of nvcc), then run this script again."
)

# Smoke test run in a fresh interpreter: import, report, one small product per device against dense math.
VERIFY = r"""
import json, sys
import bitkernel
info = bitkernel.info()
result = {"info": info, "devices": {}}
try:
    import torch
    import bitkernel.functional as F
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and info.get("cuda") else [])
    for dev in devices:
        try:
            g = torch.Generator().manual_seed(0)
            w, x = torch.randn(64, 128, generator=g), torch.randn(3, 128, generator=g)
            qw = F.quantize(w.to(dev), "ternary")
            dt = torch.float16 if dev == "cuda" else torch.float32
            y = F.linear(x.to(dev, dt), qw).float().cpu()
            ref = x @ F.dequantize(qw).cpu().T
            err = float((y - ref).abs().max() / ref.abs().max())
            result["devices"][dev] = "ok" if err < 1e-2 else f"wrong result (relative error {err:.3g})"
        except Exception as exc:
            result["devices"][dev] = f"{type(exc).__name__}: {exc}"
except ImportError as exc:
    result["torch"] = str(exc)
print("BITKERNEL_VERIFY " + json.dumps(result))
"""


class InstallError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def say(msg: str) -> None:
    print(f"{PREFIX} {msg}", flush=True)


@dataclass
class Machine:
    """What the plan depends on (gathered by `inspect_machine`, faked in tests)."""

    python: tuple[int, int]
    executable: str
    torch_version: Optional[str]
    torch_cuda: Optional[str]
    gpus: list[tuple[str, tuple[int, int]]] = field(default_factory=list)  # name, compute capability
    nvcc: Optional[str] = None
    nvcc_version: Optional[str] = None
    nvcc_archs: list[str] = field(default_factory=list)  # "75", "120", ...
    portable_python: Optional[str] = None  # ComfyUI portable's python_embeded, when this is not it


@dataclass
class Plan:
    env: dict[str, str]
    description: str
    warnings: list[str] = field(default_factory=list)
    expect_cuda: bool = False


def find_nvcc() -> Optional[str]:
    for candidate in (
        os.environ.get("CUDACXX"),
        shutil.which("nvcc"),
        *(
            os.path.join(os.environ[v], "bin", "nvcc" + (".exe" if os.name == "nt" else ""))
            for v in ("CUDA_HOME", "CUDA_PATH")
            if os.environ.get(v)
        ),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def inspect_machine() -> Machine:
    torch_version = torch_cuda = None
    gpus: list[tuple[str, tuple[int, int]]] = []
    try:
        import torch

        torch_version, torch_cuda = torch.__version__, torch.version.cuda
        if torch.cuda.is_available():
            gpus = [
                (torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
                for i in range(torch.cuda.device_count())
            ]
    except ImportError:
        pass
    nvcc = find_nvcc()
    version, archs = None, []
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release (\d+\.\d+)", out)
        version = m.group(1) if m else None
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
        archs = re.findall(r"compute_(\d+)", listed)
    portable = os.path.normpath(os.path.join(HERE, "..", "..", "..", "python_embeded", "python.exe"))
    if not os.path.isfile(portable) or os.path.normcase(os.path.abspath(sys.executable)) == os.path.normcase(portable):
        portable = None
    return Machine(
        python=sys.version_info[:2],
        executable=sys.executable,
        torch_version=torch_version,
        torch_cuda=torch_cuda,
        gpus=gpus,
        nvcc=nvcc,
        nvcc_version=version,
        nvcc_archs=archs,
        portable_python=portable,
    )


def make_plan(m: Machine, cpu_only: bool = False, all_archs: bool = False) -> Plan:
    """What to build here, or InstallError (code 2) saying why it cannot be built."""
    if m.portable_python:
        raise InstallError(
            f"This is ComfyUI portable, but install.py runs under {m.executable}. Run it with ComfyUI's own "
            f"Python:\n    {m.portable_python} {os.path.join(HERE, 'install.py')}",
            2,
        )
    if m.python < MIN_PYTHON:
        raise InstallError(
            f"Python {m.python[0]}.{m.python[1]} is too old: bitkernel needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer.",
            2,
        )
    if m.torch_version is None:
        raise InstallError(
            f"torch is not installed in {m.executable}, so this is not the Python that runs ComfyUI. Run install.py "
            "with that Python (the one in ComfyUI's virtual environment, or python_embeded\\python.exe in ComfyUI "
            "portable).",
            2,
        )
    env = {"BITKERNEL_CUDA": "OFF"}
    if cpu_only or not m.gpus:
        why = "--cpu-only was given" if cpu_only else "torch sees no CUDA GPU"
        return Plan(env, f"CPU kernels only ({why})")
    names = ", ".join(f"{n} (sm_{a}{b})" for n, (a, b) in m.gpus)
    if not m.nvcc:
        raise InstallError(
            f"This machine has a CUDA GPU ({names}) but no CUDA compiler (nvcc), so bitkernel's GPU kernels cannot be "
            f"built; a CPU-only build would leave ComfyUI unable to run the model on the GPU.\n{CUDA_TOOLKIT_HELP}\n"
            "(To install the CPU kernels anyway, for ComfyUI started with --cpu: install.py --cpu-only)",
            2,
        )
    needed = sorted({f"{a}{b}" for _, (a, b) in m.gpus}, key=int)
    missing = [a for a in needed if m.nvcc_archs and a not in m.nvcc_archs]
    if missing:
        raise InstallError(
            f"nvcc {m.nvcc_version} ({m.nvcc}) cannot compile for sm_{', sm_'.join(missing)} ({names}). "
            f"{CUDA_TOOLKIT_HELP}",
            2,
        )
    archs = DEFAULT_ARCHS if all_archs else ";".join(needed)
    if m.nvcc_archs:  # drop defaults this nvcc cannot target (the GPUs present were checked above)
        archs = ";".join(a for a in archs.split(";") if a in m.nvcc_archs)
    env = {"BITKERNEL_CUDA": "ON", "BITKERNEL_CUDA_ARCHS": archs, "CUDACXX": m.nvcc}
    plan = Plan(env, f"CUDA kernels for sm_{archs.replace(';', ', sm_')} with nvcc {m.nvcc_version}", expect_cuda=True)
    major = int((m.nvcc_version or "0").split(".")[0])
    if major >= 13:
        plan.warnings.append(
            "nvcc 13 builds need an NVIDIA driver of the r580 series or newer; with an older driver install "
            "CUDA 12.8 instead (the check below tells if the driver is too old)."
        )
    return plan


def pip_command(m: Machine, build_dir: str) -> list[str]:
    # --no-deps: bitkernel has no runtime dependencies, and nothing here may upgrade or replace torch.
    # A fresh build directory: a CMake cache from an earlier build would keep its old CUDA decision.
    return [
        m.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall",
        f"--config-settings=build-dir={build_dir}", KERNEL_DIR,
    ]  # fmt: skip


def shown_command(plan: Plan, cmd: list[str]) -> str:
    """The build command as a shell line, with the plan's environment variables in front."""
    return " ".join(f"{k}={v}" for k, v in plan.env.items()) + " " + " ".join(cmd)


def build(m: Machine, plan: Plan) -> None:
    with tempfile.TemporaryDirectory(prefix="bitkernel-build-") as build_dir:
        cmd = pip_command(m, build_dir)
        env = dict(os.environ, **plan.env)
        say("running: " + shown_command(plan, cmd))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        log = (proc.stdout + proc.stderr).strip().splitlines()
        tail = "\n".join(log[-40:])
        hint = (
            "A C++17 compiler is needed: on Linux install gcc/g++ (e.g. `apt install build-essential`); on Windows "
            "install Visual Studio Build Tools with 'Desktop development with C++'."
        )
        if plan.expect_cuda and re.search(r"nvcc|CUDA|cuda", tail):
            hint += (
                " The CUDA part failed: check that the toolkit matches your compiler "
                "(nvcc prints the supported host compilers), or try --cpu-only to see whether the C++ part builds."
            )
        if "Could not find a version" in tail or "No matching distribution" in tail:
            hint = (
                "pip could not download the build tools (scikit-build-core, pybind11, cmake): check the internet "
                "connection or the pip index settings."
            )
        raise InstallError(f"building bitkernel failed (pip exit code {proc.returncode}). Last lines:\n{tail}\n{hint}")


def verify(m: Machine, expect_cuda: bool) -> dict:
    proc = subprocess.run([m.executable, "-c", VERIFY], capture_output=True, text=True, cwd=tempfile.gettempdir())
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BITKERNEL_VERIFY ")), None)
    if proc.returncode != 0 or line is None:
        raise InstallError(
            f"bitkernel does not import in {m.executable}:\n{(proc.stderr or proc.stdout).strip()[-2000:]}\n"
            "Run install.py again; if it keeps failing, report this output."
        )
    result = json.loads(line[len("BITKERNEL_VERIFY ") :])
    info, devices = result["info"], result.get("devices", {})
    say(
        f"bitkernel {info.get('version')}: CUDA {'archs ' + info['cuda_archs'] if info.get('cuda') else 'no'}; "
        f"CPU kernels {info.get('cpu_features')}; GPUs seen: {', '.join(info.get('gpus') or []) or 'none'}"
    )
    for dev, status in devices.items():
        say(f"check on {dev}: {status}")
    bad = {d: s for d, s in devices.items() if s != "ok"}
    driver, runtime = info.get("cuda_driver") or 0, info.get("cuda_runtime") or 0
    if expect_cuda and driver and runtime and driver < runtime:
        raise InstallError(
            f"bitkernel was built with CUDA {runtime // 1000}.{runtime % 1000 // 10}, but the NVIDIA driver supports "
            f"CUDA {driver // 1000}.{driver % 1000 // 10} at most: update the driver, or install an older CUDA toolkit "
            "(12.8 needs driver r570+) and run install.py again."
        )
    if expect_cuda and not info.get("cuda"):
        raise InstallError(f"bitkernel was built without CUDA kernels although nvcc was given.\n{CUDA_TOOLKIT_HELP}")
    if expect_cuda and "cuda" not in devices:
        bad["cuda"] = "torch sees the GPU but bitkernel's CUDA check did not run"
    if bad:
        detail = "; ".join(f"{d}: {s}" for d, s in bad.items())
        hint = ""
        if any("driver" in s.lower() or "insufficient" in s.lower() for s in bad.values()):
            hint = (
                "\nThe NVIDIA driver is older than the CUDA toolkit bitkernel was built with: update the driver, or "
                "install CUDA 12.8 and run install.py again."
            )
        raise InstallError(f"bitkernel is installed but does not work: {detail}{hint}")
    return info


def torch_version_now(m: Machine) -> Optional[str]:
    out = subprocess.run([m.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return out.stdout.strip() or None


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-only", action="store_true", help="build the CPU kernels only")
    ap.add_argument("--all-archs", action="store_true", help=f"build for {DEFAULT_ARCHS}, not just this GPU")
    ap.add_argument("--check", action="store_true", help="only verify the installed bitkernel")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    args = ap.parse_args(argv)
    try:
        m = inspect_machine()
        say(f"Python {m.python[0]}.{m.python[1]} at {m.executable}; torch {m.torch_version or 'missing'}")
        if args.check:  # what is installed must run on every device ComfyUI will use
            make_plan(m, cpu_only=True)  # the Python checks only
            verify(m, expect_cuda=bool(m.gpus) and not args.cpu_only)
            say("OK")
            return 0
        plan = make_plan(m, args.cpu_only, args.all_archs)
        say(f"plan: {plan.description}")
        for w in plan.warnings:
            say(f"note: {w}")
        if args.dry_run:
            say("dry run: " + shown_command(plan, pip_command(m, "<tmp>")))
            return 0
        build(m, plan)
        after = torch_version_now(m)
        if after != m.torch_version:
            raise InstallError(
                f"torch changed from {m.torch_version} to {after} during the install; reinstall the torch "
                "build ComfyUI needs."
            )
        verify(m, plan.expect_cuda)
        say("OK: restart ComfyUI to load the 1.58-bit FLUX nodes.")
        return 0
    except InstallError as exc:
        print(f"{PREFIX} FAILED: {exc}", file=sys.stderr, flush=True)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
