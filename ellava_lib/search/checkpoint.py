"""The search's on-disk state: ``checkpoint.json`` (written atomically once per generation) and
``history.csv`` (one row per evaluated candidate, appended as the search goes).

A checkpoint holds the finished generation, the population with its scores, the state of the search's
``random.Random``, the number of history rows that belong to the finished generations, the projector
file of the latest evolution round (if any), accumulated timings, the start policies, the lambda of the evolution
(``lam``, chosen once before it) and the record of its choice (``lam_record``), the search config
and the *context* (calibration fingerprint, model identity, units). Resuming truncates ``history.csv`` to the recorded
row count (rows of a generation that was killed half-way are recomputed identically), so a resumed run
writes exactly the history of an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ellava_lib.core import files

FORMAT = 3  # 2: ranked population, stage rows from the run's rng, selection rows in the context; 3: lam, lam_record
CHECKPOINT = "checkpoint.json"
HISTORY = "history.csv"
HISTORY_COLUMNS: tuple[str, ...] = ("generation", "policy_id", "r_hat", "g_hat", "j", "budget", "n_samples",
                                    "phase")

#: Config fields a resumed run may change: they decide when to stop, not what is computed.
RESUMABLE_FIELDS: tuple[str, ...] = ("generations", "max_generations")
#: Serialised config fields that set memory use, not what is computed (rows per forward pass, projector
#: micro-batches, checkpointing; :mod:`ellava_lib.speed.memory` chooses them per GPU), with their baseline values:
#: a search's identity (digest, sweep rows) reads them at the baseline and a resumed run may change them, so a run
#: moved to a GPU of another size keeps its folder. Results then agree to floating-point rounding, not bit for bit.
MEMORY_FIELDS: dict[str, Any] = {"eval_batch_size": 0, "projector_micro_batch": 0, "projector_checkpointing": False}


# ------------------------------------------------------------------------------------------- history


def _cell(v: Any) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def start_history(path: Path) -> None:
    """Create ``history.csv`` with only its header (replacing any file there)."""
    files.write_text(path, ",".join(HISTORY_COLUMNS) + "\n")


def append_history(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append rows (floats written with ``repr``: they read back exactly)."""
    with open(path, "a", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        for row in rows:
            w.writerow([_cell(row[c]) for c in HISTORY_COLUMNS])
        f.flush()


def truncate_history(path: Path, n_rows: int) -> None:
    """Keep the header and the first ``n_rows`` rows (atomic rewrite); ``ValueError`` if fewer exist."""
    lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True) if Path(path).is_file() else []
    if len(lines) < n_rows + 1:
        raise ValueError(f"{path} has {max(len(lines) - 1, 0)} rows but the checkpoint recorded {n_rows}")
    files.write_text(path, "".join(lines[: n_rows + 1]))


# ----------------------------------------------------------------------------------------- checkpoint


def rng_state(rng: random.Random) -> list:
    """``random.Random.getstate()`` as JSON-ready lists."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_from_state(state: Sequence) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


def write_checkpoint(out_dir: Path, state: Mapping[str, Any]) -> Path:
    """Write ``checkpoint.json`` atomically (``state`` plus the format number)."""
    return files.write_json(Path(out_dir) / CHECKPOINT, {"format": FORMAT, **state})


def read_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    """The checkpoint in ``out_dir``, or None if there is none."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); remove it to start the search afresh") from None
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} has format {state.get('format')!r}, expected {FORMAT}")
    return state


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(have: Mapping[str, Any], want: Mapping[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """``"key: old -> new"`` for every top-level key whose value differs (keys in ``ignore`` skipped)."""
    keys = [k for k in dict.fromkeys([*have, *want]) if k not in ignore]
    return [f"{k}: {_short(have.get(k))} -> {_short(want.get(k))}" for k in keys if have.get(k) != want.get(k)]


def check_compatible(state: Mapping[str, Any], config: Mapping[str, Any], context: Mapping[str, Any] | None,
                     where: Path) -> None:
    """``ValueError`` naming every difference between the checkpoint's config (and context, when given)
    and the requested one; fields in :data:`RESUMABLE_FIELDS` and :data:`MEMORY_FIELDS` may differ."""
    diffs = differences(state.get("config", {}), config, (*RESUMABLE_FIELDS, *MEMORY_FIELDS))
    if context is not None:
        diffs += differences(state.get("context", {}), context)
    if diffs:
        raise ValueError(f"{Path(where) / CHECKPOINT} was written by another search ({'; '.join(diffs)}); "
                         "use a new output folder or the same settings")
