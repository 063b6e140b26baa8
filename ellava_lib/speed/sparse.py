"""Sparse execution of pruned linear layers, swapped in only where a measurement says it is faster.

A pruned ``nn.Linear`` still multiplies every zero: the FLOP ratio of a policy is *counted*, not delivered.
This module turns masked weights into sparse kernels and keeps them only where they beat the dense kernel:

- :class:`SparseLinear`: ``W`` (``d_out x d_in``) held in CSR (``torch.sparse_csr``, int32 indices), computing
  ``y = x W^T + b`` as ``Y^T = addmm(b, W_csr, X^T)`` (one sparse-times-dense product, MKL on the CPU), or
  ``F.linear(x, W_csr, b)`` for a single row. Measured on torch 2.13 CPU (2-core AMD EPYC, fp32): those two
  beat the alternatives (``X @ (W^T)_csr`` is 7-100x slower; ``F.linear`` grows linearly with the rows, so
  it wins only at one row; int64 indices are up to 3.6x slower than int32 at one row, equal at 600).
- :class:`SemiStructuredLinear`: 2:4 weights on a CUDA GPU via ``torch.sparse.to_sparse_semi_structured``
  (cuSPARSELt / CUTLASS). It refuses, with :class:`SemiStructuredUnsupported` and the reason, anything those
  kernels cannot compute exactly: a CPU tensor, a mask that is not 2:4, an unsupported dtype or shape.
- :class:`~ellava_lib.speed.bitmask.BitmaskLinear` (backend ``bitmask``): packed nonzeros + a 1-bit mask per
  row, a C++ AVX-512 kernel (float32 / bfloat16, CPU) compiled at first use; see :mod:`ellava_lib.speed.bitmask`.
- :func:`sparsify_model`: per pruned linear, time dense vs sparse on representative row counts (cached per
  shape, density bucket, backend, device, dtype, threads), check the sparse output against the dense one, and
  swap only where :func:`decide` says so: the sparse module must beat dense by the margin ``min_speedup``
  (default :data:`MIN_SPEEDUP` = 1.05), per row count under ``auto`` (see :func:`decide` for the rule).

Time of a layer at a row count = median of interleaved calls (dense, sparse, dense, sparse, ...; at least
:data:`MIN_ROUNDS` pairs after a warm-up; ``torch.cuda.synchronize`` on GPUs): a change of machine load during
the measurement slows both alike, where two series timed one after the other would see different loads
(:func:`ellava_lib.speed.timing.interleaved_ms`). Where the pruned layers together exceed the last-level cache,
each call runs the next of :func:`stream_copies` copies of the layer, so its weights come from memory as in a
decode step of the whole model. Sustained contention for the CPU still changes the ratio itself (a
memory-bound kernel gains less when compute is scarce): time on an otherwise idle machine.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ellava_lib.core import files
from ellava_lib.core.policy import Policy
from ellava_lib.core.units import policy_linears
from ellava_lib.speed import bitmask
from ellava_lib.speed.timing import interleaved_ms, rounds_for

BACKENDS: tuple[str, ...] = ("auto", "bitmask", "csr", "semi", "dense")
#: Row counts timed when no example inputs are given: one decode token, and a LLaVA-1.5 prefill
#: (576 visual + 24 text tokens).
DEFAULT_ROWS: tuple[int, ...] = (1, 600)
#: Default ``min_speedup`` of :func:`sparsify_model`: a sparse module must be at least 5% faster than dense (a tie
#: within timing noise keeps the dense layer, whose speed is then exactly dense speed).
MIN_SPEEDUP = 1.05
#: Fewest interleaved dense/sparse call pairs timed per row count (:func:`_measure`).
MIN_ROUNDS = 5
#: Last-level cache size assumed where sysfs does not tell (:func:`llc_bytes`), and the most copies of one layer
#: cycled through by a timing (:func:`stream_copies`).
LLC_DEFAULT = 32 * 2**20
MAX_COPIES = 64
#: Density buckets of the timing cache (two layers of the same shape within 1% density share a timing).
DENSITY_DECIMALS = 2
#: Tolerance ``(rtol, atol)`` of the sparse-vs-dense output check per dtype (see :func:`_check_close`): float32
#: sums in another order; half precision rounds each output to 11 (fp16) or 8 (bf16) bits.
TOLERANCE = {torch.float64: (1e-7, 1e-9), torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 2e-3),
             torch.bfloat16: (1.6e-2, 1.6e-2)}


class SemiStructuredUnsupported(RuntimeError):
    """The 2:4 semi-structured kernels cannot compute this layer (the caller keeps it dense)."""


# ------------------------------------------------------------------------------------------------- modules


class SparseLinear(bitmask.PackedLinear):
    """``y = x W^T + b`` with ``W`` in CSR: ``Y^T = addmm(b 1^T, W_csr, X^T)`` where ``X`` = ``x`` as rows
    (``F.linear(X, W_csr, b)`` when ``X`` is one row).

    The CSR arrays (``crow_indices``, ``col_indices``, ``values``) are dense buffers (so ``.to``, ``deepcopy``
    and ``state_dict`` work); the CSR tensor over them is rebuilt (no copy) when they move. Inference only.
    Memory: ``nnz * (value + index bytes) + (d_out + 1) * index bytes``, i.e. 8 bytes per kept fp32 weight with
    int32 indices, so CSR moves fewer bytes than dense only below 50% density.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 index_dtype: torch.dtype = torch.int32) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        if weight.device.type == "cpu" and weight.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"torch's CPU CSR matmul (MKL) supports float32/float64, not {weight.dtype}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            csr = weight.detach().to_sparse_csr()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("crow_indices", csr.crow_indices().to(index_dtype))
        self.register_buffer("col_indices", csr.col_indices().to(index_dtype))
        self.register_buffer("values", csr.values().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._csr: torch.Tensor | None = None
        self._csr_key: tuple = ()

    @classmethod
    def from_linear(cls, linear: nn.Linear, index_dtype: torch.dtype = torch.int32) -> SparseLinear:
        """The CSR twin of ``linear`` (its zeros are dropped, nothing else changes)."""
        return cls(linear.weight, linear.bias, index_dtype)

    def weight_csr(self) -> torch.Tensor:
        """The CSR tensor over the buffers (cached until a buffer is replaced, e.g. by ``.to``)."""
        key = (self.values.data_ptr(), self.crow_indices.data_ptr(), self.col_indices.data_ptr(), self.values.device)
        if self._csr is None or key != self._csr_key:
            self._csr = torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                                (self.out_features, self.in_features), check_invariants=False)
            self._csr_key = key
        return self._csr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        w = self.weight_csr()
        if rows.shape[0] == 1:  # one token (decode): MKL's sparse matrix-vector path, ~1.5x faster than addmm
            return F.linear(rows, w, self.bias).reshape(*x.shape[:-1], self.out_features)
        out_t = torch.mm(w, rows.t()) if self.bias is None else torch.addmm(self.bias.unsqueeze(1), w, rows.t())
        return out_t.t().reshape(*x.shape[:-1], self.out_features)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the (masked) dense weight."""
        return bitmask.make_linear(self.weight_csr().to_dense(), self.bias)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_csr"], state["_csr_key"] = None, ()  # a CSR tensor cannot be pickled or deep-copied
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
                f"density={self.density:.3f}, bias={self.bias is not None}")


def is_2_4(weight: torch.Tensor) -> bool:
    """Every group of 4 consecutive inputs of every output row holds at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def semi_structured_problem(weight: torch.Tensor) -> str | None:
    """Why ``to_sparse_semi_structured`` cannot run ``weight`` exactly, or ``None`` if it can (shape limits of
    the chosen kernel are checked by the conversion itself)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return f"2:4 sparsity needs a 2-D weight with d_in divisible by 4, got {tuple(weight.shape)}"
    if not is_2_4(weight):
        return "the mask is not 2:4 (some group of 4 consecutive inputs keeps more than 2 weights)"
    if weight.device.type != "cuda":
        return (f"2:4 semi-structured kernels need a CUDA GPU (compute capability >= 8.0); the weight is on "
                f"{weight.device.type}")
    major, _ = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        return f"2:4 semi-structured kernels need compute capability >= 8.0, this GPU has {major}.x"
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.int8):
        return f"2:4 semi-structured kernels take float16/bfloat16/int8 weights, not {weight.dtype}"
    return None


class SemiStructuredLinear(nn.Module):
    """``y = x W^T + b`` with a 2:4 ``W`` compressed by ``torch.sparse.to_sparse_semi_structured`` (CUDA only).

    Raises :class:`SemiStructuredUnsupported` (with the reason) instead of ever computing a wrong result.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        problem = semi_structured_problem(weight)
        if problem is not None:
            raise SemiStructuredUnsupported(f"semi-structured backend refused: {problem}; keep the layer dense")
        try:
            packed = torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())
        except (RuntimeError, ValueError) as e:
            raise SemiStructuredUnsupported(f"semi-structured backend refused: {e}; keep the layer dense") from None
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SemiStructuredLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        return F.linear(rows, self.weight, self.bias).reshape(*x.shape[:-1], self.out_features)

    def to_linear(self) -> nn.Linear:
        return bitmask.make_linear(self.weight.to_dense(), self.bias)


