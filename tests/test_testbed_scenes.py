"""Scene renderer and rule scorer: ground truth must pass, wrong pictures must fail."""

import random

import pytest
import torch

from testbed.prompts import all_specs
from testbed.scenes import CATEGORIES, COLORS, IMAGE_SIZE, PALETTE, Spec, SpecTable, render, render_specs, sample_scenes
from testbed.score import score

N_PER_CATEGORY = 150


def _random_specs(category: str, n: int, seed: int = 0) -> list[Spec]:
    rng = random.Random(seed)
    return [rng.choice(all_specs(category)) for _ in range(n)]


def _accuracy(images: torch.Tensor, specs: list[Spec]) -> float:
    return sum(ok for ok, _ in score(images, specs)) / len(specs)


@pytest.mark.parametrize("category", CATEGORIES)
def test_ground_truth_scores_at_least_99_percent(category):
    specs = _random_specs(category, N_PER_CATEGORY)
    images, _ = render_specs(specs, torch.Generator().manual_seed(1))
    assert _accuracy(images, specs) >= 0.99


def test_fallback_layouts_also_score():
    # one candidate per scene forces the fixed fallback layouts often (4 objects rarely fit at random)
    specs = _random_specs("counting", 60) + _random_specs("position", 60)
    gen = torch.Generator().manual_seed(2)
    table = SpecTable(specs)
    images = render(sample_scenes(table, torch.arange(len(specs)), gen, candidates=1))
    assert _accuracy(images, specs) >= 0.99


def _swap(spec: Spec) -> Spec:
    """A spec whose picture must fail the original spec's check."""
    cat, s, c = spec.category, spec.shapes, spec.colors
    if cat == "counting":
        n = len(s) + 1 if len(s) < 4 else len(s) - 1
        return Spec(cat, (s[0],) * n, (None,) * n)
    if cat == "position":
        return Spec(cat, s, c, {0: 1, 1: 0, 2: 3, 3: 2}[spec.relation])
    if cat == "color_attr":
        return Spec(cat, s, (c[1], c[0]))
    if cat == "colors":
        return Spec(cat, s, ((c[0] + 1) % len(COLORS),))
    raise ValueError(cat)


@pytest.mark.parametrize("category", ["counting", "position", "color_attr", "colors"])
def test_wrong_pictures_fail(category):
    specs = _random_specs(category, 60, seed=3)
    images, _ = render_specs([_swap(s) for s in specs], torch.Generator().manual_seed(4))
    assert _accuracy(images, specs) <= 0.01


def test_blank_and_noise_images_fail():
    specs = [s for cat in CATEGORIES for s in _random_specs(cat, 5)]
    blank = torch.full((len(specs), 3, IMAGE_SIZE, IMAGE_SIZE), 0.12)
    noise = torch.rand(len(specs), 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    assert _accuracy(blank, specs) == 0
    assert _accuracy(noise, specs) == 0


def test_render_is_deterministic_and_uses_palette():
    specs = _random_specs("color_attr", 8)
    a, _ = render_specs(specs, torch.Generator().manual_seed(7))
    b, _ = render_specs(specs, torch.Generator().manual_seed(7))
    assert a.shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(a, b)
    colors = {tuple(round(v, 4) for v in px) for px in a.permute(0, 2, 3, 1).reshape(-1, 3).tolist()}
    allowed = {tuple(round(v, 4) for v in rgb) for rgb in PALETTE} | {(0.12, 0.12, 0.12)}
    assert colors <= allowed


def test_captions_follow_the_grammar():
    assert Spec("colors", (0,), (1,)).caption == "an orange circle"
    assert Spec("counting", (3,) * 3, (None,) * 3).caption == "three crosses"
    assert Spec("position", (0, 4), (None, None), 2).caption == "a circle above a ring"
    assert Spec("color_attr", (1, 2), (0, 5)).caption == "a red square and a blue triangle"
