"""Notebook 02's evaluations on the results ledger (run/denseeval.py), on the smol recipe's micro model: computed
once and written as one row per model (dense, each magnitude sparsity); a second call with the rows present
computes nothing and returns equal frames and post-condition; a row of another digest or a corrupted row is
recomputed; without a ledger nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ellava_lib.eval import evaluate
from ellava_lib.eval.metrics import FRAME_COLUMNS
from ellava_lib.model.specs import build_or_load
from ellava_lib.model.train import TrainConfig
from ellava_lib.run import denseeval, runs
from ellava_lib.run import tier as tiers

REAL_COMPUTE = denseeval._compute


@pytest.fixture(scope="module")
def smol_micro_dir(tmp_path_factory) -> Path:
    return build_or_load(TrainConfig.smol_micro(), cache=tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="module")
def tier() -> tiers.Tier:
    return tiers.Tier.from_dict({"db_dtype": "bfloat16"})


def _call(tier, model_dir, tmp_path, limit=1, ledger_dir=None):
    run = runs.Run(tmp_path / "run")
    cfg = tiers.eval_config(tier, limit)
    return denseeval.dense_and_magnitude(tier, model_dir, cfg, [0.5], run, tiers.make_judge(tier, run.path("judge")),
                                         ledger_dir=ledger_dir)


def _count(monkeypatch) -> list:
    ran = []

    def counted(tier, model_dir, eval_cfg, sparsity, out_dir, judge):
        ran.append(sparsity)
        return REAL_COMPUTE(tier, model_dir, eval_cfg, sparsity, out_dir, judge)

    monkeypatch.setattr(denseeval, "_compute", counted)
    return ran


def test_rows_present_compute_nothing(smol_micro_dir, tier, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "results"
    ran = _count(monkeypatch)
    first = _call(tier, smol_micro_dir, tmp_path / "a", ledger_dir=folder)
    assert ran == [None, 0.5] and first.read == []
    assert sorted(p.name for p in (folder / "eval").iterdir()) == ["dense-eval-1.json", "magnitude-0.50-eval-1.json"]
    assert not list(folder.glob("*.json"))  # the sweep's top level is left to the sweep's rows
    assert list(first.frames) == ["dense", "magnitude 50%"]
    assert list(first.frames["dense"].columns) == list(FRAME_COLUMNS)
    assert list(first.postcondition.index) == ["target", "measured"]
    entry = json.loads((folder / "eval" / "dense-eval-1.json").read_text())
    assert sorted(entry) == sorted(denseeval.FIELDS) and entry["postcondition"] is None

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(denseeval, "_compute", fail)
    monkeypatch.setattr(evaluate, "evaluate", fail)
    monkeypatch.setattr(tiers, "load_model", fail)
    capsys.readouterr()
    again = _call(tier, smol_micro_dir, tmp_path / "clone", ledger_dir=folder)
    assert again.read == ["dense-eval-1", "magnitude-0.50-eval-1"]
    assert "dense-eval-1: read from the ledger" in capsys.readouterr().out
    for name in first.frames:
        pd.testing.assert_frame_equal(again.frames[name], first.frames[name])
    pd.testing.assert_frame_equal(again.postcondition, first.postcondition)
    pd.testing.assert_frame_equal(evaluate.compare(again.frames), evaluate.compare(first.frames))


def test_another_digest_or_a_corrupted_row_recomputes(smol_micro_dir, tier, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "results"
    _call(tier, smol_micro_dir, tmp_path / "a", ledger_dir=folder)
    dense = folder / "eval" / "dense-eval-1.json"
    entry = json.loads(dense.read_text())
    dense.write_text(json.dumps({**entry, "digest": "another"}))
    pruned = folder / "eval" / "magnitude-0.50-eval-1.json"
    pruned.write_text("{\"format\": 1")
    ran = _count(monkeypatch)
    capsys.readouterr()
    out = _call(tier, smol_micro_dir, tmp_path / "b", ledger_dir=folder)
    assert ran == [None, 0.5] and out.read == []
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ledger:")]
    assert err == [f"ledger: corrupted row {pruned}: invalid JSON (JSONDecodeError); it is recomputed"]
    assert json.loads(dense.read_text())["digest"] == entry["digest"]  # overwritten under the right digest
    assert json.loads(pruned.read_text())["key"] == "magnitude-0.50-eval-1"
    cfg = tiers.eval_config(tier, 1)
    digests = {denseeval.eval_digest(smol_micro_dir, tier, cfg, None, 1),
               denseeval.eval_digest(smol_micro_dir, tier, tiers.eval_config(tier, 2), None, 1),
               denseeval.eval_digest(smol_micro_dir, tier, cfg, 0.5, 1),
               denseeval.eval_digest(smol_micro_dir, tier, cfg, None, 2)}
    assert len(digests) == 4  # the limit, the sparsity and the thread count are all part of the digest


def test_without_a_ledger_nothing_is_written(smol_micro_dir, tier, tmp_path):
    out = _call(tier, smol_micro_dir, tmp_path, ledger_dir=None)
    assert out.read == [] and not list(tmp_path.rglob("*-eval-*.json"))
    assert (tmp_path / "run" / "eval" / "magnitude-0.50" / "metrics.csv").is_file()
