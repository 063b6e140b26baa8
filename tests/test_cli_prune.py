from __future__ import annotations

import json

import pandas as pd
import pytest
from helpers import exit_code

from ellava_lib import cli
from ellava_lib.core.policy import Policy
from ellava_lib.model.specs import load_model


def _prune(model, out, *extra):
    return cli.main(["prune", "--model", str(model), "--out", str(out), "--quiet", *extra])


@pytest.mark.parametrize("args,needle", [
    (["--sparsity", "1.0"], "must be in [0, 1)"),
    (["--sparsity", "-0.1"], "must be in [0, 1)"),
    (["--sparsity", "nan"], "must be in [0, 1)"),
    (["--sparsity", "abc"], "invalid float value"),
    (["--nm", "2-4"], "N:M such as 2:4"),
    (["--nm", "4:2"], "0 < N < M"),
    (["--sparsity", "0.5", "--calib", "5000"], "exceed the calibration pool"),
    (["--sparsity", "0.5", "--calib", "0"], "positive"),
    (["--method", "owl", "--nm", "2:4"], "--nm applies"),
    (["--method", "magnitude"], "give --sparsity"),
    (["--sparsity", "0.6", "--nm", "2:4"], "disagrees"),
    (["--policy", "search", "--sparsity", "0.5"], "--policy sets every unit's sparsity"),
    (["--policy", "search", "--method", "owl"], "--policy sets every unit's sparsity"),
    (["--policy", "no-search"], "no-search is missing"),
])
def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    out = tmp_path / "pruned"
    assert exit_code(lambda: _prune(tmp_path / "no-model", out, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_prune_then_eval_end_to_end(micro_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert _prune(micro_model_dir, out, "--method", "sparsegpt", "--sparsity", "0.6", "--calib", "8") == 0
    assert "calibration loss" in capsys.readouterr().out
    report = pd.read_csv(out / "sparsity.csv")
    assert {"layer", "target", "measured"} <= set(report.columns)
    assert (report["target"] == 0.6).all() and ((report["measured"] - 0.6).abs() < 0.01).all()
    policy = Policy.from_json(out / "policy.json")
    assert set(policy.sparsities.values()) == {0.6}
    meta = json.loads((out / "ellava.json").read_text())
    assert meta["method"] == "sparsegpt" and len(meta["calibration"]["ids"]) == 8
    model, _ = load_model(out)  # the saved weights carry the zeros
    q = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert abs(float((q == 0).float().mean()) - 0.6) < 0.01
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    assert cli.main(["eval", "--model", str(out), "--out", str(tmp_path / "ev"), "--limit", "2", "--quiet"]) == 0
    assert (tmp_path / "ev" / "metrics.csv").is_file()
    # an existing output folder is replaced only with --force
    assert _prune(micro_model_dir, out, "--method", "magnitude", "--sparsity", "0.5") == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert _prune(micro_model_dir, out, "--method", "magnitude", "--sparsity", "0.5", "--force") == 0
    assert json.loads((out / "ellava.json").read_text())["method"] == "magnitude"


@pytest.mark.parametrize("args", [["--method", "wanda", "--nm", "2:4"], ["--method", "ecoflap", "--sparsity", "0.6"],
                                  ["--method", "owl", "--sparsity", "0.7"]])
def test_other_methods_write_their_policy(micro_model_dir, tmp_path, args):
    out = tmp_path / "pruned"
    assert _prune(micro_model_dir, out, "--calib", "8", *args) == 0
    report = pd.read_csv(out / "sparsity.csv")
    policy = Policy.from_json(out / "policy.json")
    target = 0.5 if "--nm" in args else float(args[-1])
    mean = (report["measured"] * report["params"]).sum() / report["params"].sum()
    # per-row / per-block counts are round(s * n): a continuous (OWL) level can land a hair under its target
    assert target - 1e-3 <= mean < target + 0.031
    assert policy.meta["method"] == args[1]
