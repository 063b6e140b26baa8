"""Plots the notebooks show (matplotlib figures returned, never shown or saved here)."""

from __future__ import annotations

import textwrap

import matplotlib

import matplotlib.pyplot as plt
import pandas as pd

from .schema import Sample

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


def score_vs_sparsity(results: pd.DataFrame, dense_mean: float):
    """Mean test score against mean language-model sparsity, one line per method, dense as a reference."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, part in results.groupby("method", sort=False):
        part = part.sort_values("sparsity")
        ax.plot(part["sparsity"] * 100, part["mean"], marker="o", label=method)
    ax.axhline(dense_mean, color="k", ls="--", lw=1, label="dense")
    ax.set_xlabel("mean language-model sparsity (%)")
    ax.set_ylabel("mean test score (0-100)")
    ax.set_title("Pruning methods on the tiny model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
