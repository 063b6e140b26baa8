"""Prune a LLaVA under a per-unit sparsity policy: magnitude, Wanda or SparseGPT (OBS), block by block.

Driver (SparseGPT's ``llama_sequential``, without globals): decoder blocks are visited in order
(vision-tower blocks first when the policy names ``vision.*`` units). For each block, forward hooks
on the linears of its units accumulate calibration statistics while the block runs on its inputs;
then every linear is pruned at its unit's sparsity (block units or matrix units, :func:`units.policy_linears`);
in sequential mode the block is re-run on the pruned weights, so the next block sees the outputs of the already
pruned ones.

* **magnitude**: zero the ``round(s * numel)`` smallest ``|W_ij|`` of each layer (data-free).
* **Wanda** (Sun et al. 2023): score ``S_ij = |W_ij| * ||X_j||_2`` (``X_j`` = input feature ``j``
  over all calibration tokens); in every output row ``i`` zero the ``int(d_in * s)`` (floor) lowest scores
  (N:M: the ``N`` lowest of every ``M`` consecutive inputs of the row). No weight update.
* **SparseGPT**: ``H = 2 X X^T / N`` per layer, then the OBS column-block solver
  (:class:`obs.SparseGPT`), which also updates the surviving weights.
* **llm_pruner**: structured, whole attention heads and MLP channels zeroed by Taylor importance
  (:mod:`structured`; the policy from :func:`structured.structured_policy`).

N:M (``prune_n, prune_m > 0``): every unit whose policy sparsity is > 0 gets the N:M pattern
(target ``N / M``); units at 0 stay dense.

Post-condition (:func:`check_sparsity`), in weights counted exactly, ``k = zeros`` of a ``d_out x d_in``
layer at target ``s``: ``k >= s * numel - b`` (raises otherwise) with the rounding bound ``b``:
magnitude and llm_pruner ``0.5``; Wanda ``d_out`` (one floor per row, short by less than 1 each); SparseGPT
``0.5 * ceil(d_in / blocksize)`` (one per column block, see :mod:`obs`); N:M ``0``.
More zeros than ``s * numel + b`` (weights that were already zero, dead inputs) only warn.
"""

from __future__ import annotations

import math
import warnings

import pandas as pd
import torch
from torch import nn

from ellava_lib.core.policy import Policy
from ellava_lib.core.units import names_vision, policy_linears, policy_units, unit_kind
from ellava_lib.prune.masks import (
    check_nm,
    magnitude_mask,
    measured_sparsity,
    wanda_mask,
)
from ellava_lib.prune.obs import SparseGPT
from ellava_lib.prune.walk import InputNorms, walk_blocks

METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt", "llm_pruner")


def _bound(method: str, weight: torch.Tensor, blocksize: int, nm: bool) -> float:
    """Allowed shortfall of zeros below ``s * numel`` (see the module docstring)."""
    if nm:
        return 0.0
    rows, cols = weight.shape
    return {"magnitude": 0.5, "llm_pruner": 0.5, "wanda": float(rows),
            "sparsegpt": 0.5 * math.ceil(cols / blocksize)}[method]


def _unit_target(sparsity: float, prune_n: int = 0, prune_m: int = 0) -> float:
    """The sparsity a unit at policy ``sparsity`` is pruned to: ``N / M`` under N:M when ``sparsity > 0``
    (units at 0 stay dense), else ``sparsity``."""
    return prune_n / prune_m if (prune_n and sparsity > 0) else sparsity


def check_sparsity(model: nn.Module, policy: Policy, method: str, prune_n: int = 0, prune_m: int = 0,
                   blocksize: int = 128) -> None:
    """Post-condition: every pruned layer has at least ``target * numel - bound`` exact zeros (raises
    ``RuntimeError``); more than ``target * numel + bound`` only warns."""
    for unit, lins in policy_linears(model, policy.sparsities).items():
        s = policy.sparsities[unit]
        target = _unit_target(s, prune_n, prune_m)
        for name, lin in lins.items():
            zeros = int((lin.weight == 0).sum())
            want = target * lin.weight.numel()
            b = _bound(method, lin.weight, blocksize, bool(prune_n))
            if zeros < want - b - 1e-6:
                raise RuntimeError(f"{name}: {zeros} zeros, target {target} needs {want:.1f} (bound {b})")
            if zeros > want + b + 1e-6:
                warnings.warn(f"{name}: {zeros} zeros exceed the target {want:.1f} (+{b}); "
                              "weights that were already zero (or dead inputs) count too", RuntimeWarning,
                              stacklevel=2)


