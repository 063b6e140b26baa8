"""Notebook 04's showcased search: the sweep's job ``Job("ellava", sparsity, seed, calib_n)``, read from the results
ledger (:mod:`ledger`) when the profile has one holding its row, else run (and its row written there).

:func:`showcase_search` returns a :class:`Showcase`: the sweep row, the searched policy (the ledger row's when there
is a ledger, else the run folder's) and, when the run folder holds the finished search of this job
(``sweep/jobs/<job>/search/``), its history and projector rounds; a fresh clone whose ledger holds the row has no
history, and says so in one line instead of re-running a search of hours. :func:`allocation_policies` gives the
baselines the policy is drawn against (uniform, OWL, ECoFLaP), from their ledger rows when there (the main table's
jobs at the same sparsity, seed and calibration size), else computed on the job's calibration batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ellava_lib.core.policy import Policy
from ellava_lib.run import backends, ledger, sweep
from ellava_lib.run.jobs import LABELS, Job, SweepSpec, job_digest, spec_digest
from ellava_lib.run.tier import calibration_samples, encode_calibration, load_model, place

#: The baselines the searched policy is drawn against, as (method, label): SparseGPT prunes the uniform policy.
ALLOCATIONS: tuple[tuple[str, str], ...] = (("sparsegpt", "uniform"), ("owl", LABELS["owl"]),
                                            ("ecoflap", LABELS["ecoflap"]))
#: The projector-round table's columns (:meth:`Showcase.projector_rounds`).
ROUND_COLUMNS: tuple[str, ...] = ("round", "generation", "steps", "holdout_start", "holdout_best", "best_J_before",
                                  "best_J_after")
#: The task guard's table's columns (:meth:`Showcase.guard`).
GUARD_COLUMNS: tuple[str, ...] = ("option", "task_score", "gain_of_best", "gain_se", "returned")


@dataclass
class Showcase:
    """The showcased search job: its sweep ``row``, its ``policy``, ``job_dir`` (``out_dir/jobs/<job>``) and
    ``entry``, its ledger row (None without a ledger)."""

    job: Job
    row: dict[str, Any]
    policy: Policy
    job_dir: Path
    spec_stamp: str
    entry: dict[str, Any] | None = None

    @property
    def search_dir(self) -> Path:
        return self.job_dir / "search"

    def has_history(self) -> bool:
        """Whether the run folder holds this job's finished search (its ``policy.json`` written at the end and
        the job folder stamped with the spec's digest, :func:`jobs.spec_digest`)."""
        stamp = self.job_dir / "spec.txt"
        return ((self.search_dir / "policy.json").is_file() and (self.search_dir / "history.csv").is_file()
                and stamp.is_file() and stamp.read_text().strip() == self.spec_stamp)

    def history(self) -> pd.DataFrame | None:
        """The search's ``history.csv`` (one row per scored candidate), or None when the run folder lacks it."""
        return pd.read_csv(self.search_dir / "history.csv") if self.has_history() else None

    def no_history(self) -> str:
        """The one line shown instead of the history."""
        where = f"the ledger row {self.entry['key']}" if self.entry is not None else "its row"
        return (f"no search history: the run folder has no finished search of {self.job.name()} "
                f"({self.search_dir}); {where} holds its scores and policy only (run it here, e.g. with "
                f"RUNS=DIR, to see its generations)")

    def phases(self) -> pd.Series:
        """Candidates scored per phase of the search (empty without a history)."""
        history = self.history()
        if history is None:
            return pd.Series(dtype="int64", name="candidates scored")
        return history.groupby("phase").size().rename("candidates scored")

    def projector_rounds(self) -> pd.DataFrame:
        """One row per projector round: its generation ``g``, steps run, held-out loss at start and best, the best
        ``J`` of generation ``g`` on all scoring rows before the round (phases ``init`` / ``full``), and the best
        ``J`` of generation ``g + 1`` on all scoring rows, where the elite parents are rescored with the new
        projector beside the children that reached the last stage (``NaN`` when the search ended at ``g``; empty
        without a history or without rounds)."""
        history = self.history()
        rounds = []
        for path in sorted((self.search_dir / "projector_rounds").glob("*.json")) if history is not None else []:
            meta = json.loads(path.read_text())
            full = history[history["phase"].isin(["init", "full"])]
            gen = meta["generation"]
            rounds.append({"round": meta["round"], "generation": gen, "steps": meta["steps_run"],
                           "holdout_start": meta["holdout_start"], "holdout_best": meta["holdout_best"],
                           "best_J_before": full[full["generation"] == gen]["j"].min(),
                           "best_J_after": full[full["generation"] == gen + 1]["j"].min()})
        return pd.DataFrame(rounds, columns=list(ROUND_COLUMNS))

    def guard(self) -> pd.DataFrame:
        """The task guard's options (:func:`ellava_lib.search.final_pick.guard`), one row each, simplest first:
        ``task_score``, the option's mean task score on the selection rows (0-100, the unweighted suite mean of
        their generated answers), ``gain_of_best`` and ``gain_se`` (the best option's paired lead over it and its
        standard error; empty for the best), ``returned`` (the option the search returned). Empty without a history
        or when the search ran without the guard."""
        path = self.search_dir / "selection.json"
        record = json.loads(path.read_text()).get("task_guard") if self.has_history() and path.is_file() else None
        if not record:
            return pd.DataFrame(columns=list(GUARD_COLUMNS))
        n = len(record["options"])
        means = record.get("means") or [float("nan")] * n
        gains = record.get("gains") or [None] * n
        ses = record.get("gain_ses") or [None] * n
        return pd.DataFrame([{"option": o, "task_score": m, "gain_of_best": g, "gain_se": e,
                              "returned": o == record["choice"]}
                             for o, m, g, e in zip(record["options"], means, gains, ses)], columns=list(GUARD_COLUMNS))


