"""Notebook 02's evaluations: the dense model and uniform magnitude pruning at each sparsity, each read from the
results ledger (:mod:`ledger`) when the profile has one holding its row, else computed (and its row written there).

A row is ``<ledger>/eval/<key>.json`` (a subfolder: the ledger's top level holds the sweep's jobs only, which
:func:`ledger.entries` reads), keyed ``dense-eval-<limit>`` or ``magnitude-<sparsity:.2f>-eval-<limit>``
(:func:`eval_key`), written atomically (:func:`files.write_json`):

- ``format``: :data:`FORMAT`; ``key``; ``digest``: :func:`eval_digest`, over the model's recipe
  (:func:`jobs.model_identity`), the tier's identity, the evaluation's data (split, size, seed, suites, input
  format), the sparsity, :data:`REVISION` and the intra-op thread count;
- ``frame``: the metrics frame's rows (:data:`metrics.FRAME_COLUMNS`), what 02's table and figure are built from;
- ``postcondition``: for a pruned model, its mean target and measured sparsity per unit (``[{unit, target,
  measured}]``, None for dense);
- ``machine`` and ``commit``: as a sweep row's (:func:`ledger.machine`, :func:`ledger.commit`).

A row of another digest is recomputed and overwritten; a row that cannot be read is named in one line on stderr
and recomputed. Without a ledger everything is computed, as before ledgers existed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ellava_lib.core import files
from ellava_lib.eval.metrics import FRAME_COLUMNS
from ellava_lib.run import ledger
from ellava_lib.run.jobs import _hash, model_identity

FORMAT = 1
#: Bumped when the evaluation or the magnitude pruning changes what a row holds.
REVISION = 1
#: The ledger's subfolder of these rows.
FOLDER = "eval"
FIELDS: tuple[str, ...] = ("format", "key", "digest", "frame", "postcondition", "machine", "commit")
#: The evaluation's fields a row depends on (not the batch size or the data's folder: where and how fast it ran).
EVAL_FIELDS: tuple[str, ...] = ("split", "limit", "n_items", "data_seed", "data", "suites")


def label(sparsity: float | None) -> str:
    """The frame's name in 02's table: ``dense`` or ``magnitude 50%``."""
    return "dense" if sparsity is None else f"magnitude {sparsity:.0%}"


def eval_key(sparsity: float | None, limit: int | None) -> str:
    """``dense-eval-<limit>`` or ``magnitude-0.50-eval-<limit>`` (``limit`` 0 or None: the whole split, ``all``)."""
    name = "dense" if sparsity is None else f"magnitude-{sparsity:.2f}"
    return f"{name}-eval-{limit or 'all'}"


def eval_digest(model_dir: str | Path, tier, eval_cfg, sparsity: float | None, threads: int) -> str:
    """12 hex chars over what a row depends on (the module's docstring)."""
    cfg = {k: getattr(eval_cfg, k) for k in EVAL_FIELDS}
    cfg["suites"] = list(cfg["suites"])
    return _hash({"model": model_identity(model_dir), "tier": tier.identity(), "eval": cfg,
                  "input": eval_cfg.input_format(), "sparsity": sparsity, "revision": REVISION,
                  "threads": int(threads)})


def row_path(ledger_dir: str | Path, key: str) -> Path:
    return Path(ledger_dir) / FOLDER / f"{key}.json"


def load_row(ledger_dir: str | Path, key: str, digest: str) -> dict[str, Any] | None:
    """The row ``key`` when the ledger holds it under ``digest``; None when missing, of another digest, or
    unreadable (named in one line on stderr)."""
    path = row_path(ledger_dir, key)
    if not path.is_file():
        return None
    entry, reason = ledger.read_entry(path, key, _problem)
    if reason is not None:
        print(f"ledger: corrupted row {path}: {reason}; it is recomputed", file=sys.stderr, flush=True)
        return None
    return entry if entry["digest"] == digest else None


def _problem(entry: Any, key: str) -> str | None:
    """Why ``entry`` is not a dense-evaluation row of ``key`` (:func:`ledger.envelope_problem`, then its frame)."""
    reason = ledger.envelope_problem(entry, key, FIELDS, FORMAT)
    if reason is not None:
        return reason
    if not isinstance(entry["frame"], list) or not all(isinstance(r, dict) and set(FRAME_COLUMNS) <= set(r)
                                                       for r in entry["frame"]):
        return "its frame is not a list of metric rows"
    return None


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
            for r in frame[list(FRAME_COLUMNS)].to_dict(orient="records")]


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(records, columns=list(FRAME_COLUMNS))
    return frame.astype({"score": "float64", "n": "int64"})


