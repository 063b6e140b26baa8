"""Non-uniform policy allocation under a budget: OWL and ECoFLaP, and rounding a continuous allocation to the grid.

Budget: the parameter-weighted mean sparsity ``S(pi) = sum_u n_u s_u / N`` must reach the target ``S``.
Both allocators compute a continuous allocation with weighted mean exactly ``S`` and then round it to
the policy grid with :func:`round_to_grid`: every unit goes to the grid point at or below its value,
then units are raised one grid step, largest fractional remainder first, until ``S(pi) >= S`` (once a
single raise can close the gap, the unit whose raise overshoots least is taken). So every unit ends
at the grid point just below or just above its continuous value, and
``S <= S(pi) < S + step * max_u n_u / N`` (the last raise overshoots by at most one step of the largest
unit; ``step`` = the widest grid gap).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ellava_lib.core.policy import DEFAULT_GRID, GRID_TOL, Policy, weighted_mean
from ellava_lib.core.units import list_units, unit_linears
from ellava_lib.model.losses import calibration_loss
from ellava_lib.prune.walk import InputNorms, walk_blocks, wanda_scores


def _bisect(fn: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 200) -> float:
    """``x`` in ``[lo, hi]`` with ``fn(x) ~= target`` for a nondecreasing ``fn`` (the upper end, so
    ``fn(x) >= target`` whenever reachable)."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(mid) < target else (lo, mid)
    return hi


def round_to_grid(raw: Mapping[str, float], sizes: Mapping[str, int], target: float,
                  grid: tuple[float, ...] = DEFAULT_GRID) -> dict[str, float]:
    """Round a continuous allocation to ``grid`` keeping ``S(pi) >= target`` (see the module docstring)."""
    g = sorted(set(float(x) for x in grid))
    step_of: dict[str, int] = {}
    frac: dict[str, float] = {}
    for u, s in raw.items():
        s = min(max(float(s), g[0]), g[-1])
        j = max(i for i, v in enumerate(g) if v <= s + GRID_TOL)
        step_of[u] = j
        frac[u] = 0.0 if j == len(g) - 1 else (s - g[j]) / (g[j + 1] - g[j])

    def mean() -> float:
        return weighted_mean({u: g[j] for u, j in step_of.items()}, sizes)

    def gain(u: str) -> float:
        return sizes[u] * (g[step_of[u] + 1] - g[step_of[u]]) / total

    total = sum(sizes.values())
    order = sorted((u for u in step_of if frac[u] > GRID_TOL), key=lambda u: -frac[u])
    while order and mean() < target - 1e-9:
        enough = [u for u in order if gain(u) >= target - mean() - 1e-12]
        u = min(enough, key=gain) if enough else order[0]  # min() keeps the larger remainder on ties
        step_of[u] += 1
        order.remove(u)
    if mean() < target - 1e-9:
        raise ValueError(f"cannot reach mean sparsity {target} on the grid {tuple(g)}")
    return {u: g[j] for u, j in step_of.items()}


def _grid_range(grid: tuple[float, ...], target: float) -> tuple[float, float]:
    lo, hi = min(grid), max(grid)
    if not lo - GRID_TOL <= target <= hi + GRID_TOL:
        raise ValueError(f"target sparsity {target} is outside the grid range [{lo}, {hi}]")
    return lo, hi


# ------------------------------------------------------------------------------------------------- OWL

#: OWL's default band ``lam`` around the target (units move by at most this much).
OWL_LAMBDA: float = 0.08
#: ECoFLaP's default kept-weight floor (a unit keeps at least this share, so ``S <= 1 - floor``).
ECOFLAP_FLOOR: float = 0.2


def outlier_ratios(model: nn.Module, calib_batch: dict[str, torch.Tensor], M: float = 5.0,
                   include_vision: bool = False, progress: bool = False) -> dict[str, float]:
    """OWL's layerwise outlier distribution per unit: ``D_u = #{S_ij > M * mean(S)} / #S`` over the
    Wanda scores ``S_ij = |W_ij| * ||X_j||_2`` of all the unit's linears pooled (dense-model inputs)."""
    units = list(list_units(model, include_vision))
    ratios: dict[str, float] = {}

    def visit(block: str, block_units: dict[str, dict[str, nn.Linear]], stats: dict) -> bool:
        for unit, lins in block_units.items():
            scores = torch.cat([wanda_scores(lin.weight, stats[n].norms()).flatten() for n, lin in lins.items()])
            ratios[unit] = float((scores > M * scores.mean()).double().mean())
        return False

    walk_blocks(model, calib_batch, units, InputNorms, visit, sequential=False, progress=progress, desc="owl")
    return {u: ratios[u] for u in units}


