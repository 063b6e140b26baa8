"""benchmarks/sqa_probe.py: the text-only probe of the sqa option-matching step runs and records what it measured."""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def probe():
    return load_benchmark("sqa_probe")


def test_probe_records_accuracies_per_eval(probe, tmp_path):
    out = tmp_path / "r" / "probe.json"
    args = ["--out", str(out), "--micro", "--n-train", "8", "--n-test", "24", "--induction", "2", "--steps", "3",
            "--eval-every", "2", "--drill-frac", "0.5", "--aux-layer", "1"]
    result = probe.main(args)
    stored = json.loads(out.read_text())
    assert stored == result
    assert [e["step"] for e in stored["evals"]] == [2, 3]
    for e in stored["evals"]:
        assert 0 <= e["sqa_text"] <= 100 and 0 <= e["drill"] <= 100
        assert {"colour", "count", "property", "spatial"} & set(e)
    assert stored["induction_final_loss"] > 0 and stored["args"]["aux_layer"] == 1


def test_probe_drill_items_name_the_value_and_aux_loss_targets_it(probe):
    from ellava_lib.core.schema import OPTION_LETTERS
    from ellava_lib.data import synth
    from ellava_lib.model import tiny

    tok = tiny.build_processor(tiny.vocabulary(0)).tokenizer
    items = [it for it in synth.generate_items("sqa", "test", 20) if not it.scene.degrade][:5]
    for it, (ids, n_p, value_ids) in zip(items, probe.encode_items(tok, items, "sqa", "test", drill=True)):
        value = it.choices[OPTION_LETTERS.index(it.answer)]
        prompt = tok.decode(ids[:n_p])
        assert f"Which option is {value} ?" in prompt
        assert tok.decode(ids[n_p:]).split()[0] == it.answer
        assert tok.decode(value_ids).split() == value.split()


@pytest.mark.parametrize("bad", [["--drill-frac", "2"], ["--micro", "--aux-layer", "7"]])
def test_probe_rejects_bad_flags(probe, tmp_path, bad):
    with pytest.raises(SystemExit):
        probe.main(["--out", str(tmp_path / "x.json"), "--n-train", "4", "--n-test", "4", *bad])
