"""Evolutionary search for a per-unit sparsity policy that minimizes ``J(pi) = R_hat(pi) + lambda G_hat(pi)``.

Budget and mutation: :mod:`budget` (every policy keeps ``|S(pi) - target| <= budget.BUDGET_TOL``; mutations are
budget-exact moves between two units).

**Rows** (:func:`split_rows`, :func:`score_rows`). The n calibration rows are split once, seeded and
deterministically, into *selection* rows (``select_frac`` of them, stratified by suite when ``groups`` are given)
and *search* rows. ``projector.rows`` of the search rows are the *projector rows* (projector evolution trains and
early-stops on them only) and the rest are the *scoring* rows, whether or not the projector evolves: a search
without projector evolution leaves the projector rows unused, so the search with and without it (the ``ellava``
and ``search`` methods, same seed) score candidates on the same rows and are compared on equal terms. The
evolution scores candidates on scoring rows only, so no candidate is scored on a row the projector trained on,
and nothing in the evolution but the choice of lambda (below) sees a selection row.

**Loop** (:func:`run_search`). Generation 0 (:mod:`starts`): the start policies named by ``init``
(:data:`START_POLICIES`: the uniform policy, and optionally the OWL and ECoFLaP allocations of the same budget,
rounded to the grid with :func:`allocate.round_to_grid` and moved to the exact budget with
:func:`budget.snap_to_budget`; a start that cannot be is left out) plus mutants of them in turn, all scored on every
scoring row. The units are the caller's, block or matrix units (``SearchConfig.units``, :mod:`ellava_lib.core.units`);
both are assembled from the same level database. Each generation:
``offspring`` children, each a mutant of a tournament winner (``tournament`` entrants, best rank), new to the
population and to every policy scored on all scoring rows so far in the search (no candidate is scored twice on the
same rows); then EvoPress-style multi-step selection (:func:`stage_plan`, sized for the children): the children
alone are scored on ``screen_samples`` *fresh* random scoring rows (drawn with the run's seeded ``random.Random``),
the best of them go on to twice as many fresh rows, and the best ``survivors`` reach the last stage, all scoring
rows, where the ``elitism`` best parents join them and compete on the same rows (as EvoPress adds its parent at the
last selection step). A parent already scored on all scoring rows under the current projector keeps that score and
is not forwarded again (a score cache per projector round, emptied when the projector changes, kept in the
checkpoint); so between projector rounds a generation's forward passes are the children's alone. The next
population ranks the candidates by the stage they reached (last first), then by ``J`` there (ties by policy id).
Every ``projector.every`` generations the projector is evolved for the top ``projector.topk`` (:mod:`projector`,
:class:`config.ProjectorConfig`) on the projector rows; the parents are rescored with it at the next generation's
last stage. Whether a search converged: :mod:`convergence` (the best ``J`` per generation from ``history.csv`` and
its relative improvement over the last quarter of the generations); with ``max_generations`` set the search runs
past ``generations`` one generation at a time until it has converged or reached ``max_generations``
(:func:`_go_on`). Candidates are *assembled* from the level
database (no solver in the loop).

**Lambda** (:func:`_choose_lambda`): chosen once, before the evolution, and every generation runs at it. With
``gap = "none"`` it is 0. Otherwise, after generation 0 (scored on the scoring rows), every initial-population
member is also scored on the selection rows (history phase ``lambda``); the
grid is :func:`gap.lambda_grid` of the members' scoring-row ``R_hat`` and ``G_hat`` with the multipliers
``lam_scales`` (``{0} | {c * spread(R_hat) / spread(G_hat)}``, spread = max - min; ``{0}`` when either spread is
0); each lambda picks the member with the least ``R_hat + lambda G_hat`` on the scoring rows, and the lambda whose
pick has the lowest selection-row ``R_hat`` is taken (ties: the smaller lambda; :func:`gap.select_lambda`). The
initial population is then ranked by ``J`` at that lambda (from its scores, no new forward pass) and generation
0's history rows are written with ``J`` at it, so every history row's ``J`` is at that lambda. The lambda and
the record of its choice are in the checkpoint, ``selection.json`` and the policy's meta (``lam``, ``lam_grid``,
``lam_selected``), so the lambda reported is the lambda that steered the evolution.

**Finish** (:func:`_finish`): the final population and the start policies are scored on the selection rows; the
one with the lowest ``R_hat`` there is the best candidate (with or without a gap term) and ``start_pick`` the start
with the lowest selection-row ``R_hat``, the policy the search would return had it not evolved (the comparator of
the tables' "search vs its best start" check, :func:`ellava_lib.run.tables.search_vs_starts`). The search returns
the best candidate, or under ``select_rule = "paired_se"`` (the default) the start pick when the best's paired
gain over it on the selection rows is within one standard error (:mod:`final_pick`); either way the returned
policy's selection-row ``R_hat`` is at most every start policy's plus that standard error. Then, under
``guard = "task"`` (the default), the task guard (:func:`_guard`, :mod:`final_pick`) checks that answer by what the
tables measure: the start pick and the returned policy with the original projector, and the returned policy with
the evolved one, answer the selection rows (the caller's ``task_score``), and the simplest within one paired
standard error of the best is returned (its selection-row score recomputed under its projector when it is not the
pick of the rule above). ``selection.json``
holds every candidate's ``r_select``, the lambda record, the start policies' names (``start_names``, from
``cfg.init``), ``start_pick`` and ``final_pick`` (the rule, the gain, its SE and ``kept_start``), and
``task_guard`` (the options, their per-row task scores and means, the gains and SEs, the ``choice``). Each
generation ends with an atomic checkpoint (:mod:`checkpoint`); a run resumes from it and produces exactly the
result and history of an uninterrupted run.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ellava_lib.core import files
from ellava_lib.core.policy import Policy, on_grid, weighted_mean
from ellava_lib.core.units import block_unit, unit_kind
from ellava_lib.data.calibration import calibration_fingerprint
from ellava_lib.model import structure
from ellava_lib.prune.leveldb import LevelDB, model_identity
from ellava_lib.search import checkpoint as ckpt
from ellava_lib.search import final_pick
from ellava_lib.search import gap as gaps
from ellava_lib.search.budget import (
    BUDGET_TOL,
    budget_error,
    budget_weights,
    mutate,
)
from ellava_lib.search.config import SearchConfig
from ellava_lib.search.convergence import history_converged
from ellava_lib.search.objective import (
    KL_KINDS,
    Score,
    dense_logprobs_of,
    per_sample_losses,
    score_losses,
    subset,
)
from ellava_lib.search.projector import (
    evolve_projector,
    load_projector,
    projector_prefix,
    projector_state,
    save_projector,
    set_projector_state,
)
from ellava_lib.search.starts import initial_population, start_policies  # noqa: F401 (generation 0, re-exported)

#: The caller's task scorer (``SearchConfig.guard = "task"``): ``task_score(model, rows)`` generates the answers
#: of the batch rows ``rows`` with ``model`` as it is and returns each row's contribution to the task score
#: (higher is better; their mean is the score), e.g. :func:`ellava_lib.eval.evaluate.task_scores` of those rows'
#: samples.
TaskScore = Callable[[nn.Module, Sequence[int]], Sequence[float]]

# ------------------------------------------------------------------------------------------------ rows

#: Most selection stages of a generation (:func:`stage_plan`).
MAX_STAGES: int = 3


def split_rows(n: int, select_frac: float, seed: int,
               groups: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """``(search rows, selection rows)`` of ``n`` calibration rows, both sorted.

    Stratified: ``k = round(select_frac * n)`` rows (halves up) are selection rows, taken round-robin over the
    groups (suites, in sorted order; all rows one group when ``groups`` is None), each group's rows shuffled with
    ``random.Random(f"select/{seed}/{group}")``: every suite gets ``k / n_groups`` rows, give or take one.
    ``ValueError`` when fewer than 2 selection rows or fewer than 2 search rows result."""
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} rows")
    labels = [str(g) for g in groups] if groups is not None else ["all"] * n
    queues = []
    for group in sorted(set(labels)):
        rows = [i for i in range(n) if labels[i] == group]
        random.Random(f"select/{seed}/{group}").shuffle(rows)
        queues.append(rows)
    order = [q[j] for j in range(max(map(len, queues), default=0)) for q in queues if j < len(q)]
    select = sorted(order[: int(math.floor(select_frac * n + 0.5))])
    search = [i for i in range(n) if i not in set(select)]
    if len(select) < 2 or len(search) < 2:
        raise ValueError(f"select_frac {select_frac} of {n} calibration rows leaves {len(select)} selection and "
                         f"{len(search)} search rows; need at least 2 of each (more samples or another select_frac)")
    return search, select


def score_rows(search: Sequence[int], cfg: SearchConfig) -> tuple[list[int], list[int]]:
    """``(scoring rows, projector rows)`` of the search rows: ``projector.rows`` of them (at least 1, leaving at
    least 1) drawn with ``random.Random(f"projector-rows/{seed}")`` are the projector's and the rest score, with or
    without projector evolution (without it the projector rows are unused), so a search with and one without
    projector evolution score on the same rows (module docstring)."""
    search = list(search)
    k = min(max(1, round(cfg.projector.rows * len(search))), len(search) - 1)
    proj = sorted(random.Random(f"projector-rows/{cfg.seed}").sample(search, k))
    return [i for i in search if i not in set(proj)], proj


def stage_plan(candidates: int, rows: int, screen: int, survivors: int) -> list[tuple[int, int]]:
    """``[(rows scored, candidates entering), ...]`` of one generation's multi-step selection of ``candidates``
    children (``candidates >= 1``; the ``elitism`` parents are not counted: they join at the last stage,
    :func:`_generation`).

    Rows: ``screen`` and ``2 screen`` (each while below ``rows``), then ``rows`` (all scoring rows): at most
    three stages; one stage on all rows when ``screen`` is 0 or at least ``rows``. Entrants: all ``candidates`` at
    the first stage, ``s = min(survivors, candidates)`` at the last, geometric in between
    (``round(candidates * (s / candidates) ** (k / (K - 1)))``). A generation forwards
    ``sum(rows * entrants)`` rows for its children, plus ``rows`` per parent scored anew."""
    sizes = []
    r = screen
    while 0 < r < rows and len(sizes) < MAX_STAGES - 1:
        sizes.append(r)
        r *= 2
    sizes.append(rows)
    s = min(survivors, candidates)
    k_last = len(sizes) - 1
    enter = [candidates if k == 0 else max(s, round(candidates * (s / candidates) ** (k / k_last)))
             for k in range(len(sizes))]
    if k_last:
        enter[-1] = s
    return list(zip(sizes, enter))


# --------------------------------------------------------------------------------------------- the loop


@dataclass
class Member:
    policy: Policy
    score: Score

    def key(self) -> tuple[float, str]:
        return (self.score.j, self.policy.policy_id())

    def to_dict(self) -> dict[str, Any]:
        return {"policy_id": self.policy.policy_id(), "sparsities": self.policy.sparsities,
                "score": self.score.to_dict()}


@dataclass
class SearchResult:
    """The returned policy and its score on the selection rows, the final population (best rank first) and the
    run's bookkeeping.

    ``selection``: how the policy was chosen (every candidate's ``r_select``, ``index`` and ``policy_id`` of the
    pick, ``lam``: the lambda of the evolution, ``lam_choice``: the record of its choice, None without a gap term,
    :func:`_choose_lambda`). ``timing``: accumulated seconds of ``assemble``, ``evaluate`` (forward
    passes and scoring), ``projector`` and ``dense`` (the dense log-probabilities), ``n_assembled`` and
    ``n_units_copied`` (units the level database copied for them: only those that changed since the candidate
    before, :meth:`LevelDB.assemble`)."""

    policy: Policy
    score: Score
    population: list[Member]
    generations: int
    evaluations: int
    timing: dict[str, float]
    out_dir: Path
    projector: Path | None
    wall_s: float
    selection: dict[str, Any]


@dataclass
class _Run:
    model: nn.Module
    batch: dict[str, torch.Tensor]
    db: LevelDB
    units: dict[str, int]
    weights: dict[str, float]
    cfg: SearchConfig
    out: Path
    dense: torch.Tensor | None
    scoring: list[int]
    selection: list[int]
    projector_rows: list[int]
    timing: dict[str, float]
    rows: int = 0
    projector: dict[str, Any] | None = None
    starts: list[Policy] | None = None
    lam: float = 0.0  # the lambda of J: 0 until chosen (:func:`_choose_lambda`), then every generation's
    lam_record: dict[str, Any] | None = None  # how it was chosen (None: no gap term)
    pending: list[dict[str, Any]] | None = None  # history rows held back until lambda is chosen (generation 0)
    #: ``{policy_id: Score}`` of the policies scored on all scoring rows under the projector of round
    #: ``full_round`` (0: the original projector); emptied when the projector changes (:func:`_full_score`).
    full_scores: dict[str, Score] = field(default_factory=dict)
    full_round: int = 0
    #: Ids of every policy scored on all scoring rows in this search, under any projector (children are new to it).
    full_ids: set[str] = field(default_factory=set)
    #: The projector the model came with (the task guard's "original projector"), and the caller's task scorer.
    original_projector: dict[str, torch.Tensor] | None = None
    task_score: TaskScore | None = None

    @property
    def n(self) -> int:
        return int(self.batch["input_ids"].shape[0])


def _score(run: _Run, policy: Policy, generation: int, phase: str, rows: Sequence[int]) -> Score:
    """Assemble ``policy``, score it on ``rows`` at the run's lambda (``run.lam``), append its history row (to
    ``run.pending`` while that is a list)."""
    return _score_rows(run, policy, generation, phase, rows)[0]


def _score_rows(run: _Run, policy: Policy, generation: int, phase: str,
                rows: Sequence[int]) -> tuple[Score, list[float]]:
    """:func:`_score` and the per-row losses behind its ``R_hat`` (clipped at ``loss_cap``), in ``rows``' order."""
    cfg = run.cfg
    if budget_error(policy, run.weights, cfg.target) > BUDGET_TOL:  # the invariant of :mod:`budget`
        raise RuntimeError(f"policy {policy.policy_id()} left the budget {cfg.target} +- {BUDGET_TOL}: "
                           f"S = {weighted_mean(policy.sparsities, run.weights)}")
    run.timing["assemble"] += run.db.assemble(run.model, policy, check=False)
    run.timing["n_assembled"] += 1
    run.timing["n_units_copied"] += run.db.last_assemble_units or 0
    tick = time.perf_counter()
    losses = per_sample_losses(run.model, run.batch, cfg.loss_kind, run.dense, list(rows), cfg.eval_batch_size or None)
    n_fit = len(run.scoring)
    gap_kw = ({"depth_decay": cfg.depth_decay, "h_scale": cfg.h_scale or min(gaps.DEFAULT_H_SCALE, n_fit)}
              if cfg.gap == "capacity" else
              {"weight_sq": {u: run.db.weight_sq(u) for u in run.units}} if cfg.gap == "norm" else None)
    score = score_losses(losses, gap=cfg.gap, lam=run.lam, delta=cfg.delta,
                         loss_cap=cfg.loss_cap, units=run.units, sparsities=policy.sparsities, n_capacity=n_fit,
                         gap_kw=gap_kw)
    run.timing["evaluate"] += time.perf_counter() - tick
    row = {"generation": generation, "policy_id": policy.policy_id(), "r_hat": score.r_hat, "g_hat": score.g_hat,
           "j": score.j, "budget": weighted_mean(policy.sparsities, run.weights), "n_samples": score.n_used,
           "phase": phase}
    if run.pending is not None:
        run.pending.append(row)
    else:
        ckpt.append_history(run.out / ckpt.HISTORY, [row])
    run.rows += 1
    return score, losses.double().clamp(0.0, float(cfg.loss_cap)).flatten().tolist()


