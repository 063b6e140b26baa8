"""The level database (format 3): every unit pruned once at every non-zero level of the grid, from dense inputs,
stored compactly; a candidate is assembled by copying in only the units whose level changed.

Layout of ``out_dir``::

    config.json              format, grid, method, solver settings, storage dtype, calibration (fingerprint, ids,
                             seed), model identity hash and unit sizes
    {unit}.safetensors       for every linear ``name`` of the unit and every level ``s > 0`` of the grid either
                             "{name}@{s}" (its weights, dense, in the storage dtype) or "{name}@{s}.values" (its
                             nonzero weights in row-major order, storage dtype) + "{name}@{s}.mask" (the nonzero
                             pattern, :func:`pack_bits`), e.g. "lm.0.self_attn.q_proj@0.5.values"; metadata: unit,
                             method, build_seconds, format, store_dtype, shapes, dense_sha1, frobenius_sq,
                             weight_sq

Storage of one matrix of ``n`` weights, ``nnz`` of them nonzero, ``b`` bytes per stored value (2 in fp16 / bf16,
4 in fp32)::

    dense  = n * b                        packed = nnz * b + ceil(n / 8)

and every level is stored the smaller way (packed wins from sparsity ``1 / (8 b)`` on: 6.25% in 16-bit). Level 0
(the dense weights) is never stored: assembling it restores the dense weights from a snapshot the :class:`LevelDB`
takes of each unit the first time it writes that unit into a model (on the CPU, in the model's dtype), after
checking the weights against the digest ``dense_sha1`` recorded at build time, so a pruned model is refused
(snapshots are kept per model object, so another database opened on the same, by then assembled, model reuses
them). Two per-level tables are computed at build time and stored in the unit file's metadata, each summed over
the unit's matrices: ``frobenius_sq`` (``||W * M(s)||_F^2``, the dense weights ``W`` under the level's nonzero
pattern ``M(s)``; level 0 = ``||W||_F^2``) and ``weight_sq`` (the ``norm`` gap's: ``[s, ||W(s)||_F^2,
||W(s) - W||_F^2]`` of the weights the pruned model will have, ``W(s)`` the level's stored weights, OBS-updated and
rounded to the storage dtype; level 0 = ``[0, ||W||_F^2, 0]``). ``weight_sq`` was added to format 3 later: for a
unit file without it :meth:`LevelDB.weight_sq` computes the table from the stored levels and the dense snapshot.

**Matrix units** (``lm.3.self_attn.q_proj``, :mod:`ellava_lib.core.units`) use the same database: every linear is
stored at every level, pruned with its own statistics, so a matrix unit at a level is its block unit's file's
``"{matrix}@{level}"`` alone. :meth:`LevelDB.assemble`, :meth:`LevelDB.weights` and the two tables accept matrix
units; a matrix's tables are computed once from its stored levels and the dense snapshot (the files hold the
block sums only), so the tables of a block's matrices add up to the block's.

Build (:func:`build_level_db`): a disk preflight first (:func:`estimate_bytes` against the free space; nothing is
written when short); then the dense model is run block by block on the calibration batch (inputs of every block
come from the dense model, see :func:`walk.walk_blocks` with ``sequential=False``); for each unit still missing,
the calibration statistics of its linears are collected once, then for every level the dense weights are restored
and pruned, and the unit's file is written atomically (temp file + rename). Only one unit's levels are held in
memory. A unit whose file exists is skipped, so a killed build resumes.

Assembly (:meth:`LevelDB.assemble`): for each unit whose level (or weights) changed since the database last wrote
it into this model object, copy its stored weights at its policy level into the model, in place (packed levels are
decoded on the weights' device; recently decoded levels are cached); no solver in the loop. The model identity
is the sha1 of the unit names and sizes and of the embedding and LM-head weights (which pruning and projector
training never touch), so the same model can be assembled into over and over.

Formats: 1 stored every level densely in the model's dtype, level 0 included; 3 is the layout above. A database of
another format is refused with a one-line error telling to rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ellava_lib.core import files
from ellava_lib.core.policy import DEFAULT_GRID, GRID_TOL, Policy, on_grid
from ellava_lib.core.units import block_unit, is_matrix_unit, list_units, names_vision, unit_kind, unit_linears
from ellava_lib.data.calibration import calibration_fingerprint
from ellava_lib.prune.masks import wanda_mask
from ellava_lib.prune.obs import SparseGPT
from ellava_lib.prune.packing import (
    PACKED_SUFFIXES,
    dense_bytes,
    encode_weights,
    packed_bytes,
    unpack_into,
    unpack_weights,
)
from ellava_lib.prune.walk import InputNorms, walk_blocks

FORMAT = 3
DB_METHODS = ("sparsegpt", "wanda")
#: Storage dtypes of :func:`build_level_db` (``"auto"``: the model weights' own).
STORE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                        "float32": torch.float32}
#: Per unit file, added to :func:`estimate_bytes`: the safetensors header (keys, shapes, metadata) and the
#: solvers' rounding of the pruned count (at most one weight per row and level above ``floor(s n)``: 0.8 MB for a
#: LLaVA-1.5-7B MLP unit in 16-bit on 15 levels).
UNIT_FILE_SLACK = 1 << 20
#: Default bytes of decoded unit levels a :class:`LevelDB` keeps (least recently used dropped first), on the device
#: and in the dtype of the weights they were written into: a search revisits the levels near its target, and
#: decoding a packed level costs more than copying it (CPU: ~4 ns per weight, a dense copy ~0.2 ns).
DECODE_CACHE_BYTES = 256 << 20


def level_key(layer: str, level: float) -> str:
    """``"{layer}@{level}"`` with the level printed shortest (``0``, ``0.1``, ``0.55``)."""
    return f"{layer}@{round(float(level), 6):g}"


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


# ------------------------------------------------------------------------------------------------ identity


def model_identity(model: nn.Module) -> str:
    """12 hex chars: sha1 of every unit's name and size and the embedding and LM-head weights."""
    h = hashlib.sha1(json.dumps(list_units(model, include_vision=True), sort_keys=False).encode())
    for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        h.update(w.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """sha1 (hex) over the layers in name order of ``name|dtype|shape|`` and the weights' raw bytes (exact: any
    changed weight changes it; the same on every device)."""
    h = hashlib.sha1()
    for name in sorted(weights):
        w = weights[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{str(w.dtype).removeprefix('torch.')}|{tuple(w.shape)}|".encode())
        h.update(w.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


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


def check_format(path: Path, config: Mapping[str, Any]) -> None:
    """One-line ``ValueError`` unless the database in ``path`` (its ``config.json`` read as ``config``) has
    format :data:`FORMAT`."""
    if config.get("format") != FORMAT:
        raise ValueError(f"level database {path} has format {config.get('format')!r}, this version reads format "
                         f"{FORMAT}: rebuild it (delete the folder, or build into a new one)")


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


def _frobenius_terms(dense: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``||W * M||_F^2`` of one matrix in fp64 (0-d): ``W`` the dense weights, ``M = (w != 0)``."""
    return (dense.double() * (w != 0)).pow(2).sum()


def _weight_terms(dense: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(||w||_F^2, ||w - W||_F^2)`` of one matrix in fp64 (shape ``(2,)``): ``w`` the weights as stored (and
    assembled), ``W`` the dense weights."""
    w, dense = w.double(), dense.double()
    return torch.stack([w.pow(2).sum(), (w - dense).pow(2).sum()])


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


#: Dense snapshots per model object (weakly referenced): ``{unit: (weights digest, {layer: CPU weights})}``.
_SNAPSHOTS: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[str, dict[str, torch.Tensor]]]] = \
    weakref.WeakKeyDictionary()


def _signature(lins: Mapping[str, nn.Linear]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a unit's weights are replaced or changed in place: per linear the weight's object id,
    data pointer and version counter (bumped by every in-place write, ``copy_`` included)."""
    return tuple((id(lin.weight), lin.weight.data_ptr(), lin.weight._version) for lin in lins.values())


class LevelDB:
    """A built level database, opened lazily: a unit's file is opened (memory-mapped) on first use.

    Per model object it assembles into (weakly referenced) it remembers the level each unit holds and the
    unit's :func:`_signature` after the copy; :meth:`assemble` skips a unit whose level and signature are
    unchanged, so any write to a unit's weights outside the database (an in-place change, new tensors) makes
    it copy that unit again. :meth:`forget` drops what it remembers of a model outright. The dense snapshot
    (level 0) is one per database: each unit's dense weights, taken from the first model it is written into
    (:meth:`_snapshot`). Decoded levels are kept up to ``cache_bytes`` (:data:`DECODE_CACHE_BYTES`; 0 = none),
    least recently used dropped first.
    """

    def __init__(self, out_dir: str | os.PathLike[str], cache_bytes: int = DECODE_CACHE_BYTES) -> None:
        self.path = Path(out_dir)
        self.cache_bytes = int(cache_bytes)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a level database (no config.json)")
        self.config: dict[str, Any] = json.loads((self.path / "config.json").read_text())
        check_format(self.path, self.config)
        self.grid: tuple[float, ...] = tuple(self.config["grid"])
        self._handles: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._dense: dict[str, dict[str, torch.Tensor]] = {}
        self._held: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[float, tuple]]] = \
            weakref.WeakKeyDictionary()
        self.last_assemble_seconds: float | None = None
        self.last_assemble_units: int | None = None
        self._cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_used = 0

    @property
    def units(self) -> list[str]:
        """Units whose file is present."""
        return [u for u in self.config["units"] if (self.path / f"{u}.safetensors").is_file()]

    def disk_bytes(self) -> int:
        """Bytes of the unit files present."""
        return sum((self.path / f"{u}.safetensors").stat().st_size for u in self.units)

    def _open(self, unit: str) -> Any:
        if unit not in self._handles:
            f = self.path / f"{unit}.safetensors"
            if not f.is_file():
                raise KeyError(f"unit {unit!r} is not in the level database {self.path}")
            self._handles[unit] = safe_open(str(f), framework="pt")
        return self._handles[unit]

    def _info(self, unit: str) -> dict[str, Any]:
        """The unit file's parsed metadata: ``shapes``, ``dense_sha1``, ``frobenius_sq``, ``weight_sq`` (None in a
        file written before it was recorded), ``keys``."""
        if unit not in self._meta:
            handle = self._open(unit)
            meta = handle.metadata()
            weight_sq = ({float(s): (float(a), float(b)) for s, a, b in json.loads(meta["weight_sq"])}
                         if "weight_sq" in meta else None)
            self._meta[unit] = {"shapes": {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()},
                                "dense_sha1": meta["dense_sha1"], "keys": set(handle.keys()),
                                "frobenius_sq": {float(s): float(v) for s, v in json.loads(meta["frobenius_sq"])},
                                "weight_sq": weight_sq}
        return self._meta[unit]

    def level_of(self, sparsity: float) -> float:
        """The grid level equal to ``sparsity`` (tolerance 1e-9), else ``ValueError``."""
        for g in self.grid:
            if abs(g - sparsity) <= GRID_TOL:
                return g
        raise ValueError(f"sparsity {sparsity} is not a level of this database (grid {self.grid})")

    def _stored(self, unit: str, name: str, level: float, device: torch.device | str = "cpu") -> torch.Tensor:
        """The stored weights of layer ``name`` at a level ``> 0``, decoded on ``device`` (storage dtype)."""
        key, info = level_key(name, level), self._info(unit)
        handle = self._open(unit)
        if key in info["keys"]:
            return handle.get_tensor(key).to(device)
        values, packed = (handle.get_tensor(key + s).to(device) for s in PACKED_SUFFIXES)
        return unpack_weights(values, packed, info["shapes"][name])

    def weights(self, unit: str, level: float) -> dict[str, torch.Tensor]:
        """``{layer name: weight}`` of ``unit`` (a block unit, or a matrix unit: its one layer) at ``level`` (CPU;
        storage dtype; level 0: the dense snapshot, in the model's dtype, shared, not to be modified;
        ``ValueError`` before one was taken)."""
        level = self.level_of(level)
        if level <= GRID_TOL:
            return self.dense_weights(unit)
        block = block_unit(unit)
        return {name: self._stored(block, name, level) for name in self._layers(unit)}

    def dense_weights(self, unit: str) -> dict[str, torch.Tensor]:
        """The dense snapshot of ``unit`` (block or matrix unit; ``ValueError`` before the database wrote its block
        unit into a model)."""
        block = block_unit(unit)
        if block not in self._dense:
            self._info(block)  # KeyError for a unit not in the database
            raise ValueError(f"level database {self.path} stores no dense weights (format {FORMAT}): they are "
                             f"taken from the model the first time {block} is assembled into it")
        return self._dense[block] if block == unit else {name: self._dense[block][name] for name in self._layers(unit)}

    def _layers(self, unit: str) -> list[str]:
        """The layers of ``unit`` in its block unit's file: a block unit's all, a matrix unit's its own (``KeyError``
        for a unit not in the database)."""
        shapes = self._info(block_unit(unit))["shapes"]
        if is_matrix_unit(unit) and unit not in shapes:
            raise KeyError(f"matrix unit {unit!r} is not in the level database {self.path}")
        return [unit] if is_matrix_unit(unit) else list(shapes)

    def frobenius_sq(self, unit: str) -> dict[float, float]:
        """``{level: ||W * M(level)||_F^2}`` of ``unit`` (summed over its matrices in name order) for level 0
        and every level of the grid: ``W`` the dense weights, ``M(level)`` the nonzero pattern of the pruned
        weights at ``level``; level 0 gives the dense squared norm. Computed at build time (no dense weights
        needed here; a matrix unit's from its stored levels and the dense snapshot, :meth:`_matrix_tables`). For
        the ``norm`` gap (:func:`ellava_lib.search.gap.norm_gap`)."""
        table = self._matrix_tables(unit)["frobenius_sq"] if is_matrix_unit(unit) else \
            self._info(unit)["frobenius_sq"]
        return {float(s): table[s] for s in sorted({0.0, *self.grid}) if s in table}

    def weight_sq(self, unit: str) -> dict[float, tuple[float, float]]:
        """``{level: (||W(level)||_F^2, ||W(level) - W||_F^2)}`` of ``unit`` (each summed over its matrices in name
        order) for level 0 and every level of the grid: ``W(level)`` the weights the database assembles at
        ``level`` (the solver's, OBS-updated for SparseGPT, in the storage dtype), ``W`` the dense weights; level 0
        gives ``(||W||_F^2, 0)``. For the ``norm`` gap (:func:`ellava_lib.search.gap.norm_gap`). Recorded at build
        time; a unit file built before it was recorded has it computed here, once, from its stored levels and the
        dense snapshot (``ValueError`` before the database wrote the unit into a model); so is a matrix unit's
        (:meth:`_matrix_tables`)."""
        if is_matrix_unit(unit):
            table = self._matrix_tables(unit)["weight_sq"]
        else:
            info = self._info(unit)
            if info["weight_sq"] is None:  # the sums over its matrices in name order, as the build sums them
                parts = [self._matrix_tables(k)["weight_sq"] for k in sorted(self._layers(unit))]
                info["weight_sq"] = {s: tuple(sum(t[s][i] for t in parts) for i in range(2)) for s in parts[0]}
            table = info["weight_sq"]
        return {float(s): table[s] for s in sorted({0.0, *self.grid}) if s in table}

    def _matrix_tables(self, unit: str) -> dict[str, dict[float, Any]]:
        """The matrix unit ``unit``'s ``{"frobenius_sq": {level: ||W * M(level)||_F^2}, "weight_sq": {level:
        (||W(level)||_F^2, ||W(level) - W||_F^2)}}`` for level 0 and every level of the grid: the terms of its block
        unit's tables for this one matrix (fp64, as at build time), ``M(level)`` the nonzero pattern of the stored
        weights ``W(level)`` (the build's, unless a weight rounds to zero in the storage dtype). Computed once per
        block unit, for all its matrices, from the stored levels and the dense snapshot (``ValueError`` before the
        database wrote the block unit into a model)."""
        block = block_unit(unit)
        self._layers(unit)  # KeyError for a matrix not in the database
        info = self._info(block)
        if "matrices" not in info:
            dense = self.dense_weights(block)
            tables = {k: {"frobenius_sq": {0.0: float(_frobenius_terms(w, w))},
                          "weight_sq": {0.0: tuple(float(v) for v in _weight_terms(w, w))}} for k, w in dense.items()}
            for level in self.grid:
                if level > GRID_TOL:
                    for k, w in self.weights(block, level).items():
                        tables[k]["frobenius_sq"][float(level)] = float(_frobenius_terms(dense[k], w))
                        tables[k]["weight_sq"][float(level)] = tuple(float(v) for v in _weight_terms(dense[k], w))
            info["matrices"] = tables
        return info["matrices"][unit]

    def build_seconds(self) -> pd.DataFrame:
        """``unit, build_seconds`` from each unit file's metadata."""
        rows = [{"unit": u, "build_seconds": float(self._open(u).metadata()["build_seconds"])} for u in self.units]
        return pd.DataFrame(rows)

    def check_model(self, model: nn.Module) -> None:
        """``ValueError`` unless the database was built for this model."""
        have = model_identity(model)
        if have != self.config["model"]["identity"]:
            raise ValueError(f"level database {self.path} was built for another model "
                             f"(identity {self.config['model']['identity']}, this model {have})")

    def forget(self, model: nn.Module) -> None:
        """Forget which levels ``model``'s units hold: the next :meth:`assemble` into it copies every unit. Call
        it after changing unit weights outside the database (pruning, loading a state dict) when in doubt."""
        self._held.pop(model, None)

    def _snapshot(self, model: nn.Module, unit: str, lins: Mapping[str, nn.Linear]) -> None:
        """Keep ``unit``'s dense weights (CPU copies, the model's dtype): the ones an earlier :class:`LevelDB`
        took of this model object when their digest is the one recorded at build time, else copies of the
        model's weights after checking them against that digest (a one-line ``ValueError`` for weights that are
        not the dense ones, e.g. a pruned model). Snapshots are registered per model object (weakly), so
        another database of the same dense model reuses them instead of refusing the then assembled model."""
        want = self._info(unit)["dense_sha1"]
        taken = _SNAPSHOTS.setdefault(model, {})
        if unit in taken and taken[unit][0] == want:
            self._dense[unit] = taken[unit][1]
            return
        dense = {name: lin.weight.detach().to("cpu", copy=True) for name, lin in lins.items()}
        have = weights_digest(dense)
        if have != want:
            raise ValueError(f"unit {unit} of this model is not the dense one level database {self.path} was built "
                             f"from (weights digest {have[:12]} != {want[:12]}); assemble into a freshly loaded "
                             "dense model")
        taken[unit] = (have, dense)
        self._dense[unit] = dense

    def _write(self, model: nn.Module, unit: str, level: float, lins: Mapping[str, nn.Linear],
               block_lins: Mapping[str, nn.Linear]) -> None:
        """Copy ``unit`` (block or matrix unit) at ``level`` into its linears ``lins`` (the snapshot of its block unit,
        whose linears are ``block_lins``, first, when none was taken yet): level 0 from the snapshot, a level in the
        decode cache from there, else from the block unit's file (then cached)."""
        block = block_unit(unit)
        shapes = self._info(block)["shapes"]
        for name, lin in lins.items():
            if shapes.get(name) != tuple(lin.weight.shape):
                raise ValueError(f"level database {self.path} has no weight of shape "
                                 f"{tuple(lin.weight.shape)} for {name}@{level}")
        if block not in self._dense:
            self._snapshot(model, block, block_lins)
        if level <= GRID_TOL:
            for name, lin in lins.items():
                lin.weight.copy_(self._dense[block][name])
            return
        first = next(iter(lins.values())).weight
        slot = (unit, level, str(first.device), first.dtype)
        if slot in self._cache:
            self._cache.move_to_end(slot)
            for name, lin in lins.items():
                lin.weight.copy_(self._cache[slot][name])
            return
        handle, keys = self._open(block), self._info(block)["keys"]
        for name, lin in lins.items():
            w, key = lin.weight, level_key(name, level)
            if key in keys:
                w.copy_(handle.get_tensor(key))
            elif w.is_contiguous():  # decoded straight into the weights, on their device
                unpack_into(w, *(handle.get_tensor(key + s).to(w.device) for s in PACKED_SUFFIXES))
            else:
                w.copy_(self._stored(block, name, level, w.device))
        self._remember(slot, lins)

    def _remember(self, slot: tuple, lins: Mapping[str, nn.Linear]) -> None:
        """Keep copies of the unit's weights just written under ``slot`` in the decode cache, dropping the least
        recently used entries beyond :attr:`cache_bytes` (a unit larger than that is not kept)."""
        size = sum(lin.weight.numel() * lin.weight.element_size() for lin in lins.values())
        if size > self.cache_bytes:
            return
        self._cache[slot] = {name: lin.weight.detach().clone() for name, lin in lins.items()}
        self._cache_used += size
        while self._cache_used > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cache_used -= sum(t.numel() * t.element_size() for t in old.values())

    @torch.no_grad()
    def assemble(self, model: nn.Module, policy: Policy, *, check: bool = True) -> float:
        """Bring each unit of ``policy`` (block units, or matrix units: each its one layer from its block unit's
        file) to its policy level in ``model`` (in place); returns seconds.

        Copies only the units whose level (or weights, :class:`LevelDB`) changed since the database last wrote
        them into this model object; the first assembly into a model copies every unit of the policy. The number
        copied is kept in :attr:`last_assemble_units`. ``check`` verifies the model identity first (skip it in a
        tight search loop once checked).
        """
        tick = time.perf_counter()
        if check:
            self.check_model(model)
        levels = {u: self.level_of(s) for u, s in policy.sparsities.items()}
        missing = [u for u in levels if block_unit(u) not in self.config["units"]]
        if missing:
            raise ValueError(f"policy units {missing} are not in the level database {self.path}")
        blocks = unit_linears(model, names_vision(levels))
        kind = unit_kind(levels)
        linears = blocks if kind == "block" else unit_linears(model, names_vision(levels), kind)
        held = self._held.setdefault(model, {})
        copied = 0
        for unit, level in levels.items():
            lins = linears[unit]
            if held.get(unit) == (level, _signature(lins)):
                continue
            held.pop(unit, None)
            self._write(model, unit, level, lins, blocks[block_unit(unit)])
            held[unit] = (level, _signature(lins))
            copied += 1
        self.last_assemble_units = copied
        self.last_assemble_seconds = time.perf_counter() - tick
        return self.last_assemble_seconds
