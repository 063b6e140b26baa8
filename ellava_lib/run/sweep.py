"""Sweeps: prune a model with each method at each sparsity and seed, evaluate it, one results row per job.

The jobs (:class:`jobs.Job`: one (method, sparsity, seed) cell plus the ablation knobs), what a sweep's jobs share
(:class:`jobs.SweepSpec`) and the digests their rows are matched by live in :mod:`jobs`; this module runs them.
Methods are the baselines of :mod:`allocate` (``magnitude``, ``wanda``, ``sparsegpt``, ``owl``, ``ecoflap``),
the structured ``llm_pruner`` (:mod:`structured`: whole attention groups and MLP channels), ``dense`` (no pruning),
and the two searched methods: ``search`` (evolutionary search without the gap term and without projector evolution,
EvoPress-style) and ``ellava`` (EfficientLLaVA: search + SRM gap term + projector evolution). Every job draws its
own calibration set (``calib_n`` samples with its ``seed``, :mod:`calibration`), so the seed changes the calibration
data of every calibration-based method and the search's random draws. Each job reports the test score of every suite
and their mean, the **calibration score** (the same metrics on its calibration *selection rows*,
:func:`jobs.calib_rows`: the rows no stage of any method trains on; the searched methods choose their returned
policy on them, so for those the score is selected on, not trained on), the **generalization gap** ``calib_mean -
mean`` and ``flops_rel`` (prefill FLOPs of the whole model relative to dense, :mod:`flops`). Tables made from the
rows: :mod:`tables`. Resumable and parallel: a finished job writes ``out_dir/jobs/<name>/row.json`` (atomically) and
is skipped on a re-run; jobs are independent and run in ``workers`` processes or as tasks of a Ray cluster
(:mod:`backends`), after the level databases and importances they share; every job runs at the sweep's fixed intra-
op thread count (``threads``, set inside the job whatever the backend), so its row does not depend on ``workers``,
on the backend or on the caller's thread settings. A failed job is reported (``failed.json``) without stopping the
others. With a results ledger (:mod:`ledger`, a tracked folder) each finished row is also written there, and a job
whose ledger row matches its digest (:func:`jobs.job_digest`) is not run at all. Disk: one level database per
calibration draw ``(seed, calib_n)`` (notebook 06's n-ablation: four). The tier's ``level_dbs`` keeps them all
(``keep``) or holds one at a time (``one``: the jobs run draw by draw, each database deleted before the next is
built, :func:`run_sweep`); a preflight checks the bytes that mode needs at its peak (:func:`level_db_disk`) before
any work. The draws share nothing more: the databases of different ``n`` are pruned from different Hessians, and one
calibration pass over the largest ``n`` with snapshots at the smaller ones would not reproduce separate passes bit
for bit (the synthetic draws are not nested: the 64 are not a subset of the 128; and ``H`` of ``n`` rows summed as a
snapshot plus the rest, ``SparseGPT.add_batch`` twice, rounds differently in fp32 from one sum over the ``n`` rows),
while the forward passes it would save are a small part of a build (the per-level solves dominate).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ellava_lib.core import files
from ellava_lib.core.policy import DEFAULT_GRID, Policy, on_grid
from ellava_lib.core.units import list_units
from ellava_lib.eval.evaluate import (
    compare,
    evaluate,
    evaluate_samples,
    generation_budget,
    input_format,
)
from ellava_lib.prune.allocate import (
    ecoflap_policy,
    owl_policy,
    zeroth_order_importance,
)
from ellava_lib.prune.prune import measured_mean, prune_model
from ellava_lib.prune.structured import structured_policy
from ellava_lib.run import backends, ledger
from ellava_lib.run.importances import (  # noqa: F401  (tests and scripts reach them through this module too)
    _cached_importance,
    _ecoflap_key,
    ecoflap_importance_path,
    importance_digest,
    importances_from_ledger,
    importances_to_ledger,
)
from ellava_lib.run.jobs import (  # noqa: F401  (the notebooks reach the jobs' names through this module too)
    ALL_METHODS,
    LABELS,
    METHOD_REVISION,
    METHODS,
    SEARCH_METHODS,
    SUITE_COLUMNS,
    Job,
    SweepSpec,
    _hash,
    ablation_jobs,
    calib_rows,
    db_levels,
    draw_split,
    full_method_config,
    job_digest,
    jobs_grid,
    level_grid,
    model_identity,
    needs_importance,
    search_config,
    select_frac,
    spec_digest,
)
from ellava_lib.run.leveldbs import (  # noqa: F401  (the notebooks and callers reach them through this module too)
    build_tier_level_db,
    check_level_db_disk,
    db_build_grid,
    db_rounds,
    free_level_dbs,
    level_db_dir,
    level_db_disk,
    unit_sizes,
)
from ellava_lib.run.taskscore import calibration_task_scorer
from ellava_lib.run.tier import (
    Tier,
    block_device,
    calibration_samples,
    encode_calibration,
    eval_config,
    load_model,
    make_judge,
    place,
    release,
)
from ellava_lib.search.objective import subset
from ellava_lib.speed.flops import flop_ratio


def method_policy(model: nn.Module, batch: dict[str, torch.Tensor], method: str, sparsity: float, seed: int = 0,
                  include_vision: bool = False, progress: bool = False,
                  importance: dict[str, float] | None = None) -> Policy:
    """The policy a baseline prunes with: OWL and ECoFLaP allocate per unit, the others are uniform.
    ``importance``: ECoFLaP's unit scores when already computed (:func:`ecoflap_importance`)."""
    if method == "owl":  # continuous, as OWL prunes (its +-lam moves vanish on the 0.1 grid)
        return owl_policy(model, batch, sparsity, include_vision=include_vision, progress=progress, on_grid=False)
    if method == "ecoflap":
        return ecoflap_policy(model, batch, sparsity, seed=seed, include_vision=include_vision, progress=progress,
                              importance=importance)
    if method == "llm_pruner":  # whole heads / channels: the realised per-unit ratios (structured.py)
        return structured_policy(model, sparsity)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    grid = DEFAULT_GRID if on_grid(sparsity, DEFAULT_GRID) else tuple(sorted((*DEFAULT_GRID, sparsity)))
    return Policy.uniform(list_units(model, include_vision), sparsity, grid,
                          meta={"method": method, "target": sparsity})