def _tournament(pop: list[Member], rng: random.Random, size: int) -> Member:
    """The best-ranked (lowest index) of ``size`` uniform draws from the ranked population."""
    return pop[min(rng.randrange(len(pop)) for _ in range(size))]


def _round(run: _Run) -> int:
    """The round of the projector the model holds now (0: the original one)."""
    return int((run.projector or {}).get("round", 0))


def _full_score(run: _Run, policy: Policy, gen: int, phase: str) -> Score:
    """``policy``'s score on all scoring rows under the current projector: the cached one when it has been scored
    so already (no forward pass, no history row), else scored now (:func:`_score`) and cached. The cache holds one
    projector round and is emptied when the round changes."""
    if run.full_round != _round(run):
        run.full_scores, run.full_round = {}, _round(run)
    pid = policy.policy_id()
    if pid not in run.full_scores:
        run.full_scores[pid] = _score(run, policy, gen, phase, run.scoring)
        run.full_ids.add(pid)
    return run.full_scores[pid]


def _generation(run: _Run, pop: list[Member], rng: random.Random, gen: int) -> list[Member]:
    """One generation (module docstring): children new to the search screened by :func:`stage_plan`, the
    ``elitism`` best parents joining them at the last stage (all scoring rows; a parent already scored there under
    the current projector is not re-forwarded), the next population ranked by stage reached, then ``J``."""
    cfg = run.cfg
    seen = {m.policy.policy_id() for m in pop} | run.full_ids
    children: list[Policy] = []
    for _ in range(cfg.offspring):
        for _ in range(20):
            child = mutate(_tournament(pop, rng, cfg.tournament).policy, run.weights, rng,
                           rng.randint(1, cfg.mutation_steps))
            if child.policy_id() not in seen:
                seen.add(child.policy_id())
                children.append(child)
                break
    plan = stage_plan(len(children), len(run.scoring), cfg.screen_samples, cfg.survivors) if children else []
    alive = children
    out: list[Member] = []  # eliminated, latest stage first
    for k, (n_rows, enter) in enumerate(plan[:-1]):
        rows = sorted(rng.sample(run.scoring, n_rows))
        ranked = sorted((Member(p, _score(run, p, gen, "screen", rows)) for p in alive[:enter]), key=Member.key)
        out = ranked[plan[k + 1][1]:] + out
        alive = [m.policy for m in ranked[: plan[k + 1][1]]]
    last = [Member(p, _full_score(run, p, gen, "full")) for p in alive[: plan[-1][1] if plan else 0]]
    ids = {m.policy.policy_id() for m in last}
    last += [Member(m.policy, _full_score(run, m.policy, gen, "full")) for m in pop[: cfg.elitism]
             if m.policy.policy_id() not in ids]
    out = sorted(last, key=Member.key) + out
    ids = {m.policy.policy_id() for m in out}
    out += [m for m in pop if m.policy.policy_id() not in ids]  # fewer candidates than places: older parents
    out = out[: cfg.population]
    keep = {m.policy.policy_id() for m in out}  # only parents are looked up: the cache holds the population's
    run.full_scores = {pid: s for pid, s in run.full_scores.items() if pid in keep}
    return out


