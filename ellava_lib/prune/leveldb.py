"""The level database's reader, :class:`LevelDB`: a candidate is assembled by copying in only the units whose level
changed. The format and layout are :mod:`ellava_lib.prune.leveldb_format`'s, the build
:mod:`ellava_lib.prune.leveldb_build`'s; this module re-exports both modules' names that callers reach through it
(``leveldb.build_level_db``, ``leveldb.estimate_bytes``, ``leveldb.FORMAT``, ...).

Assembly (:meth:`LevelDB.assemble`): for each unit whose level (or weights) changed since the database last wrote
it into this model object, copy its stored weights at its policy level into the model, in place (packed levels are
decoded on the weights' device; recently decoded levels are cached); no solver in the loop. The model identity
is the sha1 of the unit names and sizes and of the embedding and LM-head weights (which pruning and projector
training never touch), so the same model can be assembled into over and over.

Level 0 (the dense weights) is never stored: assembling it restores the dense weights from a snapshot the
:class:`LevelDB` takes of each unit the first time it writes that unit into a model (on the CPU, in the model's
dtype), after checking the weights against the digest ``dense_sha1`` recorded at build time, so a pruned model is
refused (snapshots are kept per model object, so another database opened on the same, by then assembled, model
reuses them). The two per-level tables ``frobenius_sq`` and ``weight_sq`` are read from the unit file's metadata;
for a unit file without ``weight_sq`` :meth:`LevelDB.weight_sq` computes the table from the stored levels and the
dense snapshot.

**Matrix units**: :meth:`LevelDB.assemble`, :meth:`LevelDB.weights` and the two tables accept matrix units; a
matrix's tables are computed once from its stored levels and the dense snapshot (the files hold the block sums
only), so the tables of a block's matrices add up to the block's.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open
from torch import nn

from ellava_lib.core.policy import GRID_TOL, Policy
from ellava_lib.core.units import block_unit, is_matrix_unit, names_vision, unit_kind, unit_linears
from ellava_lib.prune.leveldb_build import (  # noqa: F401  (callers, tests and notebooks reach them through here)
    UNIT_FILE_SLACK,
    _prune_levels,
    build_level_db,
    covering_grid,
    estimate_bytes,
    free_bytes,
    is_complete,
    pending_build,
    resolve_store_dtype,
)
from ellava_lib.prune.leveldb_format import (  # noqa: F401  (DB_METHODS, STORE_DTYPES: re-exported)
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
from ellava_lib.prune.packing import PACKED_SUFFIXES, unpack_into, unpack_weights

#: Default bytes of decoded unit levels a :class:`LevelDB` keeps (least recently used dropped first), on the device
#: and in the dtype of the weights they were written into: a search revisits the levels near its target, and
#: decoding a packed level costs more than copying it (CPU: ~4 ns per weight, a dense copy ~0.2 ns).
DECODE_CACHE_BYTES = 256 << 20


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
