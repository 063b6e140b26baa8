from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from ellava_lib.run import explorer, ledger, sweep
from ellava_lib.run.jobs import Job, SweepSpec


@pytest.fixture(scope="module")
def sweep_dir(micro_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    jobs = [Job("dense", 0.0, 0, 8), Job("magnitude", 0.5, 0, 8), Job("wanda", 0.5, 0, 8), Job("wanda", 0.7, 0, 8)]
    sweep.run_sweep(SweepSpec(str(micro_model_dir), eval_limit=3), jobs, out, progress=False)
    return out


def test_views_of_one_choice(sweep_dir):
    results = explorer.load_results(sweep_dir)
    assert explorer.choices(results) == {"methods": ["magnitude", "wanda"], "sparsities": [0.5, 0.7], "seeds": [0]}
    table = explorer.scores(results, "wanda", 0.7)
    assert list(table.index) == ["dense", "Wanda 70%"] and "mean" in table.columns
    prof = explorer.profile(sweep_dir, results, "wanda", 0.5, 0)
    assert len(prof) > 0 and (prof == 0.5).all()
    both = explorer.answers(sweep_dir, results, "magnitude", 0.5, 0)
    assert len(both) == 12 and set(both["suite"]) == {"sqa", "vizwiz", "mmvet", "llavabench"}
    assert (both["differs"] == (both["prediction_dense"] != both["prediction_pruned"])).all()
    with pytest.raises(ValueError, match="no finished job for Wanda|no finished job for wanda"):
        explorer.scores(results, "wanda", 0.6)
    table2, fig = explorer.static_view(sweep_dir, "magnitude", 0.5)
    assert isinstance(table2, pd.DataFrame) and fig.axes


def test_widget_reacts_to_choices(sweep_dir):
    ui = explorer.explorer_widget(sweep_dir)
    method, sparsity, _ = ui.children[0].children
    assert [v for _, v in method.options] == ["magnitude", "wanda"]
    method.value = "wanda"
    sparsity.value = 0.7  # observers re-render without raising
    assert ui.children[2].outputs is not None


def test_missing_sweep_names_the_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="05_main_table"):
        explorer.load_results(tmp_path)


def test_jobs_the_run_folder_lacks_come_from_the_ledger(sweep_dir, tmp_path, capsys):
    """A fresh clone: the run folder holds the dense job only, the ledger every row with its policy; scores and
    profiles are the run folder's, the answers a one-line note."""
    folder, fresh = tmp_path / "results", tmp_path / "sweep"
    for job in sorted((sweep_dir / "jobs").iterdir()):
        policy = job / "policy.json"
        ledger.write(folder, ledger.make_row(job.name, "digest", {}, json.loads((job / "row.json").read_text()),
                                             json.loads(policy.read_text()) if policy.is_file() else None, None))
    shutil.copytree(sweep_dir / "jobs" / "dense-0.00-s0-n8", fresh / "jobs" / "dense-0.00-s0-n8")
    capsys.readouterr()
    results, whole = explorer.load_results(fresh, folder), explorer.load_results(sweep_dir)
    assert capsys.readouterr().out.startswith("explorer: 3 of 4 jobs from the ledger")
    assert list(results["source"]) == ["run", "ledger", "ledger", "ledger"]
    pd.testing.assert_frame_equal(explorer.scores(results, "wanda", 0.7), explorer.scores(whole, "wanda", 0.7))
    pd.testing.assert_series_equal(explorer.profile(fresh, results, "wanda", 0.5, 0),
                                   explorer.profile(sweep_dir, whole, "wanda", 0.5, 0))
    assert explorer.changed_answers(fresh, results, "wanda", 0.5, 0) is None
    assert "per-answer views need the run folder" in capsys.readouterr().out
    assert len(explorer.changed_answers(sweep_dir, whole, "wanda", 0.5, 0, limit=100)) <= 12
    explorer.explorer_widget(fresh, results)  # the answers' note instead of a table, no error