def _evolve(run: _Run, pop: list[Member], gen: int) -> None:
    """Evolve the projector for the top-k on the projector rows and save it (the parents are rescored with it
    in the next generation's stages)."""
    cfg = run.cfg
    tick = time.perf_counter()
    top = [m.policy for m in pop[: cfg.projector.topk]]
    state, log = evolve_projector(run.model, run.batch, top, run.db, run.dense, cfg.projector,
                                  cfg.seed * 100003 + gen, rows=run.projector_rows)
    rnd = (run.projector or {}).get("round", 0) + 1
    name = f"projector_rounds/round-{rnd:03d}.safetensors"
    holdout = [r["holdout_loss"] for r in log if r["holdout_loss"] is not None]
    save_projector(run.out / name, state, projector_prefix(run.model),
                   {"round": rnd, "generation": gen, "policies": [p.policy_id() for p in top],
                    "steps_run": log[-1]["step"], "holdout_start": holdout[0] if holdout else None,
                    "holdout_best": min(holdout) if holdout else None, "config": cfg.to_dict()})
    run.projector = {"file": name, "round": rnd, "generation": gen}
    run.timing["projector"] += time.perf_counter() - tick


def search_context(model: nn.Module, batch: Mapping[str, torch.Tensor], units: Mapping[str, int]) -> dict[str, Any]:
    """What a checkpoint must agree on besides the config: calibration fingerprint, model identity, units."""
    return {"calibration": calibration_fingerprint(dict(batch)), "model": model_identity(model), "units": dict(units)}


