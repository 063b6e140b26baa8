"""Plots the notebooks show (matplotlib figures returned, never shown or saved here)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from ellava_lib.core.schema import Sample

matplotlib.rcParams.setdefault("figure.dpi", 100)


def example_grid(examples: dict[str, list[Sample]], per_suite: int = 4):
    """Images of a few items per suite with their question and reference answer."""
    suites = list(examples)
    fig, axes = plt.subplots(len(suites), per_suite, figsize=(3.2 * per_suite, 3.3 * len(suites)), squeeze=False)
    for r, suite in enumerate(suites):
        for c in range(per_suite):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(examples[suite]):
                continue
            s = examples[suite][c]
            ax.imshow(s.image, interpolation="nearest")
            title = f"[{suite}/{s.category}] {s.question}\n-> {s.answer}"
            ax.set_title("\n".join(textwrap.wrap(title, 34)[:4]), fontsize=7)
    fig.tight_layout()
    return fig


def training_curves(log: pd.DataFrame):
    """Loss per step for each training stage and loss term."""
    stages = list(dict.fromkeys(log["stage"]))
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        part = log[log["stage"] == stage]
        for col in [c for c in part.columns if c not in ("stage", "step") and part[c].notna().any()]:
            ax.plot(part["step"], part[col].rolling(10, min_periods=1).mean(), label=col)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (10-step mean)")
        ax.set_title(f"stage: {stage}")
        ax.legend()
    fig.tight_layout()
    return fig


def method_bars(table: pd.DataFrame):
    """Grouped bars: score per suite (and the mean) for each method in a ``compare`` table."""
    cols = [c for c in table.columns if c != "method"]
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 3.4))
    width = 0.8 / len(table)
    for i, row in enumerate(table.itertuples(index=False)):
        xs = [j + i * width for j in range(len(cols))]
        ax.bar(xs, [getattr(row, c) for c in cols], width, label=row.method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols)
    ax.set_ylabel("test score (0-100)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Tiny LLaVA on the synthetic suites")
    fig.tight_layout()
    return fig


def pareto(table: pd.DataFrame, labels: dict[str, str] | None = None):
    """Mean test score (± std over seeds) against mean LM sparsity and against relative prefill FLOPs,
    one line per method; ``table`` is :func:`tables.main_table` joined with ``flops_rel``."""
    labels = labels or {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    dense = table[table["method"] == "dense"]
    for method, part in table[table["method"] != "dense"].groupby("method", sort=False):
        part = part.sort_values("sparsity")
        for ax, x in zip(axes, (part["sparsity"] * 100, part["flops_rel"] * 100)):
            ax.errorbar(x, part["mean"], yerr=part["mean_std"].fillna(0), marker="o", capsize=3,
                        label=labels.get(method, method))
    for ax in axes:
        if len(dense):
            ax.axhline(float(dense["mean"].iloc[0]), color="k", ls="--", lw=1, label="dense")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("mean language-model sparsity (%)")
    axes[1].set_xlabel("prefill FLOPs relative to dense (%)")
    axes[1].invert_xaxis()
    axes[0].set_ylabel("mean test score (0-100)")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle("Score vs sparsity and vs FLOPs (mean ± std over seeds)")
    fig.tight_layout()
    return fig


def search_convergence(history: pd.DataFrame, projector_generations: Sequence[int] = ()):
    """Left: every candidate's ``J`` on all scoring rows per generation (history phases ``init`` and ``full``;
    ``screen`` scores fewer rows, ``lambda`` and ``select`` the selection rows) and the population's best, with a
    dotted line after each generation in ``projector_generations`` (a projector round: ``Showcase.projector_rounds``'
    ``generation``); right: the best candidate's ``R_hat`` and ``lambda G_hat`` (``J - R_hat``) per generation."""
    full = history[history["phase"].isin(["init", "full"])]
    best = full.loc[full.groupby("generation")["j"].idxmin()].sort_values("generation")
    best = best.assign(best_j=best["j"].cummin())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].scatter(full["generation"], full["j"], s=8, alpha=0.4, label="candidates")
    axes[0].plot(best["generation"], best["best_j"], color="C3", marker="o", label="best so far")
    if len(projector_generations):
        for g in sorted(projector_generations):
            axes[0].axvline(g + 0.5, color="C2", ls=":", lw=1)
        axes[0].plot([], [], color="C2", ls=":", label="projector evolved")
    axes[0].set_xlabel("generation")
    axes[0].set_ylabel("J = R_hat + lambda G_hat")
    axes[0].legend(fontsize=8)
    axes[1].plot(best["generation"], best["r_hat"], marker="o", label="R_hat (calibration loss)")
    axes[1].plot(best["generation"], best["j"] - best["r_hat"], marker="s", label="lambda G_hat (gap term)")
    axes[1].set_xlabel("generation")
    axes[1].set_ylabel("nats per answer token")
    axes[1].legend(fontsize=8)
    axes[1].set_title("the generation's best candidate")
    fig.tight_layout()
    return fig


