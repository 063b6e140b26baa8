from __future__ import annotations

import pandas as pd
import pytest

from ellava_lib.run import explorer, sweep
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
