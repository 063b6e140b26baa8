"""Per-item task scores (:func:`ellava_lib.eval.evaluate.item_contributions`, :func:`task_scores`): what a search's
task guard compares, item by item."""

from __future__ import annotations

import pytest

from ellava_lib.data import synth
from ellava_lib.eval import evaluate


def test_item_contributions_by_hand():
    records = [{"suite": "sqa", "score": 1.0}, {"suite": "sqa", "score": 0.0}, {"suite": "vizwiz", "score": 0.6},
               {"suite": "llavabench", "score": 6.0, "reference_score": 8.0},
               {"suite": "llavabench", "score": 4.0, "reference_score": 8.0}]
    # R = 5 items, K = 3 suites: sqa 100 * 5 / 6 = 83.33 a point; vizwiz 100 * 5 / 3; llavabench 83.33 / mean ref 8
    got = evaluate.item_contributions(records)
    assert got == pytest.approx([83.333333, 0.0, 100.0, 62.5, 41.666667])
    # their mean is the unweighted suite mean: sqa 50, vizwiz 60, llavabench 100 * 5 / 8 = 62.5 -> 57.5
    assert sum(got) / len(got) == pytest.approx(57.5)
    with pytest.raises(ValueError, match="no scored items"):
        evaluate.item_contributions([])
    with pytest.raises(ValueError, match="reference score is 0"):
        evaluate.item_contributions([{"suite": "llavabench", "score": 3.0, "reference_score": 0.0}])


def test_task_scores_follow_the_samples_order_and_average_to_the_reported_mean(micro_model):
    model, proc = micro_model
    by_suite = {s: synth.generate(s, "calib", 3, 0) for s in ("sqa", "mmvet", "llavabench")}
    frame, _ = evaluate.evaluate_samples(model, proc, by_suite, progress=False)
    mixed = [by_suite["llavabench"][0], by_suite["sqa"][2], by_suite["mmvet"][1], by_suite["sqa"][0],
             by_suite["mmvet"][0], by_suite["llavabench"][2], by_suite["sqa"][1], by_suite["mmvet"][2],
             by_suite["llavabench"][1]]
    scores = evaluate.task_scores(model, proc, mixed)
    expected = float(evaluate.compare({"m": frame}).iloc[0]["mean"])
    assert len(scores) == 9 and sum(scores) / 9 == pytest.approx(expected)
    # order: the same items in suite order give the same values, permuted
    in_order = [s for suite in by_suite.values() for s in suite]
    ordered = dict(zip((s.id for s in in_order), evaluate.task_scores(model, proc, in_order)))
    assert scores == pytest.approx([ordered[s.id] for s in mixed])
    assert len(set(scores)) > 1  # not a constant: the order is visible
