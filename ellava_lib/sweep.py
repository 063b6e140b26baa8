"""Baseline sweeps: prune a model with each method at each sparsity, evaluate it, one results row per run.

A finished (method, sparsity) row is appended to the results CSV at once and skipped on a re-run, so a
killed sweep resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from . import io
from .baselines import ecoflap_policy, measured_mean, owl_policy
from .evaluate import EvalConfig, compare, evaluate
from .loading import load_model
from .policy import DEFAULT_GRID, GRID_TOL, Policy
from .prune import prune_model
from .units import list_units

METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt", "owl", "ecoflap")


def method_policy(model: nn.Module, batch: dict[str, torch.Tensor], method: str, sparsity: float, seed: int = 0,
                  include_vision: bool = False, progress: bool = False) -> Policy:
    """The policy a method prunes with: OWL and ECoFLaP allocate per unit, the others are uniform."""
    if method == "owl":
        return owl_policy(model, batch, sparsity, include_vision=include_vision, progress=progress)
    if method == "ecoflap":
        return ecoflap_policy(model, batch, sparsity, seed=seed, include_vision=include_vision, progress=progress)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    on_grid = any(abs(sparsity - g) <= GRID_TOL for g in DEFAULT_GRID)
    grid = DEFAULT_GRID if on_grid else tuple(sorted((*DEFAULT_GRID, sparsity)))
    return Policy.uniform(list_units(model, include_vision), sparsity, grid,
                          meta={"method": method, "target": sparsity})


def solver_for(method: str) -> str:
    """OWL and ECoFLaP allocate sparsity; the weights are then pruned with SparseGPT."""
    return "sparsegpt" if method in ("owl", "ecoflap") else method


def baseline_sweep(model_dir: str | Path, batch: dict[str, torch.Tensor], methods: Sequence[str],
                   sparsities: Sequence[float], eval_cfg: EvalConfig, out_dir: Path, seed: int = 0,
                   progress: bool = True) -> pd.DataFrame:
    """Prune + evaluate every (method, sparsity); rows go to ``out_dir/results.csv`` (resumable).

    Row columns: ``method, sparsity, measured`` (parameter-weighted mean of the measured sparsity),
    one score per suite and their ``mean`` (0-100), and ``seconds`` (pruning wall time).
    """
    out_dir = io.ensure_dir(Path(out_dir))
    results = out_dir / "results.csv"
    done = pd.read_csv(results) if results.exists() else pd.DataFrame(columns=["method", "sparsity"])
    rows = done.to_dict("records")
    for s in sparsities:
        for method in methods:
            if ((done["method"] == method) & ((done["sparsity"] - s).abs() < 1e-9)).any():
                continue
            model, processor = load_model(model_dir, progress=False)
            t0 = time.time()
            policy = method_policy(model, batch, method, s, seed)
            report = prune_model(model, policy, solver_for(method), batch, progress=False)
            seconds = time.time() - t0
            name = f"{method}-{s:.2f}"
            policy.to_json(out_dir / name / "policy.json")
            frame = evaluate(model, processor, eval_cfg, out_dir / name, progress=progress)
            score = compare({method: frame}).iloc[0].to_dict()
            measured = measured_mean(report)
            rows.append({"method": method, "sparsity": s, "measured": measured,
                         **{k: v for k, v in score.items() if k != "method"}, "seconds": round(seconds, 2)})
            io.write_csv(results, pd.DataFrame(rows))
    return pd.DataFrame(rows)


def pivot_mean(results: pd.DataFrame, dense_mean: float) -> pd.DataFrame:
    """Methods x sparsity table of the mean test score, with the dense score as the first column."""
    table = results.pivot(index="method", columns="sparsity", values="mean")
    table.columns = [f"{c:.0%}" for c in table.columns]
    table.insert(0, "dense", dense_mean)
    order = [m for m in METHODS if m in table.index]
    return table.loc[order].reset_index()
