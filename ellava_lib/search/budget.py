"""The search's budget and its budget-preserving mutation.

**Budget.** Unit ``u`` has a budget weight ``w_u`` (``"params"``: its weight count ``n_u``; ``"flops"``:
``n_u`` times the tokens that pass it per sample; for language-model units alone the two are
proportional) and ``S(pi) = sum_u w_u s_u / W``, ``W = sum_u w_u``. Every policy the search makes lies in the
**budget band** ``target <= S(pi) <= target + slack`` with ``slack = step * max_u w_u / W`` (``step`` = the
widest grid gap): at least the target, and at most one grid step of the largest unit above it -- the same
band :func:`allocate.round_to_grid` (hence OWL / ECoFLaP) lands in. Checks use a 1e-9 tolerance.

**Mutation** (:func:`mutate`). One step moves one grid step of sparsity from a donor unit ``d`` to a
receiver ``r != d`` (``s_d`` down one grid level, ``s_r`` up one; both drawn uniformly among the units that
can move): ``S`` changes by ``(w_r step_r - w_d step_d) / W``, which is exactly zero when ``w_r = w_d`` (on
LLaVA every ``lm.i.attn`` weighs the same, and every ``lm.i.mlp``). A move between units of different
weight may leave the band; it is then *repaired* by one more single-unit step (down if ``S`` is above the
band, up if below) of a third unit, drawn uniformly among those whose step lands ``S`` back in the band;
with no such unit the move is redrawn (at most ``tries`` times; then the step is skipped). So the
invariant -- every policy on the grid and in the band -- holds after every step, equal-weight moves keep
``S`` exactly, and sparsity can still flow between attention and MLP units (a band that only allowed
equal-weight swaps would freeze the attention/MLP split of the start policy).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from ellava_lib.core.policy import Policy, weighted_mean
from ellava_lib.core.units import is_vision_unit

BUDGETS: tuple[str, ...] = ("params", "flops")
EPS = 1e-9


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


def _repair(level: dict[str, int], weights: Mapping[str, float], g: list[float], band: tuple[float, float],
            rng: random.Random, keep: tuple[str, ...]) -> bool:
    """Bring ``S`` back into ``band`` with one single-unit step of a unit not in ``keep`` (in place)."""
    lo, hi = band
    s = weighted_mean({u: g[level[u]] for u in weights}, weights)
    if lo - EPS <= s <= hi + EPS:
        return True
    way = -1 if s > hi else 1
    total = sum(weights.values())
    fits = [u for u in weights if u not in keep and 0 <= level[u] + way < len(g)
            and lo - EPS <= s + weights[u] * (g[level[u] + way] - g[level[u]]) / total <= hi + EPS]
    if not fits:
        return False
    level[rng.choice(fits)] += way
    return True


def mutate(policy: Policy, units: Mapping[str, float], rng: random.Random, steps: int, *,
           target: float | None = None, tries: int = 20) -> Policy:
    """``steps`` budget-keeping moves (module docstring); ``units`` = budget weights, ``target`` defaults
    to ``policy.meta["target"]``. The result keeps the grid and meta of ``policy``."""
    target = float(policy.meta["target"] if target is None else target)
    if set(units) != set(policy.sparsities):
        raise ValueError(f"policy units {sorted(policy.sparsities)} differ from the budget's {sorted(units)}")
    g = sorted(policy.grid)
    level = {u: min(range(len(g)), key=lambda i: abs(g[i] - policy.sparsities[u])) for u in units}
    band = budget_band(units, target, policy.grid)
    for _ in range(steps):
        for _ in range(tries):
            ups = [u for u in units if level[u] < len(g) - 1]
            if not ups:
                break
            r = rng.choice(ups)
            downs = [u for u in units if u != r and level[u] > 0]
            if not downs:
                break
            d = rng.choice(downs)
            trial = {**level, r: level[r] + 1, d: level[d] - 1}
            if _repair(trial, units, g, band, rng, (r, d)):
                level = trial
                break
    return Policy({u: g[level[u]] for u in policy.sparsities}, policy.grid, dict(policy.meta))
