"""What a search returns: the one-standard-error rule on the selection rows (:mod:`ellava_lib.search.final_pick`),
on hand-computed cases."""

import math

import pytest

from ellava_lib.search.config import SearchConfig
from ellava_lib.search.final_pick import choose, guard, paired_gain

START = [0.5, 0.4, 0.6, 0.3]


def test_paired_gain_by_hand():
    # d = 0.1, -0.05, 0.2, 0.0: mean 0.0625; squared deviations sum 0.036875, / 3 / 4 -> se sqrt(0.00307292)
    gain, se = paired_gain(START, [0.4, 0.45, 0.4, 0.3])
    assert gain == pytest.approx(0.0625) and se == pytest.approx(0.0554339, abs=1e-7)
    gain, se = paired_gain([0.2], [0.1])  # one row: no standard error
    assert gain == pytest.approx(0.1) and math.isnan(se)
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_gain([0.1, 0.2], [0.1])


def test_best_returned_only_when_its_gain_exceeds_one_standard_error():
    clear = [0.4, 0.45, 0.4, 0.3]  # gain 0.0625 > se 0.0554
    noisy = [0.4, 0.5, 0.5, 0.3]  # d = 0.1, -0.1, 0.1, 0: gain 0.025 < se 0.0478714
    losses = [clear, noisy, START]  # candidate 2 is the start pick
    idx, rec = choose(losses, best=0, start=2, rule="paired_se")
    assert idx == 0 and not rec["kept_start"] and rec["gain"] == pytest.approx(0.0625)
    idx, rec = choose(losses, best=1, start=2, rule="paired_se")
    assert idx == 2 and rec["kept_start"] and rec["best_index"] == 1
    assert rec["gain"] == pytest.approx(0.025) and rec["gain_se"] == pytest.approx(0.0478714, abs=1e-7)
    idx, rec = choose(losses, best=1, start=2, rule="min")  # the lowest R_hat however small its lead
    assert idx == 1 and not rec["kept_start"] and rec["gain"] == pytest.approx(0.025)
    idx, rec = choose(losses, best=2, start=2, rule="paired_se")  # the start is the best: nothing to test
    assert idx == 2 and rec["gain"] is None and not rec["kept_start"]
    assert choose(losses, best=1, start=None, rule="paired_se")[0] == 1  # no start policy
    assert choose([[0.1], [0.3]], best=0, start=1, rule="paired_se")[0] == 1  # one row: no SE, keep the start
    with pytest.raises(ValueError, match="select_rule"):
        choose(losses, best=1, start=2, rule="median")


def test_select_rule_config_default_and_older_searches():
    cfg = SearchConfig()
    assert cfg.select_rule == "paired_se" and cfg.to_dict()["select_rule"] == "paired_se"
    older = {k: v for k, v in cfg.to_dict().items() if k != "select_rule"}  # written before the field existed
    assert SearchConfig.from_dict(older).select_rule == "min"
    assert SearchConfig(select_rule="min").digest() == SearchConfig.from_dict(older).digest() != cfg.digest()
    with pytest.raises(ValueError, match="select_rule"):
        SearchConfig(select_rule="median")


def test_guard_returns_the_simplest_option_within_one_standard_error_of_the_best():
    start = [0.5, 0.4, 0.6, 0.3]  # mean 0.45
    searched = [0.6, 0.5, 0.6, 0.4]  # mean 0.525
    tuned = [0.7, 0.5, 0.7, 0.3]  # mean 0.55: the best
    # best - start: d = 0.2, 0.1, 0.1, 0: gain 0.1, sd sqrt(0.02 / 3) = 0.0816497, se 0.0408248: 0.1 > se, dropped
    # best - searched: d = 0.1, 0, 0.1, -0.1: gain 0.025, sd sqrt(0.0275 / 3) = 0.0957427, se 0.0478714: kept
    index, rec = guard([start, searched, tuned])
    assert index == 1 and rec["best_index"] == 2 and rec["index"] == 1
    assert rec["means"] == pytest.approx([0.45, 0.525, 0.55])
    assert rec["gains"][0] == pytest.approx(0.1) and rec["gain_ses"][0] == pytest.approx(0.0408248, abs=1e-7)
    assert rec["gains"][1] == pytest.approx(0.025) and rec["gain_ses"][1] == pytest.approx(0.0478714, abs=1e-7)
    assert rec["gains"][2] is None and rec["gain_ses"][2] is None
    # the start within one SE of the best: the start
    index, rec = guard([[0.7, 0.4, 0.7, 0.35], searched, tuned])  # d = 0, 0.1, 0, -0.05: gain 0.0125
    assert index == 0 and rec["gain_ses"][0] == pytest.approx(0.0314576, abs=1e-7)
    # a tie at the top goes to the simpler option; one option is returned as it is
    assert guard([[0.2, 0.4], [0.2, 0.4]])[0] == 0 and guard([[0.1, 0.3]])[0] == 0
    assert guard([[0.0], [1.0]])[0] == 0  # one row: no SE, the simplest is kept
    assert guard([[0.0, 0.0], [1.0, 1.0]])[0] == 1  # a lead of 1 on every row: SE 0, the best
    with pytest.raises(ValueError, match="no option"):
        guard([])