def check_resume(out_dir: str | Path, cfg: SearchConfig, context: Mapping[str, Any] | None = None) -> bool:
    """Whether ``out_dir`` holds a checkpoint to resume; ``ValueError`` naming the differences if it was
    written with another config (or, when given, another context: calibration, model, units)."""
    state = ckpt.read_checkpoint(Path(out_dir))
    if state is None:
        return False
    ckpt.check_compatible(state, cfg.to_dict(), context, Path(out_dir))
    return True


def _check_inputs(cfg: SearchConfig, units: Mapping[str, int], db: LevelDB, n: int) -> None:
    if unit_kind(units) != cfg.units:
        raise ValueError(f"the search's config has {cfg.units} units, the units given are {unit_kind(units)} units "
                         f"(units.list_units(model, kind={cfg.units!r}))")
    missing = [u for u in units if block_unit(u) not in db.units]
    if missing:
        raise ValueError(f"units {missing} are not in the level database {db.path}")
    off = [g for g in cfg.levels if not on_grid(g, db.grid)]
    if off:
        raise ValueError(f"grid levels {off} are not in the level database {db.path} (grid {db.grid})")
    if cfg.gap == "bernstein" and n < 2:
        raise ValueError("the Bernstein gap needs at least 2 calibration samples")


def run_search(model: nn.Module, batch: dict[str, torch.Tensor], level_db: LevelDB, units: Mapping[str, int],
               cfg: SearchConfig, out_dir: str | Path, progress: bool = True,
               importance: Mapping[str, float] | None = None, groups: Sequence[str] | None = None,
               task_score: TaskScore | None = None) -> SearchResult:
    """Run (or resume) the search of the module docstring in ``out_dir``; returns the selected policy.

    ``model``'s units are reset to the database's level 0 (its dense weights) on entry; its projector must be the
    original one (the dense log-probabilities of KL terms come from it). ``importance``: ECoFLaP's unit scores for
    this model on the search rows when already computed (an ``ecoflap`` start policy needs them; the start policies'
    statistics read the search rows only, never a selection row). ``groups``: each row's
    suite, to stratify the selection rows (:func:`split_rows`). ``task_score``: the caller's task scorer
    (:data:`TaskScore`), required by ``cfg.guard = "task"`` (:func:`_guard`). The model is left assembled at the
    returned policy with the projector returned (the latest one, or the original one when the guard chose it).
    Writes ``search_config.json``, ``history.csv``, ``checkpoint.json``, ``selection.json``, ``policy.json`` and
    ``projector.safetensors`` (+ ``.json``, when an evolved projector is returned) into ``out_dir``; what becomes
    of the model afterwards (saved as assembled, or re-pruned exactly: :mod:`finalize`) is the caller's.
    ``ValueError`` when the split leaves fewer than 2 selection or search rows, or when ``cfg.guard = "task"`` and
    no ``task_score`` is given.
    """
    if cfg.guard == "task" and task_score is None:
        raise ValueError('guard "task" needs a task_score (the generated answers of the selection rows, scored); '
                         'pass one, or set guard "none"')
    wall = time.perf_counter()
    units = dict(units)
    n = int(batch["input_ids"].shape[0])
    search, selection = split_rows(n, cfg.select_frac, cfg.seed, groups)
    scoring, projector_rows = score_rows(search, cfg)
    _check_inputs(cfg, units, level_db, len(scoring))
    out = files.ensure_dir(Path(out_dir))
    context = search_context(model, batch, units)  # the split follows from the batch and the config
    resume = check_resume(out, cfg, context)
    level_db.check_model(model)
    level_db.forget(model)  # what the model's units hold is unknown: the first assembly copies every unit
    if on_grid(0.0, level_db.grid):  # level 0 = the dense weights (the database's snapshot): make the units dense
        level_db.assemble(model, Policy({u: 0.0 for u in units}, level_db.grid), check=False)
    lm_tokens = float(batch["attention_mask"].sum(1).float().mean())
    weights = budget_weights(units, cfg.budget, lm_tokens, structure.vision_tokens_per_image(model.config))
    timing = {"assemble": 0.0, "evaluate": 0.0, "projector": 0.0, "dense": 0.0, "n_assembled": 0, "n_units_copied": 0}
    tick = time.perf_counter()
    need_dense = cfg.loss_kind in KL_KINDS or (cfg.projector.every > 0 and cfg.projector.kl_weight > 0)
    dense = dense_logprobs_of(model, batch, cfg.eval_batch_size or None) if need_dense else None
    timing["dense"] = time.perf_counter() - tick
    run = _Run(model, batch, level_db, units, weights, cfg, out, dense, scoring, selection, projector_rows, timing,
               original_projector=projector_state(model), task_score=task_score)
    cfg.to_json(out / "search_config.json")
    if resume:
        state = ckpt.read_checkpoint(out)
        names = state.get("start_names") or [None] * len(state["starts"])
        starts = [Policy(sp, cfg.levels, {"target": cfg.target, "start": nm}) for sp, nm in zip(state["starts"], names)]
        ckpt.truncate_history(out / ckpt.HISTORY, state["history_rows"])
        run.rows, run.projector, start = state["history_rows"], state["projector"], state["generation"]
        run.lam, run.lam_record = float(state["lam"]), state["lam_record"]
        run.timing.update({k: v for k, v in state["timing"].items() if k != "dense"})
        rng = ckpt.rng_from_state(state["rng"])
        run.starts = starts
        pop = [Member(Policy(m["sparsities"], cfg.levels, {"target": cfg.target}), Score.from_dict(m["score"]))
               for m in state["population"]]
        run.full_round = state["full_round"]  # the score cache (checkpoints of selection revision 2 hold it)
        run.full_scores = {pid: Score.from_dict(d) for pid, d in state["full_scores"].items()}
        run.full_ids = set(state["full_ids"])
        if run.projector:
            set_projector_state(model, load_projector(out / run.projector["file"])[0])
    else:
        ckpt.start_history(out / ckpt.HISTORY)
        rng, start = random.Random(cfg.seed), 0
        starts = start_policies(model, subset(batch, search), weights, cfg, importance)  # no selection row
        level_db.forget(model)  # ECoFLaP's importances perturb and restore unit weights in place
        run.starts = starts
        run.pending = []  # generation 0's history rows: written by _choose_lambda, with J at the lambda chosen
        pop = [Member(p, _full_score(run, p, 0, "init")) for p in initial_population(weights, cfg, rng, starts)]
        pop = _choose_lambda(run, pop)
        _save_checkpoint(run, pop, rng, 0, context)
    bar = tqdm(total=cfg.generations, initial=min(start, cfg.generations), desc="search", disable=not progress)
    gen = start
    while _go_on(run, gen):
        gen += 1
        pop = _generation(run, pop, rng, gen)
        if cfg.projector.every and gen % cfg.projector.every == 0:
            _evolve(run, pop, gen)
        _save_checkpoint(run, pop, rng, gen, context)
        if gen > bar.total:  # beyond ``generations``: running until converged
            bar.total = gen
        bar.update(1)
        bar.set_postfix(best_j=f"{pop[0].score.j:.4f}")
    bar.close()
    return _finish(run, pop, starts, gen, time.perf_counter() - wall)


