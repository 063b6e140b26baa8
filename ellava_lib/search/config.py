"""The search's configuration: :class:`SearchConfig` (fitness, gap term, population, selection, projector
rounds, start policies), validated, serialisable and hashed into the run's identity.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ellava_lib.core import files
from ellava_lib.core.policy import DEFAULT_GRID, GRID_TOL
from ellava_lib.prune.allocate import (
    ecoflap_cap,
)
from ellava_lib.search import checkpoint as ckpt
from ellava_lib.search import gap as gaps
from ellava_lib.search.budget import (
    BUDGETS,
)
from ellava_lib.search.objective import (
    DEFAULT_LOSS_CAP,
    LOSS_KINDS,
)

#: Fields added after search folders existed, with their defaults: left out of ``to_dict`` (and the digest)
#: at those defaults, so older folders still resume and older sweep rows stay valid.
_LATER_FIELDS: dict[str, Any] = {"init": ["uniform"], "projector_ce_weight": 1.0}


@dataclass
class SearchConfig:
    """Everything that determines a search's result (``generations`` only decides when it stops).

    Objective: ``target`` mean sparsity on ``grid`` under the ``budget`` weights; ``J = R_hat + lam G_hat``
    with ``gap`` in :data:`gaps.GAP_ESTIMATORS` (confidence ``delta``; capacity: ``h_scale``, ``depth_decay``),
    per-sample ``loss_kind`` losses clipped at ``loss_cap`` (:mod:`objective`). Evolution: ``population``,
    ``offspring`` per generation, 1 to ``mutation_steps`` moves per child, ``tournament`` size, ``elitism``
    parents kept, multi-step selection ``screen_samples`` -> ``survivors``; ``seed`` drives every draw.
    ``init``: the start policies of generation 0 (:data:`START_POLICIES`). ``projector_*``: evolution every
    ``projector_every`` generations (0 = off) for the top ``projector_topk`` (:func:`projector.evolve_projector`;
    loss ``ce_weight * CE + kl_weight * KL(dense || pruned)``). ``extra``: free-form (e.g. how the calibration
    set was drawn); compared on resume like the rest.
    """

    target: float = 0.6
    grid: tuple[float, ...] = DEFAULT_GRID
    gap: str = "bernstein"
    lam: float = 1.0
    delta: float = 0.05
    loss_kind: str = "ce"
    loss_cap: float = DEFAULT_LOSS_CAP
    h_scale: float | None = None  # capacity gap; None = min(gaps.DEFAULT_H_SCALE, n)
    depth_decay: float = gaps.DEFAULT_DEPTH_DECAY
    budget: str = "params"
    population: int = 8
    generations: int = 10
    offspring: int = 16
    mutation_steps: int = 3
    tournament: int = 2
    elitism: int = 2
    screen_samples: int = 8  # 0 = no screening
    survivors: int = 4
    eval_batch_size: int = 0  # rows per forward pass; 0 = all
    seed: int = 0
    init: tuple[str, ...] = ("uniform",)
    projector_every: int = 0  # K generations between projector evolutions; 0 = off
    projector_topk: int = 2
    projector_steps: int = 20
    projector_lr: float = 1e-3
    projector_kl_weight: float = 1.0
    projector_ce_weight: float = 1.0
    projector_holdout: float = 0.25
    projector_patience: int = 3
    projector_eval_every: int = 2
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, compared on resume

    def __post_init__(self) -> None:
        self.grid = tuple(sorted(float(g) for g in self.grid))
        self.init = tuple(self.init)
        checks = [
            (len(self.grid) >= 2 and self.grid[0] >= 0 and self.grid[-1] < 1,
             f"grid levels must be >= 2 values in [0, 1), got {self.grid}"),
            (self.grid[0] - GRID_TOL <= self.target <= self.grid[-1] + GRID_TOL,
             f"target sparsity {self.target} is outside the grid range [{self.grid[0]}, {self.grid[-1]}]"),
            (self.gap in gaps.GAP_ESTIMATORS, f"gap must be one of {sorted(gaps.GAP_ESTIMATORS)}, got {self.gap!r}"),
            (self.lam >= 0 and 0 < self.delta < 1, f"need lam >= 0 and 0 < delta < 1, got {self.lam}, {self.delta}"),
            (self.loss_kind in LOSS_KINDS and self.loss_cap > 0, f"loss_kind in {LOSS_KINDS} and loss_cap > 0"),
            (self.budget in BUDGETS, f"budget must be one of {BUDGETS}, got {self.budget!r}"),
            (self.population >= 1 and self.offspring >= 1 and self.generations >= 0,
             "need population >= 1, offspring >= 1, generations >= 0"),
            (self.mutation_steps >= 1 and self.tournament >= 1, "need mutation_steps >= 1 and tournament >= 1"),
            (0 <= self.elitism <= self.population, f"elitism must lie in [0, population], got {self.elitism}"),
            (self.screen_samples >= 0 and self.survivors >= 1, "need screen_samples >= 0 and survivors >= 1"),
            (self.screen_samples != 1, "screen_samples must be 0 (off) or >= 2"),
            (len(self.init) >= 1 and len(set(self.init)) == len(self.init) and set(self.init) <= set(START_POLICIES),
             f"init must name distinct start policies from {START_POLICIES}, got {list(self.init)}"),
            ("ecoflap" not in self.init or self.target <= ecoflap_cap(self.grid) + GRID_TOL,
             f"the ECoFLaP start policy cannot reach sparsity {self.target} (it keeps at least "
             f"{1 - ecoflap_cap(self.grid):g} of every unit); leave ecoflap out of init"),
            (self.eval_batch_size >= 0 and self.projector_every >= 0 and self.projector_topk >= 1,
             "need eval_batch_size >= 0, projector_every >= 0, projector_topk >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        d = json.loads(json.dumps({**asdict(self), "grid": list(self.grid), "init": list(self.init)}))
        for k, default in _LATER_FIELDS.items():  # at their defaults: configs (and digests) as before they existed
            if d[k] == default:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown search config keys {unknown}")
        return cls(**{**d, "grid": tuple(d.get("grid", DEFAULT_GRID))})

    def to_json(self, path: str | Path) -> Path:
        return files.write_json(Path(path), self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> SearchConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def digest(self) -> str:
        """12 hex chars of sha1 over the config minus :data:`checkpoint.RESUMABLE_FIELDS`."""
        d = {k: v for k, v in self.to_dict().items() if k not in ckpt.RESUMABLE_FIELDS}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


#: Start policies of generation 0 (``SearchConfig.init``): the uniform policy, OWL's outlier-weighted and
#: ECoFLaP's importance-weighted allocations (:mod:`allocate`), each rounded to the grid inside the budget band.
START_POLICIES: tuple[str, ...] = ("uniform", "owl", "ecoflap")
