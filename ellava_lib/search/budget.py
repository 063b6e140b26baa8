"""The search's budget and its budget-preserving mutation.

**Budget.** Unit ``u`` has a budget weight ``w_u`` (``"params"``: its weight count ``n_u``; ``"flops"``:
``n_u`` times the tokens that pass it per sample; for language-model units alone the two are
proportional) and ``S(pi) = sum_u w_u s_u / W``, ``W = sum_u w_u``. Every policy the search makes lies in the
**budget band** ``target <= S(pi) <= target + slack`` with ``slack = step * max_u w_u / W`` (``step`` = the
widest grid gap): at least the target, and at most one grid step of the largest unit above it -- the same
band :func:`allocate.round_to_grid` (hence OWL / ECoFLaP) lands in. Checks use a 1e-9 tolerance.

**Exact budget.** The search's policies keep ``|S(pi) - target| <= BUDGET_TOL`` (0.002): :func:`snap_to_budget`
brings a start policy there, :func:`mutate` keeps it there.

**Mutation** (:func:`mutate`, budget-exact, EvoPress-style: steps sized in weights). One step moves sparsity from
a donor unit ``d`` to a receiver ``r != d``: ``s_r`` up ``i`` grid levels and ``s_d`` down ``j`` levels,
``i, j in 1..MAX_LEVELS``, the pair ``(i, j)`` chosen so the weights pruned in ``r`` and restored in ``d``
balance best (smallest ``|S - target|``, then fewest levels): equal-weight units swap one level each (``S``
unchanged exactly), an attention and an MLP unit of LLaVA trade 2:1 levels (``4 d^2`` vs ``3 d d_ff``). The pair
``(r, d)`` is drawn uniformly (all pairs in a seeded random order; the first whose best move keeps
``|S - target| <= max(MOVE_TOL, |S_before - target|)`` is taken; none: the step is skipped). So every mutant of
a policy within ``MOVE_TOL`` stays within it.

The budget band (:func:`budget_band`, ``target <= S <= target + step * max_u w_u / W``) is where
:func:`allocate.round_to_grid` lands; :func:`snap_to_budget` takes a policy from there to the exact budget.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from ellava_lib.core.policy import Policy, weighted_mean
from ellava_lib.core.units import is_vision_unit

BUDGETS: tuple[str, ...] = ("params", "flops")
EPS = 1e-9

#: The search's budget tolerance: every searched policy has ``|S(pi) - target| <= BUDGET_TOL``.
BUDGET_TOL: float = 0.002

#: What a mutation keeps (half the tolerance: room for float sums).
MOVE_TOL: float = BUDGET_TOL / 2

#: Most grid levels one unit moves in one mutation step.
MAX_LEVELS: int = 3


def budget_weights(units: Mapping[str, int], kind: str = "params", lm_tokens: float = 1.0,
                   vision_tokens: float = 1.0) -> dict[str, float]:
    """``w_u = n_u`` (``"params"``) or ``n_u * T_u`` (``"flops"``; ``T_u`` = tokens through the unit per
    sample: ``vision_tokens`` for ``vision.*`` units, ``lm_tokens`` otherwise)."""
    if kind not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {kind!r}")
    if kind == "params":
        return {u: float(n) for u, n in units.items()}
    return {u: float(n) * (vision_tokens if is_vision_unit(u) else lm_tokens) for u, n in units.items()}


def budget_band(weights: Mapping[str, float], target: float, grid: tuple[float, ...]) -> tuple[float, float]:
    """``(target, target + step * max_u w_u / W)``, ``step`` = the widest gap of ``grid``."""
    g = sorted(grid)
    step = max(b - a for a, b in zip(g, g[1:]))
    return float(target), float(target) + step * max(weights.values()) / sum(weights.values())


def in_band(policy: Policy, weights: Mapping[str, float], target: float) -> bool:
    """``target - 1e-9 <= S(pi) <= target + slack + 1e-9`` (see :func:`budget_band`)."""
    lo, hi = budget_band(weights, target, policy.grid)
    s = weighted_mean(policy.sparsities, weights)
    return lo - EPS <= s <= hi + EPS


def budget_error(policy: Policy, weights: Mapping[str, float], target: float) -> float:
    """``|S(pi) - target|`` under the budget ``weights``."""
    return abs(weighted_mean(policy.sparsities, weights) - float(target))


def _levels(policy: Policy, units: Mapping[str, float]) -> tuple[list[float], dict[str, int]]:
    g = sorted(policy.grid)
    return g, {u: min(range(len(g)), key=lambda i: abs(g[i] - policy.sparsities[u])) for u in units}


def _best_pair(level: dict[str, int], units: Mapping[str, float], g: list[float], r: str, d: str, dev: float,
               total: float) -> tuple[float, int, int] | None:
    """``(new deviation, i, j)`` of the best ``r`` up ``i`` / ``d`` down ``j`` move, or None if none exists."""
    best = None
    for i in range(1, min(MAX_LEVELS, len(g) - 1 - level[r]) + 1):
        up = units[r] * (g[level[r] + i] - g[level[r]]) / total
        for j in range(1, min(MAX_LEVELS, level[d]) + 1):
            new = dev + up - units[d] * (g[level[d]] - g[level[d] - j]) / total
            key = (abs(new), i + j)
            if best is None or key < (abs(best[0]), best[1] + best[2]):
                best = (new, i, j)
    return best


def mutate(policy: Policy, units: Mapping[str, float], rng: random.Random, steps: int, *,
           target: float | None = None) -> Policy:
    """``steps`` budget-exact moves (module docstring); ``units`` = budget weights, ``target`` defaults
    to ``policy.meta["target"]``. The result keeps the grid and meta of ``policy``."""
    target = float(policy.meta["target"] if target is None else target)
    if set(units) != set(policy.sparsities):
        raise ValueError(f"policy units {sorted(policy.sparsities)} differ from the budget's {sorted(units)}")
    g, level = _levels(policy, units)
    total = sum(units.values())
    names = list(units)
    for _ in range(steps):
        dev = weighted_mean({u: g[level[u]] for u in units}, units) - target
        limit = max(MOVE_TOL, abs(dev)) + EPS
        pairs = [(r, d) for r in names if level[r] < len(g) - 1 for d in names if d != r and level[d] > 0]
        rng.shuffle(pairs)
        for r, d in pairs:
            best = _best_pair(level, units, g, r, d, dev, total)
            if best is not None and abs(best[0]) <= limit:
                level[r] += best[1]
                level[d] -= best[2]
                break
    return Policy({u: g[level[u]] for u in policy.sparsities}, policy.grid, dict(policy.meta))


def snap_to_budget(policy: Policy, units: Mapping[str, float], target: float,
                   tol: float = MOVE_TOL, max_moves: int = 64) -> Policy | None:
    """``policy`` moved to ``|S - target| <= tol`` by greedy deterministic moves (each the single-unit step or
    budget-exact pair move of :func:`mutate` that lowers ``|S - target|`` most; ties: fewest levels, then unit
    order), or None when no sequence of at most ``max_moves`` such moves gets there."""
    g, level = _levels(policy, units)
    total = sum(units.values())
    names = list(units)
    for _ in range(max_moves + 1):
        dev = weighted_mean({u: g[level[u]] for u in units}, units) - float(target)
        if abs(dev) <= tol + EPS:
            return Policy({u: g[level[u]] for u in policy.sparsities}, policy.grid, dict(policy.meta))
        best: tuple[float, int, dict[str, int]] | None = None
        for u in names:
            for way in (-1, 1):
                if 0 <= level[u] + way < len(g):
                    new = dev + units[u] * (g[level[u] + way] - g[level[u]]) / total
                    if best is None or (abs(new), 1) < (abs(best[0]), best[1]):
                        best = (new, 1, {u: way})
        for r in names:
            for d in names:
                if d != r and level[r] < len(g) - 1 and level[d] > 0:
                    pair = _best_pair(level, units, g, r, d, dev, total)
                    if pair is not None and (abs(pair[0]), pair[1] + pair[2]) < (abs(best[0]), best[1]):
                        best = (pair[0], pair[1] + pair[2], {r: pair[1], d: -pair[2]})
        if best is None or abs(best[0]) >= abs(dev) - EPS:
            return None
        for u, k in best[2].items():
            level[u] += k
    return None