def _go_on(run: _Run, gen: int) -> bool:
    """Whether to run generation ``gen + 1``: always below ``generations``; beyond it, only with
    ``max_generations`` set, below it, and while the search has not converged
    (:func:`convergence.history_converged`)."""
    cfg = run.cfg
    if gen < cfg.generations:
        return True
    return gen < cfg.max_generations and not history_converged(run.out / ckpt.HISTORY)


def _save_checkpoint(run: _Run, pop: list[Member], rng: random.Random, gen: int, context: dict[str, Any]) -> None:
    ckpt.write_checkpoint(run.out, {
        "generation": gen, "config": run.cfg.to_dict(), "config_hash": run.cfg.digest(), "context": context,
        "population": [m.to_dict() for m in pop], "rng": ckpt.rng_state(rng), "history_rows": run.rows,
        "projector": run.projector, "timing": run.timing,
        "starts": [p.sparsities for p in run.starts or []],
        "start_names": [p.meta.get("start") for p in run.starts or []], "lam": run.lam, "lam_record": run.lam_record,
        "full_round": run.full_round, "full_scores": {pid: s.to_dict() for pid, s in run.full_scores.items()},
        "full_ids": sorted(run.full_ids)})


def _choose_lambda(run: _Run, pop: list[Member]) -> list[Member]:
    """Choose the run's lambda on the initial population ``pop`` (scored on the scoring rows, in its order) and
    return ``pop`` ranked by ``J`` at it (module docstring, **Lambda**). Sets ``run.lam`` and ``run.lam_record``
    (``grid``, the ``scales``, the ``spread_r`` / ``spread_g`` it was scaled by, each lambda's ``picks``: index,
    policy id, selection-row ``R_hat``; and every member's ``r_search``, ``g``, ``r_select``), then writes the
    history rows held back in ``run.pending`` with ``J`` at the lambda chosen."""
    cfg = run.cfg
    if cfg.gap != "none":
        r, g = [m.score.r_hat for m in pop], [m.score.g_hat for m in pop]
        grid = gaps.lambda_grid(r, g, cfg.lam_scales)
        r_select = [_score(run, m.policy, 0, "lambda", run.selection).r_hat for m in pop]
        run.lam = gaps.select_lambda(r, g, r_select, grid)[0]
        picks = [gaps.select_lambda(r, g, r_select, [lam])[1] for lam in grid]
        run.lam_record = {
            "lam": run.lam, "grid": list(grid), "scales": list(cfg.lam_scales), "spread_r": max(r) - min(r),
            "spread_g": max(g) - min(g),
            "picks": [{"lam": lam, "index": i, "policy_id": pop[i].policy.policy_id(), "r_select": r_select[i]}
                      for lam, i in zip(grid, picks)],
            "candidates": [m.policy.policy_id() for m in pop], "r_search": r, "g": g, "r_select": r_select}
    else:
        run.lam, run.lam_record = 0.0, None
    rows, run.pending = run.pending or [], None
    ckpt.append_history(run.out / ckpt.HISTORY,
                        [{**r, "j": gaps.objective(r["r_hat"], r["g_hat"], run.lam)} for r in rows])
    pop = sorted((Member(m.policy, replace(m.score, j=gaps.objective(m.score.r_hat, m.score.g_hat, run.lam)))
                  for m in pop), key=Member.key)
    for m in pop:  # the score cache holds J at the lambda chosen, as every later score
        if m.policy.policy_id() in run.full_scores:
            run.full_scores[m.policy.policy_id()] = m.score
    return pop