def densify_model(model: nn.Module) -> int:
    """Swap every sparse module (:data:`SPARSE_TYPES`: CSR, 2:4, bitmask) back to ``nn.Linear`` (in place);
    returns how many were swapped."""
    names = [n for n, m in model.named_modules() if isinstance(m, SPARSE_TYPES)]
    for n in names:
        model.set_submodule(n, model.get_submodule(n).to_linear())
    return len(names)


#: Sparse module classes by backend name.
MODULES: dict[str, type[nn.Module]] = {"csr": SparseLinear, "semi": SemiStructuredLinear,
                                       "bitmask": bitmask.BitmaskLinear}
SPARSE_TYPES = tuple(MODULES.values())


def _cache_key(lin: nn.Linear, density: float, rows: Sequence[int], backend: str, copies: int = 1) -> str:
    """``device|dtype|threads|d_out x d_in|bias|density|rows|backend|torch`` (timings depend on all of them),
    plus ``|copies=k`` when the layer was timed cycling over ``k > 1`` copies (:func:`stream_copies`)."""
    w = lin.weight
    return (f"{w.device.type}|{str(w.dtype).replace('torch.', '')}|threads={torch.get_num_threads()}|"
            f"{w.shape[0]}x{w.shape[1]}|bias={lin.bias is not None}|density={density:.{DENSITY_DECIMALS}f}|"
            f"rows={','.join(map(str, rows))}|{backend}|torch={torch.__version__}"
            + (f"|copies={copies}" if copies > 1 else ""))


