"""Whether a search converged: the best ``J`` per generation from its ``history.csv`` and how much it still
improved over the last quarter of the generations. Pure functions over the history's rows.

``best_per_generation``: ``b_g`` = the population's best ``J`` on all scoring rows after generation ``g``
(``g = 0 .. G``), read from the rows of the phases ``init`` and ``full`` (screening rows are on fewer rows, the
final selection's rows are not the evolution's): ``b_0 = min J`` of the initial population and
``b_g = min(b_{g-1}, min J of generation g's full rows)``, the running minimum. The elites keep their score and
are not scored again (:mod:`evolve`) until a projector round changes every ``J``; then they are re-forwarded, so a
generation with a full row of a policy scored on all rows before starts a new projector round and
``b_g = min J of its full rows`` (the running minimum restarts: ``J`` under two projectors is two objectives).
Without projector rounds ``b`` is the running minimum over the whole search.

``late_improvement``: ``(b[g0] - b[G]) / |b[g0]|`` with ``g0 = G - ceil(G / 4)``, the relative improvement of the
best ``J`` over the last quarter of the generations (0 when ``G = 0``; negative when a projector round left the
best ``J`` higher than it was at ``g0``); a search whose late improvement is below :data:`CONVERGED` (1 %) is taken
to have converged.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Phases of ``history.csv`` scored on all scoring rows during the evolution (:mod:`evolve`).
FULL_PHASES: tuple[str, ...] = ("init", "full")
#: ``late_improvement`` below this: converged.
CONVERGED: float = 0.01


def best_per_generation(rows: Iterable[Mapping[str, Any]]) -> list[float]:
    """``[b_0, ..., b_G]`` (module docstring) of history rows (mappings with ``generation``, ``policy_id``,
    ``phase``, ``j``, as ``csv.DictReader`` or ``DataFrame.to_dict("records")`` give them, in the history's order);
    ``G`` is the last generation with a row of :data:`FULL_PHASES`, a generation without one keeps the best before
    it. ``ValueError`` without a generation-0 row of those phases."""
    full: dict[int, list[tuple[str, float]]] = {}
    for row in rows:
        if str(row["phase"]) in FULL_PHASES:
            full.setdefault(int(row["generation"]), []).append((str(row["policy_id"]), float(row["j"])))
    if 0 not in full:
        raise ValueError("the history has no generation-0 row of phase init: not a search's history")
    seen: set[str] = set()
    out: list[float] = []
    for g in range(max(full) + 1):
        scored = full.get(g, [])
        best = min((j for _, j in scored), default=math.inf)
        rescored = any(pid in seen for pid, _ in scored)  # an elite forwarded again: a new projector round
        out.append(best if (rescored or not out) else min(best, out[-1]))
        seen.update(pid for pid, _ in scored)
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


def history_converged(path: str | Path) -> bool:
    """Whether the search whose ``history.csv`` is at ``path`` has converged so far:
    ``late_improvement(best_per_generation(rows)) < CONVERGED`` over the generations it holds (what a search with
    ``max_generations`` checks after each generation beyond ``generations``, :func:`evolve.run_search`)."""
    with open(path, newline="") as f:
        return late_improvement(best_per_generation(csv.DictReader(f))) < CONVERGED
