"""The sweep's level databases (:mod:`ellava_lib.prune.leveldb`): one per calibration draw ``(seed, calib_n)`` in
``out_dir/leveldb/s<seed>-n<n>`` (:func:`level_db_dir`), built on the draw's statistic rows with the levels every
search of the draw reads (:func:`db_build_grid`, :func:`build_tier_level_db`, on the tier's device or one block at
a time with ``tier.offload``), and their disk plan: what the databases still to build need against the free space
(:func:`level_db_disk`, :func:`check_level_db_disk`), and for ``tier.level_dbs == "one"`` the rounds of jobs that
read one database each (:func:`db_rounds`) and the deletion of the others (:func:`free_level_dbs`). The sweep
(:mod:`sweep`) prepares the databases and runs the jobs; notebook 03 builds its database here too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ellava_lib.core.units import list_units
from ellava_lib.run.jobs import SEARCH_METHODS, Job, SweepSpec, level_grid
from ellava_lib.run.tier import Tier, block_device, load_model, place


def level_db_dir(out_dir: Path, seed: int, calib_n: int) -> Path:
    return Path(out_dir) / "leveldb" / f"s{seed}-n{calib_n}"


def db_build_grid(db_dir: Path, grid: Sequence[float], store_dtype: str | None = None,
                  calib_ids: Sequence[str] | None = None) -> tuple[float, ...]:
    """The grid to build ``db_dir`` with so it holds ``grid`` (:func:`leveldb.covering_grid`). A sweep's databases
    are its cache: one there of another format (:data:`leveldb.FORMAT`), or, when given, of another storage dtype
    (``store_dtype``) or built on other calibration samples (``calib_ids``, e.g. all the rows of a draw instead of
    its statistic rows) is removed (built afresh with ``grid``), and one that lacks some of ``grid``'s levels is
    removed and rebuilt with the union of both."""
    from ellava_lib.prune.leveldb import FORMAT, covering_grid

    config = Path(db_dir) / "config.json"
    if config.is_file():
        known = json.loads(config.read_text())
        ids = known.get("calibration", {}).get("ids")
        if known.get("format") != FORMAT or (store_dtype is not None and known.get("store_dtype") != store_dtype) \
                or (calib_ids is not None and ids != list(calib_ids)):
            shutil.rmtree(db_dir)
    want = covering_grid(db_dir, grid)
    if not config.is_file():
        return want
    have = tuple(float(g) for g in json.loads(config.read_text()).get("grid", ()))
    if want == have:
        return have
    shutil.rmtree(db_dir)
    return tuple(sorted(set(have) | set(want)))


def build_tier_level_db(tier: Tier, model: nn.Module, batch: dict[str, torch.Tensor], db_dir: Path,
                        grid: Sequence[float], samples: Sequence[Any], seed: int,
                        progress: bool = False) -> pd.DataFrame:
    """Build (or resume) the level database ``db_dir`` of the dense ``model`` (on the CPU, as :func:`tier.load_model`
    leaves it) on the calibration ``batch`` of ``samples`` drawn with ``seed``, holding at least the levels of
    ``grid`` (:func:`db_build_grid`), stored in the tier's ``db_dtype``. Where the model runs follows the tier:
    with ``tier.offload`` it stays on the CPU and one decoder block at a time goes to the tier's device
    (:func:`tier.block_device`), else the whole model and the batch are placed there first (:func:`tier.place`).
    With ``tier.level_dbs == "one"`` every other database folder beside ``db_dir`` (``s<seed>-n<n>``) is deleted
    first, so at most one is on disk. The sweep (:func:`prepare_level_db`) and notebook 03 build their databases
    here, each on the statistic rows of its draw (:func:`statistic_draw`: ``samples`` and ``batch`` are those rows).
    Returns :func:`leveldb.build_level_db`'s records."""
    from ellava_lib.prune.leveldb import build_level_db, resolve_store_dtype

    if tier.level_dbs == "one":
        _free_others(Path(db_dir).parent, Path(db_dir))
    store_dtype = resolve_store_dtype(model, tier.db_dtype)
    device = block_device(tier)
    if device is None:
        model, batch = place(tier, model, batch)
    ids = [s.id for s in samples]
    return build_level_db(model, batch, db_dir, db_build_grid(db_dir, grid, store_dtype, ids), "sparsegpt",
                          progress=progress, calib_info={"ids": ids, "seed": seed},
                          device=device, store_dtype=store_dtype)


# ------------------------------------------------------------------------------------------- disk

def unit_sizes(spec: SweepSpec) -> tuple[dict[str, int], str]:
    """``({unit: weights}, storage dtype)`` of the spec's model as its level databases store it: a hub
    model from its shipped config on the ``meta`` device (no download; ``tier.dtype`` unless ``tier.db_dtype``
    names another), a model folder loaded on the CPU (:func:`leveldb.resolve_store_dtype`)."""
    from ellava_lib.model import structure
    from ellava_lib.prune.leveldb import STORE_DTYPES, resolve_store_dtype

    tier = spec.get_tier()
    if str(spec.model_dir) in structure.CONFIG_ALIASES:
        model = structure.meta_model(structure.load_config(str(spec.model_dir)))
        dtype = tier.dtype if tier.db_dtype == "auto" else tier.db_dtype
    else:
        model, _ = load_model(tier, spec.model_dir)
        dtype = resolve_store_dtype(model, tier.db_dtype)
    if dtype not in STORE_DTYPES:
        raise ValueError(f"level databases cannot store {dtype}: set tier db_dtype to one of {', '.join(STORE_DTYPES)}")
    return dict(list_units(model)), dtype


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else 0