def llc_bytes() -> int:
    """Bytes of the CPU's last-level cache (the highest ``index*`` level in
    ``/sys/devices/system/cpu/cpu0/cache``), or :data:`LLC_DEFAULT` where sysfs does not tell."""
    best = (0, LLC_DEFAULT)
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, size = int((d / "level").read_text()), (d / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        value = int(size.rstrip("KMG")) * scale if size.rstrip("KMG").isdigit() else 0
        if level > best[0] and value:
            best = (level, value)
    return best[1]


def stream_copies(layer_bytes: int, llc: int, cap: int = MAX_COPIES) -> int:
    """Copies of a layer to cycle through when timing it as a decode step of a model larger than the last-level
    cache ``llc`` runs it: ``clamp(ceil(2 llc / layer_bytes), 1, cap)``, so the copies exceed the cache twice and
    every timed call reads its weights from memory (a layer of ``2 llc`` bytes or more: one copy)."""
    return int(min(cap, max(1, math.ceil(2 * llc / max(1, layer_bytes)))))


def _load_cache(cache: dict | str | Path | None) -> tuple[dict, Path | None]:
    if cache is None:
        return {}, None
    if isinstance(cache, dict):
        return cache, None
    path = Path(cache)
    return (json.loads(path.read_text()) if path.is_file() else {}), path


# -------------------------------------------------------------------------------------------- selection


def _targets(model: nn.Module, policy: Policy | Mapping[str, float] | None) -> dict[str, tuple[str, nn.Linear]]:
    """``{module path: (report name, linear)}``: the linears of units with sparsity > 0 under ``policy``, or
    every ``nn.Linear`` holding an exact zero when ``policy`` is ``None``."""
    paths = {id(m): n for n, m in model.named_modules()}
    if policy is None:
        return {n: (n, m) for n, m in model.named_modules()
                if type(m) is nn.Linear and not bool(m.weight.all())}
    sps = policy.sparsities if isinstance(policy, Policy) else dict(policy)
    out = {}
    for unit, lins in policy_linears(model, sps).items():
        if sps.get(unit, 0.0) > 0:
            out.update({paths[id(lin)]: (name, lin) for name, lin in lins.items() if type(lin) is nn.Linear})
    return out


def _layer_rows(model: nn.Module, targets: Mapping[str, tuple[str, nn.Linear]],
                example_inputs: Mapping[str, torch.Tensor] | Sequence[int] | None) -> dict[str, tuple[int, ...]]:
    """Row counts timed per layer: the given integers, or those seen in one forward on ``example_inputs``
    (model kwargs) plus the batch size (one decode step per sequence)."""
    if example_inputs is None or not isinstance(example_inputs, Mapping):
        rows = tuple(sorted({int(r) for r in (example_inputs or DEFAULT_ROWS)}))
        if not rows or min(rows) < 1:
            raise ValueError(f"example row counts must be positive integers, got {example_inputs!r}")
        return {path: rows for path in targets}
    seen: dict[str, set[int]] = {path: set() for path in targets}
    def record(path: str) -> Callable:
        return lambda mod, args: seen[path].add(args[0].numel() // args[0].shape[-1])

    hooks = [lin.register_forward_pre_hook(record(path)) for path, (_, lin) in targets.items()]
    try:
        with torch.no_grad():
            model(**example_inputs)
    finally:
        for h in hooks:
            h.remove()
    batch = int(next(iter(example_inputs.values())).shape[0])
    return {p: tuple(sorted(s | {batch})) if s else DEFAULT_ROWS for p, s in seen.items()}


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` keeps for one layer: ``backend`` (``"dense"`` or a candidate), ``dense_from`` (a kept
    splittable module runs its dense copy from this many rows on; ``None``: never), the weighted dense and
    effective times (ms) of the chosen (or, if none, the fastest) candidate, its per-row text and, for a dense
    result, why each candidate was refused."""

    backend: str
    dense_from: int | None
    dense_ms: float
    sparse_ms: float
    per_rows: str
    notes: tuple[str, ...]


def decide(rows: Sequence[int], timings: Mapping[str, Mapping[str, Sequence[float]]],
           min_speedup: float = MIN_SPEEDUP, per_row: bool = True, splittable: Collection[str] = ("bitmask",),
           row_weights: Mapping[int, float] | None = None) -> Decision:
    """Choose a layer's backend from timings alone (pure: no clock, so it is tested with made-up timings).

    ``timings[c] = {"dense_ms": [t_d(r) ...], "sparse_ms": [t_c(r) ...]}`` over ``rows`` for each candidate ``c``
    (dense and ``c`` timed interleaved). With ``m = min_speedup`` and ``w_r = row_weights.get(r, 1)``:

    - ``c`` *wins* at ``r`` iff ``t_d(r) >= m t_c(r)`` (``m = 1.05``: at least 5% faster; ``m = 0``: always).
    - ``per_row`` (``auto`` with ``keep_dense``; never slower than dense at any timed row count):
      a splittable ``c`` (one that can keep a dense copy, :meth:`BitmaskLinear.keep_dense_from`) must win at the
      smallest row count; from the first row count ``r_0`` where it does not win on, it runs the dense copy
      (``eff_c(r) = t_d(r)`` for ``r >= r_0``, ``dense_from = r_0``; memory: dense + packed). Any other ``c``
      must win at every row count (``eff_c = t_c``).
    - otherwise (an explicit backend, or ``keep_dense=False``): ``c`` is kept iff
      ``sum_r w_r t_d(r) >= m sum_r w_r t_c(r)`` (``eff_c = t_c``; may be slower at some row counts if it
      pays on the weighted sum, e.g. ``row_weights={1: 32}`` for 32 decode steps per prefill).

    Among kept candidates the lowest ``sum_r w_r eff_c(r)`` wins; with none kept the layer stays dense (exactly
    dense speed, no copy).
    """
    weights = [float((row_weights or {}).get(r, 1.0)) for r in rows]
    kept, notes, fastest = [], [], None
    for cand, t in timings.items():
        d, x = list(t["dense_ms"]), list(t["sparse_ms"])
        wins = [di >= min_speedup * xi for di, xi in zip(d, x)]
        dense_from, eff, why = None, x, ""
        if per_row and cand in splittable:
            lead = next((i for i, ok in enumerate(wins) if not ok), len(wins))
            if lead == 0:
                why = f"{cand} not {min_speedup:g}x faster at {rows[0]} rows"
            elif lead < len(rows):
                dense_from, eff = rows[lead], x[:lead] + d[lead:]
        elif per_row:
            if not all(wins):
                why = f"{cand} not {min_speedup:g}x faster at {rows[wins.index(False)]} rows"
        dense_ms = sum(w * v for w, v in zip(weights, d))
        sparse_ms = sum(w * v for w, v in zip(weights, eff))
        if not per_row and dense_ms < min_speedup * sparse_ms:
            why = f"{cand} not {min_speedup:g}x faster ({dense_ms:.4g} ms dense vs {sparse_ms:.4g} ms)"
        per = ",".join(f"{r}:{di:.4g}/{xi:.4g}" for r, di, xi in zip(rows, d, x))
        per += f" (dense from {dense_from} rows)" if dense_from is not None else ""
        option = Decision(cand, dense_from, dense_ms, sparse_ms, per, ())
        if why:
            notes.append(why)
            fastest = option if fastest is None or option.sparse_ms < fastest.sparse_ms else fastest
        else:
            kept.append(option)
    if kept:
        return min(kept, key=lambda o: o.sparse_ms)
    if fastest is None:
        return Decision("dense", None, math.nan, math.nan, "", tuple(notes))
    return Decision("dense", None, fastest.dense_ms, fastest.sparse_ms, fastest.per_rows, tuple(notes))


def _check_close(dense: torch.Tensor, sparse: torch.Tensor) -> bool:
    """``|y_s - y_d| <= atol * scale + rtol * |y_d|`` elementwise, ``scale = max(1, max |y_d|)``, ``(rtol, atol)``
    from :data:`TOLERANCE` (exact equality for other dtypes)."""
    rtol, atol = TOLERANCE.get(dense.dtype, (0.0, 0.0))
    d, s = dense.double(), sparse.double()
    scale = max(1.0, float(d.abs().max())) if d.numel() else 1.0
    return bool(((s - d).abs() <= atol * scale + rtol * d.abs()).all())


@torch.no_grad()
def _measure(lin: nn.Linear, module: nn.Module, rows: Sequence[int], min_time_s: float,
             copies: int = 1) -> dict[str, list[float]]:
    """Per row count, dense and sparse median ms on seeded random inputs: the two calls interleaved,
    :func:`~ellava_lib.speed.timing.rounds_for` pairs (at least :data:`MIN_ROUNDS`, about ``min_time_s``); each
    call runs the next of ``copies`` copies of the layer (dense and sparse), round robin."""
    w = lin.weight
    gen = torch.Generator(device="cpu").manual_seed(0)
    dense_w = [(w, lin.bias)] + [(w.clone(), None if lin.bias is None else lin.bias.clone())
                                 for _ in range(copies - 1)]
    mods = [module] + [copy.deepcopy(module) for _ in range(copies - 1)]
    turn = {"d": 0, "s": 0}

    def run_dense(x: torch.Tensor) -> torch.Tensor:
        turn["d"] = (turn["d"] + 1) % copies
        return F.linear(x, *dense_w[turn["d"]])

    def run_sparse(x: torch.Tensor) -> torch.Tensor:
        turn["s"] = (turn["s"] + 1) % copies
        return mods[turn["s"]](x)

    dense, sparse = [], []
    for r in rows:
        x = torch.randn(r, w.shape[1], generator=gen).to(device=w.device, dtype=w.dtype)
        fns = (lambda: run_dense(x), lambda: run_sparse(x))
        td, ts = interleaved_ms(fns, w.device, rounds_for(fns, w.device, min_time_s, MIN_ROUNDS), warmup=0)
        dense.append(statistics.median(td))
        sparse.append(statistics.median(ts))
    return {"dense_ms": dense, "sparse_ms": sparse}


def _try(cand: str, lin: nn.Linear, density: float, rows: Sequence[int], store: dict,
         min_time_s: float, copies: int = 1) -> tuple[nn.Module | None, dict | None, str]:
    """Build candidate ``cand`` for ``lin``, check its output, time it (or read the cache):
    ``(module, timing, "")`` or ``(None, None | timing, why not)``."""
    w = lin.weight
    try:
        module = MODULES[cand].from_linear(lin)
    except (SemiStructuredUnsupported, bitmask.BitmaskUnavailable, ValueError, RuntimeError) as e:
        return None, None, str(e)
    probe = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(1)).to(w.device, w.dtype)
    if not _check_close(F.linear(probe, w, lin.bias), module(probe)):
        return None, None, f"{cand} output differs from the dense output; refused"
    key = _cache_key(lin, density, rows, cand, copies)
    if key not in store:
        store[key] = _measure(lin, module, rows, min_time_s, copies)
    return module, store[key], ""


@torch.no_grad()
def sparsify_model(model: nn.Module, policy: Policy | Mapping[str, float] | None = None, backend: str = "auto",
                   example_inputs: Mapping[str, torch.Tensor] | Sequence[int] | None = None,
                   min_speedup: float = MIN_SPEEDUP, cache: dict | str | Path | None = None,
                   min_time_s: float = 0.02, row_weights: Mapping[int, float] | None = None,
                   keep_dense: bool = True, stream: bool | None = None,
                   dense_budget: int | None = None) -> pd.DataFrame:
    """Swap pruned linears for sparse modules where they are measured faster (in place); returns the table.

    Candidates: ``csr`` -> :class:`SparseLinear`; ``semi`` -> :class:`SemiStructuredLinear`; ``bitmask`` ->
    :class:`~ellava_lib.speed.bitmask.BitmaskLinear`; ``auto`` -> all three (``semi`` only where
    :func:`semi_structured_problem` allows it, ``bitmask`` only where :func:`bitmask.supported` does: its
    extension built, a float32/bfloat16 CPU weight); ``dense`` -> none (a table of densities).
    A candidate is considered iff its output matches the dense one (:data:`TOLERANCE`); dense and each candidate
    are timed interleaved at every row count (:func:`_measure`), and :func:`decide` keeps one or none:

    - ``auto`` with ``keep_dense`` (the default): per row count, a layer never runs slower than dense. A bitmask
      layer must be ``min_speedup`` times faster at the smallest row count (decode); from the first row count
      where it is not (e.g. prefill) on, it runs a dense copy of the weight
      (:meth:`~ellava_lib.speed.bitmask.BitmaskLinear.keep_dense_from`: dense speed there, memory dense +
      packed). CSR / 2:4 must be ``min_speedup`` times faster at every row count. Else the layer stays dense.
    - an explicit backend, or ``keep_dense=False``: kept iff
      ``sum_r w_r dense_ms(r) >= min_speedup * sum_r w_r sparse_ms(r)`` (``w_r = row_weights.get(r, 1)``, e.g.
      ``{1: 32}`` for 32 decode steps per prefill; ``min_speedup=0`` forces the swap), no dense copy: a bitmask
      layer then runs prefill through its tile decode (:meth:`~ellava_lib.speed.bitmask.BitmaskLinear._tiled`).
    - ``dense_budget`` (bytes; ``None``: no limit): the dense copies ``auto`` with ``keep_dense`` may keep, in
      all. Layers are taken in model order; a layer whose copy would exceed what is left of the budget is decided
      as under ``keep_dense=False`` (dense-free). ``dense_budget=0``: no layer keeps a copy, the resident size of
      every packed layer is its packed size (a 7B model in 24 GiB). A per-layer measured choice, first come first
      served: layers of one shape and density share one timing, so their order does not change which kind of
      layer gets a copy, only how many.

    Memory: each dense linear is released as soon as its sparse module replaces it (the table keeps no
    reference), so the peak is the model plus one layer's candidates, never dense plus packed for the whole model.
    Among kept candidates the lowest weighted time wins. ``stream`` (default: whether the pruned linears together
    exceed the last-level cache, :func:`llc_bytes`): time each layer cycling over :func:`stream_copies` copies,
    so that, as in a decode step of the whole model, its weights come from memory and not from a cache warmed
    by the previous call (a 3.5 MB SmolLM2 MLP matrix stays in a 32 MB cache when timed alone).
    Timings are cached in ``cache`` (a dict, or a JSON file read and rewritten) under :func:`_cache_key`.
    Columns: ``layer, module, shape, density, backend_chosen, dense_ms, sparse_ms, speedup, rows, per_rows,
    note`` (``*_ms`` weighted sums, ``sparse_ms`` of the chosen (else the fastest) candidate with the dense
    copy's time where it runs, ``speedup = dense_ms / sparse_ms``; ``per_rows`` = ``rows:dense/sparse`` ms each;
    ``note`` says why a layer stayed dense). Asking for ``semi``
    where it cannot run (or ``bitmask`` / ``csr`` where they cannot) warns once with the reason and keeps the
    layers dense.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    targets = _targets(model, policy)
    rows_of = _layer_rows(model, targets, example_inputs) if backend != "dense" else {}
    store, path = _load_cache(cache)
    total = sum(lin.weight.numel() * lin.weight.element_size() for _, lin in targets.values())
    llc = llc_bytes()
    streaming = total > llc if stream is None else stream
    candidates = {"auto": ("semi", "bitmask", "csr"), "dense": ()}.get(backend, (backend,))
    table, refusal, budget_left = [], None, math.inf if dense_budget is None else float(dense_budget)
    for mod_path in list(targets):
        name, lin = targets.pop(mod_path)  # no reference outlives the swap: the dense weight is freed with it
        w = lin.weight
        density = float(torch.count_nonzero(w)) / w.numel()
        rows = rows_of.get(mod_path, ())
        modules: dict[str, nn.Module] = {}
        timings: dict[str, dict] = {}
        notes = ["backend=dense"] if backend == "dense" else []
        for cand in candidates:
            if backend == "auto" and ((cand == "semi" and semi_structured_problem(w) is not None) or
                                      (cand == "bitmask" and not bitmask.supported(w))):
                continue
            copies = stream_copies(w.numel() * w.element_size(), llc) if streaming else 1
            module, t, why = _try(cand, lin, density, rows, store, min_time_s, copies)
            if t is None:
                notes.append(why)
                refusal = refusal or (why if backend != "auto" else None)
                continue
            modules[cand], timings[cand] = module, t
        splittable = [c for c, m in modules.items() if hasattr(m, "keep_dense_from")]
        per_row = backend == "auto" and keep_dense
        pick = decide(rows, timings, min_speedup, per_row=per_row, splittable=splittable, row_weights=row_weights)
        copy_bytes = w.numel() * w.element_size()
        if pick.dense_from is not None and copy_bytes > budget_left:  # over the dense budget: dense-free choice
            notes.append(f"dense copy over dense_budget ({copy_bytes} bytes, {budget_left:.0f} left)")
            pick = decide(rows, timings, min_speedup, per_row=False, splittable=splittable, row_weights=row_weights)
        shape = f"{w.shape[0]}x{w.shape[1]}"
        del w
        if pick.backend != "dense":
            module = modules[pick.backend]
            if pick.dense_from is not None:
                module.keep_dense_from(pick.dense_from)
                budget_left -= copy_bytes
            model.set_submodule(mod_path, module)
        del lin, modules
        table.append({"layer": name, "module": mod_path, "shape": shape,
                      "density": density, "backend_chosen": pick.backend, "dense_ms": pick.dense_ms,
                      "sparse_ms": pick.sparse_ms,
                      "speedup": pick.dense_ms / pick.sparse_ms if pick.sparse_ms else math.inf,
                      "rows": ",".join(map(str, rows)), "per_rows": pick.per_rows,
                      "note": "; ".join(notes + list(pick.notes)) if pick.backend == "dense"
                      else "; ".join(n for n in notes if "dense_budget" in n)})
    if refusal is not None:
        warnings.warn(f"{refusal} ({backend} backend; the layers stay dense)", UserWarning, stacklevel=2)
    if path is not None:
        files.write_json(path, store)
    return pd.DataFrame(table, columns=["layer", "module", "shape", "density", "backend_chosen", "dense_ms",
                                        "sparse_ms", "speedup", "rows", "per_rows", "note"])
