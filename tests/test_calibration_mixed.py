"""Mixed-precision planning (converter.calibration.mixed): the knapsack solver against brute force, its
rounding guarantee and monotonicity, a FLUX.1-dev-sized plan, budget parsing, byte counts, the reports."""

import itertools
import json
import math
import random
from fractions import Fraction
from functools import reduce

import numpy as np
import pytest

from converter.architecture import AXES_DIM, Architecture, block_linears, expected_shapes
from converter.calibration.mixed import (
    candidate_bytes,
    format_plan,
    parse_budget,
    plan_metadata,
    solve_assignment,
)
from converter.errors import ConversionError
from converter.fileformat import LayerSpec, layer_tensors
from converter.rules import parse_format

FLUX_DEV = Architecture(64, 768, 4096, 3072, 4.0, 24, 19, 38, AXES_DIM, 10_000, True, True)
FORMATS = ("ternary", "int4:64", "int8", "bf16")


def _flux_shapes() -> dict[str, tuple[int, int, bool]]:
    shapes = expected_shapes(FLUX_DEV)
    return {p: (*shapes[f"{p}.weight"], f"{p}.bias" in shapes) for p in block_linears(FLUX_DEV)}


def _flux_layers(seed: int) -> dict[str, dict[str, tuple[int, float]]]:
    """FLUX.1-dev's 304 block linears, exact byte sizes, sensitivities shaped like measured ones."""
    rng = random.Random(seed)
    layers = {}
    for name, (n_out, n_in, bias) in _flux_shapes().items():
        t = rng.lognormvariate(-4, 1.5)
        sens = (t, t * rng.uniform(0.05, 0.3), t * rng.uniform(0.001, 0.02), 0.0)
        layers[name] = {f: (candidate_bytes(f, n_out, n_in, bias), s) for f, s in zip(FORMATS, sens)}
    return layers


def _total(layers, assignment) -> tuple[float, int]:
    """(sensitivity, bytes) of a plan, summed in layer order as the solver does."""
    s, b = 0.0, 0
    for name, candidates in layers.items():
        nbytes, sens = candidates[assignment[name]]
        s += sens
        b += nbytes
    return s, b


class BruteForce:
    """Every plan of a small instance, for exact optima at any budget."""

    def __init__(self, layers):
        self.labels = [list(c) for c in layers.values()]
        combos = list(itertools.product(*(range(len(lb)) for lb in self.labels)))
        rows = [list(c.values()) for c in layers.values()]
        self.sens = np.zeros(len(combos))
        self.bytes = np.zeros(len(combos), dtype=np.int64)
        for j, row in enumerate(rows):  # layer by layer, the solver's summation order
            self.sens = self.sens + np.array([row[c[j]][1] for c in combos])
            self.bytes = self.bytes + np.array([row[c[j]][0] for c in combos])

    def optimum(self, budget):
        """(least sensitivity, fewest bytes among those) over plans within budget, or None."""
        fits = self.bytes <= budget
        if not fits.any():
            return None
        s = self.sens[fits].min()
        return s, int(self.bytes[fits & (self.sens == s)].min())


def _random_instance(rng, n_layers, n_cands, max_bytes, integer_sens=False):
    layers = {}
    for i in range(n_layers):
        cands = {}
        for k in range(n_cands):
            sens = float(rng.randint(0, 3)) if integer_sens else rng.choice([0.0, rng.random(), rng.random()])
            cands[f"f{k}"] = (rng.randint(1, max_bytes), sens)
        layers[f"layer{i}"] = cands
    return layers


def _budgets(rng, layers, count):
    lo = sum(min(b for b, _ in c.values()) for c in layers.values())
    hi = sum(max(b for b, _ in c.values()) for c in layers.values())
    picks = {lo - 1, lo, lo + 1, hi - 1, hi, hi + 5}
    picks.update(rng.randint(lo, hi) for _ in range(count))
    return sorted(picks)


# -- the solver ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("integer_sens", [False, True])
def test_solver_matches_brute_force(integer_sens):
    """Exact (no rounding at these sizes): same least sensitivity and, on ties, the same fewest bytes;
    infeasible budgets raise, naming the minimum."""
    rng = random.Random(1 if integer_sens else 0)
    for _ in range(120):
        layers = _random_instance(rng, 6, 3, 60, integer_sens)
        brute = BruteForce(layers)
        for budget in _budgets(rng, layers, 12):
            want = brute.optimum(budget)
            if want is None:
                minimum = int(brute.bytes.min())
                with pytest.raises(ConversionError, match=f"{minimum:,} bytes"):
                    solve_assignment(layers, budget)
                continue
            got = _total(layers, solve_assignment(layers, budget))
            assert got[1] <= budget
            assert got[0] == pytest.approx(want[0], abs=1e-12)
            if got[0] == want[0]:
                assert got[1] == want[1], "ties must go to fewer bytes"


