"""Tables from sweep rows (:mod:`sweep`): the main table (mean ± std over seeds), its display form,
the margins against each baseline (paired mean differences over seeds ± standard error), the ablations'
labels, and whether the searches converged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ellava_lib.core.stats import paired_mean_se
from ellava_lib.run.jobs import (
    ALL_METHODS,
    LABELS,
    SUITE_COLUMNS,
    SweepSpec,
    full_method_config,
)
from ellava_lib.search.convergence import CONVERGED, best_per_generation, late_improvement


def plain_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Rows of jobs without ablation overrides (no ``gap`` / ``projector`` override, not ``assembled``): the
    main table's jobs and the calibration-size ablation's."""
    plain = results["gap"].isna() & results["projector"].isna() & ~results["assembled"].astype(bool)
    return results[plain]


def ablation_label(row: Mapping[str, Any], spec: SweepSpec) -> str:
    """What a row of :func:`ablation_jobs` varies, in words."""
    if row["method"] == "search":
        return f"no gap term, no projector, n={row['calib_n']}"
    default_gap = full_method_config(spec, float(row["sparsity"])).gap
    gap = row["gap"] if isinstance(row.get("gap"), str) else default_gap
    parts = [f"gap={gap}"]
    if row.get("projector") is False or row.get("projector") == 0.0:
        parts.append("no projector")
    parts.append(f"n={row['calib_n']}")
    if row.get("assembled"):
        parts.append("assembled from the level database")
    return ", ".join(parts)


