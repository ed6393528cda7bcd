"""Mixed precision per layer (MixDQ, Zhao et al. 2024, Sec. 3.3): one format per block linear, chosen by an
integer program that minimises the total measured sensitivity under a size budget.

Each block linear has a few candidate formats (ternary, int4:64, int8, bf16, ...), each with its exact
stored size in bytes (`candidate_bytes`, from `fileformat.layer_tensors`, so the plan's total equals the
block linears' share of the real file) and a sensitivity measured elsewhere (>= 0, lower is better, bf16 = 0).
Picking one candidate per layer so that the bytes fit the budget and the summed sensitivity is least is a
multiple-choice knapsack; `solve_assignment` solves it by dynamic programming (its docstring states the
guarantee). MixDQ uses an ILP solver (OR-tools) for the same problem; a DP needs no new dependency, runs
in well under a second for FLUX's 304 block linears and comes with a stated optimality bound.

    parse_budget(text, total_params)        "3.2GB" | "3200MB" | "2.9GiB" | "2.5bits" -> bytes for the block linears
    candidate_bytes(spec, out, in, bias)    the exact bytes one layer takes in a given format
    solve_assignment(layers, budget_bytes)  {layer: {label: (bytes, sensitivity)}} -> {layer: label}
    format_plan(assignment, layers, total_params=None)  the printable table
    plan_metadata(assignment, layers, budget_bytes, total_params=None) -> JSON record for the file's metadata
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from functools import reduce
from typing import Any, Optional, Union

import numpy as np

from ..errors import ConversionError
from ..fileformat import LayerSpec, layer_tensors
from ..rules import parse_format

# one layer's candidates: format label -> (stored bytes, sensitivity)
Candidates = dict[str, tuple[int, float]]

# Upper bound on the DP table's width (cells of g bytes). FLUX.1-dev's ternary / int4:64 / int8 / bf16 sizes
# differ by multiples of 12,288 bytes, so 2**17 cells solve exactly (no rounding) any budget up to 1.6 GB
# above all-ternary (about 3.1 bits per weight). One DP of that width takes about 0.1 s on one CPU core, its
# back-pointers 40 MB.
MAX_CELLS = 1 << 17
# At most this many granularity levels (DPs) per solve, whatever the byte sizes' gcd: bounds the time.
MAX_LEVELS = 6

_BYTE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BIT_UNITS = ("bit", "bits", "bpw")
_BUDGET_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
_BUDGET_FORMS = (
    "use a size such as 3.2GB, 3200MB or 2.9GiB (also B, KB, KiB, MiB, TB, TiB), or an average such as 2.5bits "
    "(bits per block-linear weight, counting every stored byte of those layers)"
)


def parse_budget(text: str, total_params: int) -> int:
    """The size budget for the block linears, in bytes, from a --budget string.

    "3.2GB" / "3200MB" / "2.9GiB": decimal (GB = 10**9) or binary (GiB = 2**30) units, as `--dry-run` prints
    decimal GB. "2.5bits" / "2.5 bits" / "2.5bpw": an average over the block linears' `total_params` weights
    (sum of out_features * in_features) of every byte those layers store -- packed weights, scales, zero
    points, biases, low-rank branches -- so 2.5 bits means 2.5 * total_params / 8 bytes. The budget covers the
    block linears only: embedders, final layer and the header come on top. Rounded down (a budget is a cap);
    the decimal is read exactly, so "3.2GB" is 3_200_000_000 bytes, not a float's neighbour.
    """
    match = _BUDGET_RE.fullmatch(text) if isinstance(text, str) else None
    unit = match.group(2).lower() if match else ""
    if match is None or (unit not in _BYTE_UNITS and unit not in _BIT_UNITS):
        raise ConversionError(f"bad size budget {text!r}: {_BUDGET_FORMS}")
    value = Fraction(match.group(1))
    if unit in _BIT_UNITS:
        if total_params <= 0:
            raise ConversionError(f"budget {text!r} is in bits per weight, but the model has no block-linear weights")
        budget = math.floor(value * total_params / 8)
    else:
        budget = math.floor(value * _BYTE_UNITS[unit])
    if budget <= 0:
        raise ConversionError(f"size budget {text!r} is not positive: {_BUDGET_FORMS}")
    return budget


def candidate_bytes(spec: Union[str, LayerSpec], out_features: int, in_features: int, bias: bool) -> int:
    """Bytes one layer occupies in the file when stored as `spec` (a LayerSpec or a label like "int4:64"):
    the sum over `layer_tensors`, so a plan's totals are the real file's, tensor for tensor."""
    if isinstance(spec, str):
        spec = parse_format(spec)
    return sum(t.nbytes for t in layer_tensors("layer", spec, out_features, in_features, bias))


def _frontier(name: str, candidates: Candidates) -> list[tuple[str, int, float]]:
    """The layer's Pareto frontier: bytes strictly ascending, sensitivity strictly descending.

    A candidate with at least the bytes and at least the sensitivity of another can be swapped for it in any
    plan without raising either total, so dropping it changes neither the optimum nor the tie rule (fewer
    bytes among equal sensitivities). Exact duplicates keep the first label given.
    """
    if not candidates:
        raise ConversionError(f"layer {name} has no candidate formats")
    items: list[tuple[str, int, float]] = []
    for label, (nbytes, sens) in candidates.items():
        s = float(sens)
        if not math.isfinite(s) or s < 0:
            raise ConversionError(f"layer {name}: sensitivity of {label} is {sens!r}; expected a finite value >= 0")
        if int(nbytes) != nbytes or nbytes < 0:
            raise ConversionError(f"layer {name}: size of {label} is {nbytes!r}; expected a whole number of bytes")
        items.append((label, int(nbytes), s))
    items.sort(key=lambda c: (c[1], c[2]))  # stable: equal (bytes, sensitivity) keep the given order
    kept: list[tuple[str, int, float]] = []
    for item in items:
        if not kept or item[2] < kept[-1][2]:
            kept.append(item)
    return kept


def solve_assignment(layers: dict[str, Candidates], budget_bytes: int, max_cells: int = MAX_CELLS) -> dict[str, str]:
    """One candidate label per layer, minimising the summed sensitivity with the summed bytes <= budget_bytes.

    Algorithm (multiple-choice knapsack by dynamic programming over bytes):
      1. Each layer keeps its Pareto frontier (`_frontier`); the all-cheapest plan is the baseline and only
         the bytes above it (a layer's "extra" bytes) compete for the free budget = budget - baseline.
         A budget below the baseline is infeasible (ConversionError naming the minimum); a free budget that
         holds every layer's largest frontier candidate needs no search (each layer takes its least sensitive).
      2. Extras are counted in cells of g = gcd * 2**j bytes, rounded UP, where gcd is the greatest common
         divisor of all extras and j the smallest level >= j0 with free // g <= max_cells; j0 is 0 unless the
         gcd is so small that the all-largest plan would need more than MAX_LEVELS levels, then the lowest
         level that keeps it to MAX_LEVELS. The DP (`_dp`) holds per cell count c the least sensitivity of
         the layers so far whose rounded extras sum to exactly c, with a back-pointer per layer and cell; the
         plan is the least sensitivity over c <= free // g, fewest cells among equals.
      3. For j > j0 the levels j0 .. j - 1 are solved too, each at its full max_cells width (which fits the
         budget, as a coarser level was needed), and the best of the plans is returned. That makes the result
         monotone -- a larger budget never returns a higher total sensitivity: every level's optimum can only
         improve with more cells, and a larger budget solves the same levels with at least as many cells,
         plus possibly coarser ones.

    Guarantee: rounding up only overstates sizes, so the plan always fits the true budget. When g is the gcd
    (free budget <= max_cells * gcd) nothing is rounded and the plan is exactly optimal; FLUX.1-dev's
    ternary / int4:64 / int8 / bf16 sizes differ by multiples of 12,288 bytes, so that covers budgets up to
    1.6 GB above all-ternary (about 3.1 bits per weight). Otherwise the plan's sensitivity is at most that
    of the best plan fitting budget - n * (g - 1) bytes (n layers), with g < 2 * free / max_cells, or when
    j0 > 0 possibly g = gcd * 2**j0 < cap / (2**(MAX_LEVELS - 2) * max_cells), cap being the all-largest
    plan's extra bytes.
    For FLUX's 304 layers that slack is under 0.46% of the free budget (at most 93 MB at 20 GB free).
    Ties (equal total sensitivity) go to fewer bytes -- exactly when nothing is rounded, up to the rounding
    otherwise; identical (bytes, sensitivity) candidates to the first listed. Cost: at most MAX_LEVELS DPs
    of O(n * k * max_cells) numpy work: 0.02 to 0.6 s for 304 layers x 4 candidates on one CPU core.
    """
    if not layers:
        return {}
    names = list(layers)
    fronts = [_frontier(name, layers[name]) for name in names]
    baseline = sum(f[0][1] for f in fronts)
    if budget_bytes < baseline:
        cheapest = ", ".join(sorted({f[0][0] for f in fronts}))
        raise ConversionError(
            f"size budget {budget_bytes:,} bytes ({budget_bytes / 1e9:.3f} GB) is below the smallest possible plan: "
            f"{baseline:,} bytes ({baseline / 1e9:.3f} GB), every layer at its cheapest candidate ({cheapest}); "
            f"raise the budget to at least that"
        )
    free = budget_bytes - baseline
    extras = [[nbytes - f[0][1] for _, nbytes, _ in f] for f in fronts]
    if sum(e[-1] for e in extras) <= free:
        return {name: f[-1][0] for name, f in zip(names, fronts)}

    gcd = reduce(math.gcd, (e for row in extras for e in row if e), 0)

    def level_for(nbytes: int) -> int:  # the smallest j with nbytes // (gcd * 2**j) <= max_cells
        j = 0
        while nbytes // (gcd << j) > max_cells:
            j += 1
        return j

    lowest = max(0, level_for(sum(e[-1] for e in extras)) - (MAX_LEVELS - 1))
    best: Optional[tuple[float, int, list[int]]] = None
    for level in range(lowest, max(lowest, level_for(free)) + 1):
        g = gcd << level
        weights = [[-(-e // g) for e in row] for row in extras]
        cells = min(free // g, max_cells, sum(w[-1] for w in weights))
        picks = _dp([[c[2] for c in f] for f in fronts], weights, cells)
        key = (
            sum(f[k][2] for f, k in zip(fronts, picks)),
            sum(f[k][1] for f, k in zip(fronts, picks)),
            picks,
        )
        if best is None or key[:2] < best[:2]:
            best = key
    assert best is not None and best[1] <= budget_bytes
    return {name: front[k][0] for name, front, k in zip(names, fronts, best[2])}


def _dp(sens: list[list[float]], weights: list[list[int]], cells: int) -> list[int]:
    """The multiple-choice knapsack in cells: one index per layer, least summed `sens` with summed `weights`
    <= cells (fewest cells among equals). Every layer's candidate 0 weighs 0, weights ascend per layer.

    Row i of the table is the least sensitivity per exact cell count after layers 0..i; the blends are
    arithmetic (np.minimum, multiply by the mask) because masked assignment is several times slower.
    """
    best = np.full(cells + 1, np.inf)
    best[0] = 0.0
    dtype = np.uint8 if max(len(s) for s in sens) <= 256 else np.uint16
    choice = np.zeros((len(sens), cells + 1), dtype=dtype)
    reach = 0  # highest cell any plan of the layers so far can occupy
    for i, (row_sens, row_w) in enumerate(zip(sens, weights)):
        new = np.full(cells + 1, np.inf)
        np.add(best[: reach + 1], row_sens[0], out=new[: reach + 1])
        for k in range(1, len(row_sens)):
            w = row_w[k]
            if w > cells:
                break
            top = min(cells, reach + w)
            cand = best[: top - w + 1] + row_sens[k]
            old = new[w : top + 1]
            better = cand < old
            np.minimum(old, cand, out=old)
            pick = choice[i, w : top + 1]
            pick += better.astype(dtype) * (dtype(k) - pick)  # wraps modulo 2**bits: pick or k
        reach = min(cells, reach + row_w[-1])
        best = new
    cell = int(np.argmin(best))  # first minimum: fewest cells
    picks = [0] * len(sens)
    for i in range(len(sens) - 1, -1, -1):
        picks[i] = int(choice[i, cell])
        cell -= weights[i][picks[i]]
    assert cell == 0, "DP back-pointers do not lead to the empty plan"
    return picks


def _chosen(assignment: dict[str, str], layers: dict[str, Candidates]) -> dict[str, tuple[str, int, float]]:
    """name -> (label, bytes, sensitivity) of the assigned candidate, in `layers` order, checking the pairing."""
    missing = [name for name in layers if name not in assignment]
    extra = [name for name in assignment if name not in layers]
    if missing or extra:
        raise ConversionError(
            f"assignment and candidates disagree: {len(missing)} layers unassigned (e.g. {missing[:1]}), "
            f"{len(extra)} unknown (e.g. {extra[:1]})"
        )
    out: dict[str, tuple[str, int, float]] = {}
    for name, candidates in layers.items():
        label = assignment[name]
        if label not in candidates:
            raise ConversionError(f"layer {name} is assigned {label!r}, not one of its candidates {list(candidates)}")
        nbytes, sens = candidates[label]
        out[name] = (label, int(nbytes), float(sens))
    return out


def _ternary_label(candidates: Candidates) -> Optional[str]:
    """The candidate that is plain ternary ("ternary" if offered, else the first ternary variant), or None."""
    if "ternary" in candidates:
        return "ternary"
    for label in candidates:
        try:
            if parse_format(label).format == "ternary":
                return label
        except ConversionError:
            continue
    return None


def format_plan(assignment: dict[str, str], layers: dict[str, Candidates], total_params: Optional[int] = None) -> str:
    """The plan as a table: per format the layer count and bytes, the totals (with the average bits per
    block-linear weight when `total_params` is given, the same measure `parse_budget` reads), and the 10
    layers most sensitive at their worst candidate with what they got -- the lines to read when checking that
    the budget went where the measurements say it matters."""
    chosen = _chosen(assignment, layers)
    order: list[str] = []  # formats in the order the candidates list them
    for candidates in layers.values():
        order.extend(label for label in candidates if label not in order)
    count = dict.fromkeys(order, 0)
    nbytes = dict.fromkeys(order, 0)
    for label, b, _ in chosen.values():
        count[label] += 1
        nbytes[label] += b
    total = sum(nbytes.values())
    total_sens = sum(s for _, _, s in chosen.values())
    lines = [f"{'format':<14}{'layers':>8}{'bytes':>18}{'share':>8}"]
    for label in order:
        if count[label]:
            lines.append(f"{label:<14}{count[label]:>8}{nbytes[label]:>18,}{nbytes[label] / max(total, 1):>8.1%}")
    lines.append(f"{'total':<14}{len(chosen):>8}{total:>18,}{1:>8.0%}")
    bits = f", {8 * total / total_params:.3f} bits per weight" if total_params else ""
    lines.append(f"block linears: {total / 1e9:.3f} GB{bits}; total sensitivity {total_sens:.6g}")
    worst = sorted(layers, key=lambda n: max(float(s) for _, s in layers[n].values()), reverse=True)[:10]
    if worst:
        width = max(len("most sensitive layers"), *(len(n) for n in worst))
        head = f"{'most sensitive layers':<{width}}  {'worst':<12} {'sensitivity':>11}     {'chosen':<12} sensitivity"
        lines += ["", head]
        for name in worst:
            label, s = max(((lb, float(v[1])) for lb, v in layers[name].items()), key=lambda x: x[1])
            got, _, got_s = chosen[name]
            lines.append(f"{name:<{width}}  {label:<12} {s:>11.4g}  -> {got:<12} {got_s:.4g}")
    return "\n".join(lines)


def plan_metadata(
    assignment: dict[str, str], layers: dict[str, Candidates], budget_bytes: int, total_params: Optional[int] = None
) -> dict[str, Any]:
    """What the file records about the plan (JSON-serialisable): the budget, the totals, and per layer the
    chosen label, its bytes and sensitivity, and the ternary sensitivity (the all-ternary baseline the
    budget was spent against; None where ternary was not a candidate), so a later run can re-plan for
    another budget or audit this one without measuring again."""
    chosen = _chosen(assignment, layers)
    total = sum(b for _, b, _ in chosen.values())
    per_layer: dict[str, dict[str, Any]] = {}
    formats: dict[str, int] = {}
    for name, (label, b, s) in chosen.items():
        formats[label] = formats.get(label, 0) + 1
        tern = _ternary_label(layers[name])
        per_layer[name] = {
            "format": label,
            "bytes": b,
            "sensitivity": s,
            "ternary_sensitivity": float(layers[name][tern][1]) if tern is not None else None,
        }
    record: dict[str, Any] = {
        "method": "mixdq-mckp",
        "budget_bytes": int(budget_bytes),
        "total_bytes": total,
        "total_sensitivity": float(sum(s for _, _, s in chosen.values())),
        "formats": formats,
        "layers": per_layer,
    }
    if total_params:
        record["average_bits"] = 8 * total / total_params
    return record
