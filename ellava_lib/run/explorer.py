"""An explorer of a run's sweep (``runs/<profile>/sweep``): per-suite scores and the per-unit sparsity profile
of a (method, sparsity), and dense vs pruned answers on test items.

:func:`explorer_widget` is the ipywidgets version for JupyterLab; :func:`static_view` is what the same
choice looks like as a table and a figure, for headless runs (papermill, nbval) where widgets do not render.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from ellava_lib.run.jobs import LABELS, SUITE_COLUMNS
from ellava_lib.run.tables import plain_rows


def load_results(sweep_dir: str | Path) -> pd.DataFrame:
    """The rows of every finished job of a sweep folder (``jobs/*/row.json``), main-table jobs first."""
    rows = [json.loads(p.read_text()) for p in sorted(Path(sweep_dir).glob("jobs/*/row.json"))]
    if not rows:
        raise FileNotFoundError(f"no finished sweep jobs under {sweep_dir}: run notebooks/05_main_table.ipynb first")
    return pd.DataFrame(rows)


def choices(results: pd.DataFrame) -> dict[str, list]:
    """Methods (display name -> key, in table order) and sparsities available among the main-table jobs."""
    rows = plain_rows(results)
    methods = [m for m in LABELS if m in set(rows["method"]) and m != "dense"]
    sparsities = sorted(float(s) for s in rows.loc[rows["method"] != "dense", "sparsity"].unique())
    return {"methods": methods, "sparsities": sparsities,
            "seeds": sorted(int(s) for s in rows["seed"].unique())}


def scores(results: pd.DataFrame, method: str, sparsity: float) -> pd.DataFrame:
    """Per-suite test score (and mean, calibration score, gap): dense and the chosen method, mean over seeds."""
    rows = plain_rows(results)
    cols = [c for c in (*SUITE_COLUMNS, "mean", "calib_mean", "gap_calib_test") if c in rows.columns]
    at = (rows["method"] == method) & ((rows["sparsity"] - sparsity).abs() < 1e-9)
    pick = rows[at | (rows["method"] == "dense")]
    if not (pick["method"] == method).any():
        raise ValueError(f"no finished job for {method} at {sparsity:.0%}")
    out = pick.groupby("method", sort=False)[cols].mean()
    out.index = [LABELS.get(m, m) + ("" if m == "dense" else f" {sparsity:.0%}") for m in out.index]
    return out.round(2)


def job_dir(sweep_dir: str | Path, results: pd.DataFrame, method: str, sparsity: float, seed: int) -> Path:
    rows = plain_rows(results)
    hit = rows[(rows["method"] == method) & ((rows["sparsity"] - sparsity).abs() < 1e-9) & (rows["seed"] == seed)]
    if hit.empty:
        raise ValueError(f"no finished job for {method} at {sparsity:.0%} with seed {seed}")
    return Path(sweep_dir) / "jobs" / hit.iloc[0]["job"]


def profile(sweep_dir: str | Path, results: pd.DataFrame, method: str, sparsity: float, seed: int) -> pd.Series:
    """Per-unit sparsity of the job's policy (model order)."""
    path = job_dir(sweep_dir, results, method, sparsity, seed) / "policy.json"
    return pd.Series(json.loads(path.read_text())["sparsities"], name=LABELS.get(method, method))


def answers(sweep_dir: str | Path, results: pd.DataFrame, method: str, sparsity: float, seed: int,
            suite: str | None = None) -> pd.DataFrame:
    """Test items with the dense and the pruned model's predictions side by side (``differs`` marks changes)."""
    def read(d: Path) -> pd.DataFrame:
        return pd.read_json(d / "test" / "predictions.jsonl", lines=True)

    dense = read(job_dir(sweep_dir, results, "dense", 0.0, seed))
    pruned = read(job_dir(sweep_dir, results, method, sparsity, seed))
    both = dense.merge(pruned[["id", "prediction"]], on="id", suffixes=("_dense", "_pruned"))
    if suite is not None:
        both = both[both["suite"] == suite]
    both["differs"] = both["prediction_dense"] != both["prediction_pruned"]
    return both[["id", "suite", "question", "answer", "prediction_dense", "prediction_pruned", "differs"]]


def profile_figure(prof: pd.Series, title: str = ""):
    fig, ax = plt.subplots(figsize=(8, 2.8))
    ax.bar(range(len(prof)), 100 * prof.values)
    ax.set_xticks(range(len(prof)), prof.index, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("unit sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or f"{prof.name}: per-unit sparsity")
    fig.tight_layout()
    return fig


def static_view(sweep_dir: str | Path, method: str, sparsity: float, seed: int = 0) -> tuple[pd.DataFrame, Any]:
    """The explorer's content for one choice, as (scores table, profile figure)."""
    results = load_results(sweep_dir)
    return scores(results, method, sparsity), profile_figure(profile(sweep_dir, results, method, sparsity, seed))


def explorer_widget(sweep_dir: str | Path):
    """Dropdowns for method / sparsity / seed / suite; shows scores, the profile, and changed answers."""
    import ipywidgets as w
    from IPython.display import display

    results = load_results(sweep_dir)
    opts = choices(results)
    method = w.Dropdown(options=[(LABELS[m], m) for m in opts["methods"]], description="method")
    sparsity = w.Dropdown(options=[(f"{s:.0%}", s) for s in opts["sparsities"]], description="sparsity")
    seed = w.Dropdown(options=opts["seeds"], description="seed")
    suite = w.Dropdown(options=[("all", None)] + [(s, s) for s in SUITE_COLUMNS], description="suite")
    only_changed = w.Checkbox(value=True, description="only answers that changed")
    out = w.Output()

    def refresh(*_: Any) -> None:
        out.clear_output(wait=True)
        with out:
            try:
                display(scores(results, method.value, sparsity.value))
                fig = profile_figure(profile(sweep_dir, results, method.value, sparsity.value, seed.value))
                plt.show()
                plt.close(fig)
                table = answers(sweep_dir, results, method.value, sparsity.value, seed.value, suite.value)
                display(table[table["differs"]] if only_changed.value else table)
            except (ValueError, FileNotFoundError) as e:
                print(e)

    for control in (method, sparsity, seed, suite, only_changed):
        control.observe(refresh, names="value")
    refresh()
    return w.VBox([w.HBox([method, sparsity, seed]), w.HBox([suite, only_changed]), out])