def solver_for(method: str) -> str:
    """OWL and ECoFLaP allocate sparsity; the weights are then pruned with SparseGPT."""
    return "sparsegpt" if method in ("owl", "ecoflap") else method


# ------------------------------------------------------------------------------------ shared by jobs

def _calibration(tier: Tier, processor, seed: int, n: int):
    samples = calibration_samples(tier, n, seed)
    return samples, encode_calibration(tier, samples, processor)


def _load(tier: Tier, spec: SweepSpec, batch_seed: int, calib_n: int, on_device: bool = True):
    """The dense model, its processor, the job's calibration samples and batch, all on the tier's device
    (``on_device=False``: left on the CPU)."""
    model, processor = load_model(tier, spec.model_dir)
    samples, batch = _calibration(tier, processor, batch_seed, calib_n)
    if on_device:
        model, batch = place(tier, model, batch)
    return model, processor, samples, batch


def statistic_draw(spec: SweepSpec, seed: int, samples: Sequence[Any], batch: dict[str, torch.Tensor]
                   ) -> tuple[list[Any], dict[str, torch.Tensor]]:
    """The statistic rows of a calibration draw (:func:`jobs.draw_split`): its samples and batch without the
    selection rows. Every statistic a method computes (level database, Hessians, OWL, ECoFLaP, Wanda, Taylor
    scores) reads these only."""
    rows = draw_split(spec, seed, samples)[0]
    return [samples[i] for i in rows], subset(batch, rows)


def prepare_level_db(spec: SweepSpec, seed: int, calib_n: int, out_dir: Path, progress: bool = False,
                     grid: Sequence[float] = DEFAULT_GRID) -> None:
    """Build (or resume) the level database of one (seed, calib_n), holding at least the levels of ``grid``
    (:func:`level_grid`; :func:`build_tier_level_db`: the tier's storage dtype, one decoder block at a time on the
    device with ``tier.offload``)."""
    tier = spec.get_tier()
    model, _, samples, batch = _load(tier, spec, seed, calib_n, on_device=False)
    samples, batch = statistic_draw(spec, seed, samples, batch)
    build_tier_level_db(tier, model, batch, level_db_dir(out_dir, seed, calib_n), grid, samples, seed, progress)


