"""The results ledger: a tracked folder (``results/smol/``) holding one JSON file per finished sweep job, committed
to git as the run goes, so a sweep longer than one machine's life continues from any fresh clone.

A ledger row is ``<ledger>/<job key>.json`` (the key is :meth:`jobs.Job.name`), written atomically
(:func:`files.write_json`) once its job is complete:

- ``format``: :data:`FORMAT`; ``key``: the job key (the file's name); ``digest``: :func:`jobs.job_digest`, over
  everything the row depends on (model recipe, method and its revision, sparsity, seed, calibration size, search
  configuration, evaluation size, tier, intra-op threads);
- ``job``: the job's fields (method, sparsity, seed, calib_n, gap, projector, exact);
- ``row``: the sweep row as ``results.csv`` holds it (test scores per suite and ``mean``, ``calib_mean``,
  ``gap_calib_test``, ``measured``, ``flops_rel``, for the searched methods the fitness ``j`` / ``r_hat`` /
  ``g_hat``, ``search_s`` and ``lam`` (the lambda of its ``J``, 0 without a gap term), and ``seconds``);
- ``policy``: the pruning policy (:meth:`policy.Policy.to_dict`; None for dense); ``lam``: the lambda that steered
  a search with a gap term (None otherwise);
- ``machine``: where it ran (platform, CPU count, torch version, intra-op threads); ``commit``: ``git rev-parse
  HEAD`` of the checkout the code ran from, None outside one.

A sweep (:func:`sweep.run_sweep` with ``ledger``) skips a job whose row is here with its digest; a row of another
digest (another recipe, configuration, thread count) is re-run and overwritten, never mixed in; a row that cannot
be read (invalid JSON, missing fields) is named in one line on stderr and re-run. Level databases and the other
large intermediates stay in the run folder (git-ignored) and are rebuilt where a job needs them. ECoFLaP's
importances (one number per unit of a calibration draw, which every ECoFLaP job and every search starting from
ECoFLaP reads, and which take tens of minutes on a CPU) are small, so the sweep keeps them in the subfolder
``ecoflap/`` (:func:`write_importance`, :func:`read_importance`): ``format``, ``key`` (``s<seed>-n<calib_n>``),
``digest`` (everything they depend on, :func:`importances.importance_digest`), ``importance``, ``seconds`` (their
computation's wall time, null when not measured), ``machine``, ``commit``.

Notebook 04 reads its showcased search's row and policy here (:mod:`showcase`), notebook 07 every row
(:func:`entries`, :mod:`explorer`) for the jobs its run folder lacks; notebook 02 keeps its dense and magnitude
evaluations in the subfolder ``eval/`` (:mod:`denseeval`), which :func:`entries` does not read.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from ellava_lib.core import files

FORMAT = 1
#: The keys every ledger row holds (:func:`make_row`).
FIELDS: tuple[str, ...] = ("format", "key", "digest", "job", "row", "policy", "lam", "machine", "commit")
#: The keys every ``row`` of a ledger row holds (whatever the method).
ROW_FIELDS: tuple[str, ...] = ("job", "method", "sparsity", "seed", "calib_n", "measured", "flops_rel", "mean",
                               "seconds")


#: The keys of an importance entry (:func:`write_importance`) and the ledger's subfolder of them.
IMPORTANCE_FIELDS: tuple[str, ...] = ("format", "key", "digest", "importance", "seconds", "machine", "commit")
IMPORTANCE_FOLDER = "ecoflap"


def row_path(ledger: Path, key: str) -> Path:
    """The file of the job ``key`` in the ledger folder ``ledger``."""
    return Path(ledger) / f"{key}.json"


def machine() -> dict[str, Any]:
    """Where this process runs: ``platform``, ``cpu`` (the processor's model name, :func:`cpu_name`),
    ``cpu_count``, ``torch`` (version) and ``threads`` (torch's intra-op thread count now)."""
    import torch

    return {"platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def cpu_name() -> str:
    """The first ``model name`` of ``/proc/cpuinfo`` (e.g. ``AMD EPYC``), else ``platform.processor()``, else
    ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.lru_cache(maxsize=1)
def commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout this package is imported from; None when that fails (no git, not a
    checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    head = out.stdout.strip()
    return head if out.returncode == 0 and head else None


def make_row(key: str, digest: str, job: dict[str, Any], row: dict[str, Any], policy: dict[str, Any] | None,
             lam: float | None) -> dict[str, Any]:
    """A ledger row (:data:`FIELDS`) of a finished job, with this process's :func:`machine` and :func:`commit`."""
    return {"format": FORMAT, "key": key, "digest": digest, "job": dict(job), "row": dict(row), "policy": policy,
            "lam": lam, "machine": machine(), "commit": commit()}


def write(ledger: Path, entry: dict[str, Any]) -> Path:
    """Write ``entry`` (a complete ledger row) to its file in ``ledger``, atomically; returns the path."""
    return files.write_json(row_path(ledger, entry["key"]), entry)


def envelope_problem(entry: Any, key: str, fields: tuple[str, ...], fmt: int) -> str | None:
    """Why ``entry`` (parsed JSON) is not a ledger entry of ``key`` with the keys ``fields`` in format ``fmt``
    (what every kind of ledger row checks first), or None."""
    if not isinstance(entry, dict):
        return f"not a JSON object but {type(entry).__name__}"
    missing = [f for f in fields if f not in entry]
    if missing:
        return f"missing {', '.join(missing)}"
    if entry["format"] != fmt:
        return f"format {entry['format']!r}, not {fmt}"
    if entry["key"] != key:
        return f"key {entry['key']!r}, not {key!r}"
    return None


def read_entry(path: Path, key: str, check) -> tuple[dict[str, Any] | None, str | None]:
    """``(entry, None)`` when the file ``path`` parses as JSON and ``check(entry, key)`` finds no problem, else
    ``(None, why not)``."""
    try:
        entry = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"invalid JSON ({type(e).__name__})"
    reason = check(entry, key)
    return (entry, None) if reason is None else (None, reason)


def problem(entry: Any, key: str) -> str | None:
    """Why ``entry`` (parsed JSON) is not a ledger row of the job ``key``, or None when it is one."""
    reason = envelope_problem(entry, key, FIELDS, FORMAT)
    if reason is not None:
        return reason
    if not isinstance(entry["row"], dict):
        return "its row is not a JSON object"
    missing = [f for f in ROW_FIELDS if f not in entry["row"]]
    return f"its row misses {', '.join(missing)}" if missing else None


def _parse(path: Path, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(row, None)`` when the file ``path`` holds a ledger row of the job ``key``, else ``(None, why not)``."""
    return read_entry(path, key, problem)


def load(path: Path, key: str, digest: str, warn: bool = True, check=problem, what: str = "row",
         then: str = "its job re-runs") -> dict[str, Any] | None:
    """The ledger entry in ``path`` when it is one of ``key`` made under ``digest`` (``check``: why a parsed entry
    is not one, :func:`problem` for a job's row); else None: no file, an entry of another digest (re-run, then
    overwritten), or a corrupted one, which ``warn`` names in one line on stderr (``ledger: corrupted <what>
    <path>: <reason>; <then>``)."""
    path = Path(path)
    if not path.is_file():
        return None
    entry, reason = read_entry(path, key, check)
    if entry is None:
        if warn:
            print(f"ledger: corrupted {what} {path}: {reason}; {then}", file=sys.stderr, flush=True)
        return None
    return entry if entry["digest"] == digest else None


def importance_path(ledger: Path, key: str) -> Path:
    """The file of the importance entry ``key`` (``s<seed>-n<calib_n>``) in the ledger folder ``ledger``."""
    return Path(ledger) / IMPORTANCE_FOLDER / f"{key}.json"


def _importance_problem(entry: Any, key: str) -> str | None:
    """Why ``entry`` is not an importance entry of ``key``: its envelope, then a map of unit names to finite
    numbers."""
    reason = envelope_problem(entry, key, IMPORTANCE_FIELDS, FORMAT)
    if reason is not None:
        return reason
    imp = entry["importance"]
    if not isinstance(imp, dict) or not imp or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for k, v in imp.items()):
        return "its importance is not a non-empty map of unit names to finite numbers"
    if entry["seconds"] is not None and not (isinstance(entry["seconds"], (int, float)) and entry["seconds"] >= 0):
        return "its seconds is neither null nor a number >= 0"
    return None


def write_importance(ledger: Path, key: str, digest: str, importance: dict[str, float],
                     seconds: float | None = None) -> Path:
    """Write the importance entry ``key`` (module docstring) atomically, with this process's :func:`machine` and
    :func:`commit`; ``seconds``: the computation's wall time (None: not measured); returns the path."""
    entry = {"format": FORMAT, "key": key, "digest": digest, "importance": {u: float(v) for u, v in importance.items()},
             "seconds": None if seconds is None else float(seconds), "machine": machine(), "commit": commit()}
    return files.write_json(importance_path(ledger, key), entry)


def read_importance(ledger: Path, key: str, digest: str) -> dict[str, Any] | None:
    """The importance entry ``key`` (``importance``, ``seconds``, ...) when it was made under ``digest``; None when
    there is none, when it has another digest (recomputed, then overwritten), or when it cannot be read (named in
    one line on stderr)."""
    return load(importance_path(ledger, key), key, digest, check=_importance_problem, what="importance entry",
                then="recomputed")


def entries(ledger: Path) -> list[dict[str, Any]]:
    """Every row of the ledger folder ``ledger`` whatever its digest, in key order (none when the folder is
    missing); a corrupted row is named in one line on stderr and left out."""
    out = []
    for path in sorted(Path(ledger).glob("*.json")):
        entry, reason = _parse(path, path.stem)
        if entry is None:
            print(f"ledger: corrupted row {path}: {reason}; left out", file=sys.stderr, flush=True)
        else:
            out.append(entry)
    return out


def read(ledger: Path, key: str, digest: str) -> dict[str, Any] | None:
    """The row of the job ``key`` in the ledger folder ``ledger`` when its digest is ``digest`` (:func:`load`)."""
    return load(row_path(ledger, key), key, digest)