def _select(run: _Run, candidates: list[Policy], n_starts: int, generations: int) -> tuple[int, Score, dict]:
    """Score ``candidates`` (the final population, then the ``n_starts`` start policies) on the selection rows;
    the index of the one returned (:func:`final_pick.choose` under ``select_rule``: the lowest ``R_hat`` there, ties
    the lowest index, or the best start when that one's paired gain is within its standard error), its
    selection-row score (``J`` at the run's lambda) and the record of the choice (module docstring)."""
    scored = [_score_rows(run, p, generations + 1, "select", run.selection) for p in candidates]
    select, losses = [s for s, _ in scored], [x for _, x in scored]
    r_select = [s.r_hat for s in select]
    best = min(range(len(candidates)), key=lambda i: (r_select[i], i))
    first = len(candidates) - n_starts
    pick = min(range(first, len(candidates)), key=lambda i: (r_select[i], i)) if n_starts else None
    idx, choice = final_pick.choose(losses, best, pick, run.cfg.select_rule)
    record: dict[str, Any] = {"lam": run.lam, "lam_choice": run.lam_record, "r_select": r_select,
                              "candidates": [p.policy_id() for p in candidates], "n_starts": n_starts,
                              "index": idx, "policy_id": candidates[idx].policy_id(),
                              "start_names": [p.meta.get("start") for p in candidates[first:]],
                              "start_pick": None if pick is None else candidates[pick].meta.get("start"),
                              "start_index": pick, "final_pick": choice}
    return idx, select[idx], record


