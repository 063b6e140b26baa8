"""The search's generation 0: its start policies and the initial population made from them.

Start policies (:data:`config.START_POLICIES`, ``SearchConfig.init``): the uniform policy, OWL's outlier-weighted
and ECoFLaP's importance-weighted allocations (:mod:`allocate`; one sparsity per decoder layer, as their reference
code), each rounded to the grid with :func:`allocate.round_to_grid` and moved to the exact budget with
:func:`budget.snap_to_budget`. They are allocated over *block* units; a search over matrix units
(``SearchConfig.units = "matrix"``) starts from the same policies with every matrix at its block unit's sparsity
(:func:`units.to_kind`; the same budget, since a block unit's weight is the sum of its matrices').
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import torch
from torch import nn

from ellava_lib.core.policy import Policy
from ellava_lib.core.units import block_unit, names_vision, to_kind, unit_kind
from ellava_lib.prune.allocate import (
    OWL_LAMBDA,
    ecoflap_allocation,
    outlier_ratios,
    owl_allocation,
    round_to_grid,
    zeroth_order_importance,
)
from ellava_lib.search.budget import BUDGET_TOL, mutate, snap_to_budget
from ellava_lib.search.config import SearchConfig


def block_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """The budget weights of the block units of ``weights``' units, in depth order: ``weights`` itself for block
    units; for matrix units each block unit's weight is the sum of its matrices' (left to right)."""
    if unit_kind(weights) == "block":
        return dict(weights)
    out: dict[str, float] = {}
    for u, w in weights.items():
        out[block_unit(u)] = out.get(block_unit(u), 0.0) + w
    return out


def start_policies(model: nn.Module, batch: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                   cfg: SearchConfig, importance: Mapping[str, float] | None = None) -> list[Policy]:
    """The distinct grid policies named by ``cfg.init``, in order, over the units of ``weights`` (the budget
    weights). ``uniform``: ``s_u = S``; ``owl``: :func:`allocate.owl_allocation` of the outlier ratios; ``ecoflap``:
    :func:`allocate.ecoflap_allocation` of the zeroth-order importances (``importance``, block-unit scores, when
    already computed for this model and batch, else computed with ``cfg.seed``); each allocated over the block units
    (:func:`block_weights`), through :func:`allocate.round_to_grid` with their budget weights, then
    :func:`budget.snap_to_budget` (``|S(pi) - S| <= budget.MOVE_TOL``), then as units of ``weights``' kind
    (:func:`units.to_kind`: every matrix at its block unit's sparsity; snapped again under the matrix weights,
    which moves nothing unless float sums differ); one that cannot reach the exact budget is left out. ``model``
    must be dense."""
    vision = names_vision(weights)
    kind = unit_kind(weights)
    blocks = block_weights(weights)
    out: list[Policy] = []
    for name in cfg.init:
        if name == "uniform":
            raw = {u: cfg.target for u in blocks}
        elif name == "owl":
            raw = owl_allocation(outlier_ratios(model, dict(batch), include_vision=vision), blocks, cfg.target,
                                 lam=OWL_LAMBDA, grid=cfg.levels)
        else:
            scores = importance or zeroth_order_importance(model, dict(batch), seed=cfg.seed, include_vision=vision)
            raw = ecoflap_allocation({u: scores[u] for u in blocks}, blocks, cfg.target, grid=cfg.levels)
        policy = snap_to_budget(Policy(round_to_grid(raw, blocks, cfg.target, cfg.levels), cfg.levels,
                                       {"target": cfg.target, "start": name}), blocks, cfg.target)
        if policy is not None and kind != "block":
            sps = to_kind(policy.sparsities, kind)
            policy = snap_to_budget(Policy({u: sps[u] for u in weights}, cfg.levels,
                                           {"target": cfg.target, "start": name}),
                                    weights, cfg.target)
        if policy is not None and policy.policy_id() not in {p.policy_id() for p in out}:
            out.append(policy)
    if not out:
        raise ValueError(f"no start policy of {list(cfg.init)} reaches the budget {cfg.target} within "
                         f"{BUDGET_TOL} on the grid {cfg.levels}")
    return out


def initial_population(weights: Mapping[str, float], cfg: SearchConfig, rng: random.Random,
                       starts: list[Policy]) -> list[Policy]:
    """The start policies (:func:`start_policies`) and distinct mutants of them, taken in turn, up to
    ``population`` policies."""
    out = list(starts[: cfg.population])
    seen = {p.policy_id() for p in out}
    for t in range(20 * cfg.population):
        if len(out) >= cfg.population:
            break
        child = mutate(starts[t % len(starts)], weights, rng, rng.randint(1, cfg.mutation_steps))
        if child.policy_id() not in seen:
            out.append(child)
            seen.add(child.policy_id())
    return out
