"""``ellava sweep``: the jobs of notebooks 05 / 06 under a profile, one-line errors, exit 1 on a failed job."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ellava_lib import cli
from ellava_lib.cli import sweep as cli_sweep
from ellava_lib.run import backends, pipeline, sweep
from ellava_lib.run.jobs import SweepSpec
from tests.helpers import exit_code

ROOT = Path(__file__).resolve().parents[1]


def _args(*argv: str):
    return cli.build_parser().parse_args(["sweep", *argv])


@pytest.mark.parametrize("argv,needle", [
    (["--profile", "nope"], "unknown profile 'nope'"),
    (["--profile", "ci", "--methods", "dense", "nope"], "unknown method nope"),
    (["--profile", "ci", "--sparsities", "0.5", "1.0"], "sparsity must be in [0, 1), got 1.0"),
    (["--profile", "ci", "--sparsities", "nan"], "sparsity must be in [0, 1), got nan"),
    (["--profile", "ci", "--seeds", "x"], "invalid int value"),
    (["--profile", "ci", "--retries", "-1"], "must be a non-negative integer"),
    (["--profile", "ci", "--backend", "ray"], 'needs Ray: pip install "ellava[ray]"'),
    (["--profile", "ci", "--address", "auto"], "--address needs --backend ray"),
    (["--profile", "ci", "--backend", "slurm"], "invalid choice"),
    (["--profile", "ci", "--readme"], "--readme goes with --status"),
    (["--profile", "ci", "--status"], "--status reads the results ledger: this profile has none"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    out = tmp_path / "run"
    assert exit_code(lambda: cli.main(["sweep", "--out", str(out), "--quiet", *argv])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ellava: error:") and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert not out.exists()


def test_the_run_folder_is_required_unless_status(capsys):
    assert exit_code(lambda: cli.main(["sweep", "--profile", "ci", "--quiet"])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out is required (the run folder), unless --status" in err, err


def test_notebook_defaults_are_the_parameters_cell():
    got = pipeline.notebook_defaults(ROOT / "notebooks" / "05_main_table.ipynb")
    assert got["sweep_eval_limit"] == 64 and got["calib_n"] == 64 and got["search"] == {}
    assert got["table_methods"][0] == "dense" and "run_dir" in got


def _code(notebook: str) -> str:
    nb = json.loads((ROOT / "notebooks" / notebook).read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def test_the_notebooks_build_spec_and_jobs_as_the_cli_does():
    """If a notebook changes how it builds its sweep, this fails: ``cli.sweep.cmd_sweep`` / ``sweep_jobs`` must
    follow."""
    spec_line = ('spec = sweep.SweepSpec(model_info["model_dir"], sweep_eval_limit or None, '
                 'search_preset=search_preset, search=search, ellava=ellava, tier=model_info.get("tier", {}))')
    main, ablations = _code("05_main_table.ipynb"), _code("06_ablations.ipynb")
    assert spec_line in main and spec_line in ablations
    assert "jobs = sweep.jobs_grid(table_methods, sparsities, seeds, calib_n)" in main
    assert "jobs = sweep.ablation_jobs(spec, sparsity, seed, calib_n, gaps, calib_ns)" in ablations
    assert ('sweep.run_sweep(spec, jobs, run.path("sweep"), workers=workers, threads=job_threads, '
            'ledger_dir=ledger or None)') in main
    assert 'record = tiers.model_record(tier_cfg, train_preset, force_rebuild)' in _code("01_tiny_model.ipynb")


@pytest.mark.parametrize("profile", ["ci", "default", "paper"])
def test_a_profile_sweeps_the_notebooks_jobs(profile):
    values = pipeline.load_profile(profile)
    params = cli_sweep.sweep_params(_args("--profile", profile, "--out", "x"))
    assert all(params[k] == v for k, v in values.items())
    spec = SweepSpec("m", params["sweep_eval_limit"] or None, search_preset=params["search_preset"],
                     search=params.get("search") or {}, ellava=params.get("ellava") or {})
    main = sweep.jobs_grid(values["table_methods"], values["sparsities"], values["seeds"], values["calib_n"])
    abl = sweep.ablation_jobs(spec, values["sparsity"], values["seeds"][0], values["calib_n"], values["gaps"],
                              values["calib_ns"])
    assert cli_sweep.sweep_jobs(spec, params, "main") == main and cli_sweep.sweep_jobs(spec, params, "ablations") == abl
    both = cli_sweep.sweep_jobs(spec, params, "all")
    assert [j.name() for j in both] == list(dict.fromkeys(j.name() for j in main + abl))
    flags = cli_sweep.sweep_params(_args("--profile", profile, "--out", "x", "--methods", "dense,wanda", "--sparsities",
                                   "0.5", "--seeds", "3", "4", "--workers", "3"))
    cli_sweep.check_sweep_params(flags)
    assert (flags["table_methods"], flags["sparsities"], flags["seeds"], flags["workers"]) == \
        (["dense", "wanda"], [0.5], [3, 4], 3)
    assert cli_sweep.sweep_jobs(spec, flags, "ablations")[0].seed == 3  # the ablations run at the first seed


MICRO_PROFILE = {"sweep_eval_limit": 2, "calib_n": 8, "sparsities": [0.5], "seeds": [0],
                 "table_methods": ["dense", "magnitude"], "search_preset": "ci", "sparsity": 0.5, "gaps": ["none"],
                 "calib_ns": [8], "workers": 1, "train_preset": "micro"}


def test_sweep_command_fails_a_job_exits_1_then_resumes(micro_model_dir, tmp_path, capsys, monkeypatch):
    root = tmp_path / "project"
    (root / "profiles").mkdir(parents=True)
    (root / "notebooks").symlink_to(ROOT / "notebooks")
    (root / "profiles" / "micro.yaml").write_text(yaml.safe_dump(MICRO_PROFILE))
    record = {"model_dir": str(micro_model_dir), "preset": "micro", "tier": {}}
    calls = []
    monkeypatch.setattr("ellava_lib.run.tier.model_record", lambda tier, preset: calls.append((tier, preset))
                        or record)  # what notebook 01 records (the micro model is built already)
    run = tmp_path / "run"
    argv = ["sweep", "--profile", "micro", "--root", str(root), "--out", str(run), "--what", "main", "--quiet"]
    monkeypatch.setenv(backends.TEST_FAIL_ENV, "magnitude-0.50-s0-n8")
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "ellava: failed: magnitude-0.50-s0-n8: RuntimeError: ELLAVA_TEST_FAIL_JOB" in err
    assert json.loads((run / "model.json").read_text()) == record and calls[0][1] == "micro"
    assert pd.read_csv(run / "sweep" / "results.csv")["job"].tolist() == ["dense-0.00-s0-n8"]
    assert json.loads((run / "sweep" / "failed.json").read_text())[0]["job"] == "magnitude-0.50-s0-n8"
    monkeypatch.delenv(backends.TEST_FAIL_ENV)
    assert cli.main(argv) == 0
    assert "2 rows in" in capsys.readouterr().out
    assert len(calls) == 1  # model.json is read back, not made again
    assert pd.read_csv(run / "sweep" / "results.csv")["job"].tolist() == ["dense-0.00-s0-n8", "magnitude-0.50-s0-n8"]
    assert not (run / "sweep" / "failed.json").exists()
