"""Train / evaluation / calibration splits are disjoint and deterministic."""

from collections import Counter

import torch

from testbed.prompts import (
    EVAL_SIZE,
    HELDOUT_PAIRS,
    allowed_colors,
    calibration_prompts,
    calibration_specs,
    eval_items,
    train_specs,
    uses_unseen_pair,
)
from testbed.scenes import CATEGORIES, COLORS, SHAPES, Spec, SpecTable, sample_scenes
from testbed.text import TextEncoder


def test_eval_train_calibration_disjoint():
    train = {s.caption for s in train_specs()}
    evaluation = {it.caption for it in eval_items()}
    calibration = set(calibration_prompts(512))
    assert not train & evaluation
    assert not calibration & evaluation
    assert calibration <= train  # calibration looks like training data, never like evaluation


def test_heldout_pairs_never_in_training():
    pairs = {(SHAPES.index(s), COLORS.index(c)) for s, c in HELDOUT_PAIRS}
    assert not any(uses_unseen_pair(s) for s in train_specs())
    # colours drawn at render time for colour-free objects avoid them too
    specs = train_specs()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(specs), (4000,), generator=gen)
    scene = sample_scenes(SpecTable(specs), idx, gen, allowed_colors())
    drawn = set(zip(scene.shape[scene.present].tolist(), scene.color[scene.present].tolist()))
    assert not drawn & pairs


def test_eval_items_balanced_deterministic_seeded():
    items = eval_items()
    assert len(items) == EVAL_SIZE >= 1000
    assert Counter(it.spec.category for it in items) == {c: EVAL_SIZE // len(CATEGORIES) for c in CATEGORIES}
    prefix = eval_items(60)
    assert Counter(it.spec.category for it in prefix) == {c: 10 for c in CATEGORIES}
    assert [it.caption for it in prefix] == [it.caption for it in items[:60]]
    assert [it.seed for it in eval_items(10, seed=5)] == list(range(5, 15))
    assert any(uses_unseen_pair(it.spec) for it in items)


def test_calibration_deterministic_and_balanced():
    a, b = calibration_specs(100), calibration_specs(100)
    assert a == b
    assert set(Counter(s.category for s in a)) == set(CATEGORIES) - {"single"}


def test_every_prompt_tokenizes():
    tok = TextEncoder().tokenizer
    captions = [it.caption for it in eval_items()] + [s.caption for s in train_specs()]
    tokens = tok.encode(captions)
    assert tokens.shape == (len(captions), tok.max_len)
    assert (tokens[:, 0] != 0).all()


def test_heldout_position_captions_have_their_picture_in_training():
    # "A left of B" is evaluated; the same picture is trained as "B right of A", the
    # mirror as "B left of A"; no training caption has A as subject and B as object on that axis
    flip = {0: 1, 1: 0, 2: 3, 3: 2}
    train = {s.caption for s in train_specs()}
    held = [it.spec for it in eval_items() if it.spec.category == "position"]
    assert len({s.caption for s in held}) == 16
    for s in held:
        a, b = s.shapes
        assert Spec("position", (b, a), s.colors, flip[s.relation]).caption in train  # same picture
        assert Spec("position", (b, a), s.colors, s.relation).caption in train  # mirror picture
        assert Spec("position", s.shapes, s.colors, flip[s.relation]).caption not in train
