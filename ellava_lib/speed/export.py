"""Export a pruned LLaVA as a plain ``transformers`` checkpoint that loads without ellava.

Layout of ``out_dir``: ``config.json`` + ``model.safetensors`` (``save_pretrained``; pruned weights are stored
densely with their exact zeros), the processor files, ``policy.json`` (:meth:`Policy.to_json`),
``sparsity.csv`` (the sparsity report: ``layer, unit, target, measured, params, ...``) and, when the caller
records how the model was made (``ellava prune``), ``ellava.json``. Load it with
``transformers.LlavaForConditionalGeneration.from_pretrained(out_dir)`` and
``transformers.AutoProcessor.from_pretrained(out_dir)``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
from torch import nn

from ellava_lib.core import files
from ellava_lib.core.policy import Policy
from ellava_lib.model import loading
from ellava_lib.prune.prune import sparsity_report
from ellava_lib.speed.sparse import SemiStructuredLinear, SparseLinear, densify_model

#: Largest allowed gap between a report's ``measured`` sparsity and the weights being exported.
REPORT_TOL = 1e-5


def check_report(model: nn.Module, policy: Policy, report: pd.DataFrame) -> None:
    """Raise ``ValueError`` unless every layer of ``report`` has, in ``model``, the ``measured`` sparsity the
    report states (within :data:`REPORT_TOL`): the report must describe the weights being exported."""
    now = sparsity_report(model, policy).set_index("layer")["measured"]
    missing = sorted(set(report["layer"]) - set(now.index))
    if missing:
        raise ValueError(f"report names layers the model does not have under this policy: {missing[:3]}")
    stated = report.set_index("layer")["measured"]
    gap = (stated - now.loc[stated.index]).abs()
    if (gap > REPORT_TOL).any():
        worst = gap.idxmax()
        raise ValueError(f"report does not match the model: {worst} measured {stated[worst]} in the report, "
                         f"{now[worst]} in the weights (was the model pruned after the report?)")


def export_pruned(model: nn.Module, processor, policy: Policy, report: pd.DataFrame | None,
                  out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``model`` (pruned under ``policy``), ``processor``, ``policy.json``, ``sparsity.csv`` and, when
    ``extra`` is given, ``ellava.json`` (:func:`loading.save`) into ``out_dir``, atomically: the folder is built
    beside it and replaces whatever was there (:func:`files.write_dir`); returns it. ``report`` (from
    ``prune_model``) is checked against the weights (:func:`check_report`); ``None`` writes a fresh
    ``sparsity_report``. Sparse modules (:class:`~ellava_lib.speed.sparse.SparseLinear`, ...) are written as
    their dense masked weights, from a copy: ``model`` itself is left as it is."""
    if any(isinstance(m, (SparseLinear, SemiStructuredLinear)) for m in model.modules()):
        model = copy.deepcopy(model)
        densify_model(model)
    if report is None:
        report = sparsity_report(model, policy)
    else:
        check_report(model, policy, report)

    def fill(out: Path) -> None:
        loading.save(model, processor, out, extra)
        policy.to_json(out / "policy.json")
        files.write_csv(out / "sparsity.csv", report)

    return files.write_dir(Path(out_dir), fill)