def test_rounded_levels_keep_guarantee_and_monotone():
    """Forced rounding (tiny tables): always within budget, never worse than the optimum of the budget less
    n * g bytes (g < max(gcd, 2 * free / max_cells)), and monotone in the budget."""
    rng = random.Random(2)
    max_cells = 16
    for _ in range(40):
        layers = _random_instance(rng, 6, 3, 100_000)
        brute = BruteForce(layers)
        fronts = [sorted(b for b, _ in c.values()) for c in layers.values()]
        baseline = sum(f[0] for f in fronts)
        gcd = reduce(math.gcd, (b - f[0] for f in fronts for b in f if b != f[0]), 0)
        previous = math.inf
        for budget in _budgets(rng, layers, 25)[1:]:
            got = _total(layers, solve_assignment(layers, budget, max_cells=max_cells))
            assert got[1] <= budget
            assert got[0] <= previous + 1e-12, "a larger budget gave a higher total sensitivity"
            previous = got[0]
            g = max(gcd, 2 * (budget - baseline) / max_cells)
            slack_opt = brute.optimum(budget - len(layers) * g)
            if slack_opt is not None:
                assert got[0] <= slack_opt[0] + 1e-12


def _lp_bound(layers, budget) -> tuple[float, float]:
    """The LP relaxation's optimum (a lower bound on any plan within budget) and the largest single-layer
    sensitivity range: OPT(budget) <= LP(budget) + that range (one fractional layer rounded down)."""
    base_s, base_b, steps, spread = 0.0, 0, [], 0.0
    for cands in layers.values():
        pts = sorted((b, s) for b, s in cands.values())
        spread = max(spread, max(s for _, s in pts) - min(s for _, s in pts))
        hull = [pts[0]]
        for b, s in pts[1:]:
            if s >= hull[-1][1]:
                continue
            while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (b - hull[-2][0]) >= (s - hull[-2][1]) * (
                hull[-1][0] - hull[-2][0]
            ):
                hull.pop()
            hull.append((b, s))
        base_b += hull[0][0]
        base_s += hull[0][1]
        steps += [(q[0] - p[0], p[1] - q[1]) for p, q in zip(hull, hull[1:])]
    free, value = budget - base_b, base_s
    for db, ds in sorted(steps, key=lambda x: x[1] / x[0], reverse=True):
        take = min(1.0, free / db)
        value -= take * ds
        free -= take * db
        if take < 1:
            break
    return value, spread


def test_flux_sized_plans_fit_are_near_optimal_and_monotone():
    layers = _flux_layers(0)
    assert len(layers) == 304
    total_params = sum(o * i for o, i, _ in _flux_shapes().values())
    baseline = sum(c["ternary"][0] for c in layers.values())
    ceiling = sum(c["bf16"][0] for c in layers.values())
    previous = math.inf
    for budget in [
        baseline,
        *np.linspace(baseline, ceiling, 10).astype(int)[1:],
        parse_budget("2.5bits", total_params),
    ]:
        plan = solve_assignment(layers, int(budget))
        sens, nbytes = _total(layers, plan)
        assert nbytes <= budget
        lp, spread = _lp_bound(layers, budget)
        assert sens >= lp - 1e-9
        # n * g slack: g < 2 * free / 2**17 (or the gcd, 12288 bytes)
        slack = 304 * max(12288, 2 * (budget - baseline) / 2**17)
        assert sens <= _lp_bound(layers, max(baseline, budget - slack))[0] + spread + 1e-9
        if budget != parse_budget("2.5bits", total_params):
            assert sens <= previous + 1e-12
            previous = sens
    assert all(label == "ternary" for label in solve_assignment(layers, baseline).values())
    assert all(label == "bf16" for label in solve_assignment(layers, ceiling).values())


def test_coprime_sizes_fit_and_stay_monotone():
    """Byte sizes with gcd 1 (no exact level in reach): with the level count capped, plans still fit and improve
    with the budget."""
    rng = random.Random(4)
    layers = {
        name: {
            label: (nbytes + rng.randint(0, 999) * (label != "ternary"), sens) for label, (nbytes, sens) in c.items()
        }
        for name, c in _flux_layers(5).items()
    }
    baseline = sum(c["ternary"][0] for c in layers.values())
    ceiling = sum(max(b for b, _ in c.values()) for c in layers.values())
    previous = math.inf
    for budget in np.linspace(baseline, ceiling, 6).astype(int)[1:-1]:
        sens, nbytes = _total(layers, solve_assignment(layers, int(budget)))
        assert nbytes <= budget and sens <= previous
        previous = sens


