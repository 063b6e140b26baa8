"""Export a pruned LLaVA as a plain ``transformers`` checkpoint that loads without ellava.

Layout of ``out_dir``: ``config.json`` + ``model.safetensors`` (``save_pretrained``; pruned weights are stored
densely with their exact zeros), the processor files, ``policy.json`` (:meth:`Policy.to_json`),
``sparsity.csv`` (the sparsity report: ``layer, unit, target, measured, params, ...``) and, when the caller
records how the model was made (``ellava prune``), ``ellava.json``. Load it with
``transformers.LlavaForConditionalGeneration.from_pretrained(out_dir)`` and
``transformers.AutoProcessor.from_pretrained(out_dir)``.

:func:`save_sparse` / :func:`load_sparse` instead keep the sparse layers of a ``sparsify_model``-ed model sparse
(format ``ellava-sparse-v1``: safetensors tensors of each layer's packed form plus an ``ellava_sparse`` entry in
``config.json``, described in :func:`save_sparse`); the round trip is exact.
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
from ellava_lib.speed.sparse import SPARSE_TYPES, SemiStructuredLinear, SparseLinear, densify_model

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
    if any(isinstance(m, SPARSE_TYPES) for m in model.modules()):
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


# ------------------------------------------------------------------------------------------ sparse folders

#: Config entry of a sparse folder and its format version.
SPARSE_KEY, SPARSE_FORMAT = "ellava_sparse", "ellava-sparse-v1"
SPARSE_WEIGHTS = "sparse.safetensors"


def save_sparse(model: nn.Module, out_dir: str | Path, processor=None, policy: Policy | None = None) -> Path:
    """Write ``model`` with its sparse layers kept sparse into ``out_dir`` (atomically), returns it.

    Format ``ellava-sparse-v1``: ``config.json`` = the model's config plus an entry
    ``"ellava_sparse": {"format": "ellava-sparse-v1", "layers": {module path: {"kind", "in_features",
    "out_features", "dtype"}}}``, and ``sparse.safetensors`` = the model's ``state_dict`` (a tensor shared by
    several keys, such as tied embeddings, stored once under its first key). A ``bitmask`` layer's tensors are
    ``<path>.values`` (nonzeros, row-major), ``<path>.mask`` (uint8, per-row bitmask), ``<path>.offsets`` and
    ``<path>.bias`` (see :mod:`ellava_lib.speed.bitmask`), plus ``<path>.dense_weight`` where ``auto`` kept a
    dense copy for large row counts (``dense_from_rows`` in the entry); a ``csr`` layer's are ``crow_indices``,
    ``col_indices``, ``values`` and ``bias``; a ``semi`` layer is written as a dense ``nn.Linear``. Optional
    ``processor`` files and ``policy.json``. Read it back with :func:`load_sparse`."""
    from safetensors.torch import save_file

    from ellava_lib.speed.bitmask import BitmaskLinear

    semi = [name for name, m in model.named_modules() if isinstance(m, SemiStructuredLinear)]
    if semi:  # from a copy: the caller's model keeps its 2:4 layers
        model = copy.deepcopy(model)
        for name in semi:
            model.set_submodule(name, model.get_submodule(name).to_linear())
    kinds = {BitmaskLinear: "bitmask", SparseLinear: "csr"}
    layers = {name: {"kind": kinds[type(m)], "in_features": m.in_features, "out_features": m.out_features,
                     "dtype": str(m.values.dtype).replace("torch.", ""),
                     "dense_from_rows": getattr(m, "dense_from_rows", None)}
              for name, m in model.named_modules() if type(m) in kinds}
    state, seen = {}, set()
    for key, t in model.state_dict().items():
        ident = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            continue
        seen.add(ident)
        state[key] = t.detach().cpu().contiguous()
    config = model.config.to_dict()
    config[SPARSE_KEY] = {"format": SPARSE_FORMAT, "layers": layers}

    def fill(out: Path) -> None:
        save_file(state, str(out / SPARSE_WEIGHTS), metadata={"format": "pt", SPARSE_KEY: SPARSE_FORMAT})
        files.write_json(out / "config.json", config)
        if processor is not None:
            processor.save_pretrained(out)
        if policy is not None:
            policy.to_json(out / "policy.json")

    return files.write_dir(Path(out_dir), fill)


def load_sparse(path: str | Path, model_class=None) -> nn.Module:
    """The model of a :func:`save_sparse` folder with its sparse layers rebuilt (exact: the same buffers).
    ``model_class`` defaults to ``LlavaForConditionalGeneration`` (its ``config_class`` reads ``config.json``).
    Where the bitmask kernels cannot be built, bitmask layers load as dense ``nn.Linear`` (with a warning)."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from ellava_lib.speed import bitmask

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    entry = raw.pop(SPARSE_KEY, None)
    if not entry or entry.get("format") != SPARSE_FORMAT:
        raise ValueError(f"{path / 'config.json'} has no {SPARSE_KEY!r} entry of format {SPARSE_FORMAT}")
    cls = model_class or LlavaForConditionalGeneration
    model = cls(cls.config_class.from_dict(raw)).eval()
    state = load_file(str(path / SPARSE_WEIGHTS))
    for name, spec in entry["layers"].items():
        p = name + "."
        bias = state.get(p + "bias")
        if spec["kind"] == "csr":
            csr = torch.sparse_csr_tensor(state[p + "crow_indices"].long(), state[p + "col_indices"].long(),
                                          state[p + "values"], (spec["out_features"], spec["in_features"]),
                                          check_invariants=True)
            mod: nn.Module = SparseLinear(csr.to_dense(), bias, state[p + "col_indices"].dtype)
        else:
            dense = bitmask.unpack(state[p + "values"], state[p + "mask"], spec["in_features"])
            mod = bitmask.BitmaskLinear(dense, bias) if bitmask.supported(dense) else _dense_linear(dense, bias)
            if spec.get("dense_from_rows") and isinstance(mod, bitmask.BitmaskLinear):
                mod.keep_dense_from(spec["dense_from_rows"])
        model.set_submodule(name, mod)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k, v in model.state_dict(keep_vars=True).items()
            if any(v is w for k2, w in model.state_dict(keep_vars=True).items() if k2 in state and k2 != k)}
    missing = [k for k in missing if k not in tied and not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{path / SPARSE_WEIGHTS} does not match its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model


def _dense_linear(weight, bias) -> nn.Module:
    from ellava_lib.speed.sparse import _make_linear

    return _make_linear(weight, bias)