def postcondition(report: pd.DataFrame) -> pd.DataFrame:
    """Mean target and measured sparsity per unit (rows ``target``, ``measured``; a column per unit)."""
    return report.groupby("unit")[["target", "measured"]].mean().T


@dataclass
class DenseEval:
    """02's evaluations: ``frames`` (``dense`` and ``magnitude <s>%``: metrics frames), ``postcondition`` (of the
    last pruned model; None without one) and ``read``, the keys read from the ledger."""

    frames: dict[str, pd.DataFrame]
    postcondition: pd.DataFrame | None
    read: list[str] = field(default_factory=list)


def _compute(tier, model_dir, eval_cfg, sparsity, out_dir, judge):
    """The metrics frame of the model (magnitude-pruned uniformly at ``sparsity`` unless None) and its
    post-condition (None for dense)."""
    from ellava_lib.core import units
    from ellava_lib.core.policy import Policy
    from ellava_lib.eval import evaluate
    from ellava_lib.prune import prune
    from ellava_lib.run import tier as tiers

    model, processor = tiers.load_model(tier, model_dir)
    report = None
    if sparsity is not None:
        report = prune.magnitude_prune(model, Policy.uniform(units.list_units(model), sparsity))
    model, _ = tiers.place(tier, model)
    frame = evaluate.evaluate(model, processor, eval_cfg, out_dir, judge)
    return frame, None if report is None else postcondition(report)


def dense_and_magnitude(tier, model_dir: str | Path, eval_cfg, sparsities: list[float], run, judge,
                        ledger_dir: str | Path | None = None) -> DenseEval:
    """02's frames: the dense model's and, for each of ``sparsities``, the uniformly magnitude-pruned model's
    evaluation on ``eval_cfg`` (predictions and metrics in ``run``'s ``eval/dense``, ``eval/magnitude-<s>``).
    With ``ledger_dir`` a row under its digest is read (one line says so) and nothing of it computed; any other is
    computed and its row written there."""
    import torch

    threads = torch.get_num_threads()
    out = DenseEval({}, None)
    for s in [None, *sparsities]:
        key = eval_key(s, eval_cfg.limit)
        digest = eval_digest(model_dir, tier, eval_cfg, s, threads)
        entry = None if ledger_dir is None else load_row(ledger_dir, key, digest)
        if entry is not None:
            frame = _frame(entry["frame"])
            post = None if entry["postcondition"] is None else \
                pd.DataFrame(entry["postcondition"], columns=["unit", "target", "measured"]).set_index("unit").T
            out.read.append(key)
            print(f"{key}: read from the ledger ({row_path(ledger_dir, key)}, commit "
                  f"{(entry['commit'] or 'unknown')[:12]}); nothing recomputed", flush=True)
        else:
            sub = "eval/dense" if s is None else f"eval/magnitude-{s:.2f}"
            frame, post = _compute(tier, model_dir, eval_cfg, s, run.path(sub), judge)
            if ledger_dir is not None:
                files.write_json(row_path(ledger_dir, key), {
                    "format": FORMAT, "key": key, "digest": digest, "frame": _records(frame),
                    "postcondition": None if post is None else [
                        {"unit": u, "target": float(post.loc["target", u]), "measured": float(post.loc["measured", u])}
                        for u in post.columns],
                    "machine": ledger.machine(), "commit": ledger.commit()})
        out.frames[label(s)] = frame
        if post is not None:
            out.postcondition = post
    return out
