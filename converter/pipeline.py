"""`convert()`: checkpoint in, verified bitflux file out (the API under the CLI).

Order of work: open the source lazily and read its architecture, build the
full plan (every output tensor known), write the header, then for each item in
model order read its source tensors, quantize, and stream the bytes out, so
about one layer is held at a time. The file is written under a temporary name
in the output folder, read back and verified, then renamed into place; on any
failure, Ctrl-C included, the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from typing import Optional, Union

import torch

import bitkernel
import bitkernel.functional as F
from bitkernel.formats import QuantizedWeight

from .architecture import detect_architecture
from .atomic import partial_name, remove_stale_partials
from .calibration.engine import CalibrationSettings, LayerResult, calibrate
from .calibration.state import remove_state
from .errors import ConversionError
from .fileformat import LayerSpec
from .hashing import BackgroundHasher
from .methods import METHODS, quantize_weight
from .plan import Plan, PlanItem, build_plan, layer_shapes_of
from .progress import Progress
from .report import ConversionReport, LayerStat, peak_rss_bytes, sqnr_db
from .rules import Rule, assign_formats, matched_layers, parse_format
from .safetensors_io import StreamingWriter
from .sources import Source, open_source
from .verify import verify_output

PathLike = Union[str, "os.PathLike[str]"]


def resolve_device(device: Optional[str]) -> torch.device:
    """The device for the quantization math: CUDA when available (and bitkernel has CUDA kernels)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() and bitkernel.HAS_CUDA else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConversionError(f"unsupported device {device!r}: use cuda or cpu.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConversionError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu.")
        if not bitkernel.HAS_CUDA:
            raise ConversionError("bitkernel was built without CUDA kernels; rebuild it with nvcc or use --device cpu.")
    elif dev.type != "cpu":
        raise ConversionError(f"unsupported device {device!r}: use cuda or cpu.")
    return dev


def convert(
    checkpoint: PathLike,
    output: PathLike,
    *,
    method: str = "mse",
    rules: Sequence[Union[str, Rule]] = (),
    default_format: Union[str, LayerSpec] = "ternary",
    device: Optional[str] = None,
    force: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    verify_layers: int = 4,
    calibration: Optional[CalibrationSettings] = None,
    keep_calibration_dir: bool = False,
) -> ConversionReport:
    """Converts a FLUX transformer checkpoint to a bitflux file; returns the report.

    `rules` are "PATTERN=FORMAT" strings (fnmatch on BFL layer names, last
    match wins) applied over `default_format`. With `calibration` the layers are
    fitted to the full-precision model first (converter/calibration/engine.py);
    its working folder (default `<output>.calib`) lets an interrupted run resume
    and is removed after success unless `keep_calibration_dir`. Raises
    ConversionError (with a message for the user) and leaves no file behind on
    any failure.
    """
    start = time.monotonic()
    if method not in METHODS:
        raise ConversionError(f"unknown method {method!r}: use {' or '.join(METHODS)}.")
    rule_list = [r if isinstance(r, Rule) else Rule.parse(r) for r in rules]
    default = parse_format(default_format) if isinstance(default_format, str) else default_format
    dev = resolve_device(device)
    checkpoint, output = os.fspath(checkpoint), os.path.abspath(os.fspath(output))
    if not dry_run:
        _check_output(checkpoint, output, force)
    if dev.type == "cuda" and not dry_run:
        torch.cuda.reset_peak_memory_stats(dev)  # the report's peak covers calibration too
    with open_source(checkpoint) as source:
        arch = detect_architecture(source.shapes())
        calibrated: dict[str, LayerResult] = {}
        if calibration is not None and not dry_run:
            calibration = dataclasses.replace(calibration, state_dir=calibration.state_dir or output + ".calib")
            shapes = layer_shapes_of(arch)
            specs = assign_formats(shapes, rule_list, default)
            pinned = matched_layers(shapes, rule_list)
            result = calibrate(source, arch, specs, method, calibration, dev, progress, pinned)
            calibrated = result.layers
            plan = build_plan(source, arch, rule_list, default, method, result.specs, result.record)
        else:
            plan = build_plan(source, arch, rule_list, default, method)
        report = ConversionReport(
            source=source.name,
            output=None if dry_run else output,
            dry_run=dry_run,
            layout=source.layout,
            source_dtype=source.dtype_summary(),
            method=method,
            device=str(dev),
            architecture=arch.to_dict(),
            source_bytes=plan.source_bytes,
            output_bytes=plan.output_bytes(),
            ignored_tensors=len(source.ignored),
            formats=dict(Counter(s.label for s in plan.header.layers.values())),
            plan=plan.summary(),
        )
        if dry_run:
            report.seconds = time.monotonic() - start
            return report
        _check_disk(output, report.output_bytes)
        remove_stale_partials(output)
        tmp = partial_name(output)
        hasher = BackgroundHasher(source.files)
        try:
            _write(source, plan, tmp, dev, method, hasher, report, progress, verify_layers, calibrated)
            _publish(tmp, output, force)
        except BaseException:
            hasher.cancel()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    if calibration is not None and not keep_calibration_dir and calibration.state_dir:
        remove_state(calibration.state_dir)
    report.output_bytes = os.path.getsize(output)
    report.calibration = plan.header.method.get("calibration")
    report.seconds = time.monotonic() - start
    report.peak_rss_bytes = peak_rss_bytes()
    if dev.type == "cuda":
        report.peak_gpu_bytes = torch.cuda.max_memory_allocated(dev)
    return report