def _set_projector(run: _Run, evolved: bool) -> None:
    """Put the latest evolved projector (``evolved``) or the original one into the model."""
    if evolved:
        set_projector_state(run.model, load_projector(run.out / run.projector["file"])[0])
    elif run.original_projector is not None:
        set_projector_state(run.model, run.original_projector)


def _guard(run: _Run, best: Policy, start: Policy | None) -> tuple[Policy, bool, dict[str, Any]]:
    """The task guard (:mod:`final_pick`, **Task guard**): score the options, simplest first, on the selection rows
    with the caller's task scorer and return the policy of the one :func:`final_pick.guard` keeps, whether it has
    the evolved projector, and the record (``options``: labels, ``choice``, the rule's record, ``seconds``). The
    labels: ``start`` (the start pick, original projector), ``searched`` (the returned policy, original projector)
    and ``searched+projector`` (with the evolved projector); ``start+projector`` when the returned policy is the
    start pick. One option is returned unscored."""
    tick = time.perf_counter()
    options: list[tuple[str, Policy, bool]] = []
    if start is not None:
        options.append(("start", start, False))
    if start is None or best.policy_id() != start.policy_id():
        options.append(("searched", best, False))
    if run.projector:
        options.append((f"{options[-1][0]}+projector", best, True))
    record: dict[str, Any] = {"options": [label for label, _, _ in options]}
    index = 0
    if len(options) > 1:
        scores = []
        for _, policy, evolved in options:
            run.db.assemble(run.model, policy, check=False)
            _set_projector(run, evolved)
            scores.append([float(x) for x in run.task_score(run.model, run.selection)])
        index, rule = final_pick.guard(scores)
        record.update(rule, scores=scores)
    seconds = time.perf_counter() - tick
    record.update(choice=options[index][0], seconds=round(seconds, 2))
    run.timing["guard"] = run.timing.get("guard", 0.0) + seconds
    return options[index][1], options[index][2], record