def ecoflap_importance(spec: SweepSpec, seed: int, calib_n: int, out_dir: Path, model: nn.Module | None = None,
                       batch: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """ECoFLaP's zeroth-order unit importances (:func:`allocate.zeroth_order_importance`) for the calibration
    draw ``(seed, calib_n)``: they do not depend on the sparsity, so a sweep computes them once and keeps them
    in ``out_dir/ecoflap/s<seed>-n<n>.json`` (recomputed when the model or tier changed). They are computed on the
    draw's statistic rows (:func:`statistic_draw`). ``model`` / ``batch``: the dense model and that draw's
    statistic-row batch when the caller holds them (else loaded)."""
    cached = _cached_importance(spec, seed, calib_n, out_dir)
    if cached is not None:
        return cached["importance"]
    path, key = ecoflap_importance_path(out_dir, seed, calib_n), _ecoflap_key(spec, seed, calib_n)
    start = time.perf_counter()
    if model is None or batch is None:
        model, _, samples, batch = _load(spec.get_tier(), spec, seed, calib_n)
        batch = statistic_draw(spec, seed, samples, batch)[1]
    importance = zeroth_order_importance(model, batch, seed=seed, loader_batch=spec.get_tier().ecoflap_batch)
    files.write_json(path, {"key": key, "seed": seed, "calib_n": calib_n, "importance": importance,
                            "seconds": time.perf_counter() - start})
    return importance


def job_policy(job: Job, spec: SweepSpec, out_dir: Path, model: nn.Module, batch: dict[str, torch.Tensor]) -> Policy:
    """The policy a baseline job prunes with (:func:`method_policy`; ECoFLaP's importances come from the
    sweep's cache, :func:`ecoflap_importance`). ``model`` dense, ``batch`` the statistic rows of the job's
    calibration draw (:func:`statistic_draw`)."""
    importance = (ecoflap_importance(spec, job.seed, job.calib_n, out_dir, model, batch)
                  if job.method == "ecoflap" else None)
    return method_policy(model, batch, job.method, job.sparsity, job.seed, importance=importance)


def _prepare_tasks(spec: SweepSpec, jobs: Sequence[Job], out_dir: Path) -> list[tuple[str, Callable, tuple]]:
    """What several jobs share, to compute before them, as ``(name, fn, args)``: level databases (searched
    methods) and ECoFLaP importances, one per (seed, calib_n) (names: :func:`_needs`)."""
    tasks: list[tuple[str, Callable, tuple]] = []
    for seed, n in sorted({(j.seed, j.calib_n) for j in jobs if j.method in SEARCH_METHODS}):
        grid = level_grid(spec, [j for j in jobs if (j.seed, j.calib_n) == (seed, n)])
        tasks.append((f"leveldb/s{seed}-n{n}", prepare_level_db, (spec, seed, n, out_dir, False, grid)))
    for seed, n in sorted({(j.seed, j.calib_n) for j in jobs if needs_importance(spec, j)}):
        tasks.append((f"ecoflap/s{seed}-n{n}", ecoflap_importance, (spec, seed, n, out_dir)))
    return tasks


def _needs(spec: SweepSpec, job: Job) -> tuple[str, ...]:
    """The names of the :func:`_prepare_tasks` a job reads."""
    draw = f"s{job.seed}-n{job.calib_n}"
    return ((f"leveldb/{draw}",) if job.method in SEARCH_METHODS else ()) + \
        ((f"ecoflap/{draw}",) if needs_importance(spec, job) else ())


#: A job's ledger row (:func:`ledger.make_row`) in its folder of the run, beside ``row.json``: the sweep's driver
#: copies it into the ledger (a Ray job may run where the ledger is not).
LEDGER_ROW = "ledger_row.json"


def run_job(job: Job, spec: SweepSpec, out_dir: Path, threads: int = 1) -> dict[str, Any]:
    """Prune (or search), evaluate on test and on the job's calibration samples, all at ``threads`` torch intra-op
    threads (:func:`backends.intra_op_threads`; 0: the process's own count); returns the row (also written to
    ``out_dir/jobs/<name>/row.json``, and its ledger row to :data:`LEDGER_ROW` there)."""
    with backends.intra_op_threads(threads):
        return _run_job(job, spec, Path(out_dir), threads)


def reconstruct(tier: Tier, job: Job, model: nn.Module, policy: Policy, stat_batch: dict[str, torch.Tensor],
                projector: str | Path | None = None) -> pd.DataFrame:
    """Prune the dense ``model`` in place under ``policy`` as the table's row of ``job`` is made, and return the
    pruning report: sequential SparseGPT under the policy on the statistic rows ``stat_batch`` (a searched job:
    :func:`finalize.exact_reprune`, its final ``projector`` loaded first; a baseline: :func:`prune_model` with
    the method's solver, block by block on the tier's device when it offloads, the model left on the CPU)."""
    from ellava_lib.search.finalize import exact_reprune

    if job.method in SEARCH_METHODS:
        return exact_reprune(model, policy, projector, stat_batch)
    device = block_device(tier)
    if device is not None:  # tier.offload: the model waits on the CPU, one block at a time on the device
        release(model)
    return prune_model(model, policy, solver_for(job.method), stat_batch, progress=False, device=device)


def _run_job(job: Job, spec: SweepSpec, out_dir: Path, threads: int) -> dict[str, Any]:
    """:func:`run_job`'s work, at the threads it set."""
    from ellava_lib.prune.leveldb import LevelDB
    from ellava_lib.search.evolve import run_search

    job_dir = Path(out_dir) / "jobs" / job.name()
    digest = spec_digest(spec, job)
    stamp = job_dir / "spec.txt"
    if job_dir.exists() and (not stamp.is_file() or stamp.read_text().strip() != digest):
        shutil.rmtree(job_dir)  # made under another spec: start over (a same-spec search resumes)
    files.write_text(stamp, digest + "\n")
    tier = spec.get_tier()
    model, processor, samples, batch = _load(tier, spec, job.seed, job.calib_n)
    stat_batch = statistic_draw(spec, job.seed, samples, batch)[1]  # no statistic reads a selection row
    backends.test_failure_hook(job.name(), job_dir)  # tests only: ELLAVA_TEST_FAIL_JOB
    judge = make_judge(tier, Path(out_dir) / "judge")
    cfg_eval = eval_config(tier, spec.eval_limit)
    t0 = time.time()
    extra: dict[str, Any] = {}
    measured = 0.0
    if job.method in SEARCH_METHODS:
        cfg = search_config(spec, job)
        units = list_units(model, kind=cfg.units)
        importance = (ecoflap_importance(spec, job.seed, job.calib_n, out_dir, model, stat_batch)
                      if needs_importance(spec, job) else None)
        scorer = calibration_task_scorer(tier, processor, samples, judge, cfg_eval.batch_size)
        result = run_search(model, batch, LevelDB(level_db_dir(out_dir, job.seed, job.calib_n)), units, cfg,
                            job_dir / "search", progress=False, importance=importance,
                            groups=[s.suite for s in samples], task_score=scorer)
        policy = result.policy
        guard = result.selection.get("task_guard") or {}
        extra = {"j": result.score.j, "r_hat": result.score.r_hat, "g_hat": result.score.g_hat,
                 "search_s": round(result.wall_s, 2), "gap_kind": cfg.gap,
                 "start_pick": result.selection.get("start_pick"),  # the start it ranked best on selection rows
                 "kept_start": bool((result.selection.get("final_pick") or {}).get("kept_start", False))
                 or guard.get("choice") == "start",
                 **({"guard": guard["choice"]} if guard else {})}
        if job.assembled:  # the ablation: the model as the search assembled it from the level database
            measured = float(policy.meta["mean_sparsity"])
        else:  # as every baseline: sequential SparseGPT under the policy, on the statistic rows
            model, processor = load_model(tier, spec.model_dir)
            model, _ = place(tier, model)
            measured = measured_mean(reconstruct(tier, job, model, policy, stat_batch, result.projector))
    elif job.method != "dense":
        policy = job_policy(job, spec, out_dir, model, stat_batch)
        measured = measured_mean(reconstruct(tier, job, model, policy, stat_batch))
        model, _ = place(tier, model)
    else:
        policy = None
    seconds = time.time() - t0
    flops = 1.0
    if policy is not None:
        policy.to_json(job_dir / "policy.json")
        flops = 1.0 / flop_ratio(model, policy, "prefill", "model")
    t_eval = time.time()
    test = compare({job.method: evaluate(model, processor, cfg_eval, job_dir / "test", judge, progress=False)}).iloc[0]
    row: dict[str, Any] = {"job": job.name(), **asdict(job), "spec": digest, "measured": round(measured, 6),
                           "flops_rel": round(flops, 6),
                           **{s: float(test[s]) for s in SUITE_COLUMNS if s in test}, "mean": float(test["mean"])}
    if spec.calib_eval:
        by_suite: dict[str, list] = {}
        for i in calib_rows(spec, job, samples):
            by_suite.setdefault(samples[i].suite, []).append(samples[i])
        frame, _ = evaluate_samples(model, processor, by_suite, judge, batch_size=cfg_eval.batch_size,
                                    progress=False, max_new_tokens=generation_budget(tier.data),
                                    **input_format(tier.data))
        row["calib_mean"] = float(compare({"c": frame}).iloc[0]["mean"])
        row["gap_calib_test"] = row["calib_mean"] - row["mean"]
    row.update(extra)
    if job.method in SEARCH_METHODS:  # results.csv column lam: the lambda that steered the search (0: no gap term)
        row["lam"] = float(policy.meta["lam"])
    row["seconds"] = round(seconds, 2)
    row["eval_s"] = round(time.time() - t_eval, 2)  # the test (and calib) evaluation: what the plan's eval prices
    searched = policy is not None and job.method in SEARCH_METHODS and policy.meta.get("gap") != "none"
    lam = policy.meta.get("lam") if searched else None  # the lambda that steered the search (none: no gap term)
    entry = ledger.make_row(job.name(), job_digest(spec, job, threads), asdict(job), row,
                            None if policy is None else policy.to_dict(), lam)
    files.write_json(job_dir / LEDGER_ROW, entry)
    files.write_json(job_dir / "row.json", row)
    return row


def _done(out_dir: Path, job: Job, spec: SweepSpec) -> dict[str, Any] | None:
    """The finished row of ``job`` in the run folder, or None when missing or made under another spec (then it
    re-runs)."""
    path = Path(out_dir) / "jobs" / job.name() / "row.json"
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    return row if row.get("spec") == spec_digest(spec, job) else None


def search_histories(out_dir: str | Path, results: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """``{job: rows of its history.csv}`` of the searched rows of ``results`` whose search ran in the run folder
    ``out_dir`` under the row's spec (``jobs/<job>/spec.txt`` holds the row's ``spec``); rows read from a ledger
    whose search ran elsewhere have none."""
    out: dict[str, list[dict[str, Any]]] = {}
    for _, row in results[results["method"].isin(SEARCH_METHODS)].iterrows():
        job_dir = Path(out_dir) / "jobs" / str(row["job"])
        stamp, history = job_dir / "spec.txt", job_dir / "search" / "history.csv"
        if stamp.is_file() and history.is_file() and stamp.read_text().strip() == str(row.get("spec")):
            out[str(row["job"])] = pd.read_csv(history).to_dict("records")
    return out


def _finished(out_dir: Path, job: Job, spec: SweepSpec, threads: int, ledger_dir: Path | None,
              warn: bool = True) -> dict[str, Any] | None:
    """The finished row of ``job``, or None when it must run. Without a ledger: the run folder's (:func:`_done`).
    With one: the ledger's row when its digest is the job's (:func:`jobs.job_digest`), else the ledger row this
    run folder's job wrote (:data:`LEDGER_ROW`), which is copied into the ledger now (a sweep killed between a
    job's end and that copy loses nothing); a corrupted ledger row is named on stderr when ``warn``."""
    if ledger_dir is None:
        return _done(out_dir, job, spec)
    digest = job_digest(spec, job, threads)
    entry = ledger.load(ledger.row_path(ledger_dir, job.name()), job.name(), digest, warn=warn)
    if entry is None:
        entry = ledger.load(Path(out_dir) / "jobs" / job.name() / LEDGER_ROW, job.name(), digest, warn=False)
        if entry is not None:
            ledger.write(ledger_dir, entry)
    return None if entry is None else entry["row"]


def run_sweep(spec: SweepSpec, jobs: Sequence[Job], out_dir: str | Path, workers: int = 1, threads: int = 1,
              progress: bool = True, on_row: Callable[[dict], None] | None = None, backend: str = "local",
              address: str | None = None, retries: int = 0, ledger_dir: str | Path | None = None) -> pd.DataFrame:
    """Run every job not finished yet, then return all rows in job order and write them to
    ``out_dir/results.csv``. A row made under another spec (:func:`jobs.spec_digest`: other model, evaluation size
    or search configuration) is re-run, never mixed in.

    ``threads``: the torch intra-op threads every job runs at, whatever the backend (:func:`run_job`; 0: each
    process's own count). ``ledger_dir``: a results ledger (:mod:`ledger`): a job whose row is there with its
    digest (:func:`jobs.job_digest`: recipe, configuration, ``threads``) is not run, each job that finishes writes
    its row there, and the rows returned are the ledger's; a row of another digest is re-run and overwritten, a
    corrupted one is named on stderr and re-run. ECoFLaP's importances go the same way (:func:`importance_digest`,
    the ledger's ``ecoflap/``): read from the ledger before the jobs, written there as soon as a job finishes.

    ``backend`` (:mod:`backends`): ``local`` runs ``workers`` processes of ``threads`` torch threads
    (``workers=1``: this process); ``ray`` runs each job as a Ray task on the cluster at ``address`` (None: a
    local Ray with ``workers`` CPUs), ``out_dir`` on storage every node sees. A failing job is re-run up to
    ``retries`` times, then reported at once; the others go on. If any failed, the finished rows are still
    written (``results.csv``) with the failures in ``out_dir/failed.json``, and :class:`backends.SweepFailed`
    is raised.

    Level databases (one per calibration draw ``(seed, calib_n)`` the searched jobs read): first a disk preflight
    (:func:`check_level_db_disk`: a one-line ``OSError`` naming the bytes needed and free, before any work); with
    the tier's ``level_dbs: keep`` every database is built before the jobs and kept; with ``level_dbs: one`` the
    jobs run in rounds (:func:`db_rounds`), each round's database built after every other one of
    ``out_dir/leveldb`` was deleted (:func:`free_level_dbs`), so at most one is on disk; the last one is left for
    a later sweep. Rows do not depend on the mode."""
    if backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(backends.BACKENDS)}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    out_dir = Path(out_dir)
    names = [j.name() for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate jobs in the sweep")
    ledger_dir = None if ledger_dir is None else Path(ledger_dir)
    todo = [j for j in jobs if _finished(out_dir, j, spec, threads, ledger_dir) is None]
    check_level_db_disk(spec, todo, out_dir)  # before any work: the bytes its level databases need at the peak
    files.ensure_dir(out_dir)
    one_db = spec.get_tier().level_dbs == "one"
    rounds = db_rounds(spec, todo, out_dir) if one_db else [(None, todo)]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="sweep", disable=not progress)
    by_name = {j.name(): j for j in todo}
    if ledger_dir is not None:  # ECoFLaP's importances a ledger holds are not computed again
        importances_from_ledger(spec, todo, out_dir, threads, ledger_dir)

    def done(task: backends.Task, row: dict) -> None:
        if ledger_dir is not None:  # into the ledger now: a sweep killed later keeps this row
            _finished(out_dir, by_name[task.name], spec, threads, ledger_dir, warn=False)
            importances_to_ledger(spec, todo, out_dir, threads, ledger_dir)
        bar.update(1)
        bar.set_postfix_str(task.name)
        if on_row:
            on_row(row)

    def failed(task: backends.Task, failure: backends.Failure) -> None:
        bar.update(int(task.name in by_name))  # a shared task is not a job
        tqdm.write(f"sweep: failed: {failure.line()}", file=sys.stderr)

    failures: dict[str, backends.Failure] = {}  # every row done: no worker process, no Ray
    for draw, part in rounds:  # level_dbs "one": one round per level database, the others deleted first
        if one_db and draw is not None:
            for name in free_level_dbs(out_dir, keep=draw):
                if progress:
                    tqdm.write(f"sweep: level database {name} deleted (tier level_dbs: one)", file=sys.stderr)
        shared = [backends.Task(name, fn, args) for name, fn, args in _prepare_tasks(spec, part, out_dir)]
        tasks = [backends.Task(j.name(), run_job, (j, spec, out_dir, threads), _needs(spec, j)) for j in part]
        if tasks and backend == "ray":
            failures.update(backends.run_ray(shared, tasks, done, failed, out_dir, workers, threads, retries,
                                             address, spec.get_tier().device))
        elif tasks:
            failures.update(backends.run_local(shared, tasks, done, failed, workers, threads, retries))
    bar.close()
    if ledger_dir is not None:
        importances_to_ledger(spec, todo, out_dir, threads, ledger_dir)
    rows = [row for row in (_finished(out_dir, j, spec, threads, ledger_dir, warn=False) for j in jobs)
            if row is not None]
    frame = pd.DataFrame(rows)
    files.write_csv(out_dir / "results.csv", frame)
    report = out_dir / "failed.json"
    if failures:
        files.write_json(report, [f.to_dict() for f in failures.values()])
        raise backends.SweepFailed(list(failures.values()), frame, report)
    report.unlink(missing_ok=True)
    return frame


