"""Whether a search converged: the best ``J`` per generation from its ``history.csv`` and how much it still
improved over the last quarter of the generations. Pure functions over the history's rows.

``best_per_generation``: ``b_g = min { J(row) : row.phase in {init, full}, row.generation <= g }`` for
``g = 0 .. G``, the running minimum of the population's best ``J`` on all scoring rows (generation 0: the initial
population; screening rows and the final selection's rows are not on all scoring rows, or not in the evolution,
and do not count).

``late_improvement``: ``(b[g0] - b[G]) / |b[g0]|`` with ``g0 = G - ceil(G / 4)``, the relative improvement of the
best ``J`` over the last quarter of the generations (0 when ``G = 0``); a search whose late improvement is below
:data:`CONVERGED` (1 %) is taken to have converged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Phases of ``history.csv`` scored on all scoring rows during the evolution (:mod:`evolve`).
FULL_PHASES: tuple[str, ...] = ("init", "full")
#: ``late_improvement`` below this: converged.
CONVERGED: float = 0.01


def best_per_generation(rows: Iterable[Mapping[str, Any]]) -> list[float]:
    """``[b_0, ..., b_G]`` (module docstring) of history rows (mappings with ``generation``, ``phase``, ``j``, as
    ``csv.DictReader`` or ``DataFrame.to_dict("records")`` give them); ``G`` is the last generation with a row of
    :data:`FULL_PHASES`, a generation without one keeps the best before it. ``ValueError`` without a generation-0
    row of those phases."""
    best: dict[int, float] = {}
    for row in rows:
        if str(row["phase"]) in FULL_PHASES:
            g, j = int(row["generation"]), float(row["j"])
            best[g] = min(best.get(g, math.inf), j)
    if 0 not in best:
        raise ValueError("the history has no generation-0 row of phase init: not a search's history")
    out: list[float] = []
    for g in range(max(best) + 1):
        out.append(min(best.get(g, math.inf), out[-1] if out else math.inf))
    return out


def late_window(generations: int) -> int:
    """``g0 = G - ceil(G / 4)``: the generation the last quarter of ``G`` generations starts from."""
    return generations - math.ceil(generations / 4)


def late_improvement(best_per_gen: Sequence[float]) -> float:
    """``(b[g0] - b[G]) / |b[g0]|`` with ``G = len(best_per_gen) - 1`` and ``g0 = G - ceil(G / 4)``
    (:func:`late_window`): the relative improvement of the best ``J`` over the last quarter of the generations.
    0 when ``G = 0`` or ``b[g0] = b[G]``; ``ValueError`` on an empty sequence."""
    if not best_per_gen:
        raise ValueError("no generations")
    G = len(best_per_gen) - 1
    start, end = float(best_per_gen[late_window(G)]), float(best_per_gen[G])
    if start == end:
        return 0.0
    return (start - end) / abs(start) if start else math.copysign(math.inf, start - end)
