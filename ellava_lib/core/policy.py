"""A pruning policy: one sparsity per unit, drawn from a grid, with a parameter-weighted budget."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ellava_lib.core import files

#: Sparsity grid G = (0.0, 0.1, ..., 0.9).
DEFAULT_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))

#: Tolerance for "sparsity is on the grid".
GRID_TOL: float = 1e-9

#: The finer step of the levels around a search's target (:func:`search_grid`), and how far from it they reach.
FINE_STEP: float = 0.05
FINE_SPAN: float = 0.15

_KEYS = ("sparsities", "grid", "meta")


def on_grid(sparsity: float, grid: tuple[float, ...]) -> bool:
    """Whether ``sparsity`` is a level of ``grid``: ``|sparsity - g| <= GRID_TOL`` for some ``g``."""
    return any(abs(sparsity - g) <= GRID_TOL for g in grid)


def search_grid(targets: Sequence[float], step: float = FINE_STEP, span: float = FINE_SPAN,
                base: Sequence[float] = DEFAULT_GRID) -> tuple[float, ...]:
    """The levels a search at ``targets`` uses: ``base`` plus, for every target ``t``, the finer levels
    ``t + k * step`` for the integers ``|k| <= span / step``, kept inside ``[min(base), max(base)]``.

    So at ``t = 0.6`` with the 0.1 grid, step 0.05 and span 0.15 the levels are ``0.0, 0.1, ..., 0.4, 0.45, 0.5,
    0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9``: half-steps where the search moves most (a move of one level
    near the target is 0.05 instead of 0.1), the coarse grid elsewhere. ``step <= 0``: ``base`` alone.
    Levels are rounded to 6 decimals (0.45, not 0.45000000000000007)."""
    levels = {round(float(g), 6) for g in base}
    if step > 0:
        lo, hi = min(levels), max(levels)
        k_max = int(math.floor(span / step + 1e-9))
        for t in targets:
            for k in range(-k_max, k_max + 1):
                level = round(float(t) + k * step, 6)
                if lo - GRID_TOL <= level <= hi + GRID_TOL and not on_grid(level, tuple(levels)):
                    levels.add(level)
    return tuple(sorted(levels))


@dataclass
class Policy:
    """``sparsities[u]`` is the fraction of unit ``u``'s weights pruned (in ``[0, 1]``).

    Budget: ``S(pi) = sum_u n_u s_u / sum_u n_u`` (see :meth:`mean_sparsity`).
    """

    sparsities: dict[str, float]
    grid: tuple[float, ...] = DEFAULT_GRID
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.sparsities, Mapping):
            raise ValueError(f"sparsities must be a mapping unit -> float; got {type(self.sparsities).__name__}")
        sps: dict[str, float] = {}
        for u, s in self.sparsities.items():
            if not isinstance(u, str):
                raise ValueError(f"unit names must be str; got {u!r}")
            s = float(s)
            if not math.isfinite(s) or not (0.0 <= s <= 1.0):
                raise ValueError(f"unit {u!r}: sparsity must lie in [0, 1]; got {s!r}")
            sps[u] = s + 0.0  # normalizes -0.0
        self.sparsities = sps
        self.grid = tuple(float(g) for g in self.grid)
        if not self.grid:
            raise ValueError("grid is empty")
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta must be a dict; got {type(self.meta).__name__}")

    # ----------------------------------------------------------------------------------- constructors

    @classmethod
    def uniform(
        cls,
        units: Mapping[str, int],
        sparsity: float,
        grid: tuple[float, ...] = DEFAULT_GRID,
        meta: dict[str, Any] | None = None,
    ) -> Policy:
        """Every unit at the same ``sparsity`` (which must be on ``grid``)."""
        if not on_grid(float(sparsity), grid):
            raise ValueError(f"sparsity {sparsity!r} is not on the grid {tuple(grid)}")
        return cls({u: float(sparsity) for u in units}, tuple(grid), dict(meta or {}))

    # -------------------------------------------------------------------------------- serialization

    def to_dict(self) -> dict[str, Any]:
        """``{"sparsities": {...}, "grid": [...], "meta": {...}}`` (JSON-ready; copies)."""
        return {
            "sparsities": dict(self.sparsities),
            "grid": list(self.grid),
            "meta": json.loads(json.dumps(self.meta)),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        """Inverse of :meth:`to_dict`; ``grid`` and ``meta`` are optional, other keys are rejected."""
        if "sparsities" not in d:
            raise ValueError("policy dict has no 'sparsities'")
        extra = [k for k in d if k not in _KEYS]
        if extra:
            raise ValueError(f"unknown policy keys {extra}; expected {list(_KEYS)}")
        return cls(
            dict(d["sparsities"]),
            tuple(d.get("grid", DEFAULT_GRID)),
            dict(d.get("meta", {})),
        )

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as indented JSON atomically (:func:`files.write_text`)."""
        return files.write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Policy:
        """Read a policy written by :meth:`to_json`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    # ------------------------------------------------------------------------------------- checks

    def _check_cover(self, units: Mapping[str, int]) -> list[str]:
        problems = []
        unknown = [u for u in self.sparsities if u not in units]
        missing = [u for u in units if u not in self.sparsities]
        if unknown:
            problems.append(f"unknown units {unknown}")
        if missing:
            problems.append(f"missing units {missing}")
        return problems

    def validate(self, units: Mapping[str, int]) -> None:
        """Raise ``ValueError`` listing unknown units, missing units and off-grid sparsities (tol 1e-9)."""
        problems = self._check_cover(units)
        off = {u: s for u, s in self.sparsities.items() if not on_grid(s, self.grid)}
        if off:
            problems.append(f"off-grid sparsities {off} (grid {self.grid})")
        if problems:
            raise ValueError("invalid policy: " + "; ".join(problems))

    def mean_sparsity(self, units: Mapping[str, int]) -> float:
        """Parameter-weighted mean ``S = sum_u n_u s_u / sum_u n_u`` over exactly the units in ``units``."""
        problems = self._check_cover(units)
        if problems:
            raise ValueError("policy does not match units: " + "; ".join(problems))
        for u, n_u in units.items():
            if isinstance(n_u, bool) or not isinstance(n_u, numbers.Integral) or n_u <= 0:
                raise ValueError(f"unit {u!r}: parameter count must be a positive int; got {n_u!r}")
        if not units:
            raise ValueError("units is empty")
        return weighted_mean(self.sparsities, {u: int(n_u) for u, n_u in units.items()})

    def budget_ok(self, units: Mapping[str, int], target: float, tol: float = 1e-9) -> bool:
        """``S(pi) >= target - tol``."""
        return self.mean_sparsity(units) >= float(target) - float(tol)

    def policy_id(self) -> str:
        """10 hex chars of ``sha1`` of the canonical JSON of the sparsities (keys sorted, values rounded to
        9 decimals, compact separators). Independent of insertion order, ``grid`` and ``meta``."""
        canon = json.dumps(
            {u: round(s, 9) + 0.0 for u, s in self.sparsities.items()},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha1(canon.encode("utf-8")).hexdigest()[:10]


def weighted_mean(values: Mapping[str, float], sizes: Mapping[str, float]) -> float:
    """``sum_u n_u v_u / sum_u n_u`` over the units of ``sizes`` (``values`` may hold more), both sums taken
    left to right in the order of ``sizes``: the budget ``S(pi)`` of a policy (``n_u`` = parameter counts, or
    the search's budget weights ``w_u``) and every mean the allocators and the search compare with it."""
    return sum(sizes[u] * values[u] for u in sizes) / sum(sizes.values())
