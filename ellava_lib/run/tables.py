"""Tables from sweep rows (:mod:`sweep`): the main table (mean ± std over seeds), its display form,
the margins against the issue's targets, and the ablations' labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ellava_lib.run.sweep import (
    ALL_METHODS,
    LABELS,
    SUITE_COLUMNS,
    SweepSpec,
    full_method_config,
)


def plain_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Rows of jobs without ablation overrides (no ``gap`` / ``projector`` override, not ``exact``): the
    main table's jobs and the calibration-size ablation's."""
    plain = results["gap"].isna() & results["projector"].isna() & ~results["exact"].astype(bool)
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
    if row.get("exact"):
        parts.append("exact re-prune")
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


def best_baseline_margin(table: pd.DataFrame, method: str = "ellava",
                         baselines: Sequence[str] = ("sparsegpt", "wanda", "owl", "ecoflap", "search")) -> pd.DataFrame:
    """Per sparsity: ``method``'s mean test score minus the best of ``baselines`` (the issue's +2 target), and
    its share of the dense score (the >= 95% target at 50%)."""
    dense = table.loc[table["method"] == "dense", "mean"]
    dense_mean = float(dense.iloc[0]) if len(dense) else float("nan")
    rows = []
    for s, part in table[table["sparsity"] > 0].groupby("sparsity"):
        ours = part.loc[part["method"] == method, "mean"]
        base = part[part["method"].isin(baselines)]
        if ours.empty or base.empty:
            continue
        best = base.loc[base["mean"].idxmax()]
        rows.append({"sparsity": f"{s:.0%}", "ours": float(ours.iloc[0]), "best_baseline": LABELS.get(best["method"]),
                     "best_baseline_score": float(best["mean"]), "margin": float(ours.iloc[0]) - float(best["mean"]),
                     "share_of_dense_%": 100 * float(ours.iloc[0]) / dense_mean})
    return pd.DataFrame(rows)