def showcase_search(spec: SweepSpec, job: Job, out_dir: str | Path, threads: int = 1,
                    ledger_dir: str | Path | None = None, progress: bool = True) -> Showcase:
    """The showcased search ``job`` as the sweep of ``out_dir`` (:func:`sweep.run_sweep` with ``threads`` and
    ``ledger_dir``): with a ledger holding the job's row under its digest (:func:`jobs.job_digest`) nothing runs
    and the row and policy are the ledger's (one line says so); else the search runs here, and with a ledger its
    row is written there. Without a ledger the policy is the run folder's (``jobs/<job>/policy.json``)."""
    out_dir = Path(out_dir)
    digest = job_digest(spec, job, threads)
    known = None if ledger_dir is None else ledger.load(ledger.row_path(ledger_dir, job.name()), job.name(), digest,
                                                         warn=False)
    row = sweep.run_sweep(spec, [job], out_dir, threads=threads, progress=progress,
                          ledger_dir=ledger_dir).iloc[0].to_dict()
    job_dir = out_dir / "jobs" / job.name()
    entry = None
    if ledger_dir is None:
        policy = Policy.from_json(job_dir / "policy.json")
    else:
        entry = ledger.read(ledger_dir, job.name(), digest)
        if entry is None or entry["policy"] is None:
            raise RuntimeError(f"the ledger {ledger_dir} holds no policy of {job.name()} after its sweep")
        policy = Policy.from_dict(entry["policy"])
    if known is not None:
        print(f"{job.name()}: read from the ledger ({ledger.row_path(ledger_dir, job.name())}, commit "
              f"{(known['commit'] or 'unknown')[:12]}, {known['machine'].get('platform', '?')}); nothing recomputed",
              flush=True)
    return Showcase(job, row, policy, job_dir, spec_digest(spec, job), entry)


def allocation_policies(spec: SweepSpec, sparsity: float, seed: int, calib_n: int, out_dir: str | Path,
                        threads: int = 1, ledger_dir: str | Path | None = None) -> dict[str, dict[str, float]]:
    """``{label: {unit: sparsity}}`` of the baselines of :data:`ALLOCATIONS` at ``(sparsity, seed, calib_n)``: a
    ledger row's policy where ``ledger_dir`` holds that job's row under its digest, else :func:`sweep.job_policy`
    on the dense model and the draw's calibration batch (loaded once, only when a policy is missing; ECoFLaP's
    importances from the sweep's cache in ``out_dir``), at ``threads`` intra-op threads as the sweep's jobs."""
    found: dict[str, dict[str, float]] = {}
    todo = []
    for method, label in ALLOCATIONS:
        job = Job(method, sparsity, seed, calib_n)
        entry = None if ledger_dir is None else ledger.load(ledger.row_path(ledger_dir, job.name()), job.name(),
                                                             job_digest(spec, job, threads), warn=False)
        if entry is not None and entry["policy"] is not None:
            found[label] = dict(entry["policy"]["sparsities"])
        else:
            todo.append((job, label))
    if todo:
        tier = spec.get_tier()
        with backends.intra_op_threads(threads):
            model, processor = load_model(tier, spec.model_dir)
            batch = encode_calibration(tier, calibration_samples(tier, calib_n, seed), processor)
            model, batch = place(tier, model, batch)
            for job, label in todo:
                found[label] = sweep.job_policy(job, spec, Path(out_dir), model, batch).sparsities
    return {label: found[label] for _, label in ALLOCATIONS}