def _pm(mean: float, std: float, digits: int = 1) -> str:
    return f"{mean:.{digits}f}" if not np.isfinite(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def main_table(results: pd.DataFrame, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Method x sparsity rows: mean and sample std over seeds of each suite's test score, the mean test
    score, the calibration score and the gap (calibration - test). Columns ``<col>`` and ``<col>_std``."""
    cols = [c for c in (*SUITE_COLUMNS, "mean", "calib_mean", "gap_calib_test") if c in results.columns]
    grouped = results.groupby(["method", "sparsity"], sort=False)[cols]
    mean, std = grouped.mean(), grouped.std(ddof=1)
    table = mean.join(std.add_suffix("_std")).join(grouped.size().rename("seeds")).reset_index()
    order = {m: i for i, m in enumerate(methods or ALL_METHODS)}
    table = table[table["method"].isin(order)]
    table = table.assign(_o=table["method"].map(order)).sort_values(["sparsity", "_o"]).drop(columns="_o")
    return table.reset_index(drop=True)


def format_main_table(table: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """``mean ± std`` strings per column, display names, sparsity as a percentage (for Markdown / LaTeX)."""
    cols = [c for c in (*SUITE_COLUMNS, "mean", "calib_mean", "gap_calib_test") if c in table.columns]
    out = pd.DataFrame({"sparsity": [f"{s:.0%}" if s > 0 else "0%" for s in table["sparsity"]],
                        "method": [LABELS.get(m, m) for m in table["method"]]})
    for c in cols:
        out[c] = [_pm(m, s, digits) for m, s in zip(table[c], table[f"{c}_std"])]
    out["seeds"] = table["seeds"].values
    return out.rename(columns={"mean": "mean (test)", "calib_mean": "calib", "gap_calib_test": "gap"})


#: The baselines :func:`paired_margins` compares against by default (a baseline without rows is skipped).
MARGIN_BASELINES: tuple[str, ...] = ("sparsegpt", "wanda", "owl", "ecoflap", "llm_pruner", "search")


def paired_margins(results: pd.DataFrame, method: str = "ellava", baselines: Sequence[str] = MARGIN_BASELINES,
                   column: str = "mean") -> pd.DataFrame:
    """Per sparsity and baseline ``b``: the paired mean difference over seeds of ``column`` (the mean test score)
    and its standard error, from the per-seed rows of a sweep::

        d_i = x_{method, i} - x_{b, i}    over the k seeds i both ran (same seed = same calibration draw)
        diff = mean(d),   se = sd(d) / sqrt(k)   (sample sd, ddof 1; NaN when k < 2)

    next to each side's mean and sample std over its seeds (``ours`` / ``ours_std``, ``baseline`` /
    ``baseline_std``) and ``method``'s share of the dense score (the >= 95% target at 50%). Rows pair on
    ``seed`` (and ``calib_n`` when present); only plain rows (:func:`plain_rows`) when the ablation columns exist.
    """
    rows_in = plain_rows(results) if {"gap", "projector", "assembled"} <= set(results.columns) else results
    keys = ["seed", *(["calib_n"] if "calib_n" in rows_in.columns else [])]
    dense = rows_in.loc[rows_in["method"] == "dense", column]
    dense_mean = float(dense.mean()) if len(dense) else float("nan")
    out = []
    for s, part in rows_in[rows_in["sparsity"] > 0].groupby("sparsity"):
        ours = part[part["method"] == method].groupby(keys)[column].mean()
        if ours.empty:
            continue
        for b in baselines:
            theirs = part[part["method"] == b].groupby(keys)[column].mean()
            pairs = pd.concat([ours.rename("a"), theirs.rename("b")], axis=1, join="inner").dropna()
            if pairs.empty:
                continue
            k = len(pairs)
            diff, se = paired_mean_se(pairs["a"].tolist(), pairs["b"].tolist())
            out.append({"sparsity": f"{s:.0%}", "baseline": LABELS.get(b, b), "k": k,
                        "ours": float(ours.mean()), "ours_std": float(ours.std(ddof=1)) if len(ours) > 1 else np.nan,
                        "baseline_score": float(theirs.mean()),
                        "baseline_std": float(theirs.std(ddof=1)) if len(theirs) > 1 else np.nan,
                        "mean_diff": diff, "se": se,
                        "share_of_dense_%": 100 * float(ours.mean()) / dense_mean})
    return pd.DataFrame(out)


#: The baselines whose allocations start the search (uniform SparseGPT, OWL, ECoFLaP: ``SearchConfig.init``).
START_BASELINES: tuple[str, ...] = ("sparsegpt", "owl", "ecoflap")

#: The table method of each start policy name of ``SearchConfig.init`` (a searched row's ``start_pick``).
START_METHODS: dict[str, str] = {"uniform": "sparsegpt", "owl": "owl", "ecoflap": "ecoflap"}

#: Baselines whose calib - test gap EfficientLLaVA's is compared with (the methods that select nothing on calib).
GAP_BASELINES: tuple[str, ...] = ("sparsegpt", "wanda", "owl", "ecoflap", "llm_pruner")


def _holds(diff: float, se: float) -> bool:
    return bool(diff >= -se) if np.isfinite(se) else bool(diff >= 0)


def search_vs_starts(results: pd.DataFrame, method: str = "search",
                     starts: Sequence[str] = START_BASELINES) -> pd.DataFrame:
    """Per sparsity: ``method`` against its best start, paired over seeds, and ``holds`` = ``mean_diff >= -se``
    (never below its best start by more than the paired standard error)::

        d_i = x_{method, i} - x_{b_i, i},   diff = mean(d),   se = sd(d) / sqrt(k)   (ddof 1)

    The best start ``b_i`` of seed ``i`` is the one the search itself ranked best: the start policy with the
    lowest ``R_hat`` on that draw's selection rows (the searched row's ``start_pick``, mapped to its table method by
    :data:`START_METHODS`), i.e. the policy the search would have returned without evolving. It is chosen without
    the test split, so the check compares the search with what it started from, not with the start that happened
    to score best on test. ``best_start`` lists the picks (``"OWL x2, SparseGPT"``); a seed whose pick has no row
    of its baseline in ``results`` is left out, and a sparsity where no seed pairs gets ``k = 0``, ``holds`` None and
    ``best_start`` naming the missing baselines (``"ECoFLaP (no row)"``). Results without a
    ``start_pick`` column (made before it was recorded) fall back to the start with the highest mean test score
    over seeds (:func:`paired_margins`), marked ``"(by test)"``. ``kept_start`` (where the rows have that column):
    how many of the k seeds' searches returned their start pick, because the best candidate's gain on the selection
    rows was within one standard error (``SearchConfig.select_rule``) or because the task guard kept the start
    (``SearchConfig.guard``, :mod:`ellava_lib.search.final_pick`)."""
    rows_in = plain_rows(results) if {"gap", "projector", "assembled"} <= set(results.columns) else results
    if "start_pick" not in rows_in.columns:
        return _search_vs_best_on_test(results, method, starts)
    keys = ["seed", *(["calib_n"] if "calib_n" in rows_in.columns else [])]
    out = []
    for s, part in rows_in[rows_in["sparsity"] > 0].groupby("sparsity"):
        ours = part[part["method"] == method]
        mine, picks, base, unpaired, kept = [], [], [], [], []
        for _, row in ours.iterrows():
            theirs_method = START_METHODS.get(str(row["start_pick"]))
            if theirs_method is None or theirs_method not in starts:
                continue
            match = part[(part["method"] == theirs_method)
                         & np.logical_and.reduce([part[k] == row[k] for k in keys])]["mean"]
            if match.empty:  # the picked start's baseline is not in the table (e.g. not a table method)
                unpaired.append(LABELS.get(theirs_method, theirs_method))
                continue
            mine.append(float(row["mean"]))
            kept.append(bool(row["kept_start"]) if "kept_start" in row.index and pd.notna(row["kept_start"]) else None)
            picks.append(LABELS.get(theirs_method, theirs_method))
            base.append(float(match.mean()))
        if not mine:
            if unpaired:
                out.append({"sparsity": f"{s:.0%}", "method": LABELS.get(method, method),
                            "best_start": ", ".join(f"{n} (no row)" for n in dict.fromkeys(unpaired)), "k": 0,
                            "ours": float(ours["mean"].mean()), "best_start_score": np.nan, "mean_diff": np.nan,
                            "se": np.nan, "holds": None})
            continue
        k = len(mine)
        diff, se = paired_mean_se(mine, base)
        counts = pd.Series(picks).value_counts(sort=False)
        label = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in counts.items())
        out.append({"sparsity": f"{s:.0%}", "method": LABELS.get(method, method), "best_start": label, "k": k,
                    "ours": float(ours["mean"].mean()), "best_start_score": float(np.mean(base)),
                    "mean_diff": diff, "se": se, "holds": _holds(diff, se),
                    **({"kept_start": f"{sum(kept)}/{k}"} if None not in kept else {})})
    return pd.DataFrame(out)


def _search_vs_best_on_test(results: pd.DataFrame, method: str, starts: Sequence[str]) -> pd.DataFrame:
    """:func:`search_vs_starts` for results without ``start_pick``: the start with the highest mean test score."""
    margins = paired_margins(results, method, starts)
    out = []
    for s, part in margins.groupby("sparsity", sort=False):
        best = part.loc[part["baseline_score"].idxmax()]
        out.append({"sparsity": s, "method": LABELS.get(method, method), "best_start": f"{best['baseline']} (by test)",
                    "k": int(best["k"]), "ours": best["ours"], "best_start_score": best["baseline_score"],
                    "mean_diff": best["mean_diff"], "se": best["se"], "holds": _holds(best["mean_diff"], best["se"])})
    return pd.DataFrame(out)


def gap_vs_baselines(results: pd.DataFrame, method: str = "ellava", baselines: Sequence[str] = GAP_BASELINES,
                     column: str = "gap_calib_test", tolerance: float = 2.0) -> pd.DataFrame:
    """Per sparsity: ``method``'s mean calib - test gap over seeds next to the range ``[lo, hi]`` of the
    baselines' mean gaps; ``holds`` = ``lo - tolerance <= gap <= hi + tolerance`` (within ``tolerance`` points
    of the baselines' gaps)."""
    rows_in = plain_rows(results) if {"gap", "projector", "assembled"} <= set(results.columns) else results
    out = []
    for s, part in rows_in[rows_in["sparsity"] > 0].groupby("sparsity"):
        ours = part.loc[part["method"] == method, column]
        theirs = part[part["method"].isin(baselines)].groupby("method")[column].mean()
        if ours.empty or theirs.empty:
            continue
        gap, lo, hi = float(ours.mean()), float(theirs.min()), float(theirs.max())
        out.append({"sparsity": f"{s:.0%}", "method": LABELS.get(method, method), "gap": gap,
                    "baselines_min": lo, "baselines_max": hi,
                    "holds": bool(lo - tolerance <= gap <= hi + tolerance)})
    return pd.DataFrame(out)