def test_solver_edge_cases():
    assert solve_assignment({}, 10) == {}
    # dominated candidates are never chosen; an unconstrained budget takes the least sensitive, cheapest first
    layers = {"a": {"x": (10, 1.0), "y": (20, 1.0), "z": (30, 0.5), "w": (30, 0.5)}}
    assert solve_assignment(layers, 19) == {"a": "x"}
    assert solve_assignment(layers, 29) == {"a": "x"}
    assert solve_assignment(layers, 1000) == {"a": "z"}
    with pytest.raises(ConversionError, match="10 bytes"):
        solve_assignment(layers, 9)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ConversionError, match="sensitivity"):
            solve_assignment({"a": {"x": (10, bad)}}, 100)
    with pytest.raises(ConversionError, match="no candidate"):
        solve_assignment({"a": {}}, 100)


# -- budgets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("3.2GB", 3_200_000_000),
        ("3200MB", 3_200_000_000),
        (" 3.2 gb ", 3_200_000_000),
        ("2.9GiB", math.floor(Fraction("2.9") * 2**30)),
        ("512MiB", 512 * 2**20),
        ("1000000B", 1_000_000),
        ("2.5bits", 2.5 * 1000 / 8),
        ("2.5 bits", 2.5 * 1000 / 8),
        ("3bpw", 375),
        ("1bit", 125),
        (".5GB", 500_000_000),
    ],
)
def test_parse_budget(text, want):
    assert parse_budget(text, 1000) == int(want)


def test_parse_budget_bits_count_all_block_linear_weights():
    total_params = sum(o * i for o, i, _ in _flux_shapes().values())
    assert total_params == 11_834_228_736
    assert parse_budget("2.5bits", total_params) == total_params * 5 // 16


@pytest.mark.parametrize("text", ["", "3.2", "GB", "abc", "3.2 GBs", "-1GB", "1e9B", "3,2GB", "2.5 bit s", "0GB"])
def test_parse_budget_rejects(text):
    with pytest.raises(ConversionError, match=r"3\.2GB.*2\.5bits"):
        parse_budget(text, 1000)


def test_parse_budget_bits_needs_weights():
    with pytest.raises(ConversionError, match="bits per weight"):
        parse_budget("2.5bits", 0)


# -- bytes and reports -----------------------------------------------------------------------------------


def test_candidate_bytes_are_layer_tensors_bytes():
    n = 3072
    assert candidate_bytes("ternary", n, n, True) == n * n // 4 + 4 * n + 2 * n
    assert candidate_bytes("int4:64", n, n, True) == n * n // 2 + 4 * n * (n // 64) + 2 * n
    assert candidate_bytes("int4a:64", n, n, False) == n * n // 2 + 5 * n * (n // 64)
    assert candidate_bytes("int8", n, n, True) == n * n + 4 * n + 2 * n
    assert candidate_bytes("bf16", n, n, True) == 2 * n * n + 2 * n
    lora = LayerSpec("ternary", lora_rank=32)
    assert candidate_bytes(lora, n, n, True) == candidate_bytes("ternary", n, n, True) + 2 * 32 * (n + n)
    for name, (n_out, n_in, bias) in _flux_shapes().items():
        for fmt in (*FORMATS, "ternary:64", "int4a:64", "int8+a8"):
            planned = layer_tensors(name, parse_format(fmt), n_out, n_in, bias)
            assert candidate_bytes(fmt, n_out, n_in, bias) == sum(t.nbytes for t in planned)


def test_plan_report_and_metadata():
    layers = _flux_layers(3)
    shapes = _flux_shapes()
    total_params = sum(o * i for o, i, _ in shapes.values())
    budget = parse_budget("3.3GB", total_params)
    plan = solve_assignment(layers, budget)
    meta = plan_metadata(plan, layers, budget, total_params)
    assert json.loads(json.dumps(meta)) == meta
    real = sum(
        t.nbytes for name, label in plan.items() for t in layer_tensors(name, parse_format(label), *shapes[name])
    )
    assert meta["total_bytes"] == real <= budget == meta["budget_bytes"]
    assert meta["average_bits"] == pytest.approx(8 * real / total_params)
    assert sum(meta["formats"].values()) == 304
    entry = meta["layers"]["single_blocks.0.linear1"]
    assert entry["format"] == plan["single_blocks.0.linear1"]
    assert entry["ternary_sensitivity"] == layers["single_blocks.0.linear1"]["ternary"][1]
    assert entry["sensitivity"] == layers["single_blocks.0.linear1"][entry["format"]][1]

    text = format_plan(plan, layers, total_params)
    assert f"{real:,}" in text and f"{8 * real / total_params:.3f} bits per weight" in text
    worst = max(layers, key=lambda n: layers[n]["ternary"][1])
    assert worst in text and "most sensitive" in text
    assert "bits per weight" not in format_plan(plan, layers)

    with pytest.raises(ConversionError, match="not one of its candidates"):
        format_plan({**plan, worst: "int2"}, layers)
    with pytest.raises(ConversionError, match="unassigned"):
        plan_metadata({}, layers, budget)
