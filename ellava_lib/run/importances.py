"""ECoFLaP's zeroth-order importances of a sweep (:func:`allocate.zeroth_order_importance`, computed by
:func:`sweep.ecoflap_importance`): one set per calibration draw ``(seed, calib_n)``, whatever the sparsity, kept in
the run folder (``out_dir/ecoflap/s<seed>-n<n>.json``, keyed by :func:`_ecoflap_key`: the model's folder, the tier,
the draw) and in a results ledger (``<ledger>/ecoflap/``, :func:`ledger.write_importance`, under
:func:`importance_digest`: the model's recipe instead of its folder, and the thread count), so that a sweep in a fresh
clone reads them instead of computing them again (:func:`importances_from_ledger`, :func:`importances_to_ledger`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ellava_lib.core import files
from ellava_lib.run import ledger
from ellava_lib.run.jobs import METHOD_REVISION, Job, SweepSpec, _hash, model_identity, needs_importance, select_frac


def _importance_identity(spec: SweepSpec, seed: int, calib_n: int) -> dict[str, Any]:
    """What ECoFLaP's importances depend on besides the model: the tier (calibration source), seed and size,
    ECoFLaP's revision and the rows they read."""
    return {"tier": spec.get_tier().identity(), "seed": seed, "calib_n": calib_n,
            "revision": METHOD_REVISION["ecoflap"], "rows": ["statistic", select_frac(spec)]}


def _ecoflap_key(spec: SweepSpec, seed: int, calib_n: int) -> str:
    """The run folder's key of ECoFLaP's importances: :func:`_importance_identity` and the model's folder."""
    return _hash({"model_dir": spec.model_dir, **_importance_identity(spec, seed, calib_n)})


def ecoflap_importance_path(out_dir: Path, seed: int, calib_n: int) -> Path:
    return Path(out_dir) / "ecoflap" / f"s{seed}-n{calib_n}.json"


def importance_digest(spec: SweepSpec, seed: int, calib_n: int, threads: int) -> str:
    """12 hex chars over what ECoFLaP's importances of the draw ``(seed, calib_n)`` depend on, wherever they are
    computed: :func:`_ecoflap_key` with the model named by its recipe (:func:`jobs.model_identity`) instead of its
    folder, and the intra-op ``threads`` they ran at (a reduction order, as for a row, :func:`jobs.job_digest`).
    The digest of their entry in a results ledger (:func:`ledger.write_importance`)."""
    return _hash({"model": model_identity(spec.model_dir), "threads": int(threads),
                  **_importance_identity(spec, seed, calib_n)})


def _importance_draws(spec: SweepSpec, jobs: Sequence[Job]) -> list[tuple[int, int]]:
    return sorted({(j.seed, j.calib_n) for j in jobs if needs_importance(spec, j)})


def _cached_importance(spec: SweepSpec, seed: int, calib_n: int, out_dir: Path) -> dict[str, Any] | None:
    """The run folder's importance cache of the draw (``key``, ``importance``, ``seconds`` when measured) when it
    was made for this model and tier, else None."""
    path = ecoflap_importance_path(out_dir, seed, calib_n)
    try:
        cached = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
    return cached if isinstance(cached, dict) and cached.get("key") == _ecoflap_key(spec, seed, calib_n) else None


def importances_from_ledger(spec: SweepSpec, jobs: Sequence[Job], out_dir: Path, threads: int,
                            ledger_dir: Path) -> list[str]:
    """Seed the run folder's importance cache (:func:`ecoflap_importance`) from the ledger's entries made under
    the same :func:`importance_digest`, for every draw of ``jobs`` that needs importances and has none in the run
    folder; returns the entries' keys used."""
    used = []
    for seed, n in _importance_draws(spec, jobs):
        if _cached_importance(spec, seed, n, out_dir) is not None:
            continue
        entry = ledger.read_importance(ledger_dir, f"s{seed}-n{n}", importance_digest(spec, seed, n, threads))
        if entry is not None:
            files.write_json(ecoflap_importance_path(out_dir, seed, n),
                             {"key": _ecoflap_key(spec, seed, n), "seed": seed, "calib_n": n,
                              "importance": entry["importance"], "seconds": entry["seconds"]})
            used.append(f"s{seed}-n{n}")
    return used


def importances_to_ledger(spec: SweepSpec, jobs: Sequence[Job], out_dir: Path, threads: int,
                          ledger_dir: Path) -> list[str]:
    """Write every importance the run folder computed for the draws of ``jobs`` into the ledger when the ledger
    has none under its :func:`importance_digest`; returns the keys written."""
    written = []
    for seed, n in _importance_draws(spec, jobs):
        cached = _cached_importance(spec, seed, n, out_dir)
        digest = importance_digest(spec, seed, n, threads)
        if cached is not None and ledger.read_importance(ledger_dir, f"s{seed}-n{n}", digest) is None:
            ledger.write_importance(ledger_dir, f"s{seed}-n{n}", digest, cached["importance"], cached.get("seconds"))
            written.append(f"s{seed}-n{n}")
    return written
