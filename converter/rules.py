"""Per-layer formats from `--rule PATTERN=FORMAT` (fnmatch on BFL layer names, last match wins).

Format names: ternary, ternary:G, int8, int4:G (symmetric), int4a:G (with zero
points), bf16. G is a group size along the input dimension; int4 alone means
int4:64. A "+a8" suffix (ternary+a8, int8+a8) records that the layer is meant
to run with int8 activations (the `act` field of the file's layer entry).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConversionError
from .fileformat import WEIGHTS_PER_BYTE, LayerSpec

DEFAULT_INT4_GROUP = 64


def parse_format(text: str) -> LayerSpec:
    """'int4a:64' -> LayerSpec("int4", 64, symmetric=False); a "+a8" suffix ("ternary+a8") marks the
    layer for int8 activations (ternary / int8 with one scale per row only)."""
    body, plus, act = text.strip().lower().partition("+")
    if plus:
        if act != "a8":
            raise ConversionError(f"unknown suffix +{act} in format {text!r}: only +a8 exists")
        spec = parse_format(body)
        try:
            return LayerSpec(spec.format, spec.group_size, spec.symmetric, "a8")
        except ValueError as exc:
            raise ConversionError(str(exc)) from None
    name, _, group = body.partition(":")
    try:
        g = int(group) if group else 0
    except ValueError:
        raise ConversionError(f"bad group size in format {text!r}: expected e.g. int4:64") from None
    if name in ("int4", "int4a"):
        return LayerSpec("int4", g if group else DEFAULT_INT4_GROUP, symmetric=name == "int4")
    if name in ("ternary", "int8", "bf16"):
        if group and name != "ternary":
            raise ConversionError(f"{name} takes no group size (got {text!r})")
        if g < 0 or g % 4:
            raise ConversionError(f"ternary group size must be a positive multiple of 4, got {g}")
        return LayerSpec(name, g)
    raise ConversionError(f"unknown format {text!r}: use ternary, ternary:G, int8, int4:G, int4a:G or bf16")


@dataclass(frozen=True)
class Rule:
    pattern: str
    spec: LayerSpec

    @classmethod
    def parse(cls, text: str) -> Rule:
        pattern, sep, fmt = text.rpartition("=")
        if not sep or not pattern.strip():
            raise ConversionError(f"bad rule {text!r}: expected PATTERN=FORMAT, e.g. 'single_blocks.37.*=bf16'")
        return cls(pattern.strip(), parse_format(fmt))


def assign_formats(layers: dict[str, tuple[int, int]], rules: list[Rule], default: LayerSpec) -> dict[str, LayerSpec]:
    """Each layer's spec: the default, overridden by the last rule whose pattern matches.

    `layers` maps BFL layer prefixes to (out_features, in_features); a spec the
    layer's shape cannot hold, or a rule matching no layer, is an error.
    """
    specs = dict.fromkeys(layers, default)
    for rule in rules:
        hits = _hits(layers, rule)
        if not hits:
            example = next(iter(layers), "double_blocks.0.img_attn.qkv")
            raise ConversionError(
                f"rule {rule.pattern}={rule.spec.label} matches no quantizable layer; patterns match block linear "
                f"names such as {example} (embedders and final_layer always stay bf16)."
            )
        for name in hits:
            specs[name] = rule.spec
    for name, spec in specs.items():
        check_fits(name, spec, layers[name][1])
    return specs


def matched_layers(layers: Iterable[str], rules: list[Rule]) -> frozenset[str]:
    """The layers some rule names (calibration's mixed precision and A8 plan leave them alone)."""
    return frozenset(name for rule in rules for name in _hits(layers, rule))


def _hits(layers: Iterable[str], rule: Rule) -> list[str]:
    return [name for name in layers if fnmatch.fnmatchcase(name, rule.pattern)]


def check_fits(name: str, spec: LayerSpec, in_features: int) -> None:
    if not spec.quantized:
        return
    wpb = WEIGHTS_PER_BYTE[spec.format]
    if in_features % wpb or (spec.group_size and spec.group_size % wpb):
        raise ConversionError(f"layer {name} ({in_features} inputs) cannot be stored as {spec.label}")
    if spec.format == "ternary" and spec.group_size and in_features % spec.group_size:
        # the MSE search splits rows into whole groups
        raise ConversionError(
            f"layer {name}: ternary group size {spec.group_size} does not divide its {in_features} inputs"
        )