def _finish(run: _Run, pop: list[Member], starts: list[Policy], generations: int, wall_s: float) -> SearchResult:
    cfg = run.cfg
    start_ids = {p.policy_id() for p in starts}  # a start still in the population is scored once, as a start
    candidates = [m.policy for m in pop if m.policy.policy_id() not in start_ids] + list(starts)
    idx, score, record = _select(run, candidates, len(starts), generations)
    best = candidates[idx]
    evolved = run.projector is not None
    if cfg.guard == "task":
        start = None if record["start_index"] is None else candidates[record["start_index"]]
        chosen, chosen_evolved, record["task_guard"] = _guard(run, best, start)
        if chosen.policy_id() != best.policy_id() or chosen_evolved != evolved:
            best, evolved = chosen, chosen_evolved  # rescored on the selection rows under its own projector
            _set_projector(run, evolved)  # (_score_rows assembles the policy)
            score = _score_rows(run, best, generations + 1, "guard", run.selection)[0]
    run.db.assemble(run.model, best, check=False)
    _set_projector(run, evolved)
    projector_path = None
    if evolved:
        state, config = load_projector(run.out / run.projector["file"])
        projector_path = save_projector(run.out / "projector.safetensors", state, projector_prefix(run.model), config)
    else:  # a projector file from an earlier finish of this folder is not this result's
        for stale in (run.out / "projector.safetensors", run.out / "projector.json"):
            stale.unlink(missing_ok=True)
    policy = Policy(best.sparsities, cfg.levels, {
        "method": "ellava-search", "target": cfg.target, "budget": cfg.budget,
        "mean_sparsity": weighted_mean(best.sparsities, run.weights), "score": score.to_dict(),
        "gap": cfg.gap, "lam": run.lam, "lam_grid": run.lam_record["grid"] if run.lam_record else None,
        "lam_selected": run.lam_record is not None,
        "selection_rows": len(run.selection), "generations": generations, "config_hash": cfg.digest(),
        "projector": projector_path.name if projector_path else None,
        **({"guard": record["task_guard"]["choice"]} if "task_guard" in record else {})})
    policy.to_json(run.out / "policy.json")
    files.write_json(run.out / "selection.json", record)
    return SearchResult(policy, score, pop, generations, run.rows, dict(run.timing), run.out,
                        projector_path, wall_s, record)