def _db_draws(spec: SweepSpec, jobs: Sequence[Job]) -> dict[tuple[int, int], tuple[float, ...]]:
    """``{(seed, calib_n): levels}`` of the level databases ``jobs`` read (:func:`level_grid`)."""
    draws = sorted({(j.seed, j.calib_n) for j in jobs if j.method in SEARCH_METHODS})
    return {d: level_grid(spec, [j for j in jobs if (j.seed, j.calib_n) == d]) for d in draws}


def level_db_disk(spec: SweepSpec, jobs: Sequence[Job], out_dir: Path, mode: str | None = None
                  ) -> dict[str, Any]:
    """What the level databases of ``jobs`` still need on disk, before any is built.

    Per draw ``d`` to build: ``need_d`` = :func:`leveldb.estimate_bytes` of its units not built yet on the grid it
    will be built with (:func:`leveldb.pending_build`). ``mode`` (default ``tier.level_dbs``): ``keep`` holds every
    database, so the sweep needs ``sum_d need_d`` of the free space ``F``; ``one`` deletes every other database of
    ``out_dir/leveldb`` (``B_d`` bytes) before building ``d``, so it needs ``need_d <= F + B_d`` for every ``d``
    (peak: one database). Returns ``need`` and ``free`` (of the tightest draw for ``one``), ``ok``, ``mode``,
    ``per_draw`` ``{"s<seed>-n<n>": need_d}``; no model is loaded when nothing is left to build."""
    from ellava_lib.prune.leveldb import STORE_DTYPES, estimate_bytes, free_bytes, is_complete, pending_build

    mode = mode or spec.get_tier().level_dbs
    db_dtype = spec.get_tier().db_dtype
    draws = {d: grid for d, grid in _db_draws(spec, jobs).items()
             if not is_complete(level_db_dir(out_dir, *d), grid, db_dtype)}
    root = Path(out_dir) / "leveldb"
    per_draw: dict[str, int] = {}
    if draws:
        sizes, dtype = unit_sizes(spec)
        width = torch.empty((), dtype=STORE_DTYPES[dtype]).element_size()
        for d, grid in draws.items():
            levels, todo = pending_build(level_db_dir(out_dir, *d), grid, list(sizes), dtype)
            if todo:
                per_draw[f"s{d[0]}-n{d[1]}"] = estimate_bytes({u: sizes[u] for u in todo}, levels, width)
    free = free_bytes(root)
    if mode == "keep" or not per_draw:
        need = sum(per_draw.values())
        return {"mode": mode, "need": need, "free": free, "ok": need <= free, "per_draw": per_draw}
    others = {name: sum(_dir_bytes(p) for p in root.glob("s*-n*") if p.name != name) for name in per_draw}
    worst = min(per_draw, key=lambda name: free + others[name] - per_draw[name])
    need, room = per_draw[worst], free + others[worst]
    return {"mode": mode, "need": need, "free": room, "ok": need <= room, "per_draw": per_draw}


def check_level_db_disk(spec: SweepSpec, jobs: Sequence[Job], out_dir: Path) -> dict[str, Any]:
    """:func:`level_db_disk`, and a one-line ``OSError`` naming the bytes needed and free when they do not fit
    (before any database is built or any job runs)."""
    disk = level_db_disk(spec, jobs, out_dir)
    if not disk["ok"]:
        how = ("every level database kept (tier level_dbs: keep; 'one' needs only the largest)"
               if disk["mode"] == "keep" else "one level database at a time (tier level_dbs: one)")
        raise OSError(f"not enough disk space for the sweep's level databases in {Path(out_dir) / 'leveldb'}: "
                      f"{disk['need']:,} bytes ({disk['need'] / 1e9:.2f} GB) needed, {disk['free']:,} bytes "
                      f"({disk['free'] / 1e9:.2f} GB) free, {how}")
    return disk


def db_rounds(spec: SweepSpec, jobs: Sequence[Job], out_dir: Path) -> list[tuple[tuple[int, int] | None,
                                                                                  list[Job]]]:
    """The jobs of a ``level_dbs: one`` sweep in rounds, each reading at most one level database: first the jobs
    that read none (``None``), then one round per draw ``(seed, calib_n)``, the draws whose database is already
    on disk first (a sweep after another, notebook 06 after 05, starts with the database the first one left),
    then by seed and size. Job order is kept inside a round."""
    rounds: list[tuple[tuple[int, int] | None, list[Job]]] = []
    plain = [j for j in jobs if j.method not in SEARCH_METHODS]
    if plain:
        rounds.append((None, plain))
    draws = sorted({(j.seed, j.calib_n) for j in jobs if j.method in SEARCH_METHODS},
                   key=lambda d: (not (level_db_dir(out_dir, *d) / "config.json").is_file(), d))
    for d in draws:
        rounds.append((d, [j for j in jobs if j.method in SEARCH_METHODS and (j.seed, j.calib_n) == d]))
    return rounds


def free_level_dbs(out_dir: Path, keep: tuple[int, int] | None = None) -> list[str]:
    """Delete every level database folder of ``out_dir/leveldb`` but the one of the draw ``keep``; returns the
    names deleted (``s<seed>-n<n>``)."""
    return _free_others(Path(out_dir) / "leveldb", level_db_dir(out_dir, *keep) if keep is not None else None)


def _free_others(root: Path, keep: Path | None) -> list[str]:
    """Delete the database folders ``root/s*-n*`` other than ``keep``; their names."""
    gone = []
    for path in sorted(root.glob("s*-n*")) if root.is_dir() else []:
        if path.is_dir() and path != keep:
            shutil.rmtree(path)
            gone.append(path.name)
    return gone
