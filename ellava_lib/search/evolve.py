"""Evolutionary search for a per-unit sparsity policy that minimizes ``J(pi) = R_hat(pi) + lambda G_hat(pi)``.

Budget and mutation: :mod:`budget` (every policy stays in the budget band
``target <= S(pi) <= target + step * max_u w_u / W``).

**Loop** (:func:`run_search`). Generation 0: the start policies named by ``init`` (:data:`START_POLICIES`: the
grid-rounded uniform policy, and optionally the OWL and ECoFLaP allocations of the same budget, rounded to the
grid with :func:`allocate.round_to_grid`, so the search begins where the one-shot allocation heuristics end)
plus mutants of them in turn (1 to ``mutation_steps`` steps each), all scored on the n calibration samples.
Each generation: ``offspring`` children, each a mutant of a tournament winner (``tournament`` entrants, best
``J``), new to the population and the generation; multi-step selection scores them on ``screen_samples`` fixed
calibration rows first and only the best ``survivors`` on all n (``screen_samples = 0`` or ``>= n``: all on
n); the next population is the best ``elitism`` parents plus the best fully scored children (topped up with
parents). Ties break by policy id. Every ``projector.every`` generations the projector is evolved for the top
``projector.topk`` (:mod:`projector`, :class:`config.ProjectorConfig`) and the population rescored with it.
Candidates are *assembled* from the level database (no solver in the loop). Each generation ends with an
atomic checkpoint (:mod:`checkpoint`); a run resumes from it and produces exactly the result and history of an
uninterrupted run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ellava_lib.core import files
from ellava_lib.core.policy import Policy, on_grid, weighted_mean
from ellava_lib.core.units import names_vision
from ellava_lib.data.calibration import calibration_fingerprint
from ellava_lib.model import structure
from ellava_lib.prune.allocate import (
    OWL_LAMBDA,
    ecoflap_allocation,
    outlier_ratios,
    owl_allocation,
    round_to_grid,
    zeroth_order_importance,
)
from ellava_lib.prune.leveldb import LevelDB, model_identity
from ellava_lib.search import checkpoint as ckpt
from ellava_lib.search import gap as gaps
from ellava_lib.search.budget import (
    budget_band,
    budget_weights,
    in_band,
    mutate,
)
from ellava_lib.search.config import SearchConfig
from ellava_lib.search.objective import (
    KL_KINDS,
    Score,
    dense_logprobs_of,
    per_sample_losses,
    score_losses,
)
from ellava_lib.search.projector import (
    evolve_projector,
    load_projector,
    projector_prefix,
    save_projector,
    set_projector_state,
)


def start_policies(model: nn.Module, batch: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                   cfg: SearchConfig, importance: Mapping[str, float] | None = None) -> list[Policy]:
    """The distinct grid policies named by ``cfg.init``, in order. ``uniform``: ``s_u = S``; ``owl``:
    :func:`allocate.owl_allocation` of the outlier ratios; ``ecoflap``: :func:`allocate.ecoflap_allocation`
    of the zeroth-order importances (``importance`` when already computed for this model and batch, else
    computed with ``cfg.seed``); each through :func:`allocate.round_to_grid` with the budget weights, so
    ``S <= S(pi) <= S + step * max_u w_u / W`` (the budget band). ``model`` must be dense."""
    vision = names_vision(weights)
    out: list[Policy] = []
    for name in cfg.init:
        if name == "uniform":
            raw = {u: cfg.target for u in weights}
        elif name == "owl":
            raw = owl_allocation(outlier_ratios(model, dict(batch), include_vision=vision), weights, cfg.target,
                                 lam=OWL_LAMBDA, grid=cfg.grid)
        else:
            scores = importance or zeroth_order_importance(model, dict(batch), seed=cfg.seed, include_vision=vision)
            raw = ecoflap_allocation({u: scores[u] for u in weights}, weights, cfg.target, grid=cfg.grid)
        policy = Policy(round_to_grid(raw, weights, cfg.target, cfg.grid), cfg.grid, {"target": cfg.target})
        if policy.policy_id() not in {p.policy_id() for p in out}:
            out.append(policy)
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
    """The best policy and its score, the final population (best first) and the run's bookkeeping.

    ``timing``: accumulated seconds of ``assemble``, ``evaluate`` (forward passes and scoring), ``projector``
    and ``dense`` (the dense logits), and ``n_assembled`` (assemblies for scoring)."""

    policy: Policy
    score: Score
    population: list[Member]
    generations: int
    evaluations: int
    timing: dict[str, float]
    out_dir: Path
    projector: Path | None
    wall_s: float


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
    screen: list[int] | None
    timing: dict[str, float]
    rows: int = 0
    projector: dict[str, Any] | None = None

    @property
    def n(self) -> int:
        return int(self.batch["input_ids"].shape[0])


def _score(run: _Run, policy: Policy, generation: int, phase: str, screen: bool = False) -> Score:
    """Assemble ``policy``, score it (on the screening rows when ``screen``), append its history row."""
    cfg = run.cfg
    if not in_band(policy, run.weights, cfg.target):  # the invariant of :mod:`budget`
        band = budget_band(run.weights, cfg.target, cfg.grid)
        raise RuntimeError(f"policy {policy.policy_id()} left the budget band {band}: "
                           f"S = {weighted_mean(policy.sparsities, run.weights)}")
    run.timing["assemble"] += run.db.assemble(run.model, policy, check=False)
    run.timing["n_assembled"] += 1
    tick = time.perf_counter()
    losses = per_sample_losses(run.model, run.batch, cfg.loss_kind, run.dense, run.screen if screen else None,
                               cfg.eval_batch_size or None)
    gap_kw = ({"depth_decay": cfg.depth_decay, "h_scale": cfg.h_scale or min(gaps.DEFAULT_H_SCALE, run.n)}
              if cfg.gap == "capacity" else None)
    score = score_losses(losses, gap=cfg.gap, lam=cfg.lam, delta=cfg.delta, loss_cap=cfg.loss_cap,
                         units=run.units, sparsities=policy.sparsities, n_capacity=run.n, gap_kw=gap_kw)
    run.timing["evaluate"] += time.perf_counter() - tick
    ckpt.append_history(run.out / ckpt.HISTORY, [{
        "generation": generation, "policy_id": policy.policy_id(), "r_hat": score.r_hat, "g_hat": score.g_hat,
        "j": score.j, "budget": weighted_mean(policy.sparsities, run.weights), "n_samples": score.n_used,
        "phase": phase}])
    run.rows += 1
    return score


def _tournament(pop: list[Member], rng: random.Random, size: int) -> Member:
    return min((pop[rng.randrange(len(pop))] for _ in range(size)), key=Member.key)


def _generation(run: _Run, pop: list[Member], rng: random.Random, gen: int) -> list[Member]:
    cfg = run.cfg
    seen = {m.policy.policy_id() for m in pop}
    children: list[Policy] = []
    for _ in range(cfg.offspring):
        for _ in range(20):
            child = mutate(_tournament(pop, rng, cfg.tournament).policy, run.weights, rng,
                           rng.randint(1, cfg.mutation_steps))
            if child.policy_id() not in seen:
                seen.add(child.policy_id())
                children.append(child)
                break
    if run.screen is not None and len(children) > cfg.survivors:
        screened = [Member(c, _score(run, c, gen, "screen", screen=True)) for c in children]
        children = [m.policy for m in sorted(screened, key=Member.key)[: cfg.survivors]]
    scored = sorted((Member(c, _score(run, c, gen, "full")) for c in children), key=Member.key)
    parents = sorted(pop, key=Member.key)
    nxt = parents[: cfg.elitism] + scored[: cfg.population - cfg.elitism]
    nxt += parents[cfg.elitism: cfg.elitism + cfg.population - len(nxt)]
    return sorted(nxt, key=Member.key)


def _evolve(run: _Run, pop: list[Member], gen: int) -> list[Member]:
    """Evolve the projector for the top-k, save it, rescore the population with it."""
    cfg = run.cfg
    tick = time.perf_counter()
    top = [m.policy for m in pop[: cfg.projector.topk]]
    state, log = evolve_projector(run.model, run.batch, top, run.db, run.dense, cfg.projector, cfg.seed * 100003 + gen)
    rnd = (run.projector or {}).get("round", 0) + 1
    name = f"projector_rounds/round-{rnd:03d}.safetensors"
    holdout = [r["holdout_loss"] for r in log if r["holdout_loss"] is not None]
    save_projector(run.out / name, state, projector_prefix(run.model),
                   {"round": rnd, "generation": gen, "policies": [p.policy_id() for p in top],
                    "steps_run": log[-1]["step"], "holdout_start": holdout[0] if holdout else None,
                    "holdout_best": min(holdout) if holdout else None, "config": cfg.to_dict()})
    run.projector = {"file": name, "round": rnd, "generation": gen}
    run.timing["projector"] += time.perf_counter() - tick
    return sorted((Member(m.policy, _score(run, m.policy, gen, "rescore")) for m in pop), key=Member.key)


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
    missing = [u for u in units if u not in db.units]
    if missing:
        raise ValueError(f"units {missing} are not in the level database {db.path}")
    off = [g for g in cfg.grid if not on_grid(g, db.grid)]
    if off:
        raise ValueError(f"grid levels {off} are not in the level database {db.path} (grid {db.grid})")
    if cfg.gap == "bernstein" and n < 2:
        raise ValueError("the Bernstein gap needs at least 2 calibration samples")


def run_search(model: nn.Module, batch: dict[str, torch.Tensor], level_db: LevelDB, units: Mapping[str, int],
               cfg: SearchConfig, out_dir: str | Path, progress: bool = True,
               importance: Mapping[str, float] | None = None) -> SearchResult:
    """Run (or resume) the search of the module docstring in ``out_dir``; returns the best policy.

    ``model``'s units are reset to the database's level 0 (its dense weights) on entry; its projector must be the
    original one (the dense logits of KL terms come from it). ``importance``: ECoFLaP's unit scores for this model
    and batch when already computed (an ``ecoflap`` start policy needs them). The model is left assembled at the best
    policy with the latest projector. Writes ``search_config.json``, ``history.csv``, ``checkpoint.json``,
    ``policy.json`` and ``projector.safetensors`` (+ ``.json``, when evolution ran) into ``out_dir``; what becomes
    of the model afterwards (saved as assembled, or re-pruned exactly: :mod:`finalize`) is the caller's.
    """
    wall = time.perf_counter()
    out = files.ensure_dir(Path(out_dir))
    units = dict(units)
    n = int(batch["input_ids"].shape[0])
    _check_inputs(cfg, units, level_db, n)
    context = search_context(model, batch, units)
    resume = check_resume(out, cfg, context)
    level_db.check_model(model)
    if on_grid(0.0, level_db.grid):  # level 0 = the dense weights: make the units dense
        level_db.assemble(model, Policy({u: 0.0 for u in units}, level_db.grid), check=False)
    lm_tokens = float(batch["attention_mask"].sum(1).float().mean())
    weights = budget_weights(units, cfg.budget, lm_tokens, structure.vision_tokens_per_image(model.config))
    timing = {"assemble": 0.0, "evaluate": 0.0, "projector": 0.0, "dense": 0.0, "n_assembled": 0}
    tick = time.perf_counter()
    need_dense = cfg.loss_kind in KL_KINDS or (cfg.projector.every > 0 and cfg.projector.kl_weight > 0)
    dense = dense_logprobs_of(model, batch, cfg.eval_batch_size or None) if need_dense else None
    timing["dense"] = time.perf_counter() - tick
    screen = (sorted(random.Random(f"screen/{cfg.seed}").sample(range(n), cfg.screen_samples))
              if 0 < cfg.screen_samples < n else None)
    run = _Run(model, batch, level_db, units, weights, cfg, out, dense, screen, timing)
    cfg.to_json(out / "search_config.json")
    if resume:
        state = ckpt.read_checkpoint(out)
        ckpt.truncate_history(out / ckpt.HISTORY, state["history_rows"])
        run.rows, run.projector, start = state["history_rows"], state["projector"], state["generation"]
        run.timing.update({k: v for k, v in state["timing"].items() if k != "dense"})
        rng = ckpt.rng_from_state(state["rng"])
        pop = [Member(Policy(m["sparsities"], cfg.grid, {"target": cfg.target}), Score.from_dict(m["score"]))
               for m in state["population"]]
        if run.projector:
            set_projector_state(model, load_projector(out / run.projector["file"])[0])
    else:
        ckpt.start_history(out / ckpt.HISTORY)
        rng, start = random.Random(cfg.seed), 0
        starts = start_policies(model, batch, weights, cfg, importance)
        pop = sorted((Member(p, _score(run, p, 0, "init")) for p in initial_population(weights, cfg, rng, starts)),
                     key=Member.key)
        _save_checkpoint(run, pop, rng, 0, context)
    bar = tqdm(total=cfg.generations, initial=min(start, cfg.generations), desc="search", disable=not progress)
    for gen in range(start + 1, cfg.generations + 1):
        pop = _generation(run, pop, rng, gen)
        if cfg.projector.every and gen % cfg.projector.every == 0:
            pop = _evolve(run, pop, gen)
        _save_checkpoint(run, pop, rng, gen, context)
        bar.update(1)
        bar.set_postfix(best_j=f"{pop[0].score.j:.4f}")
    bar.close()
    return _finish(run, pop, max(start, cfg.generations), time.perf_counter() - wall)


def _save_checkpoint(run: _Run, pop: list[Member], rng: random.Random, gen: int, context: dict[str, Any]) -> None:
    ckpt.write_checkpoint(run.out, {
        "generation": gen, "config": run.cfg.to_dict(), "config_hash": run.cfg.digest(), "context": context,
        "population": [m.to_dict() for m in pop], "rng": ckpt.rng_state(rng), "history_rows": run.rows,
        "projector": run.projector, "timing": run.timing})


def _finish(run: _Run, pop: list[Member], generations: int, wall_s: float) -> SearchResult:
    best, cfg = pop[0], run.cfg
    run.db.assemble(run.model, best.policy, check=False)
    projector_path = None
    if run.projector:
        state, config = load_projector(run.out / run.projector["file"])
        projector_path = save_projector(run.out / "projector.safetensors", state, projector_prefix(run.model), config)
    policy = Policy(best.policy.sparsities, cfg.grid, {
        "method": "ellava-search", "target": cfg.target, "budget": cfg.budget,
        "mean_sparsity": weighted_mean(best.policy.sparsities, run.weights), "score": best.score.to_dict(),
        "gap": cfg.gap, "lam": cfg.lam, "generations": generations, "config_hash": cfg.digest(),
        "projector": projector_path.name if projector_path else None})
    policy.to_json(run.out / "policy.json")
    return SearchResult(policy, best.score, pop, generations, run.rows, dict(run.timing), run.out,
                        projector_path, wall_s)