def _write(
    source: Source,
    plan: Plan,
    tmp: str,
    dev: torch.device,
    method: str,
    hasher: BackgroundHasher,
    report: ConversionReport,
    show_progress: bool,
    verify_layers: int,
    calibrated: dict[str, LayerResult],
) -> None:
    layer_items = [i for i, item in enumerate(plan.items) if item.spec is not None]
    picks = {layer_items[round(j * (len(layer_items) - 1) / max(verify_layers - 1, 1))] for j in range(verify_layers)}
    samples: dict[str, tuple[LayerSpec, QuantizedWeight]] = {}
    bar = Progress(sum(item.source_bytes for item in plan.items), enabled=show_progress)
    writer = StreamingWriter(tmp, plan.tensors, plan.metadata())
    try:
        for index, item in enumerate(plan.items):
            qw = _write_item(source, item, writer, dev, method, report, calibrated.get(item.name))
            if index in picks and qw is not None and item.spec is not None:
                samples[item.name] = (item.spec, qw)
            bar.advance(item.source_bytes, item.name)
        bar.close()
        plan.header.source["sha256"] = hasher.result()
        metadata = plan.metadata()
        writer.rewrite_metadata(metadata)
        writer.finish()
    finally:
        writer.close()
    verify_output(tmp, plan, metadata, writer.crcs, samples)


def _write_item(
    source: Source, item: PlanItem, writer: StreamingWriter, dev: torch.device, method: str, report: ConversionReport,
    calibrated: Optional[LayerResult] = None,
) -> Optional[QuantizedWeight]:
    """Reads, converts (or takes the calibrated layer) and writes one plan item; returns its
    QuantizedWeight (CPU) for a quantized layer."""
    spec = item.spec
    if spec is None:
        writer.write(item.name, source.load(item.source_keys[0]).to(torch.bfloat16))
        return None
    w = source.load(item.source_keys[0])
    n, k = w.shape
    qw: Optional[QuantizedWeight] = None
    if spec.quantized:
        wd = w.to(dev)
        qw = quantize_weight(wd, spec, method) if calibrated is None else calibrated.qw
        report.layers.append(LayerStat(item.name, spec.label, n * k, sqnr_db(wd, F.dequantize(qw).to(wd.device))))
        del wd
        qw = QuantizedWeight(
            qw.fmt, qw.qweight.cpu(), qw.scale.cpu(), None if qw.zero is None else qw.zero.cpu(), k, qw.group_size
        )
        writer.write(f"{item.name}.qweight", qw.qweight)
        writer.write(f"{item.name}.scale", qw.scale)
        if qw.zero is not None:
            writer.write(f"{item.name}.zero", qw.zero)
    else:
        w16 = w.to(torch.bfloat16)
        report.layers.append(LayerStat(item.name, spec.label, n * k, sqnr_db(w, w16)))
        writer.write(f"{item.name}.weight", w16)
    del w
    if len(item.source_keys) > 1:
        trained = None if calibrated is None else calibrated.bias
        bias = trained if trained is not None else source.load(item.source_keys[1])
        writer.write(f"{item.name}.bias", bias.to(torch.bfloat16))
    if spec.lora_rank:
        if calibrated is None or calibrated.lora is None:
            raise ConversionError(f"{item.name}: a low-rank branch is planned but calibration produced none")
        writer.write(f"{item.name}.lora_down", calibrated.lora[0].to(torch.bfloat16))
        writer.write(f"{item.name}.lora_up", calibrated.lora[1].to(torch.bfloat16))
    return qw


def _check_output(checkpoint: str, output: str, force: bool) -> None:
    folder = os.path.dirname(output)
    if os.path.isdir(output):
        raise ConversionError(
            f"{output} is a folder; give the output file name, e.g. {output}/flux-bitflux.safetensors"
        )
    if not os.path.isdir(folder):
        raise ConversionError(f"the output folder {folder} does not exist.")
    if os.path.exists(output):
        if os.path.exists(checkpoint) and os.path.samefile(checkpoint, output):
            raise ConversionError(f"the output {output} is the input checkpoint; choose another name.")
        if not force:
            raise ConversionError(f"{output} already exists; pass --force to replace it.")


def _check_disk(output: str, need: int) -> None:
    free = shutil.disk_usage(os.path.dirname(output)).free
    if free < need + (64 << 20):
        raise ConversionError(
            f"not enough disk space in {os.path.dirname(output)}: the output needs {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free."
        )


def _publish(tmp: str, output: str, force: bool) -> None:
    """Gives the verified file its name atomically; without `force` never replaces a file,
    even one that appeared while converting (os.link fails if the name exists)."""
    if force:
        os.replace(tmp, output)
    else:
        try:
            os.link(tmp, output)
        except FileExistsError:
            raise ConversionError(f"{output} appeared while converting; pass --force to replace it.") from None
        except OSError:  # a filesystem without hard links
            if os.path.exists(output):
                raise ConversionError(f"{output} already exists; pass --force to replace it.") from None
            os.replace(tmp, output)
        else:
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # make the rename durable
        fd = os.open(os.path.dirname(output), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
