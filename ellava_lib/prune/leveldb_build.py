"""Building the level database (:func:`build_level_db`): its format and layout are
:mod:`ellava_lib.prune.leveldb_format`'s, its reader :class:`ellava_lib.prune.leveldb.LevelDB`.

Build (:func:`build_level_db`): a disk preflight first (:func:`estimate_bytes` against the free space; nothing is
written when short); then the dense model is run block by block on the calibration batch (inputs of every block
come from the dense model, see :func:`walk.walk_blocks` with ``sequential=False``); for each unit still missing,
the calibration statistics of its linears are collected once, then for every level the dense weights are restored
and pruned, and the unit's file is written atomically (temp file + rename). Only one unit's levels are held in
memory. A unit whose file exists is skipped, so a killed build resumes.

Each level ``s > 0`` is stored the smaller way, dense or packed (:func:`encode_weights`), in the storage dtype
(:func:`resolve_store_dtype`), and the unit file's metadata gets its dense digest and the two per-level tables
``frobenius_sq`` and ``weight_sq`` (:func:`_encode_unit`). A resumed build must use the same settings
(:func:`_check_config`). The sweep plans its databases with the read-only helpers here: :func:`estimate_bytes`,
:func:`free_bytes`, :func:`covering_grid`, :func:`pending_build`, :func:`is_complete`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn

from ellava_lib.core import files
from ellava_lib.core.policy import DEFAULT_GRID, GRID_TOL, on_grid
from ellava_lib.core.units import list_units, unit_linears
from ellava_lib.data.calibration import calibration_fingerprint
from ellava_lib.prune.leveldb_format import (
    DB_METHODS,
    FORMAT,
    STORE_DTYPES,
    _frobenius_terms,
    _weight_terms,
    check_format,
    level_key,
    model_identity,
    weights_digest,
)
from ellava_lib.prune.masks import wanda_mask
from ellava_lib.prune.obs import SparseGPT
from ellava_lib.prune.packing import dense_bytes, encode_weights, packed_bytes
from ellava_lib.prune.walk import InputNorms, walk_blocks

#: Per unit file, added to :func:`estimate_bytes`: the safetensors header (keys, shapes, metadata) and the
#: solvers' rounding of the pruned count (at most one weight per row and level above ``floor(s n)``: 0.8 MB for a
#: LLaVA-1.5-7B MLP unit in 16-bit on 15 levels).
UNIT_FILE_SLACK = 1 << 20


def estimate_bytes(units_sizes: Mapping[str, int], grid: Sequence[float], store_dtype_bytes: int) -> int:
    """Upper bound of the bytes :func:`build_level_db` writes for units of ``units_sizes`` (``{unit: n_u}``)::

        sum_u [ UNIT_FILE_SLACK + sum_{s in grid, s > 0} min(n_u b, (n_u - floor(s n_u)) b + ceil(n_u / 8)) ]

    with ``b = store_dtype_bytes`` (level 0 is not stored). LLaVA-1.5-7B's language model (64 units, 32 of
    67,108,864 and 32 of 135,266,304 weights, 6.48e9 in all) at fp16 on the 16-level grid of a 0.5 / 0.6 / 0.7
    sweep (``policy.search_grid([0.5, 0.6, 0.7])``): 101,578,493,952 bytes (101.6 GB; format 1 stored
    207.2 GB there); on the 0.1 grid (``DEFAULT_GRID``, 10 levels): 65,636,663,808 bytes (65.6 GB)."""
    total = 0
    levels = [float(s) for s in grid if s > GRID_TOL]
    for n in units_sizes.values():
        total += UNIT_FILE_SLACK
        for s in levels:
            total += min(dense_bytes(n, store_dtype_bytes),
                         packed_bytes(n, n - math.floor(s * n), store_dtype_bytes))
    return total


def resolve_store_dtype(model: nn.Module, store_dtype: str, units: Sequence[str] | None = None) -> str:
    """The storage dtype's name: ``store_dtype``, or for ``"auto"`` the dtype of the first unit's weights
    (``ValueError`` when that is none of :data:`STORE_DTYPES`)."""
    if store_dtype != "auto":
        if store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be 'auto' or one of {', '.join(STORE_DTYPES)}, got {store_dtype!r}")
        return store_dtype
    lins = unit_linears(model, include_vision=True)
    unit = units[0] if units else next(iter(lins))
    dtype = next(iter(lins[unit].values())).weight.dtype
    names = {d: k for k, d in STORE_DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"the model's weights are {dtype}: pass store_dtype (one of {', '.join(STORE_DTYPES)})")
    return names[dtype]


# ------------------------------------------------------------------------------------------------ build


def _db_config(model: nn.Module, calib_batch: dict[str, torch.Tensor], grid: Sequence[float], method: str,
               blocksize: int, percdamp: float, calib_info: dict | None, store_dtype: str) -> dict[str, Any]:
    return {"format": FORMAT, "grid": [float(g) for g in grid], "method": method, "blocksize": blocksize,
            "percdamp": percdamp, "store_dtype": store_dtype,
            "model": {"identity": model_identity(model), "units": dict(list_units(model, include_vision=True))},
            "calibration": {"fingerprint": calibration_fingerprint(calib_batch), **(calib_info or {})}}


def _check_config(path: Path, want: dict[str, Any]) -> None:
    """A resumed build must use the same format, grid, method, solver settings, storage dtype, model and
    calibration."""
    have = json.loads(path.read_text())
    check_format(path.parent, have)
    have["calibration"] = have.get("calibration", {}).get("fingerprint")
    want = {**want, "calibration": want["calibration"]["fingerprint"]}
    for key in ("format", "grid", "method", "blocksize", "percdamp", "store_dtype", "model", "calibration"):
        if have.get(key) != want[key]:
            raise ValueError(f"level database {path.parent} was built with another {key} "
                             f"({have.get(key)!r} != {want[key]!r}); use a new folder")


def _iter_levels(lin: nn.Linear, stat: Any, grid: Sequence[float], method: str, blocksize: int,
                 percdamp: float) -> Iterator[tuple[float, torch.Tensor]]:
    """``(level, the layer's weights at level)`` for every level of ``grid`` (CPU copies; level 0 = dense); the
    dense weights are restored afterwards."""
    dense = lin.weight.detach().clone()
    try:
        for level in grid:
            lin.weight.copy_(dense)
            if level > 0:
                if method == "sparsegpt":
                    stat.prune(level, 0, 0, blocksize, percdamp)
                else:
                    lin.weight[wanda_mask(lin.weight, stat.norms(), level)] = 0
            yield level, lin.weight.detach().cpu().clone().contiguous()
    finally:
        lin.weight.copy_(dense)


def _prune_levels(lin: nn.Linear, stat: Any, grid: Sequence[float], method: str, blocksize: int,
                  percdamp: float) -> dict[float, torch.Tensor]:
    """The layer's weights at every level (its dense weights are restored afterwards); format 1 stored these."""
    return dict(_iter_levels(lin, stat, grid, method, blocksize, percdamp))


def _table(terms: Mapping[float, Mapping[str, torch.Tensor]]) -> list[list[float]]:
    """``[[level, *sum over the matrices in name order of the level's terms]]`` in level order."""
    return [[level, *(float(v) for v in sum(t[k] for k in sorted(t)).reshape(-1))]
            for level, t in sorted(terms.items())]


def _encode_unit(lins: Mapping[str, nn.Linear], stats: Mapping[str, Any], grid: Sequence[float], method: str,
                 blocksize: int, percdamp: float, dtype: torch.dtype
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One unit's stored tensors (levels ``> 0``, :func:`encode_weights`) and its metadata (shapes, dense digest,
    Frobenius table ``[[level, sum over matrices in name order of ||W * M(level)||_F^2]]`` and the stored weights'
    table ``[[level, sum ||W(level)||_F^2, sum ||W(level) - W||_F^2]]`` with ``W(level)`` rounded to ``dtype``,
    level 0 included in both)."""
    tensors: dict[str, torch.Tensor] = {}
    terms: dict[float, dict[str, torch.Tensor]] = {0.0: {}}
    stored: dict[float, dict[str, torch.Tensor]] = {0.0: {}}
    digest = weights_digest({name: lin.weight for name, lin in lins.items()})
    for name, lin in lins.items():
        dense = lin.weight.detach().cpu().clone()
        terms[0.0][name] = _frobenius_terms(dense, dense)
        stored[0.0][name] = _weight_terms(dense, dense)
        for level, w in _iter_levels(lin, stats[name], grid, method, blocksize, percdamp):
            if level > GRID_TOL:
                terms.setdefault(float(level), {})[name] = _frobenius_terms(dense, w)
                stored.setdefault(float(level), {})[name] = _weight_terms(dense, w.to(dtype))
                tensors.update(encode_weights(w, dtype, level_key(name, level)))
        stats[name].free()
    meta = {"format": str(FORMAT), "shapes": json.dumps({n: list(lin.weight.shape) for n, lin in lins.items()}),
            "dense_sha1": digest, "frobenius_sq": json.dumps(_table(terms)), "weight_sq": json.dumps(_table(stored))}
    return tensors, meta


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem of ``path`` (its nearest existing ancestor when it does not exist yet)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return int(shutil.disk_usage(path).free)


def _preflight(out: Path, sizes: Mapping[str, int], grid: Sequence[float], store_dtype: str) -> None:
    """One-line ``OSError`` when :func:`estimate_bytes` of the units ``sizes`` exceeds the free space at ``out``."""
    need = estimate_bytes(sizes, grid, torch.empty((), dtype=STORE_DTYPES[store_dtype]).element_size())
    free = free_bytes(out)
    if need > free:
        raise OSError(f"not enough disk space for the level database {out}: {need:,} bytes ({need / 1e9:.2f} GB) "
                      f"needed for {len(sizes)} units in {store_dtype}, {free:,} bytes ({free / 1e9:.2f} GB) free")


def covering_grid(out_dir: str | os.PathLike[str], grid: Sequence[float]) -> tuple[float, ...]:
    """The grid to build (or resume) ``out_dir`` with so it holds every level of ``grid``: the database's own
    when one there already covers ``grid``, else ``grid`` (a database there without some of those levels then
    fails :func:`build_level_db`'s config check, naming the grids)."""
    want = tuple(sorted({float(g) for g in grid}))
    config = Path(out_dir) / "config.json"
    if config.is_file():
        have = tuple(float(g) for g in json.loads(config.read_text()).get("grid", ()))
        if all(on_grid(g, have) for g in want):
            return have
    return want


def pending_build(db_dir: Path, grid: Sequence[float], units: Sequence[str],
                  store_dtype: str) -> tuple[tuple[float, ...], list[str]]:
    """``(grid, units)`` a sweep still builds in ``db_dir`` to hold ``grid``, read only (the rules the sweep's
    ``db_build_grid`` applies before it builds): the units without a file when a database there of this format
    and storage dtype already covers ``grid``, else every unit on ``grid`` (with the one there: the union of both
    grids)."""
    want = tuple(sorted({float(g) for g in grid}))
    config = Path(db_dir) / "config.json"
    if not config.is_file():
        return want, list(units)
    known = json.loads(config.read_text())
    if known.get("format") != FORMAT or known.get("store_dtype") != store_dtype:
        return want, list(units)
    have = tuple(float(g) for g in known.get("grid", ()))
    if not all(on_grid(g, have) for g in want):
        return tuple(sorted(set(have) | set(want))), list(units)
    return have, [u for u in units if not (Path(db_dir) / f"{u}.safetensors").is_file()]


def is_complete(db_dir: Path, grid: Sequence[float], db_dtype: str = "auto") -> bool:
    """Whether ``db_dir`` holds a finished database of this format covering ``grid`` (every unit its config lists
    has its file) in the storage dtype ``db_dtype`` (``auto``: any): then nothing is left to build there."""
    config = Path(db_dir) / "config.json"
    if not config.is_file():
        return False
    known = json.loads(config.read_text())
    have = tuple(float(g) for g in known.get("grid", ()))
    return (known.get("format") == FORMAT and db_dtype in ("auto", known.get("store_dtype"))
            and all(on_grid(float(g), have) for g in grid)
            and all((Path(db_dir) / f"{u}.safetensors").is_file() for u in known.get("units", ())))


@torch.no_grad()
def build_level_db(model: nn.Module, calib_batch: dict[str, torch.Tensor], out_dir: str | os.PathLike[str],
                   grid: Sequence[float] = DEFAULT_GRID, method: str = "sparsegpt",
                   units: Sequence[str] | None = None, progress: bool = True, *, blocksize: int = 128,
                   percdamp: float = 0.01, calib_info: dict | None = None,
                   device: torch.device | str | None = None, store_dtype: str = "auto") -> pd.DataFrame:
    """Build (or resume) the level database of ``units`` (default: every language-model unit) from the dense
    ``model``.

    ``calib_info`` (e.g. sample ids and seed) is recorded in ``config.json`` beside the calibration
    fingerprint. ``device``: one decoder block at a time on it (:func:`walk.walk_blocks`); the stored
    weights are on the CPU either way. ``store_dtype``: ``"auto"`` (the model weights' own dtype: a fp32 model
    assembles bit-identically to its pruned weights) or one of :data:`STORE_DTYPES`. Before any work the bytes
    to write (:func:`estimate_bytes` of the units not built yet) are compared with the free space of
    ``out_dir``'s filesystem: a one-line ``OSError`` when short, nothing written. A folder holding a database
    of another format: a one-line ``ValueError`` (rebuild it). The model is left dense. Returns one row per unit:
    ``unit, status`` (``built`` / ``skipped``), ``seconds`` (this call's wall time for the unit, statistics
    included).
    """
    if method not in DB_METHODS:
        raise ValueError(f"level database method must be one of {DB_METHODS}, got {method!r}")
    grid = tuple(sorted(set(float(g) for g in grid)))
    if not grid or grid[0] < 0 or grid[-1] >= 1:
        raise ValueError(f"grid levels must lie in [0, 1), got {grid}")
    sizes = list_units(model, include_vision=True)
    units = list(units) if units is not None else list(list_units(model))
    unknown = [u for u in units if u not in sizes]
    if unknown or not units:
        raise ValueError(f"unknown units {unknown} for this model" if unknown else "no units to build")
    store_dtype = resolve_store_dtype(model, store_dtype, units)
    out = Path(out_dir)
    config = _db_config(model, calib_batch, grid, method, blocksize, percdamp, calib_info, store_dtype)
    if (out / "config.json").exists():
        _check_config(out / "config.json", config)
        known = json.loads((out / "config.json").read_text())
        config = {**known, "units": known["units"] + [u for u in units if u not in known["units"]]}
    else:
        config = {**config, "units": units}
    todo = [u for u in units if not (out / f"{u}.safetensors").exists()]
    _preflight(out, {u: sizes[u] for u in todo}, grid, store_dtype)
    files.ensure_dir(out)
    files.write_json(out / "config.json", config)
    records = {u: {"unit": u, "status": "skipped", "seconds": 0.0} for u in units}
    clock = {"t": time.perf_counter()}

    def visit(block: str, block_units: dict[str, dict[str, nn.Linear]], stats: dict) -> bool:
        for unit, lins in block_units.items():
            tensors, meta = _encode_unit(lins, stats, grid, method, blocksize, percdamp, STORE_DTYPES[store_dtype])
            seconds = time.perf_counter() - clock["t"]
            meta = {"unit": unit, "method": method, "build_seconds": f"{seconds:.6f}", "store_dtype": store_dtype,
                    **meta}
            files.write_atomic(out / f"{unit}.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))
            records[unit] = {"unit": unit, "status": "built", "seconds": seconds}
            clock["t"] = time.perf_counter()
        return False

    if todo:
        model.eval()
        make_stat = SparseGPT if method == "sparsegpt" else InputNorms
        walk_blocks(model, calib_batch, todo, make_stat, visit, sequential=False, progress=progress,
                    desc="level db", device=device)
    return pd.DataFrame([records[u] for u in units])