def prune_model(model: nn.Module, policy: Policy, method: str, calib_batch: dict[str, torch.Tensor] | None,
                *, sequential: bool = True, prune_n: int = 0, prune_m: int = 0, blocksize: int = 128,
                percdamp: float = 0.01, progress: bool = True,
                device: torch.device | str | None = None) -> pd.DataFrame:
    """Prune ``model`` in place under ``policy`` with ``method`` in :data:`METHODS`.

    ``device``: run the calibration walk with one decoder block at a time on it (the model stays where it
    is; see :func:`walk.walk_blocks`), e.g. ``"cuda"`` for LLaVA-1.5-7B held on the CPU.
    ``calib_batch`` (from :func:`calibration.encode_calibration`) is unused by magnitude. Returns the
    sparsity report (``layer, unit, target, measured, params, error``; ``error`` is SparseGPT's OBS loss
    ``trace((W - Ŵ) H (W - Ŵ)^T) / 2``, NaN otherwise) after checking :func:`check_sparsity`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {', '.join(METHODS)}")
    check_nm(prune_n, prune_m)
    check_policy(model, policy)
    errors: dict[str, float] = {}
    if method == "llm_pruner":  # structured: whole heads / MLP channels zeroed (:mod:`structured`)
        from ellava_lib.prune.structured import structured_prune

        if prune_n or names_vision(policy.sparsities) or calib_batch is None or \
                unit_kind(policy.sparsities) != "block":
            raise ValueError("llm_pruner prunes the language model's heads and channels from a calibration batch "
                             "(no N:M, no vision units, block units)")
        structured_prune(model, policy, calib_batch)
    elif method == "magnitude":
        magnitude_prune(model, policy, prune_n, prune_m)
    else:
        if calib_batch is None:
            raise ValueError(f"{method} needs a calibration batch")
        todo = [u for u, s in policy.sparsities.items() if s > 0]
        make_stat = InputNorms if method == "wanda" else SparseGPT

        def visit(block: str, units: dict[str, dict[str, nn.Linear]], stats: dict) -> bool:
            for unit, lins in units.items():
                s = policy.sparsities[unit]
                for name, lin in lins.items():
                    if method == "wanda":
                        lin.weight[wanda_mask(lin.weight, stats[name].norms(), s, prune_n, prune_m)] = 0
                    else:
                        errors[name] = stats[name].prune(s, prune_n, prune_m, blocksize, percdamp).error
                    stats[name].free()
            return True

        model.eval()
        walk_blocks(model, calib_batch, todo, make_stat, visit, sequential=sequential, progress=progress,
                    desc=f"prune {method}", device=device)
    check_sparsity(model, policy, method, prune_n, prune_m, blocksize)
    report = sparsity_report(model, policy, prune_n, prune_m)
    report["error"] = [errors.get(layer, float("nan")) for layer in report["layer"]]
    return report


def check_policy(model: nn.Module, policy: Policy) -> bool:
    """Validate ``policy`` against the model's units of its kind (block or matrix, :func:`units.policy_units`);
    returns whether it names vision units."""
    policy.validate(policy_units(model, policy.sparsities))
    return names_vision(policy.sparsities)



@torch.no_grad()
def magnitude_prune(model: nn.Module, policy: Policy, prune_n: int = 0, prune_m: int = 0) -> pd.DataFrame:
    """Zero the smallest-magnitude weights of every unit at its policy sparsity (in place).

    With N:M, every unit whose sparsity is > 0 gets the N:M pattern. Returns :func:`sparsity_report`.
    """
    check_policy(model, policy)
    for unit, linears in policy_linears(model, policy.sparsities).items():
        s = policy.sparsities[unit]
        for lin in linears.values():
            if s > 0:
                lin.weight[magnitude_mask(lin.weight, s, prune_n, prune_m)] = 0
    return sparsity_report(model, policy, prune_n, prune_m)


def sparsity_report(model: nn.Module, policy: Policy, prune_n: int = 0, prune_m: int = 0) -> pd.DataFrame:
    """Per linear layer: ``layer, unit, target, measured, params`` (measured = fraction of exact zeros;
    with N:M the target of a unit with sparsity > 0 is ``N / M``)."""
    rows = []
    for unit, linears in policy_linears(model, policy.sparsities).items():
        s = policy.sparsities.get(unit, 0.0)
        target = _unit_target(s, prune_n, prune_m)
        for name, lin in linears.items():
            rows.append({"layer": name, "unit": unit, "target": target,
                         "measured": round(measured_sparsity(lin.weight), 6), "params": lin.weight.numel()})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- budget helpers


def measured_mean(report: pd.DataFrame) -> float:
    """Parameter-weighted mean of the measured sparsity in a sparsity report: ``sum_l n_l s_l / sum_l n_l`` over
    its layers ``l``. The quantity of :func:`policy.weighted_mean`, but summed by pandas (numpy's pairwise
    summation), the order the recorded ``measured`` / ``mean_sparsity`` numbers were made with; a left-to-right
    sum differs from it in the last bits."""
    return float((report["measured"] * report["params"]).sum() / report["params"].sum())
