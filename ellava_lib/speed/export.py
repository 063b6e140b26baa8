"""Export a pruned LLaVA as a plain ``transformers`` checkpoint that loads without ellava.

Layout of ``out_dir``: ``config.json`` + ``model.safetensors`` (``save_pretrained``; pruned weights are stored
densely with their exact zeros), the processor files, ``policy.json`` (:meth:`Policy.to_json`),
``sparsity.csv`` (the sparsity report: ``layer, unit, target, measured, params, ...``) and, when the caller
records how the model was made (``ellava prune``), ``ellava.json``. Load it with
``transformers.LlavaForConditionalGeneration.from_pretrained(out_dir)`` and
``transformers.AutoProcessor.from_pretrained(out_dir)``.

:func:`save_sparse` / :func:`load_sparse` instead keep the sparse layers of a ``sparsify_model``-ed model sparse
(format ``ellava-sparse-v1``: safetensors tensors of each layer's packed form plus an ``ellava_sparse`` entry in
``config.json``, described in :func:`save_sparse`); the round trip is exact. Both stream one tensor at a time
(:func:`write_safetensors` / :func:`read_safetensors`, no ``mmap``, no copy of the model), so a model that fits
in memory once can be saved and loaded: a 7B model pruned to 50% is never held dense and packed at once.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ellava_lib.core import files
from ellava_lib.core.policy import Policy
from ellava_lib.model import loading
from ellava_lib.prune.prune import sparsity_report
from ellava_lib.speed import bitmask
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

#: safetensors dtype names (https://github.com/huggingface/safetensors, ``Dtype``).
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...],
                                                             Callable[[], torch.Tensor]]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file, one tensor at a time: ``entries`` = ``(key, dtype, shape, get)`` in file order,
    ``get()`` returning the tensor when its turn comes (so at most one tensor beyond the caller's model is alive:
    a layer converted on the fly, never the whole model as bytes, as ``safetensors.torch.save_file`` builds).
    The header (``u64`` length, JSON padded to 8 bytes, ``data_offsets`` contiguous from 0) is written first from
    the shapes; a tensor whose dtype or shape differs from its entry raises ``ValueError``. Returns the bytes
    written. The file is a plain safetensors file (``safetensors.safe_open`` reads it)."""
    header, offset = {}, 0
    for key, dtype, shape, _ in entries:
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, dtype, shape, get in entries:
            t = get().detach().to("cpu").contiguous()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{key}: expected {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
            if t.numel():
                f.write(_as_bytes(t))
            del t
    return 8 + len(raw) + offset


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """``(header without __metadata__, byte offset of the data)`` of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_safetensors(path: str | Path, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of a safetensors file, one at a time in file order (``keys``: only those), each read with
    ``readinto`` into a fresh tensor (no ``mmap``: the file's pages are not held resident by the reader)."""
    header, start = safetensors_header(path)
    wanted = sorted((k for k in header if keys is None or k in set(keys)), key=lambda k: header[k]["data_offsets"][0])
    with open(path, "rb") as f:
        for key in wanted:
            spec = header[key]
            t = torch.empty(spec["shape"], dtype=_ST_TORCH[spec["dtype"]])
            b, e = spec["data_offsets"]
            if t.numel() * t.element_size() != e - b:
                raise ValueError(f"{path}: {key} has {e - b} bytes for shape {spec['shape']} {spec['dtype']}")
            f.seek(start + b)
            if t.numel() and f.readinto(_as_bytes(t)) != e - b:
                raise ValueError(f"{path}: {key} is truncated")
            yield key, t


def _sparse_entries(model: nn.Module) -> tuple[list, dict]:
    """``(entries for write_safetensors, {layer path: spec})`` of a model: every state_dict tensor once (a tensor
    shared by several keys under its first key), a ``semi`` layer as its dense weight made when written."""
    kinds = {bitmask.BitmaskLinear: "bitmask", SparseLinear: "csr"}
    layers = {name: {"kind": kinds[type(m)], "in_features": m.in_features, "out_features": m.out_features,
                     "dtype": str(m.values.dtype).replace("torch.", ""),
                     "dense_from_rows": getattr(m, "dense_from_rows", None)}
              for name, m in model.named_modules() if type(m) in kinds}
    semi = {name: m for name, m in model.named_modules() if isinstance(m, SemiStructuredLinear)}
    entries, seen = [], set()
    for key, t in model.state_dict(keep_vars=True).items():
        layer, _, leaf = key.rpartition(".")
        if layer in layers and leaf == "dense_weight":
            continue  # auto's dense copy is rebuilt from the packed weight on load (dense_from_rows), not stored
        if layer in semi and leaf == "weight":  # the dense nn.Linear weight, converted when its turn comes
            m = semi[layer]
            entries.append((key, m.weight.dtype, (m.out_features, m.in_features), lambda m=m: m.weight.to_dense()))
            continue
        ident = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            continue
        seen.add(ident)
        entries.append((key, t.dtype, tuple(t.shape), lambda t=t: t.detach()))
    return entries, layers


def save_sparse(model: nn.Module, out_dir: str | Path, processor=None, policy: Policy | None = None) -> Path:
    """Write ``model`` with its sparse layers kept sparse into ``out_dir`` (atomically), returns it.

    Format ``ellava-sparse-v1``: ``config.json`` = the model's config plus an entry
    ``"ellava_sparse": {"format": "ellava-sparse-v1", "layers": {module path: {"kind", "in_features",
    "out_features", "dtype"}}}``, and ``sparse.safetensors`` = the model's ``state_dict`` (a tensor shared by
    several keys, such as tied embeddings, stored once under its first key). A ``bitmask`` layer's tensors are
    ``<path>.values`` (nonzeros, row-major), ``<path>.mask`` (uint8, per-row bitmask), ``<path>.offsets`` and
    ``<path>.bias`` (see :mod:`ellava_lib.speed.bitmask`); where ``auto`` kept a dense copy for large row counts,
    only ``dense_from_rows`` is stored in the entry (:func:`load_sparse` rebuilds the copy from the packed
    weight: the file holds no dense weight of a packed layer); a ``csr`` layer's are ``crow_indices``,
    ``col_indices``, ``values`` and ``bias``; a ``semi`` layer is written as a dense ``nn.Linear``. Optional
    ``processor`` files and ``policy.json``. Read it back with :func:`load_sparse`.

    Streaming: the tensors are written one at a time from the model's own storage (:func:`write_safetensors`),
    so saving needs no memory beyond the model (a ``semi`` layer: one dense layer at a time). A bitmask layer at
    sparsity ``s`` takes ``(1 - s) b + 1/8 + 8 / d_in`` bytes per weight on disk against ``b`` dense."""
    entries, layers = _sparse_entries(model)
    config = model.config.to_dict()
    config[SPARSE_KEY] = {"format": SPARSE_FORMAT, "layers": layers}

    def fill(out: Path) -> None:
        write_safetensors(out / SPARSE_WEIGHTS, entries, metadata={"format": "pt", SPARSE_KEY: SPARSE_FORMAT})
        files.write_json(out / "config.json", config)
        if processor is not None:
            processor.save_pretrained(out)
        if policy is not None:
            policy.to_json(out / "policy.json")

    return files.write_dir(Path(out_dir), fill)


def empty_model(cls, config) -> nn.Module:
    """``cls(config)`` with every parameter and persistent buffer on the ``meta`` device (no memory) and its
    non-persistent buffers (rotary frequencies, CLIP position ids) computed on the CPU: each module owning one is
    rebuilt alone on the CPU from its ``config`` (``type(m)(m.config)``) and its non-persistent buffers taken."""
    with torch.device("meta"):
        model = cls(config)
    for mod_name, m in model.named_modules():
        meta = [b for b in m._non_persistent_buffers_set if m._buffers.get(b) is not None and m._buffers[b].is_meta]
        if not meta:
            continue
        if not hasattr(m, "config"):
            raise ValueError(f"cannot compute the non-persistent buffers {meta} of {mod_name} ({type(m).__name__})")
        fresh = type(m)(m.config)
        for b in meta:
            m._buffers[b] = fresh._buffers[b]
    return model.eval()


def _assign(model: nn.Module, key: str, t: torch.Tensor) -> None:
    """Put ``t`` as the parameter or buffer ``key`` of ``model`` (replacing a meta placeholder)."""
    mod_name, _, leaf = key.rpartition(".")
    mod = model.get_submodule(mod_name)
    if leaf in mod._parameters:
        old = mod._parameters[leaf]
        if tuple(old.shape) != tuple(t.shape):
            raise ValueError(f"{key}: shape {tuple(t.shape)} in the file, {tuple(old.shape)} in the model")
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = t
    else:
        raise KeyError(key)


def load_sparse(path: str | Path, model_class=None) -> nn.Module:
    """The model of a :func:`save_sparse` folder with its sparse layers rebuilt (exact: the same buffers).
    ``model_class`` defaults to ``LlavaForConditionalGeneration`` (its ``config_class`` reads ``config.json``).
    Where the bitmask kernels cannot be built, bitmask layers load as dense ``nn.Linear`` (with a warning).

    Streaming: the model is built on the ``meta`` device (:func:`empty_model`), then the file is read one tensor
    at a time (:func:`read_safetensors`) and each layer is put in place as soon as its tensors are read: a bitmask
    layer straight from its packed tensors (:meth:`BitmaskLinear.from_packed`, no dense weight), a CSR layer
    through its dense weight (one layer at a time). Peak memory: the loaded model plus one layer."""
    from transformers import LlavaForConditionalGeneration

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    entry = raw.pop(SPARSE_KEY, None)
    if not entry or entry.get("format") != SPARSE_FORMAT:
        raise ValueError(f"{path / 'config.json'} has no {SPARSE_KEY!r} entry of format {SPARSE_FORMAT}")
    cls = model_class or LlavaForConditionalGeneration
    model = empty_model(cls, cls.config_class.from_dict(raw))
    specs = entry["layers"]
    owner = {}  # key -> sparse layer path
    header, _ = safetensors_header(path / SPARSE_WEIGHTS)
    for key in header:
        layer = key.rpartition(".")[0]
        if layer in specs:
            owner[key] = layer
    pending: dict[str, dict[str, torch.Tensor]] = {}
    expected = {name: sum(1 for k in owner.values() if k == name) for name in specs}
    loaded: set[str] = set()
    for key, t in read_safetensors(path / SPARSE_WEIGHTS):
        layer = owner.get(key)
        if layer is None:
            try:
                _assign(model, key, t)
            except (KeyError, AttributeError):
                raise ValueError(f"{path / SPARSE_WEIGHTS} does not match its config: unexpected {key}") from None
            loaded.add(key)
            continue
        pending.setdefault(layer, {})[key[len(layer) + 1:]] = t
        if len(pending[layer]) == expected[layer]:
            model.set_submodule(layer, _sparse_layer(specs[layer], pending.pop(layer)))
    if pending:
        raise ValueError(f"{path / SPARSE_WEIGHTS}: incomplete sparse layers {sorted(pending)[:3]}")
    missing = [k for k in specs if k not in {owner[x] for x in owner}]
    if missing:
        raise ValueError(f"{path / SPARSE_WEIGHTS} does not match its config: sparse layers {missing[:3]} absent")
    _tie_loaded(model, loaded)
    left = [k for k, v in model.state_dict(keep_vars=True).items() if v is not None and v.is_meta]
    if left:
        raise ValueError(f"{path / SPARSE_WEIGHTS} does not match its config: missing {left[:3]}")
    return model.eval()


def _tie_loaded(model: nn.Module, loaded: set[str]) -> None:
    """Point each tied parameter not in the file at the loaded one it is tied to (``all_tied_weights_keys``:
    ``{target: source}``, transformers 5)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        if target not in loaded and source in loaded:
            mod_name, _, leaf = target.rpartition(".")
            src_name, _, src_leaf = source.rpartition(".")
            model.get_submodule(mod_name)._parameters[leaf] = model.get_submodule(src_name)._parameters[src_leaf]


def _sparse_layer(spec: dict, t: dict[str, torch.Tensor]) -> nn.Module:
    """One sparse layer of a sparse folder from its tensors (``values, mask, offsets[, bias, dense_weight]`` or
    ``crow_indices, col_indices, values[, bias]``)."""
    bias = t.get("bias")
    if spec["kind"] == "csr":
        csr = torch.sparse_csr_tensor(t["crow_indices"].long(), t["col_indices"].long(), t["values"],
                                      (spec["out_features"], spec["in_features"]), check_invariants=True)
        return SparseLinear(csr.to_dense(), bias, t["col_indices"].dtype)
    if t["values"].dtype in (torch.float32, torch.bfloat16) and bitmask.extension() is not None:
        mod = bitmask.BitmaskLinear.from_packed(t["values"], t["mask"], spec["in_features"], bias, t["offsets"])
        if spec.get("dense_from_rows"):
            mod.keep_dense_from(spec["dense_from_rows"])
        return mod
    return bitmask.make_linear(bitmask.unpack(t["values"], t["mask"], spec["in_features"]), bias)