def convergence_curve(history: pd.DataFrame):
    """The population's best ``J`` on all scoring rows after each generation (:func:`convergence.best_per_generation`:
    the running minimum over the phases ``init`` and ``full``, restarting at a projector round) with the last
    quarter of the generations shaded;
    returns ``(figure, late_improvement)`` (:func:`convergence.late_improvement`, also in the title: below
    :data:`convergence.CONVERGED` the search is taken to have converged)."""
    from ellava_lib.search.convergence import CONVERGED, best_per_generation, late_improvement, late_window

    best = best_per_generation(history.to_dict("records"))
    late = late_improvement(best)
    G = len(best) - 1
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(range(G + 1), best, color="C3", marker="o", ms=3, label="best J (the population's)")
    ax.axvspan(late_window(G), G, color="C0", alpha=0.12, label="last quarter")
    ax.set_xlabel("generation")
    ax.set_ylabel("best J on all scoring rows")
    verdict = "converged" if late < CONVERGED else "still improving"
    ax.set_title(f"late improvement {late:.2%} over the last quarter ({verdict}, threshold {CONVERGED:.0%})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, late


def policy_profile(policies: dict[str, dict[str, float]]):
    """Per-unit sparsity of several policies (x: units in model order). When some name matrix units
    (``SearchConfig.units = "matrix"``), block-unit policies are drawn over the matrices (:func:`units.to_kind`)."""
    from ellava_lib.core.units import to_kind, unit_kind

    kinds = {unit_kind(sp) for sp in policies.values()}
    if len(kinds) > 1:
        policies = {name: to_kind(sp, "matrix") if unit_kind(sp) == "block" else sp for name, sp in policies.items()}
    fig, ax = plt.subplots(figsize=(10, 3.4))
    units = list(next(iter(policies.values())))
    for name, sp in policies.items():
        ax.plot(range(len(units)), [100 * sp[u] for u in units], marker="o", ms=3, label=name)
    ax.set_xticks(range(len(units)), units, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("unit sparsity (%)")
    ax.set_title("Per-unit sparsity profile")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def gap_vs_calibration_size(frame: pd.DataFrame, labels: dict[str, str] | None = None):
    """Generalization gap (calibration - test score) and test score against the number of calibration
    samples, one line per method (``frame``: rows with ``method, calib_n, mean, gap_calib_test``)."""
    labels = labels or {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for method, part in frame.groupby("method", sort=False):
        part = part.sort_values("calib_n")
        axes[0].plot(part["calib_n"], part["gap_calib_test"], marker="o", label=labels.get(method, method))
        axes[1].plot(part["calib_n"], part["mean"], marker="o", label=labels.get(method, method))
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration samples n")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set_ylabel("calibration - test score (points)")
    axes[1].set_ylabel("mean test score (0-100)")
    fig.suptitle("Generalization gap vs calibration size, with and without the gap term")
    fig.tight_layout()
    return fig