def owl_allocation(ratios: Mapping[str, float], sizes: Mapping[str, int], sparsity: float, lam: float,
                   grid: tuple[float, ...] = DEFAULT_GRID) -> dict[str, float]:
    """Continuous OWL sparsities (Yin et al. 2024) from outlier ratios ``D_u``::

        D~_u = (D_u - min D) / (max D - min D)          (all 1/2 when every D_u is equal)
        s_u  = clip(S - lam + 2 lam (1 - D~_u) + c, max(S - lam, g_min), min(S + lam, g_max))

    with the shift ``c`` solved (bisection) so the weighted mean is exactly ``S``: more outliers ->
    lower sparsity. (OWL sets the keep ratio ``1 - s_l = 2 lam D~_l - mean + (1 - S)``; the same
    allocation up to the clip, which keeps it in OWL's ``[S - lam, S + lam]``.)
    """
    gmin, gmax = _grid_range(grid, sparsity)
    lo, hi = max(sparsity - lam, gmin), min(sparsity + lam, gmax)
    dmin, dmax = min(ratios.values()), max(ratios.values())
    norm = {u: (d - dmin) / (dmax - dmin) if dmax > dmin else 0.5 for u, d in ratios.items()}
    base = {u: sparsity - lam + 2 * lam * (1 - norm[u]) for u in sizes}

    def alloc(c: float) -> dict[str, float]:
        return {u: min(max(base[u] + c, lo), hi) for u in sizes}

    c = _bisect(lambda c: weighted_mean(alloc(c), sizes), sparsity, -2 * lam - 1, 2 * lam + 1)
    return alloc(c)


def owl_policy(model: nn.Module, calib_batch: dict[str, torch.Tensor], sparsity: float, M: float = 5.0,
               lam: float = OWL_LAMBDA, grid: tuple[float, ...] = DEFAULT_GRID, include_vision: bool = False,
               progress: bool = False, on_grid: bool = True) -> Policy:
    """OWL policy at mean sparsity ``sparsity``: :func:`outlier_ratios` -> :func:`owl_allocation`, then
    :func:`round_to_grid` when ``on_grid`` (a policy the level database can assemble), else the continuous
    allocation itself, as OWL prunes (its levels are added to the policy's grid). OWL moves every unit by at
    most ``lam`` around the target, so on a grid coarser than ``lam`` the rounded policy can be uniform.
    ``meta`` keeps the ratios and the continuous allocation."""
    sizes = list_units(model, include_vision)
    ratios = outlier_ratios(model, calib_batch, M, include_vision, progress)
    raw = owl_allocation(ratios, sizes, sparsity, lam, grid)
    meta = {"method": "owl", "target": sparsity, "M": M, "lam": lam, "outlier_ratio": ratios, "continuous": raw}
    if not on_grid:
        return Policy(dict(raw), tuple(sorted(set(grid) | set(raw.values()))), meta)
    return Policy(round_to_grid(raw, sizes, sparsity, grid), tuple(grid), meta)


# --------------------------------------------------------------------------------------------- ECoFLaP


@torch.no_grad()
def zeroth_order_importance(model: nn.Module, calib_batch: dict[str, torch.Tensor], eps: float = 1e-3,
                            draws: int = 4, seed: int = 0, include_vision: bool = False,
                            progress: bool = False) -> dict[str, float]:
    """ECoFLaP's zeroth-order importance of each unit (two-point estimate of the directional derivative)::

        I_u = 1/D sum_d |L(w_u + eps z_d) - L(w_u - eps z_d)| / (2 eps),    z_d ~ N(0, I)

    ``L`` = calibration loss (:func:`losses.calibration_loss`), only unit ``u``'s weights perturbed,
    ``z_d`` drawn from ``torch.Generator().manual_seed(seed * 100003 + 1009 * k + d)`` for unit ``k``;
    the dense weights are restored exactly after each unit.
    """
    from tqdm.auto import tqdm

    out: dict[str, float] = {}
    units = unit_linears(model, include_vision)
    for k, (unit, lins) in enumerate(tqdm(units.items(), desc="ecoflap", disable=not progress)):
        dense = {n: lin.weight.detach().clone() for n, lin in lins.items()}
        total = 0.0
        for d in range(draws):
            gen = torch.Generator().manual_seed(seed * 100003 + 1009 * k + d)
            z = {n: torch.randn(w.shape, generator=gen).to(w) for n, w in dense.items()}
            losses = []
            for sign in (1.0, -1.0):
                for n, lin in lins.items():
                    lin.weight.copy_(dense[n] + sign * eps * z[n])
                losses.append(calibration_loss(model, calib_batch))
            total += abs(losses[0] - losses[1]) / (2 * eps)
        for n, lin in lins.items():
            lin.weight.copy_(dense[n])
        out[unit] = total / draws
    return out


