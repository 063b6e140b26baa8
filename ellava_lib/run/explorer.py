"""An explorer of a run's sweep (``runs/<profile>/sweep``): per-suite scores and the per-unit sparsity profile
of a (method, sparsity), and dense vs pruned answers on test items.

:func:`explorer_widget` is the ipywidgets version for JupyterLab; :func:`static_view` is what the same
choice looks like as a table and a figure, for headless runs (papermill, nbval) where widgets do not render.

With a results ledger (:mod:`ledger`) the jobs the run folder lacks come from the ledger's rows (:func:`load_results`:
scores and policies; a fresh clone's run folder holds no job of a sweep whose rows are all in the ledger). Their
answers are not in the ledger: the per-answer view of such a job is a one-line note (:func:`changed_answers`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from ellava_lib.run import ledger
from ellava_lib.run.jobs import LABELS, SUITE_COLUMNS
from ellava_lib.run.tables import plain_rows


def load_results(sweep_dir: str | Path, ledger_dir: str | Path | None = None) -> pd.DataFrame:
    """The rows of every finished job of a sweep folder (``jobs/*/row.json``), in job-name order; with
    ``ledger_dir`` also the ledger's rows (:func:`ledger.entries`) of the jobs the folder lacks, each with its
    ``policy`` (a dict; None for dense) and ``source`` ``"ledger"`` (``"run"`` for the folder's), and a one-line
    note saying how many came from there and that their answers need the run folder."""
    rows = {p.parent.name: {**json.loads(p.read_text()), "source": "run"}
            for p in sorted(Path(sweep_dir).glob("jobs/*/row.json"))}
    taken = 0
    for entry in [] if ledger_dir is None else ledger.entries(Path(ledger_dir)):
        if entry["key"] not in rows:
            rows[entry["key"]] = {**entry["row"], "policy": entry["policy"], "source": "ledger"}
            taken += 1
    if not rows:
        where = sweep_dir if ledger_dir is None else f"{sweep_dir} nor in the ledger {ledger_dir}"
        raise FileNotFoundError(f"no finished sweep jobs under {where}: run notebooks/05_main_table.ipynb first")
    if taken:
        print(f"explorer: {taken} of {len(rows)} jobs from the ledger {ledger_dir} (scores and policies only): "
              f"per-answer views need the run folder's jobs ({Path(sweep_dir) / 'jobs'})", flush=True)
    return pd.DataFrame([rows[k] for k in sorted(rows)])


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


def _hit(results: pd.DataFrame, method: str, sparsity: float, seed: int) -> pd.Series:
    """The row of the main-table job (method, sparsity, seed)."""
    rows = plain_rows(results)
    hit = rows[(rows["method"] == method) & ((rows["sparsity"] - sparsity).abs() < 1e-9) & (rows["seed"] == seed)]
    if hit.empty:
        raise ValueError(f"no finished job for {method} at {sparsity:.0%} with seed {seed}")
    return hit.iloc[0]


def job_dir(sweep_dir: str | Path, results: pd.DataFrame, method: str, sparsity: float, seed: int) -> Path:
    return Path(sweep_dir) / "jobs" / _hit(results, method, sparsity, seed)["job"]


def profile(sweep_dir: str | Path, results: pd.DataFrame, method: str, sparsity: float, seed: int) -> pd.Series:
    """Per-unit sparsity of the job's policy (model order): the run folder's ``policy.json``, else its ledger
    row's policy."""
    path = job_dir(sweep_dir, results, method, sparsity, seed) / "policy.json"
    if path.is_file():
        policy = json.loads(path.read_text())
    else:
        policy = _hit(results, method, sparsity, seed).get("policy")
        if not isinstance(policy, dict):
            raise FileNotFoundError(f"no policy of {method} at {sparsity:.0%} with seed {seed}: {path} is missing")
    return pd.Series(policy["sparsities"], name=LABELS.get(method, method))


def answers(sweep_dir: str | Path, results: pd.DataFrame, method: str, sparsity: float, seed: int,
            suite: str | None = None) -> pd.DataFrame:
    """Test items with the dense and the pruned model's predictions side by side (``differs`` marks changes).
    ``FileNotFoundError`` saying the answers need the run folder when a job's predictions are not there (its row
    came from the ledger)."""
    def read(d: Path) -> pd.DataFrame:
        path = d / "test" / "predictions.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no answers of {d.name}: per-answer views need the run folder's job ({path}); "
                                    f"its row came from the ledger (run the sweep here for them)")
        return pd.read_json(path, lines=True)

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


def changed_answers(sweep_dir: str | Path, results: pd.DataFrame, method: str, sparsity: float, seed: int,
                    limit: int = 10) -> pd.DataFrame | None:
    """Prints how many test answers changed after pruning and returns the first ``limit`` of them
    (:func:`answers`); None, with a one-line note instead, when the run folder lacks the answers."""
    try:
        both = answers(sweep_dir, results, method, sparsity, seed)
    except FileNotFoundError as e:
        print(e)
        return None
    print(f"{int(both['differs'].sum())} of {len(both)} test answers changed after pruning")
    return both[both["differs"]].head(limit)


def static_view(sweep_dir: str | Path, method: str, sparsity: float, seed: int = 0,
                results: pd.DataFrame | None = None) -> tuple[pd.DataFrame, Any]:
    """The explorer's content for one choice, as (scores table, profile figure); ``results``: the rows
    (:func:`load_results`; default: the sweep folder's)."""
    results = load_results(sweep_dir) if results is None else results
    return scores(results, method, sparsity), profile_figure(profile(sweep_dir, results, method, sparsity, seed))


def explorer_widget(sweep_dir: str | Path, results: pd.DataFrame | None = None):
    """Dropdowns for method / sparsity / seed / suite; shows scores, the profile, and changed answers
    (``results``: as in :func:`static_view`)."""
    import ipywidgets as w
    from IPython.display import display

    results = load_results(sweep_dir) if results is None else results
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
