"""Data-free pruning baselines under a policy, and the per-layer sparsity report (the post-condition).

Magnitude pruning zeroes, in every linear layer of unit ``u``, the ``round(s_u * numel)`` weights with
the smallest ``|w|`` (layer-wise, as the Wanda and SparseGPT papers' magnitude baseline does).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from .obs import magnitude_mask, measured_sparsity
from .policy import Policy
from .units import list_units, unit_linears


def _check_policy(model: nn.Module, policy: Policy) -> bool:
    """Validate ``policy`` against the model's units; returns whether it names vision units."""
    include_vision = any(u.startswith("vision.") for u in policy.sparsities)
    policy.validate(list_units(model, include_vision))
    return include_vision


@torch.no_grad()
def magnitude_prune(model: nn.Module, policy: Policy, prune_n: int = 0, prune_m: int = 0) -> pd.DataFrame:
    """Zero the smallest-magnitude weights of every unit at its policy sparsity (in place).

    Returns the sparsity report (see :func:`sparsity_report`).
    """
    include_vision = _check_policy(model, policy)
    for unit, linears in unit_linears(model, include_vision).items():
        s = policy.sparsities[unit]
        for lin in linears.values():
            if s > 0 or prune_n:
                lin.weight[magnitude_mask(lin.weight, s, prune_n, prune_m)] = 0
    return sparsity_report(model, policy)


def sparsity_report(model: nn.Module, policy: Policy) -> pd.DataFrame:
    """Per linear layer: ``layer, unit, target, measured, params`` (measured = fraction of exact zeros)."""
    include_vision = any(u.startswith("vision.") for u in policy.sparsities)
    rows = []
    for unit, linears in unit_linears(model, include_vision).items():
        for name, lin in linears.items():
            rows.append({"layer": name, "unit": unit, "target": policy.sparsities.get(unit, 0.0),
                         "measured": round(measured_sparsity(lin.weight), 6), "params": lin.weight.numel()})
    return pd.DataFrame(rows)