def ecoflap_cap(grid: tuple[float, ...] = DEFAULT_GRID, floor: float = ECOFLAP_FLOOR) -> float:
    """The highest mean sparsity ECoFLaP can allocate: ``1 - f``, ``f = max(floor, 1 - max(grid))`` (every
    unit keeps at least the share ``f``)."""
    return 1 - max(floor, 1 - max(grid))


def ecoflap_allocation(importance: Mapping[str, float], sizes: Mapping[str, int], sparsity: float,
                       floor: float = ECOFLAP_FLOOR, grid: tuple[float, ...] = DEFAULT_GRID) -> dict[str, float]:
    """Continuous ECoFLaP-style sparsities: kept weights proportional to importance above a floor::

        k_u = clip(f n_u + t I_u, f n_u, (1 - g_min) n_u),   f = max(floor, 1 - g_max)
        t solved (bisection) so that sum_u k_u = (1 - S) N;   s_u = 1 - k_u / n_u

    (ECoFLaP's water-filling: every unit first keeps the floor, the rest of the keep budget is shared in
    proportion to the scores, units that are full drop out). Needs ``S <= 1 - f``.
    """
    gmin, gmax = _grid_range(grid, sparsity)
    f = 1 - ecoflap_cap(grid, floor)
    if sparsity > 1 - f + GRID_TOL:
        raise ValueError(f"sparsity {sparsity} is above the ECoFLaP cap 1 - floor = {1 - f:.3g}")
    top = max(importance.values())
    imp = {u: max(importance[u], 1e-6 * top) if top > 0 else 1.0 for u in sizes}

    def alloc(t: float) -> dict[str, float]:
        return {u: 1 - min(max(f + t * imp[u] / sizes[u], f), 1 - gmin) for u in sizes}

    t_hi = max((1 - gmin - f) * sizes[u] / imp[u] for u in sizes) + 1.0
    # mean sparsity decreases in t: bisect on its negative
    t = _bisect(lambda t: -weighted_mean(alloc(t), sizes), -sparsity, 0.0, t_hi)
    return alloc(t)


def ecoflap_policy(model: nn.Module, calib_batch: dict[str, torch.Tensor], sparsity: float,
                   floor: float = ECOFLAP_FLOOR, eps: float = 1e-3, seed: int = 0, draws: int = 4,
                   grid: tuple[float, ...] = DEFAULT_GRID, include_vision: bool = False, progress: bool = False,
                   importance: Mapping[str, float] | None = None) -> Policy:
    """ECoFLaP-style policy: :func:`zeroth_order_importance` -> :func:`ecoflap_allocation` ->
    :func:`round_to_grid`. ``meta`` keeps the importances and the continuous allocation.

    ``importance``: scores already computed for this model and calibration batch (they do not depend on the
    sparsity, so one computation serves every sparsity); must name every unit."""
    sizes = list_units(model, include_vision)
    if importance is None:
        importance = zeroth_order_importance(model, calib_batch, eps, draws, seed, include_vision, progress)
    missing = sorted(set(sizes) - set(importance))
    if missing:
        raise ValueError(f"importance misses units {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    importance = {u: float(importance[u]) for u in sizes}
    raw = ecoflap_allocation(importance, sizes, sparsity, floor, grid)
    meta = {"method": "ecoflap", "target": sparsity, "floor": floor, "eps": eps, "draws": draws, "seed": seed,
            "importance": importance, "continuous": raw}
    return Policy(round_to_grid(raw, sizes, sparsity, grid), tuple(grid), meta)
