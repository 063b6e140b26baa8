"""The level database: every unit pruned once at every sparsity level of the grid, from dense inputs.

Layout of ``out_dir``::

    config.json              grid, method, solver settings, calibration (fingerprint, ids, seed),
                             model identity hash and unit sizes
    {unit}.safetensors       keys "{layer_name}@{level}" (e.g. "lm.0.self_attn.q_proj@0.5"); metadata:
                             unit, method, build_seconds

Build (:func:`build_level_db`): the dense model is run block by block on the calibration batch (inputs
of every block come from the dense model, see :func:`walk.walk_blocks` with
``sequential=False``); for each unit still missing, the calibration statistics of its linears are
collected once, then for every level the dense weights are restored and pruned (level 0 stores the
dense weights), and the unit's file is written atomically (temp file + rename). Only one unit's
levels are held in memory. A unit whose file exists is skipped, so a killed build resumes.

Assembly (:meth:`LevelDB.assemble`): copy the stored weights of each unit at its policy level into
the model, in place; no solver in the loop. The model identity is the sha1 of the unit names and
sizes and of the embedding and LM-head weights (which pruning and projector training never touch),
so the same model can be assembled into over and over.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ellava_lib.core import files
from ellava_lib.core.policy import DEFAULT_GRID, GRID_TOL, Policy, on_grid
from ellava_lib.core.units import list_units, names_vision, unit_linears
from ellava_lib.data.calibration import calibration_fingerprint
from ellava_lib.prune.masks import wanda_mask
from ellava_lib.prune.obs import SparseGPT
from ellava_lib.prune.walk import InputNorms, walk_blocks

FORMAT = 1
DB_METHODS = ("sparsegpt", "wanda")


def level_key(layer: str, level: float) -> str:
    """``"{layer}@{level}"`` with the level printed shortest (``0``, ``0.1``, ``0.55``)."""
    return f"{layer}@{round(float(level), 6):g}"


def model_identity(model: nn.Module) -> str:
    """12 hex chars: sha1 of every unit's name and size and the embedding and LM-head weights."""
    h = hashlib.sha1(json.dumps(list_units(model, include_vision=True), sort_keys=False).encode())
    for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        h.update(w.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _db_config(model: nn.Module, calib_batch: dict[str, torch.Tensor], grid: Sequence[float], method: str,
               blocksize: int, percdamp: float, calib_info: dict | None) -> dict[str, Any]:
    return {"format": FORMAT, "grid": [float(g) for g in grid], "method": method, "blocksize": blocksize,
            "percdamp": percdamp, "model": {"identity": model_identity(model),
                                            "units": dict(list_units(model, include_vision=True))},
            "calibration": {"fingerprint": calibration_fingerprint(calib_batch), **(calib_info or {})}}


def _check_config(path: Path, want: dict[str, Any]) -> None:
    """A resumed build must use the same grid, method, solver settings, model and calibration."""
    have = json.loads(path.read_text())
    have["calibration"] = have.get("calibration", {}).get("fingerprint")
    want = {**want, "calibration": want["calibration"]["fingerprint"]}
    for key in ("format", "grid", "method", "blocksize", "percdamp", "model", "calibration"):
        if have.get(key) != want[key]:
            raise ValueError(f"level database {path.parent} was built with another {key} "
                             f"({have.get(key)!r} != {want[key]!r}); use a new folder")


def _prune_levels(lin: nn.Linear, stat: Any, grid: Sequence[float], method: str, blocksize: int,
                  percdamp: float) -> dict[float, torch.Tensor]:
    """The layer's weights at every level (its dense weights are restored afterwards)."""
    dense = lin.weight.detach().clone()
    out: dict[float, torch.Tensor] = {}
    for level in grid:
        lin.weight.copy_(dense)
        if level > 0:
            if method == "sparsegpt":
                stat.prune(level, 0, 0, blocksize, percdamp)
            else:
                lin.weight[wanda_mask(lin.weight, stat.norms(), level)] = 0
        out[level] = lin.weight.detach().cpu().clone().contiguous()
    lin.weight.copy_(dense)
    return out


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


@torch.no_grad()
def build_level_db(model: nn.Module, calib_batch: dict[str, torch.Tensor], out_dir: str | os.PathLike[str],
                   grid: Sequence[float] = DEFAULT_GRID, method: str = "sparsegpt",
                   units: Sequence[str] | None = None, progress: bool = True, *, blocksize: int = 128,
                   percdamp: float = 0.01, calib_info: dict | None = None,
                   device: torch.device | str | None = None) -> pd.DataFrame:
    """Build (or resume) the level database of ``units`` (default: every language-model unit).

    ``calib_info`` (e.g. sample ids and seed) is recorded in ``config.json`` beside the calibration
    fingerprint. ``device``: one decoder block at a time on it (:func:`walk.walk_blocks`); the stored
    weights are on the CPU either way. The model is left dense. Returns one row per unit: ``unit, status`` (``built`` /
    ``skipped``), ``seconds`` (this call's wall time for the unit, statistics included).
    """
    if method not in DB_METHODS:
        raise ValueError(f"level database method must be one of {DB_METHODS}, got {method!r}")
    grid = tuple(sorted(set(float(g) for g in grid)))
    if not grid or grid[0] < 0 or grid[-1] >= 1:
        raise ValueError(f"grid levels must lie in [0, 1), got {grid}")
    units = list(units) if units is not None else list(list_units(model))
    unknown = [u for u in units if u not in list_units(model, include_vision=True)]
    if unknown or not units:
        raise ValueError(f"unknown units {unknown} for this model" if unknown else "no units to build")
    out = files.ensure_dir(Path(out_dir))
    config = _db_config(model, calib_batch, grid, method, blocksize, percdamp, calib_info)
    if (out / "config.json").exists():
        _check_config(out / "config.json", config)
        known = json.loads((out / "config.json").read_text())
        config = {**known, "units": known["units"] + [u for u in units if u not in known["units"]]}
    else:
        config = {**config, "units": units}
    files.write_json(out / "config.json", config)
    todo = [u for u in units if not (out / f"{u}.safetensors").exists()]
    records = {u: {"unit": u, "status": "skipped", "seconds": 0.0} for u in units}
    clock = {"t": time.perf_counter()}

    def visit(block: str, block_units: dict[str, dict[str, nn.Linear]], stats: dict) -> bool:
        for unit, lins in block_units.items():
            tensors = {}
            for name, lin in lins.items():
                for level, w in _prune_levels(lin, stats[name], grid, method, blocksize, percdamp).items():
                    tensors[level_key(name, level)] = w
                stats[name].free()
            seconds = time.perf_counter() - clock["t"]
            meta = {"unit": unit, "method": method, "build_seconds": f"{seconds:.6f}"}
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


class LevelDB:
    """A built level database, opened lazily: a unit's file is opened (memory-mapped) on first use."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.path = Path(out_dir)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a level database (no config.json)")
        self.config: dict[str, Any] = json.loads((self.path / "config.json").read_text())
        self.grid: tuple[float, ...] = tuple(self.config["grid"])
        self._handles: dict[str, Any] = {}
        self._frob: dict[str, dict[float, float]] = {}
        self.last_assemble_seconds: float | None = None

    @property
    def units(self) -> list[str]:
        """Units whose file is present."""
        return [u for u in self.config["units"] if (self.path / f"{u}.safetensors").is_file()]

    def _open(self, unit: str) -> Any:
        if unit not in self._handles:
            f = self.path / f"{unit}.safetensors"
            if not f.is_file():
                raise KeyError(f"unit {unit!r} is not in the level database {self.path}")
            self._handles[unit] = safe_open(str(f), framework="pt")
        return self._handles[unit]

    def level_of(self, sparsity: float) -> float:
        """The grid level equal to ``sparsity`` (tolerance 1e-9), else ``ValueError``."""
        for g in self.grid:
            if abs(g - sparsity) <= GRID_TOL:
                return g
        raise ValueError(f"sparsity {sparsity} is not a level of this database (grid {self.grid})")

    def weights(self, unit: str, level: float) -> dict[str, torch.Tensor]:
        """``{layer name: weight}`` of ``unit`` at ``level``."""
        handle, level = self._open(unit), self.level_of(level)
        suffix = level_key("", level)
        return {k[: -len(suffix)]: handle.get_tensor(k) for k in handle.keys() if k.endswith(suffix)}

    def frobenius_sq(self, unit: str) -> dict[float, float]:
        """``{level: ||W * M(level)||_F^2}`` of ``unit`` (summed over its matrices), cached: ``W`` the dense
        (level 0) weights, ``M(level)`` the nonzero pattern of the stored weights at ``level``; level 0 gives
        the dense squared norm. For the ``norm`` gap (:func:`ellava_lib.search.gap.norm_gap`). ``ValueError``
        if the grid has no level 0 (no dense weights stored)."""
        if unit not in self._frob:
            if not any(abs(g) <= GRID_TOL for g in self.grid):
                raise ValueError(f"level database {self.path} has no level 0 (dense weights): no Frobenius norms")
            dense = {k: w.double() for k, w in self.weights(unit, 0.0).items()}
            table: dict[float, float] = {}
            for level in self.grid:
                stored = self.weights(unit, level)
                table[float(level)] = float(sum((dense[k] * (stored[k] != 0)).pow(2).sum() for k in dense))
            self._frob[unit] = table
        return dict(self._frob[unit])

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

    @torch.no_grad()
    def assemble(self, model: nn.Module, policy: Policy, *, check: bool = True) -> float:
        """Copy each unit's stored weights at its policy level into ``model`` (in place); returns seconds.

        ``check`` verifies the model identity first (skip it in a tight search loop once checked).
        """
        tick = time.perf_counter()
        if check:
            self.check_model(model)
        levels = {u: self.level_of(s) for u, s in policy.sparsities.items()}
        missing = [u for u in levels if u not in self.config["units"]]
        if missing:
            raise ValueError(f"policy units {missing} are not in the level database {self.path}")
        include_vision = names_vision(levels)
        linears = unit_linears(model, include_vision)
        for unit, level in levels.items():
            stored = self.weights(unit, level)
            for name, lin in linears[unit].items():
                if name not in stored or stored[name].shape != lin.weight.shape:
                    raise ValueError(f"level database {self.path} has no weight of shape "
                                     f"{tuple(lin.weight.shape)} for {name}@{level}")
                lin.weight.copy_(stored[name])
        self.last_assemble_seconds = time.perf_counter() - tick
        return self.last_assemble_seconds