def convergence_table(results: pd.DataFrame, histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> pd.DataFrame:
    """Per (method, sparsity) of the plain searched rows of ``results`` whose search history is in ``histories``
    (``{job: rows of its history.csv}``): ``searches``; ``converged``, how many of them improved their best ``J``
    by less than :data:`~ellava_lib.search.convergence.CONVERGED` over the last quarter of their generations
    (:func:`~ellava_lib.search.convergence.late_improvement` of
    :func:`~ellava_lib.search.convergence.best_per_generation`), as ``"k/n"``; ``late_max``, the largest of those
    improvements; ``generations_min`` and ``generations``, the fewest and the most generations a search ran (they
    differ when searches run on until converged, ``SearchConfig.max_generations``); ``evaluations``, the candidates
    scored per search (history rows, mean); and ``search_s``, the rows' seconds of search (mean). Empty when no
    searched row has a history."""
    rows_in = plain_rows(results) if {"gap", "projector", "assembled"} <= set(results.columns) else results
    out = []
    for (method, s), part in rows_in[rows_in["job"].isin(list(histories))].groupby(["method", "sparsity"]):
        late, gens, evals = [], [], []
        for job in part["job"]:
            best = best_per_generation(histories[job])
            late.append(late_improvement(best))
            gens.append(len(best) - 1)
            evals.append(len(histories[job]))
        out.append({"method": LABELS.get(method, method), "sparsity": f"{s:.0%}", "searches": len(late),
                    "converged": f"{sum(x < CONVERGED for x in late)}/{len(late)}", "late_max": max(late),
                    "generations_min": int(np.min(gens)), "generations": int(np.max(gens)),
                    "evaluations": float(np.mean(evals)),
                    "search_s": float(part["search_s"].mean()) if "search_s" in part.columns else np.nan})
    return pd.DataFrame(out, columns=["method", "sparsity", "searches", "converged", "late_max", "generations_min",
                                      "generations", "evaluations", "search_s"])


def format_convergence(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`convergence_table` for display: ``late_max`` as a percentage with one decimal, ``generations`` as
    ``"min-max"`` (one number when every search ran as many), ``evaluations`` and ``search_s`` rounded to whole
    numbers."""
    spans = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in zip(table["generations_min"], table["generations"])]
    return table.assign(late_max=table["late_max"].map(lambda x: f"{100 * x:.1f}%"), generations=spans,
                        evaluations=table["evaluations"].map(lambda x: f"{x:.0f}"),
                        search_s=table["search_s"].map(lambda x: f"{x:.0f}")).drop(columns="generations_min")
