"""The level database's on-disk format (format 3), what its build (:mod:`ellava_lib.prune.leveldb_build`) and its
reader (:class:`ellava_lib.prune.leveldb.LevelDB`) share: every unit pruned once at every non-zero level of the grid,
from dense inputs, stored compactly; a candidate is assembled by copying in only the units whose level changed.

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
(the dense weights) is never stored: the reader restores it from a dense snapshot it takes of each unit, checked
against the digest ``dense_sha1`` (:func:`weights_digest`) recorded at build time. Two per-level tables are computed
at build time and stored in the unit file's metadata, each summed over the unit's matrices: ``frobenius_sq``
(``||W * M(s)||_F^2``, the dense weights ``W`` under the level's nonzero pattern ``M(s)``; level 0 = ``||W||_F^2``)
and ``weight_sq`` (the ``norm`` gap's: ``[s, ||W(s)||_F^2, ||W(s) - W||_F^2]`` of the weights the pruned model will
have, ``W(s)`` the level's stored weights, OBS-updated and rounded to the storage dtype; level 0 = ``[0, ||W||_F^2,
0]``); both sides compute one matrix's terms with :func:`_frobenius_terms` and :func:`_weight_terms`. ``weight_sq``
was added to format 3 later: a unit file may lack it (the reader then computes it).

**Matrix units** (``lm.3.self_attn.q_proj``, :mod:`ellava_lib.core.units`) use the same database: every linear is
stored at every level, pruned with its own statistics, so a matrix unit at a level is its block unit's file's
``"{matrix}@{level}"`` alone; the files hold the tables' block sums only.

The model identity (:func:`model_identity`) is the sha1 of the unit names and sizes and of the embedding and LM-head
weights (which pruning and projector training never touch), so the same model can be assembled into over and over.

Formats: 1 stored every level densely in the model's dtype, level 0 included; 3 is the layout above. A database of
another format is refused with a one-line error telling to rebuild it (:func:`check_format`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ellava_lib.core.units import list_units

FORMAT = 3
DB_METHODS = ("sparsegpt", "wanda")
#: Storage dtypes of :func:`leveldb_build.build_level_db` (``"auto"``: the model weights' own).
STORE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                        "float32": torch.float32}


def level_key(layer: str, level: float) -> str:
    """``"{layer}@{level}"`` with the level printed shortest (``0``, ``0.1``, ``0.55``)."""
    return f"{layer}@{round(float(level), 6):g}"


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


def check_format(path: Path, config: Mapping[str, Any]) -> None:
    """One-line ``ValueError`` unless the database in ``path`` (its ``config.json`` read as ``config``) has
    format :data:`FORMAT`."""
    if config.get("format") != FORMAT:
        raise ValueError(f"level database {path} has format {config.get('format')!r}, this version reads format "
                         f"{FORMAT}: rebuild it (delete the folder, or build into a new one)")


def _frobenius_terms(dense: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``||W * M||_F^2`` of one matrix in fp64 (0-d): ``W`` the dense weights, ``M = (w != 0)``."""
    return (dense.double() * (w != 0)).pow(2).sum()


def _weight_terms(dense: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(||w||_F^2, ||w - W||_F^2)`` of one matrix in fp64 (shape ``(2,)``): ``w`` the weights as stored (and
    assembled), ``W`` the dense weights."""
    w, dense = w.double(), dense.double()
    return torch.stack([w.pow(2).sum(), (w - dense).pow(2).sum()])
