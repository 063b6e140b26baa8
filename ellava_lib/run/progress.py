"""How far a profile's sweep has come, read from its results ledger (:mod:`ledger`) alone: which of the jobs of
notebooks 05 and 06 have a row under their current digest (:func:`jobs.job_digest`), the compute they took, the
machines they ran on, and the main table of the finished main-table rows. Nothing runs and no run folder is read,
so a fresh clone shows the state of a run that spans sessions (``ellava sweep --status``; ``--readme`` splices
:func:`markdown` into the README block ``{readme_prefix}progress``).

A row of another digest (another recipe, preset or code revision of the job) does not count: it would be re-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ellava_lib.run import ledger, tables
from ellava_lib.run.jobs import Job, SweepSpec, job_digest
from ellava_lib.run.runs import markdown_table


@dataclass
class Progress:
    """``done``: ``{job name: ledger entry}`` of the jobs with a current row; ``pending``: the names of the others
    (in the sweep's order); ``main``: the names of the main-table jobs (notebook 05)."""

    done: dict[str, dict[str, Any]]
    pending: list[str]
    main: list[str]

    @property
    def total(self) -> int:
        return len(self.done) + len(self.pending)

    def compute_hours(self) -> tuple[float, float, int]:
        """``(pruning and search hours, evaluation hours, rows with an evaluation time)``: the sums over the finished
        rows of ``seconds`` and of ``eval_s`` (recorded since December 2026; older rows have none) in hours."""
        rows = [e["row"] for e in self.done.values()]
        timed = [r for r in rows if "eval_s" in r]
        return (sum(float(r.get("seconds", 0.0)) for r in rows) / 3600.0,
                sum(float(r["eval_s"]) for r in timed) / 3600.0, len(timed))

    def machines(self) -> list[str]:
        """The distinct machines of the finished rows, as :func:`ledger.machine` recorded them: ``"AMD EPYC, 2 CPUs,
        torch 2.13.0+cpu"`` (the platform string for rows written before the processor's name was recorded)."""
        out = []
        for entry in self.done.values():
            m = entry.get("machine") or {}
            label = f"{m.get('cpu') or m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch')}"
            if label not in out:
                out.append(label)
        return out

    def rows(self, main_only: bool = True) -> pd.DataFrame:
        """The finished rows as a sweep's ``results.csv`` frame (the main table's jobs only by default)."""
        names = [n for n in self.done if n in self.main] if main_only else list(self.done)
        return pd.DataFrame([self.done[n]["row"] for n in names])


def ledger_progress(spec: SweepSpec, job_list: Sequence[Job], ledger_dir: str | Path, threads: int,
                    main: Sequence[Job] = ()) -> Progress:
    """The :class:`Progress` of ``job_list`` (each at ``threads`` torch threads, part of its digest) in the ledger
    folder ``ledger_dir``; ``main``: the jobs of the main table among them."""
    done: dict[str, dict[str, Any]] = {}
    pending: list[str] = []
    for job in job_list:
        entry = ledger.read(Path(ledger_dir), job.name(), job_digest(spec, job, threads))
        if entry is None:
            pending.append(job.name())
        else:
            done[job.name()] = entry
    return Progress(done, pending, [j.name() for j in main])


def compact_table(rows: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """The finished main-table rows as one line per method (in ``methods`` order) and one column per sparsity:
    the main table's test mean (:func:`tables.format_main_table`: ``mean ± std`` over the seeds finished) and how
    many seeds, empty where none is; a README block that stays as short as the table's methods, however many rows
    arrive."""
    table = tables.format_main_table(tables.main_table(rows, methods))
    table["cell"] = [f"{m} ({n})" for m, n in zip(table["mean (test)"], table["seeds"])]
    labels = [tables.LABELS.get(m, m) for m in methods]
    order = [m for m in labels if m in set(table["method"])] + \
        [m for m in dict.fromkeys(table["method"]) if m not in labels]
    cols = sorted(table["sparsity"].unique(), key=lambda c: float(c.rstrip("%")))
    wide = table.pivot(index="method", columns="sparsity", values="cell").reindex(index=order, columns=cols)
    return wide.fillna("").rename_axis(index="method", columns=None).reset_index()


def markdown(progress: Progress, methods: Sequence[str], ledger_name: str) -> str:
    """The progress block: finished / total jobs and compute hours, the machines, the test mean of the finished
    main-table rows (:func:`compact_table`), and the pending jobs."""
    prune_h, eval_h, timed = progress.compute_hours()
    lines = [f"{len(progress.done)} of {progress.total} sweep jobs (notebooks 05 and 06) have a row in "
             f"`{ledger_name}`: {prune_h:.2f} hours of pruning and search, {eval_h:.2f} hours of evaluation "
             f"(recorded in {timed} of the {len(progress.done)} rows), on "
             f"{'; '.join(progress.machines()) or 'no machine yet'}.", ""]
    rows = progress.rows()
    if len(rows):
        lines += ["Test mean of the main-table rows finished so far (mean ± std over the seeds finished, how many in "
                  "brackets; test items per suite as in the profile's `sweep_eval_limit`; the per-suite scores are in "
                  "the ledger's rows):", "", markdown_table(compact_table(rows, methods)), ""]
    if progress.pending:
        shown = ", ".join(progress.pending[:12]) + (", ..." if len(progress.pending) > 12 else "")
        lines.append(f"Pending ({len(progress.pending)}): {shown}")
    return "\n".join(lines).rstrip() + "\n"
