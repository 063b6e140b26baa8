"""The search's configuration, and the one home of its defaults.

:class:`ProjectorConfig` (projector evolution: schedule, optimiser, loss weights, early stopping) and
:class:`SearchConfig` (fitness, gap term, population, selection, start policies, and a ``projector``), validated,
serialisable and hashed into the run's identity. Each has the named presets :data:`PRESETS` as classmethods
(``ci()``, ``default()``, ``smol()``, ``paper()``: the settings of the pipeline profiles of the same names), and
its field defaults *are* the ``default`` preset. :meth:`SearchConfig.from_preset` (a preset plus field overrides) is
how the command line, the sweep and the notebooks build the config of a search.

The serialised form (:meth:`SearchConfig.to_dict`, what checkpoints, resume checks and the sweep's row cache hash)
is flat: the projector's fields appear as ``projector_<field>``, the names override dicts use as well.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ellava_lib.core import files
from ellava_lib.core.policy import DEFAULT_GRID, FINE_STEP, GRID_TOL, search_grid
from ellava_lib.core.units import UNIT_KINDS
from ellava_lib.prune.allocate import (
    ecoflap_cap,
)
from ellava_lib.search import checkpoint as ckpt
from ellava_lib.search import gap as gaps
from ellava_lib.search.budget import (
    BUDGETS,
)
from ellava_lib.search.final_pick import GUARDS, SELECT_RULES
from ellava_lib.search.objective import (
    DEFAULT_LOSS_CAP,
    KL_KINDS,
    LOSS_KINDS,
    LOSS_REVISION,
)

#: Named presets of both configs: ``ci`` (minutes on 2 CPU cores), ``default`` (the embedded default, ``make
#: reproduce``), ``smol`` (the smol tier, ``make reproduce PROFILE=smol``), ``paper`` (LLaVA-1.5-7B on one GPU).
#: Each is the setting of the pipeline profile of that name.
PRESETS: tuple[str, ...] = ("ci", "default", "smol", "paper")

#: Revision of the search's multi-step selection (:func:`evolve._generation`), serialised as ``selection_revision``:
#: 2 = the children screened alone, the elites joining them at the last stage with their cached scores, children new
#: to the whole search (1, absent from earlier folders: the elites screened beside the children). The same config
#: gives another result under another revision, so its checkpoints and sweep rows are not reused.
SELECTION_REVISION: int = 2

#: Prefix of the projector's fields in the flat serialised form and in override dicts (``projector_every``).
PROJECTOR_PREFIX = "projector_"

#: Serialised fields added after search folders existed, with the value every search had before: left out of
#: ``to_dict`` (and the digest) at that value, so older folders still resume and older sweep rows stay valid, and
#: read back as that value when absent (:meth:`SearchConfig.from_dict`). Not the defaults of new configs.
_LATER_FIELDS: dict[str, Any] = {"init": ["uniform"], "projector_ce_weight": 1.0, "projector_grad_clip": 1.0,
                                  "fine_step": 0.0, "projector_micro_batch": 0, "projector_checkpointing": False,
                                  "projector_fp32_master": True, "projector_kl_kind": "kl_all", "units": "block",
                                  "select_rule": "min", "guard": "none", "max_generations": 0}

#: Serialised fields searches no longer have, and what replaced them: :meth:`SearchConfig.from_dict` drops them
#: (a folder written with them reads back, and its config differs from every new one, so it is not resumed and
#: its sweep rows are not reused); as overrides they are refused with this note. ``lam`` was the hand-set lambda
#: of the evolution and ``lam_grid`` the lambdas tried when choosing lambda at the end of the search; lambda is
#: now chosen before the evolution and steers it (``lam_scales``).
_RETIRED_FIELDS: dict[str, str] = {
    "lam": "lambda is chosen by the search on the selection rows before the evolution (lam_scales)",
    "lam_grid": "replaced by lam_scales (multipliers of spread(R_hat) / spread(G_hat), gap.lambda_grid)"}


def _check_preset(name: str) -> str:
    if name not in PRESETS:
        raise ValueError(f"unknown search preset {name!r}; choose from {', '.join(PRESETS)}")
    return name


@dataclass(frozen=True)
class ProjectorConfig:
    """Projector evolution (:func:`projector.evolve_projector`) and its schedule inside the search.

    Field defaults are the ``default`` preset; :meth:`ci` and :meth:`paper` change ``every`` / ``steps`` only,
    :meth:`smol` is the default.

    * ``every``: generations between evolution rounds in the search (round after generation ``g`` when
      ``g % every == 0``); 0 = no projector evolution.
    * ``topk``: a round fine-tunes the projector for the search's ``topk`` best policies (round-robin, one per step).
    * ``steps``: AdamW steps per round (``T``; fewer when early stopping ends the round).
    * ``lr``: AdamW learning rate (weight decay 0).
    * ``kl_weight``, ``ce_weight``: the step loss ``ce_weight * CE + kl_weight * KL(dense || pruned)``
      (per-sample means: CE over the answer positions, KL over the positions of ``kl_kind``; the default
      ``ce_weight = 0`` distils the dense model only, CE of the calibration answers is optional).
    * ``kl_kind``: the positions of that KL, as the search's fitness kinds (:data:`objective.KL_KINDS`): ``kl``
      the text positions, what the default fitness reads, so the projector is tuned for what candidates are
      scored on; ``kl_all`` every real position, image placeholders included (what every projector round did
      before this field existed).
    * ``rows``: share of the search rows the projector trains on (``(0, 1)``); the other search rows are the only
      rows candidates are scored on while the projector evolves (:mod:`evolve`), so no candidate is scored on a
      row the projector trained on.
    * ``holdout``: share of the projector's rows held out for early stopping (``[0, 1)``; 0 = no early stopping:
      every step runs and the last projector is kept).
    * ``patience``: held-out evaluations without improvement before a round stops.
    * ``eval_every``: steps between held-out evaluations.
    * ``grad_clip``: maximal gradient norm of a step.
    * ``micro_batch``: rows per forward / backward pass of a step (gradients accumulated over the micro-batches,
      each weighted by its share of the rows, so a step's gradient is that of all rows at once); 0 = all rows at
      once. Also the rows per pass of the held-out evaluations.
    * ``checkpointing``: recompute each language-model decoder block's activations in the backward pass instead
      of keeping them (:func:`projector.checkpointed_blocks`; about one more forward per step, the activations
      of one block instead of all).
    * ``fp32_master``: AdamW steps an fp32 copy of a half-precision projector and copies it back into the model's
      dtype after each step (no effect on an fp32 projector; off: AdamW steps the half-precision weights, whose
      rounding swallows updates below half an ulp).

    ``micro_batch`` and ``checkpointing`` change memory, not the mathematics (results agree to rounding);
    :mod:`ellava_lib.speed.memory` chooses them for a GPU size, and a search's identity reads them at their
    baselines (:meth:`SearchConfig.identity`, :data:`checkpoint.MEMORY_FIELDS`). Earlier searches ran with
    ``micro_batch = 0``, ``checkpointing = False`` and (fp32 models) the equivalent of ``fp32_master = True``.
    """

    every: int = 3
    topk: int = 2
    steps: int = 20
    lr: float = 1e-3
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    rows: float = 0.5
    holdout: float = 0.25
    patience: int = 3
    eval_every: int = 2
    grad_clip: float = 1.0
    micro_batch: int = 0
    checkpointing: bool = False
    fp32_master: bool = True
    kl_kind: str = "kl"

    def __post_init__(self) -> None:
        checks = [
            (self.every >= 0 and self.topk >= 1, f"projector: need every >= 0 and topk >= 1, got {self.every}, "
                                                  f"{self.topk}"),
            (self.steps >= 0 and self.patience >= 1 and self.eval_every >= 1 and self.lr > 0,
             f"projector: need steps >= 0, patience >= 1, eval_every >= 1 and lr > 0; got steps={self.steps}, "
             f"patience={self.patience}, eval_every={self.eval_every}, lr={self.lr}"),
            (self.ce_weight >= 0 and self.kl_weight >= 0 and self.ce_weight + self.kl_weight > 0,
             f"projector: need ce_weight, kl_weight >= 0, not both 0; got {self.ce_weight}, {self.kl_weight}"),
            (0.0 <= self.holdout < 1.0, f"projector: holdout must lie in [0, 1), got {self.holdout}"),
            (0.0 < self.rows < 1.0, f"projector: rows must lie in (0, 1), got {self.rows}"),
            (self.grad_clip > 0, f"projector: grad_clip must be > 0, got {self.grad_clip}"),
            (self.micro_batch >= 0, f"projector: micro_batch must be >= 0, got {self.micro_batch}"),
            (self.kl_kind in KL_KINDS, f"projector: kl_kind must be one of {', '.join(KL_KINDS)}, got "
                                       f"{self.kl_kind!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def ci(cls) -> ProjectorConfig:
        """profiles/ci.yaml: a short round after every generation."""
        return cls(every=1, steps=5)

    @classmethod
    def default(cls) -> ProjectorConfig:
        """profiles/default.yaml (the field defaults): 20 steps every 3 generations."""
        return cls()

    @classmethod
    def smol(cls) -> ProjectorConfig:
        """profiles/smol.yaml: the default's schedule, 20 steps every 3 generations."""
        return cls()

    @classmethod
    def paper(cls) -> ProjectorConfig:
        """profiles/paper.yaml: 20 steps every 10 of the 100 generations, 4 rows per forward / backward pass (what
        :func:`ellava_lib.speed.memory.choose` picks for LLaVA-1.5-7B in fp16 on a 40 GB GPU: ``ellava plan``)."""
        return cls(every=10, micro_batch=4)

    @classmethod
    def from_preset(cls, name: str = "default", **overrides: Any) -> ProjectorConfig:
        """The preset ``name`` (:data:`PRESETS`) with the fields named in ``overrides`` replaced."""
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown projector config keys {unknown}")
        return replace(getattr(cls, _check_preset(name))(), **overrides)

    def to_flat(self) -> dict[str, Any]:
        """``{"projector_<field>": value}`` in field order (the serialised form inside a search config)."""
        return {PROJECTOR_PREFIX + f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class SearchConfig:
    """Everything that determines a search's result (``generations`` only decides when it stops).

    Field defaults are the ``default`` preset (:meth:`default`); :meth:`ci` and :meth:`paper` are the other
    profiles' settings, :meth:`from_preset` a preset with overrides.

    Objective ``J = R_hat + lambda * G_hat`` (:mod:`objective`):

    * ``target``: mean sparsity of the policy under the ``budget`` weights (each job sets its own).
    * ``grid``: the base sparsity levels; ``fine_step``: levels this far apart added within ``policy.FINE_SPAN``
      of the target (0 = none). A unit takes the levels of :attr:`levels` (:func:`policy.search_grid`; all must be
      in the level database): the default 0.05 adds 0.45, 0.55, 0.65, 0.75 to the 0.1 grid at target 0.6.
    * ``gap``: the gap estimator ``G_hat`` (:data:`gaps.GAP_ESTIMATORS`: ``none``, ``norm``, ``capacity``,
      ``bernstein``); ``delta``: its confidence (the bound holds with probability ``1 - delta``). Its weight
      ``lambda`` is not set by hand: the search chooses it (``lam_scales`` below; 0 with ``gap = "none"``).
    * ``loss_kind``: the per-sample loss behind ``R_hat``: ``kl`` = KL(dense || pruned) over the text next-token
      positions, question and answer, not the image placeholders (as EvoPress on text; revision 2,
      :data:`objective.LOSS_REVISION`), ``kl_answer`` = the same at the answer positions only, ``kl_all`` = over
      every real position, image placeholders included (``kl`` before revision 2), ``ce`` = answer
      cross-entropy; ``loss_cap``: per-sample losses clipped at this many nats.
    * ``h_scale``, ``depth_decay``: the capacity gap's scale (None = ``min(gaps.DEFAULT_H_SCALE, n)``) and
      per-depth decay.
    * ``budget``: what the mean sparsity weighs units by, ``params`` or ``flops`` (:data:`budget.BUDGETS`).
    * ``units``: what a unit of the policy is (:data:`units.UNIT_KINDS`): ``block`` = one sparsity per decoder
      block's attention and MLP (``lm.3.attn``, ``lm.3.mlp``), ``matrix`` = one per weight matrix
      (``lm.3.self_attn.q_proj``, seven per decoder block), assembled from the same level database; the start
      policies are the block ones, every matrix at its block unit's sparsity.

    Evolution (:mod:`evolve`):

    * ``population`` policies; ``generations`` to run; ``offspring`` children per generation, each 1 to
      ``mutation_steps`` budget-keeping moves from a ``tournament``-size tournament winner, new to the search;
      ``elitism`` parents always kept (they compete at the last selection stage).
    * Rows: ``select_frac`` of the calibration rows are *selection* rows (:func:`evolve.split_rows`: seeded,
      stratified by suite when suites are given), never used by the evolution; the rest are *search* rows.
      The returned policy is the best on the selection rows among the final population and the start policies
      (``select_rule = "min"``), or, by default (``"paired_se"``), that one only when its paired gain over the best
      start policy on the selection rows exceeds its standard error, else that start (:mod:`final_pick`: the
      one-standard-error rule; searches made before it existed read back as ``"min"``).
    * ``guard``: ``"task"`` (default) checks that pick by what the tables measure: the start pick with the original
      projector, the pick with the original projector and, when the projector evolved, the pick with the evolved
      one are scored on the selection rows by their generated answers (the caller's task scorer), and the simplest
      within one paired standard error of the best is returned (:func:`final_pick.guard`). ``"none"``: the pick
      with the latest projector (searches made before the guard existed read back as ``"none"``).
    * ``lam_scales``: how ``lambda`` is chosen, before the evolution (only when ``gap != "none"``): the initial
      population is scored on the selection rows too, the lambdas ``{0} | {c * spread(R_hat) / spread(G_hat) : c in
      lam_scales}`` (spreads over the initial population's scoring-row scores, :func:`gap.lambda_grid`) are tried,
      each picking the member with the least ``R_hat + lambda G_hat`` on the scoring rows, and the lambda whose pick
      has the lowest selection-row ``R_hat`` is the one every generation runs at (:func:`gap.select_lambda`;
      default :data:`gap.DEFAULT_LAM_SCALES`: ``lambda G_hat`` spreading a quarter to four times as far as
      ``R_hat``). It replaces ``lam`` (a hand-set lambda of the evolution) and ``lam_grid`` (fixed lambdas tried at
      the end), read as :data:`_RETIRED_FIELDS`.
    * Multi-step selection (EvoPress-style): the children are scored on ``screen_samples`` fresh random scoring
      rows, then the best of them on twice as many fresh rows, and the best ``survivors`` on all scoring rows,
      where the ``elitism`` best parents join them (0 = one stage on all of them). A parent already scored there
      under the current projector is not scored again, so a generation costs its children's forward passes
      (``sum(rows * entrants)`` of :func:`evolve.stage_plan`) plus the parents' after a projector round.
    * ``generations``: the presets' are sized by convergence (:mod:`convergence`: the best ``J``'s relative
      improvement over the last quarter of the generations below 1 %), measured on the tiny default.
    * ``max_generations``: 0 (default) runs exactly ``generations``; above ``generations``, the search runs
      ``generations`` and then one generation more at a time until it has converged by that criterion
      (:func:`convergence.history_converged` of its ``history.csv``) or has run ``max_generations`` (at or below
      ``generations``: exactly ``generations``). profiles/default.yaml sets it (the tiny pipeline's searches run
      until converged); the presets do not.
    * ``eval_batch_size``: rows per forward pass (0 = all at once); ``seed``: drives every draw (each job sets its
      own).
    * ``init``: the start policies of generation 0 (:data:`START_POLICIES`).
    * ``projector``: projector evolution (:class:`ProjectorConfig`; ``projector.every = 0``: none).
    * ``extra``: free-form (e.g. how the calibration set was drawn); compared on resume like the rest.
    """

    target: float = 0.6
    grid: tuple[float, ...] = DEFAULT_GRID
    fine_step: float = FINE_STEP
    gap: str = "bernstein"
    delta: float = 0.05
    loss_kind: str = "kl"
    loss_cap: float = DEFAULT_LOSS_CAP
    h_scale: float | None = None
    depth_decay: float = gaps.DEFAULT_DEPTH_DECAY
    budget: str = "params"
    units: str = "block"
    population: int = 8
    generations: int = 32
    max_generations: int = 0
    offspring: int = 16
    mutation_steps: int = 3
    tournament: int = 2
    elitism: int = 2
    screen_samples: int = 8
    survivors: int = 2
    select_frac: float = 0.25
    select_rule: str = "paired_se"
    guard: str = "task"
    lam_scales: tuple[float, ...] = gaps.DEFAULT_LAM_SCALES
    eval_batch_size: int = 0
    seed: int = 0
    init: tuple[str, ...] = ("uniform", "owl", "ecoflap")
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.grid = tuple(sorted(float(g) for g in self.grid))
        self.init = tuple(self.init)
        self.lam_scales = tuple(float(x) for x in self.lam_scales)
        if isinstance(self.projector, Mapping):
            self.projector = ProjectorConfig(**self.projector)
        checks = [
            (isinstance(self.projector, ProjectorConfig),
             f"projector must be a ProjectorConfig, got {self.projector!r}"),
            (len(self.grid) >= 2 and self.grid[0] >= 0 and self.grid[-1] < 1,
             f"grid levels must be >= 2 values in [0, 1), got {self.grid}"),
            (self.grid[0] - GRID_TOL <= self.target <= self.grid[-1] + GRID_TOL,
             f"target sparsity {self.target} is outside the grid range [{self.grid[0]}, {self.grid[-1]}]"),
            (math.isfinite(self.fine_step) and 0 <= self.fine_step < 0.5,
             f"fine_step must lie in [0, 0.5), got {self.fine_step}"),
            (self.gap in gaps.GAP_ESTIMATORS, f"gap must be one of {sorted(gaps.GAP_ESTIMATORS)}, got {self.gap!r}"),
            (0 < self.delta < 1, f"need 0 < delta < 1, got {self.delta}"),
            (self.loss_kind in LOSS_KINDS and self.loss_cap > 0, f"loss_kind in {LOSS_KINDS} and loss_cap > 0"),
            (self.budget in BUDGETS, f"budget must be one of {BUDGETS}, got {self.budget!r}"),
            (self.units in UNIT_KINDS, f"units must be one of {UNIT_KINDS}, got {self.units!r}"),
            (self.select_rule in SELECT_RULES, f"select_rule must be one of {SELECT_RULES}, got {self.select_rule!r}"),
            (self.guard in GUARDS, f"guard must be one of {GUARDS}, got {self.guard!r}"),
            (self.population >= 1 and self.offspring >= 1 and self.generations >= 0,
             "need population >= 1, offspring >= 1, generations >= 0"),
            (self.max_generations >= 0, f"need max_generations >= 0, got {self.max_generations}"),
            (self.mutation_steps >= 1 and self.tournament >= 1, "need mutation_steps >= 1 and tournament >= 1"),
            (0 <= self.elitism <= self.population, f"elitism must lie in [0, population], got {self.elitism}"),
            (self.screen_samples >= 0 and self.survivors >= 1, "need screen_samples >= 0 and survivors >= 1"),
            (self.screen_samples != 1, "screen_samples must be 0 (off) or >= 2"),
            (len(self.init) >= 1 and len(set(self.init)) == len(self.init) and set(self.init) <= set(START_POLICIES),
             f"init must name distinct start policies from {START_POLICIES}, got {list(self.init)}"),
            ("ecoflap" not in self.init or self.target <= ecoflap_cap(self.grid) + GRID_TOL,
             f"the ECoFLaP start policy cannot reach sparsity {self.target} (it keeps at least "
             f"{1 - ecoflap_cap(self.grid):g} of every unit); leave ecoflap out of init"),
            (self.eval_batch_size >= 0, f"need eval_batch_size >= 0, got {self.eval_batch_size}"),
            (0.0 < self.select_frac < 1.0, f"select_frac must lie in (0, 1), got {self.select_frac}"),
            (len(self.lam_scales) >= 1 and all(0 <= x < float("inf") for x in self.lam_scales),
             f"lam_scales must hold finite multipliers >= 0, got {list(self.lam_scales)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def levels(self) -> tuple[float, ...]:
        """The levels a unit takes in this search: ``grid`` plus the ``fine_step`` levels around ``target``
        (:func:`policy.search_grid`)."""
        return search_grid([self.target], self.fine_step, base=self.grid)

    # ------------------------------------------------------------------------------------------ presets

    @classmethod
    def ci(cls) -> SearchConfig:
        """profiles/ci.yaml: 4 policies, 3 generations of 6 children; a 5-step projector round every generation;
        a quarter of the calibration rows held out for selection. Not sized to converge (CI time): at the ci
        profile's 32 calibration rows (12 scoring rows) a generation screens its 6 children on 8 rows and scores 2
        on all 12; 46 candidate evaluations per search (init, generations, final selection)."""
        return cls(population=4, generations=3, offspring=6, select_frac=0.25, projector=ProjectorConfig.ci())

    @classmethod
    def default(cls) -> SearchConfig:
        """profiles/default.yaml (the field defaults): 8 policies, 32 generations of 16 children (screened on 8
        rows, the best 6 on 16, 2 survivors on all 24 scoring rows beside the 2 elites), KL fitness over the text
        positions from the uniform, OWL and ECoFLaP starts, Bernstein gap whose lambda is chosen before the evolution
        on the selection rows (a quarter of the calibration rows) from the initial population, among 0 and the
        lambdas that make ``lambda G_hat`` spread 0.25 to 4 times as far as ``R_hat``, a 20-step projector round every
        3 generations on half the search rows. At 64 calibration rows: 818 candidate evaluations per search (8 +
        32 x 24 + 20 elites rescored after projector rounds + 22 in the final selection), about 9,800 row forwards.

        Sized on the tiny default (seed 0, 64 calibration rows; :func:`convergence.late_improvement`, the best
        ``J``'s relative improvement over the last quarter, below 1 % = converged), measured at the commit that
        recorded ``start_pick``: the search without the gap term and projector converges at 0.5 / 0.6 / 0.7 (0.0 /
        0.0 / 0.0015; 787 evaluations, 33-51 s a search on one core beside other work); EfficientLLaVA at 0.5 and
        0.7 too (0.0 / 0.0039; 815 evaluations), and at 0.6 its best ``J`` still fell 24 % over the last quarter
        (0.0572 to 0.0434): 0.0127 of it at the projector round after generation 24, 0.0011 in the evolution after
        it; the projector's fine-tune keeps lowering the objective where the policy evolution has flattened (rerun:
        ``ellava sweep --profile default --methods ellava --sparsities 0.6 --seeds 0``, then
        :func:`convergence.best_per_generation` of the job's ``history.csv``). 24 generations: 2.8 %
        at 0.7 (617 evaluations); 48 generations of 8 children: 0.9 % but a worse best ``J`` (0.1325 against 0.1260,
        729 evaluations). Earlier (before the projector's distillation read the text positions) 8 generations
        improved 5 % at 0.6, and screening on 4 rows instead of 8 converged later (0.6: still 4 % at 64
        generations) for less than half the cost a generation. Over seeds 0-2 the 32 generations did not converge
        everywhere, so profiles/default.yaml adds ``max_generations: 96`` (run on until converged): in its
        ``make reproduce`` every main-table search converged, within 32-52 generations, and returned the policy it
        returned at 32 (docs/method.md, block ``convergence``)."""
        return cls()

    @classmethod
    def smol(cls) -> SearchConfig:
        """profiles/smol.yaml: the default's 32 generations of 16 children with its cheap selection (8 screening
        rows, 2 survivors), 8 policies, a projector round every 3 generations. Sized from the tiny measurement
        (:meth:`default`); to be re-measured on smol (``convergence.late_improvement`` of its showcased search,
        notebook 04). At 64 calibration rows: 818 candidate evaluations per search.

        Measured on smol (AMD EPYC, 2 threads, quiet; EfficientLLaVA at 0.6, seed 0, the preset cut to 6
        generations from the uniform and OWL starts: ``search: {generations: 6, init: [uniform, owl]}`` in a copy of
        profiles/smol.yaml, ``ellava sweep --methods ellava --sparsities 0.6 --seeds 0 --no-ledger``): level
        database 387 s; 138 candidates scored in 199 s (1.44 s each, 8 to 24 rows), assembly 21 s, one projector
        round 98 s; 418 s of search, 65 s of exact re-prune, 97 s of evaluation (200 items per suite). Lambda was
        chosen non-zero (9.7); the best ``J`` fell from 1.97 to 1.30 in those 6 generations (far from flat). So the
        32 generations cost about 40 minutes a search (32 x ~40 s + 10 projector rounds x ~98 s)."""
        return cls(population=8, generations=32, offspring=16, screen_samples=8, survivors=2, select_frac=0.25,
                   projector=ProjectorConfig.smol())

    @classmethod
    def paper(cls) -> SearchConfig:
        """profiles/paper.yaml: 16 policies, 100 generations of 32 children (16 screening samples, 8 survivors),
        a projector round every 10 generations; a quarter of the calibration rows held out for selection;
        candidates scored 24 rows per forward pass (the batch ``ellava plan --profile paper`` chooses for a 40 GB
        GPU). At 64 calibration rows (24 scoring rows: two stages, 16 rows then all): 4,072 candidate evaluations
        per search. Not re-measured since the parents joined at the last stage."""
        return cls(population=16, generations=100, offspring=32, screen_samples=16, survivors=8, select_frac=0.25,
                   eval_batch_size=24, projector=ProjectorConfig.paper())

    @classmethod
    def from_preset(cls, name: str = "default", **overrides: Any) -> SearchConfig:
        """The preset ``name`` (:data:`PRESETS`) with the fields named in ``overrides`` replaced.

        Overrides use the serialised names: search fields as they are, projector fields as ``projector_<field>``
        (``projector_every=0``). ``projector=`` (a :class:`ProjectorConfig` or a mapping of its fields) replaces
        the preset's projector first; ``projector_*`` keys then apply on top. Unknown keys: ``ValueError``.
        """
        base = getattr(cls, _check_preset(name))()
        top, projector, proj = _split(overrides, base.projector)
        return replace(base, **top, projector=replace(projector, **proj))

    # ---------------------------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        """The flat serialised form (JSON types; projector fields as ``projector_<field>``, in field order), minus
        :data:`_LATER_FIELDS` at their earlier value, plus ``gap_revision`` for a gap in :data:`gaps.GAP_REVISION`
        and ``loss_revision`` for a loss in :data:`objective.LOSS_REVISION` (their meaning changed: a config with
        the old one, written without the key, no longer matches, so its checkpoints and sweep rows are not
        reused), and ``selection_revision`` (:data:`SELECTION_REVISION`, likewise)."""
        d: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "projector":
                d.update(value.to_flat())
            else:
                d[f.name] = list(value) if f.name in ("grid", "init", "lam_scales") else value
        if self.gap in gaps.GAP_REVISION:  # its formula changed: not the digest of searches with the old one
            d["gap_revision"] = gaps.GAP_REVISION[self.gap]
        if self.loss_kind in LOSS_REVISION:  # likewise for a loss whose positions changed
            d["loss_revision"] = LOSS_REVISION[self.loss_kind]
        d["selection_revision"] = SELECTION_REVISION  # how a generation selects (:func:`evolve._generation`)
        d = json.loads(json.dumps(d))
        for k, earlier in _LATER_FIELDS.items():  # at their earlier value: configs (and digests) as before
            if d[k] == earlier:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchConfig:
        """Read the serialised form back (``from_dict(c.to_dict()) == c``): an absent :data:`_LATER_FIELDS` key
        is the value searches had before it existed, any other absent key the field default; a
        :data:`_RETIRED_FIELDS` key (an older folder's ``lam``, ``lam_grid``) is dropped."""
        # revisions: derived from ``gap`` and ``loss_kind`` (:data:`gaps.GAP_REVISION`, :data:`objective.LOSS_REVISION`)
        d = {k: v for k, v in d.items() if k not in ("gap_revision", "loss_revision", "selection_revision",
                                                 *_RETIRED_FIELDS)}
        later = {k: v for k, v in _LATER_FIELDS.items() if k not in d}
        n = len(PROJECTOR_PREFIX)
        base = ProjectorConfig(**{k[n:]: v for k, v in later.items() if k.startswith(PROJECTOR_PREFIX)})
        top, projector, proj = _split({**{k: v for k, v in later.items() if not k.startswith(PROJECTOR_PREFIX)}, **d},
                                      base)
        return cls(**{**top, "grid": tuple(top.get("grid", DEFAULT_GRID))}, projector=replace(projector, **proj))

    def to_json(self, path: str | Path) -> Path:
        return files.write_json(Path(path), self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> SearchConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def identity(self) -> dict[str, Any]:
        """:meth:`to_dict` with the memory knobs (:data:`checkpoint.MEMORY_FIELDS`) at their baseline values
        (dropped where :data:`_LATER_FIELDS` drops them): what a search's result depends on, for digests and the
        sweep's rows."""
        return replace(self, eval_batch_size=0,
                       projector=replace(self.projector, micro_batch=0, checkpointing=False)).to_dict()

    def digest(self) -> str:
        """12 hex chars of sha1 over :meth:`identity` minus :data:`checkpoint.RESUMABLE_FIELDS`."""
        d = {k: v for k, v in self.identity().items() if k not in ckpt.RESUMABLE_FIELDS}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _split(d: Mapping[str, Any], projector: ProjectorConfig) -> tuple[dict[str, Any], ProjectorConfig, dict[str, Any]]:
    """``(search fields, base projector, projector fields)`` of a flat mapping. ``projector_<field>`` keys are
    projector fields (prefix dropped); a ``projector`` key replaces the base ``projector`` when it is a
    :class:`ProjectorConfig` and adds fields below the flat keys when it is a mapping. ``ValueError`` naming any
    unknown key."""
    search_names = {f.name for f in fields(SearchConfig)} - {"projector"}
    projector_names = {f.name for f in fields(ProjectorConfig)}
    top: dict[str, Any] = {}
    proj: dict[str, Any] = {}
    unknown = []
    for k, v in d.items():
        if k in search_names:
            top[k] = v
        elif k in _RETIRED_FIELDS:
            raise ValueError(f"search config key {k!r} no longer exists: {_RETIRED_FIELDS[k]}")
        elif k.startswith(PROJECTOR_PREFIX) and k[len(PROJECTOR_PREFIX):] in projector_names:
            proj[k[len(PROJECTOR_PREFIX):]] = v
        elif k != "projector":
            unknown.append(k)
    given = d.get("projector")
    if isinstance(given, ProjectorConfig):
        projector = given
    elif given is not None:
        if not isinstance(given, Mapping):
            raise ValueError(f"projector must be a ProjectorConfig or a mapping of its fields, got {given!r}")
        unknown += [f"projector.{k}" for k in given if k not in projector_names]
        proj = {**given, **proj}
    if unknown:
        raise ValueError(f"unknown search config keys {sorted(unknown)}")
    return top, projector, proj


#: Start policies of generation 0 (``SearchConfig.init``): the uniform policy, OWL's outlier-weighted and
#: ECoFLaP's importance-weighted allocations (:mod:`allocate`), each rounded to the grid inside the budget band.
START_POLICIES: tuple[str, ...] = ("uniform", "owl", "ecoflap")
