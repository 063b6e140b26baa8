from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ellava_lib.core.schema import MAX_CHOICES, OPTION_LETTERS, SUITES, option_letter
from ellava_lib.data import scenes, synth


def _digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(repr((s.id, s.question, s.answer, s.choices, s.context, s.answers, s.capabilities,
                       s.category)).encode())
        h.update(s.image.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("suite", SUITES)
def test_same_seed_gives_byte_identical_items(suite):
    assert _digest(synth.generate(suite, "test", 40, seed=3)) == _digest(synth.generate(suite, "test", 40, seed=3))
    assert _digest(synth.generate(suite, "test", 40, seed=3)) != _digest(synth.generate(suite, "test", 40, seed=4))


@pytest.mark.parametrize("suite", SUITES)
def test_splits_are_disjoint_and_test_is_large_enough(suite):
    keys = {split: [it.key() for it in synth.generate_items(suite, split, n)]
            for split, n in (("train", 3000), ("calib", 500), ("test", 500))}
    assert len(keys["test"]) >= 500
    for a, b in (("train", "calib"), ("train", "test"), ("calib", "test")):
        assert not set(keys[a]) & set(keys[b]), f"{a} and {b} share items"


def test_sqa_items_are_multiple_choice_with_context():
    for s in synth.generate("sqa", "test", 200, render=False):
        assert 2 <= len(s.choices) <= 5
        assert s.answer in "ABCDE"[: len(s.choices)]
        assert s.context
        assert len(set(s.choices)) == len(s.choices)


def test_option_letters_name_options_in_order():
    assert OPTION_LETTERS == "ABCDE" and MAX_CHOICES == 5
    assert [option_letter(i) for i in range(MAX_CHOICES)] == list(OPTION_LETTERS)
    assert option_letter(5) == "F"  # a (real) row with more options still gets a letter; scoring rejects it


def test_vizwiz_has_ten_answers_disagreement_and_unanswerables():
    items = synth.generate("vizwiz", "test", 500, render=False)
    assert all(len(s.answers) == 10 for s in items)
    unans = [s for s in items if not s.answerable]
    assert 0.15 < len(unans) / len(items) < 0.40
    assert {s.category for s in unans} == {"unanswerable-blank", "unanswerable-blur", "unanswerable-absent"}
    assert all(s.answer == "unanswerable" for s in unans)
    assert any(len(set(s.answers)) > 1 for s in items), "annotators never disagree"
    for s in items:  # the canonical answer is the most frequent one
        assert s.answers.count(s.answer) >= max([s.answers.count(a) for a in s.answers if a != s.answer], default=0)


def test_mmvet_and_llavabench_tags():
    mm = synth.generate("mmvet", "test", 300, render=False)
    assert set().union(*(s.capabilities for s in mm)) == {"rec", "ocr", "spat", "math"}
    lb = synth.generate("llavabench", "test", 300, render=False)
    assert {s.category for s in lb} == {"detail", "conv", "complex"}


def test_answers_are_consistent_with_the_scene():
    for it in synth.generate_items("mmvet", "test", 300):
        objs = it.scene.objects
        if it.category == "count":
            what = it.question.removeprefix("How many ").removesuffix(" can you see ?")
            if what == "objects":
                expected = len(objs)
            elif what.endswith(" objects"):
                expected = sum(o.colour == what.split()[0] for o in objs)
            else:
                expected = sum(o.shape == what[:-1] for o in objs)
            assert it.answer == str(expected)
        if it.category == "ocr":
            assert it.answer.upper() == "".join(o.text for o in objs if o.shape == "glyph")


def test_rendering_and_cell_labels():
    scene = scenes.Scene((scenes.Obj(0, 0, "red", "circle"), scenes.Obj(2, 1, "white", "glyph", "7")))
    img = np.asarray(scenes.render(scene)).astype(int)
    assert img.shape == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3)
    red_cell = img[: scenes.CELL, : scenes.CELL]
    assert (np.abs(red_cell - np.array(scenes.COLOURS["red"])).sum(-1) < 30).sum() > 40
    empty_cell = img[: scenes.CELL, scenes.CELL: 2 * scenes.CELL]
    assert np.abs(empty_cell - np.array(scenes.BACKGROUND)).max() <= 6
    colour, kind = scenes.cell_labels(scene)
    assert colour[0] == 1 + list(scenes.COLOURS).index("red") and kind[0] == 1 + scenes.SHAPES.index("circle")
    assert kind[7] == 1 + len(scenes.SHAPES) + scenes.GLYPHS.index("7") and colour[1] == kind[1] == 0
    blank = scenes.Scene(scene.objects, degrade="blank")
    assert np.abs(np.asarray(scenes.render(blank)).astype(int) - np.array(scenes.BACKGROUND)).max() <= 6
    assert scenes.cell_labels(blank)[0] == [-100] * 9


@pytest.mark.parametrize("suite,split", [("nope", "test"), ("sqa", "validation")])
def test_unknown_suite_or_split_is_a_clear_error(suite, split):
    with pytest.raises(ValueError, match="unknown (suite|split)"):
        synth.generate(suite, split, 1)


def test_cached_streams_give_the_items_of_a_fresh_iteration():
    """generate_items / generate share one item stream per (suite, split, seed): a short draw, then a longer one,
    then a fresh uncached iteration all agree item for item, and the caller's list is its own."""
    import itertools

    synth._STREAMS.clear()
    short = synth.generate_items("mmvet", "calib", 5, seed=7)
    longer = synth.generate_items("mmvet", "calib", 12, seed=7)
    fresh = list(itertools.islice(synth.iter_items("mmvet", "calib", 7), 12))
    assert longer == fresh and longer[:5] == short
    short.clear()
    assert synth.generate_items("mmvet", "calib", 5, seed=7) == fresh[:5]
    first = synth.generate("sqa", "test", 6, seed=2)
    again = synth.generate("sqa", "test", 6, seed=2)
    assert first is not again and [s.id for s in first] == [s.id for s in again]
    assert _digest(first) == _digest(again)
