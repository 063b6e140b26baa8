from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch
from helpers import exit_code

from ellava_lib import cli
from ellava_lib.cli.prune import search_config
from ellava_lib.core.policy import Policy
from ellava_lib.core.units import unit_linears
from ellava_lib.model.specs import load_model
from ellava_lib.search.config import PRESETS, SearchConfig
from ellava_lib.search.projector import load_projector, projector_state

SMALL = ["--calib", "8", "--generations", "2", "--population", "3", "--offspring", "4", "--screen", "4",
         "--survivors", "2", "--projector-every", "1", "--projector-steps", "3", "--quiet"]


def _search(model, out, *extra):
    return cli.main(["search", "--model", str(model), "--sparsity", "0.6", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def searched(micro_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "run"
    assert _search(micro_model_dir, out, "--gap", "bernstein", "--seed", "0", *SMALL) == 0
    return out


def test_search_writes_a_loadable_model_with_its_policy_and_projector(micro_model_dir, searched, tmp_path, capsys):
    for name in ("policy.json", "history.csv", "checkpoint.json", "search_config.json", "selection.json",
                 "config.json", "ellava.json", "leveldb/config.json"):
        assert (searched / name).is_file(), name
    policy = Policy.from_json(searched / "policy.json")
    meta = json.loads((searched / "ellava.json").read_text())
    assert meta["kind"] == "searched" and meta["policy_id"] == policy.policy_id() and meta["mode"] == "assembled"
    hist = pd.read_csv(searched / "history.csv")
    assert len(hist) > 0 and set(hist["phase"]) <= {"init", "lambda", "screen", "full", "select", "guard"}
    # the task guard chose among the start, the policy and the policy with the evolved projector, on generated
    # answers of the selection rows; the saved model holds the projector it chose
    guard = json.loads((searched / "selection.json").read_text())["task_guard"]
    assert guard["options"][-1].endswith("+projector") and len(guard["scores"]) == len(guard["options"])
    assert policy.meta["guard"] == guard["choice"] and all(len(s) == 2 for s in guard["scores"])  # 8 rows: 2 held out
    model, _ = load_model(searched)
    if guard["choice"].endswith("+projector"):
        expected, _ = load_projector(searched / "projector.safetensors")
    else:
        assert not (searched / "projector.safetensors").exists()
        expected = projector_state(load_model(micro_model_dir)[0])
    assert all(torch.equal(projector_state(model)[k], v) for k, v in expected.items())
    for unit, lins in unit_linears(model).items():  # assembled at the policy's levels
        zeros = sum(int((lin.weight == 0).sum()) for lin in lins.values())
        numel = sum(lin.weight.numel() for lin in lins.values())
        assert zeros / numel == pytest.approx(policy.sparsities[unit], abs=0.02), unit
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(searched), "--limit", "2", "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    assert (tmp_path / "ev" / "metrics.csv").is_file()


def test_rerunning_the_same_command_resumes_to_the_same_policy(micro_model_dir, searched):
    before = (searched / "policy.json").read_bytes(), (searched / "history.csv").read_bytes()
    assert _search(micro_model_dir, searched, "--gap", "bernstein", "--seed", "0", *SMALL) == 0
    assert ((searched / "policy.json").read_bytes(), (searched / "history.csv").read_bytes()) == before


def test_exact_mode_reprunes_the_final_policy(micro_model_dir, tmp_path):
    out = tmp_path / "exact"
    assert _search(micro_model_dir, out, "--gap", "capacity", "--no-projector", "--exact", "--db",
                   str(tmp_path / "db"), *SMALL) == 0
    assert not (out / "projector.safetensors").exists() and (tmp_path / "db" / "config.json").is_file()
    report = pd.read_csv(out / "sparsity.csv")
    policy = Policy.from_json(out / "policy.json")
    assert (report["target"] == report["unit"].map(policy.sparsities)).all()
    assert json.loads((out / "ellava.json").read_text())["mode"] == "exact"


@pytest.mark.parametrize("args,needle", [
    (["--sparsity", "0.95"], "the range of the grid"),
    (["--sparsity", "-0.1"], "the range of the grid"),
    (["--sparsity", "nan"], "the range of the grid"),
    (["--calib", "5000"], "exceeds the calibration pool"),
    (["--calib", "1"], "at least 2"),
    (["--generations", "-1"], "generations >= 0"),
    (["--gap", "vc"], "invalid choice"),
    (["--lam", "1"], "unrecognized arguments: --lam"),  # lambda is chosen by the search, not by hand
    (["--init", "uniform,random"], "init must name distinct start policies"),
    (["--fine-step", "-0.05"], "fine_step must lie in [0, 0.5)"),
    (["--preset", "huge"], "unknown search preset 'huge'; choose from ci, default, smol, paper"),
])
def test_bad_input_fails_with_one_line_and_writes_nothing(micro_model_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    argv = ["search", "--model", str(micro_model_dir), "--out", str(out), "--quiet"]
    argv += args if "--sparsity" in args else ["--sparsity", "0.6", *args]
    assert exit_code(lambda: cli.main(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("ellava: error:")
    assert not out.exists()


def test_a_checkpoint_from_another_config_is_refused(micro_model_dir, searched, capsys):
    before = (searched / "history.csv").read_bytes()
    capsys.readouterr()
    assert _search(micro_model_dir, searched, "--gap", "none", "--seed", "0", *SMALL) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another search" in err and "gap: \"bernstein\" -> \"none\"" in err
    assert (searched / "history.csv").read_bytes() == before


def test_a_foreign_output_folder_is_refused(micro_model_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert _search(micro_model_dir, tmp_path, *SMALL) == 2
    assert "not a search folder" in capsys.readouterr().err


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_search_without_flags_is_the_preset(preset):
    """Each search flag left out is the preset's value: no flags = ``SearchConfig.<preset>()`` at --sparsity and
    --seed (``--preset`` left out: the default preset)."""
    argv = ["search", "--sparsity", "0.5", "--out", "x"] + (["--preset", preset] if preset else [])
    cfg = search_config(cli.build_parser().parse_args(argv))
    assert cfg == dataclasses.replace(getattr(SearchConfig, preset or "default")(), target=0.5, seed=0)
    assert cfg.to_dict() == SearchConfig.from_preset(preset or "default", target=0.5).to_dict()


def test_search_flags_replace_single_fields_of_the_preset():
    args = cli.build_parser().parse_args([
        "search", "--sparsity", "0.6", "--out", "x", "--preset", "ci", "--seed", "3", "--gap", "capacity",
        "--loss", "ce", "--budget", "flops", "--generations", "5", "--population", "6",
        "--offspring", "7", "--screen", "0", "--survivors", "3", "--init", "uniform, owl", "--projector-every", "2",
        "--projector-steps", "9", "--fine-step", "0", "--select-rule", "min", "--guard", "none"])
    cfg = search_config(args, extra={"calib": 8})
    assert cfg == SearchConfig.from_preset("ci", target=0.6, seed=3, gap="capacity", loss_kind="ce",
                                           budget="flops", generations=5, population=6, offspring=7,
                                           screen_samples=0, survivors=3, init=("uniform", "owl"), projector_every=2,
                                           projector_steps=9, fine_step=0.0, select_rule="min", guard="none",
                                           extra={"calib": 8})
    assert cfg.levels == cfg.grid
    off = search_config(cli.build_parser().parse_args(["search", "--sparsity", "0.6", "--out", "x",
                                                           "--preset", "paper", "--no-projector"]))
    assert off == SearchConfig.from_preset("paper", target=0.6, projector_every=0)
