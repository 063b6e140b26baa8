"""Bitmask sparse linear layers: packed nonzeros + a 1-bit mask per output row, run by a C++ kernel.

Format of a ``d_out x d_in`` weight ``W`` with ``nnz`` nonzeros (:func:`pack`), ``b`` bytes per value::

    values   (nnz,)             the nonzeros, row-major, in W's dtype (float32 or bfloat16)
    mask     (d_out, R) uint8   R = 4 * ceil(d_in / 32); bit j of byte k of row o <=> W[o, 8k + j] != 0
    offsets  (d_out + 1,) int64 offsets[o] = nonzeros of rows < o (a prefix sum of the mask's popcounts)

Bytes read per weight at sparsity ``s`` (decode, one token): ``(1 - s) b + 1/8`` against ``b`` dense, so the
memory-bound limit of the speedup is ``b / ((1 - s) b + 1/8)``: 1.88x at 50% and 3.02x at 70% in float32,
1.78x and 2.76x in bfloat16 (a CSR with int32 indices needs ``(1 - s)(b + 4)`` bytes: no gain above 50% density).

Kernels (``csrc/bitmask.cpp``, compiled at first use by ``torch.utils.cpp_extension.load`` into
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/ellava/torch_extensions``):

- ``spmm_rows``: ``y = x W^T`` for a few rows of ``x`` (decode), parallel over output rows
  (``at::parallel_for``, torch's intra-op threads). AVX-512 path: each 16-bit half of a mask word expands the
  next ``popcount`` packed float32 values into their lanes (``_mm512_maskz_expandloadu_ps``) and multiplies them
  with the ``x`` lanes loaded under the same mask; bfloat16 expands 32 values per word
  (``_mm512_maskz_expandloadu_epi16``) into ``_mm512_dpbf16_ps`` (products exact, fp32 accumulation).
  A scalar path (``path=0``, or on CPUs without AVX-512 F/BW/VL/DQ/VBMI2 (+BF16)) walks the set bits.
- ``unpack_rows``: rows of ``W`` decoded to dense (the same expand loads); prefill (many rows) decodes tiles of
  about :data:`TILE_BYTES` of output rows into a scratch buffer and multiplies each with ``torch.mm(X, tile^T)``
  written straight into its columns of ``Y`` (the dense GEMM's work, through the same oneDNN matmul that
  ``F.linear`` runs dense, on ``W`` read from memory packed; see :meth:`BitmaskLinear._tiled`).

A :class:`BitmaskLinear` holds no dense weight unless :meth:`BitmaskLinear.keep_dense_from` is called (``auto``
with a dense budget): its resident size is ``nnz b + d_out R + 8 (d_out + 1)`` bytes (:meth:`~PackedLinear.nbytes`),
and it never materialises more than one tile of ``W`` at a time.

Where the extension cannot be built (no compiler, no ninja), :func:`extension` warns once in one line and
:class:`BitmaskLinear` raises :class:`BitmaskUnavailable`; ``sparsify_model`` then keeps csr / dense.

Why not a PyPI library: ``deepsparse`` (unstructured sparse CPU inference) is deprecated and runs whole ONNX
graphs, not torch layers; ``sparse_dot_mkl`` and torch's CSR call the same MKL CSR kernels (the ``csr`` rows of
benchmarks/results/latency.json: 4 index bytes per kept weight); ``torchao``'s sparsity kernels are 2:4 on CUDA;
``intel-extension-for-pytorch`` has no unstructured sparse linear and no build for torch 2.13.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CSRC = Path(__file__).with_name("csrc") / "bitmask.cpp"
#: Rows of ``x`` up to which the row kernel runs; above, tiles of W are decoded and multiplied densely.
MAX_KERNEL_ROWS = 8
#: Bytes of one decoded tile of ``W`` in the prefill path (:func:`tile_rows`): 4 MiB = 256 rows of a 4096-wide float32
#: weight, 512 rows in bfloat16. ``benchmarks/latency.py --tile-kib`` sets it for a run.
TILE_BYTES = 4 * 2**20
#: Tile heights are multiples of this many rows (and at least this many).
TILE_ALIGN = 16
#: Set to 1 to force the scalar kernels everywhere (tests of the portable path).
SCALAR_ENV = "ELLAVA_BITMASK_SCALAR"


class BitmaskUnavailable(RuntimeError):
    """The bitmask kernels cannot run here (extension not built, or unsupported dtype/device)."""


_EXT: dict[str, object] = {}


def extension():
    """The compiled kernel module, built once per process (and cached on disk); ``None`` with a one-line warning
    if it cannot be built. ``extension_info()`` tells the build time and the error."""
    if "module" not in _EXT:
        t0 = time.perf_counter()
        try:
            _EXT["module"] = _build()
            _EXT["error"] = None
        except Exception as e:  # any build or import failure: fall back, never crash the caller
            _EXT["module"], _EXT["error"] = None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}"
            warnings.warn(f"bitmask sparse kernels unavailable ({_EXT['error']}); using csr/dense", RuntimeWarning,
                          stacklevel=2)
        _EXT["seconds"] = time.perf_counter() - t0
    return _EXT["module"]


def extension_info() -> dict:
    """``{"available", "seconds" (load or build time), "error", "paths" (float32, bfloat16 -> avx512|scalar)}``."""
    mod = extension()
    return {"available": mod is not None, "seconds": _EXT["seconds"], "error": _EXT["error"],
            "paths": list(mod.simd_paths()) if mod is not None else None}


def _build():
    from torch.utils import cpp_extension

    try:  # the PyPI ninja puts its binary beside the package; cpp_extension looks for `ninja` on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "ellava" / "torch_extensions")
    build = Path(root) / f"ellava_bitmask-torch{torch.__version__.split('+')[0]}"
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name="ellava_bitmask", sources=[str(CSRC)], build_directory=str(build),
                              extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


def supported(weight: torch.Tensor) -> bool:
    """Whether :class:`BitmaskLinear` can run ``weight``: a 2-D float32/bfloat16 CPU tensor, the extension built."""
    ok = weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
    return ok and extension() is not None


def tile_rows(d_in: int, element_size: int, d_out: int) -> int:
    """Output rows per decoded tile: ``TILE_BYTES // (d_in * element_size)`` rounded down to a multiple of
    :data:`TILE_ALIGN` (at least ``TILE_ALIGN``), at most ``d_out`` (one tile: the whole weight)."""
    rows = max(TILE_ALIGN, TILE_BYTES // max(1, d_in * element_size) // TILE_ALIGN * TILE_ALIGN)
    return min(rows, d_out)


def _path() -> int:
    """1: the AVX-512 kernels where the CPU has them; 0: scalar (``ELLAVA_BITMASK_SCALAR=1``)."""
    return 0 if os.environ.get(SCALAR_ENV, "") == "1" else 1


# ------------------------------------------------------------------------------------------------ format


def row_bytes(d_in: int) -> int:
    """Mask bytes per output row: ``4 * ceil(d_in / 32)`` (whole 32-bit words)."""
    return 4 * math.ceil(d_in / 32)


@torch.no_grad()
def pack(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"values", "mask", "offsets"}`` of ``weight`` (see the module docstring); exact, CPU tensors.

    Through numpy (``packbits`` little-endian per row, a boolean selection of the values viewed as integers of
    their width, ``count_nonzero`` per row), several times faster than the same in torch ops, which matters for
    the 224 packs of a 7B model. Temporaries: one byte per weight (the nonzero mask)."""
    w = weight.detach().to("cpu").contiguous()
    d_out, d_in = w.shape
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
    nz = (w != 0).numpy()
    mask = torch.zeros(d_out, row_bytes(d_in), dtype=torch.uint8)
    if d_in:
        mask[:, : -(-d_in // 8)] = torch.from_numpy(np.packbits(nz, axis=1, bitorder="little"))
    values = torch.from_numpy(w.view(as_int).numpy()[nz]).view(w.dtype)
    offsets = torch.zeros(d_out + 1, dtype=torch.int64)
    offsets[1:] = torch.from_numpy(np.count_nonzero(nz, axis=1).astype(np.int64)).cumsum(0)
    return {"values": values.contiguous(), "mask": mask, "offsets": offsets}


@torch.no_grad()
def unpack(values: torch.Tensor, mask: torch.Tensor, d_in: int) -> torch.Tensor:
    """The dense ``(d_out, d_in)`` weight of :func:`pack`'s ``values`` and ``mask`` (plain torch, no kernel)."""
    bits = (mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    nz = bits.reshape(mask.shape[0], -1)[:, :d_in].bool()
    if int(nz.sum()) != values.numel():
        raise ValueError(f"mask has {int(nz.sum())} set bits but {values.numel()} values are stored")
    out = torch.zeros(nz.shape, dtype=values.dtype)
    out[nz] = values
    return out


def offsets_of(mask: torch.Tensor) -> torch.Tensor:
    """``offsets`` from ``mask`` alone: 0 then the cumulative popcount of each row."""
    bits = (mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    out = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    out[1:] = bits.reshape(mask.shape[0], -1).sum(1).cumsum(0)
    return out


# ------------------------------------------------------------------------------------------------ module


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding a copy of ``weight`` (and ``bias``), on their device and in their dtype: what every
    packed layer's ``to_linear`` returns."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class PackedLinear(nn.Module):
    """A linear layer holding only the nonzeros of ``W`` (``d_out x d_in``) in a ``values`` buffer: the counts that
    every packed format shares (this module's bitmask layers, :class:`sparse.SparseLinear`'s CSR)."""

    out_features: int
    in_features: int

    def nbytes(self) -> int:
        """Bytes of every tensor the module holds (buffers and parameters, a kept dense copy included)."""
        tensors = [*self.buffers(), *self.parameters()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        """``nnz / (d_out * d_in)``."""
        return self.nnz / max(1, self.out_features * self.in_features)


class BitmaskLinear(PackedLinear):
    """``y = x W^T + b`` with ``W`` as packed nonzeros + per-row bitmask (float32 or bfloat16, CPU, inference).

    Up to :data:`MAX_KERNEL_ROWS` rows of ``x``: the row kernel (float32 accumulation from the bias, rounded
    once to the dtype); more rows: the tile decode (:meth:`_tiled`). ``path`` 0 forces the scalar kernels
    (1: AVX-512 where the CPU has it). Buffers ``values, mask, offsets, bias`` (state_dict), and ``dense_weight``
    only after :meth:`keep_dense_from` (row counts from ``dense_from_rows`` on run ``F.linear`` on it;
    :meth:`drop_dense` removes it): by default the layer is dense-free.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, path: int | None = None) -> None:
        super().__init__()
        if weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            raise BitmaskUnavailable(f"bitmask kernels take 2-D float32/bfloat16 CPU weights, got "
                                     f"{tuple(weight.shape)} {weight.dtype} on {weight.device.type}")
        if extension() is None:
            raise BitmaskUnavailable(f"bitmask kernels unavailable: {_EXT['error']}")
        self._set(weight.shape[1], pack(weight), bias, path)

    def _set(self, in_features: int, packed: dict[str, torch.Tensor], bias: torch.Tensor | None,
             path: int | None) -> None:
        self.out_features, self.in_features = int(packed["mask"].shape[0]), int(in_features)
        for k in ("values", "mask", "offsets"):
            self.register_buffer(k, packed[k])
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("dense_weight", None)
        self.dense_from_rows: int | None = None
        self.path = path

    @classmethod
    def from_packed(cls, values: torch.Tensor, mask: torch.Tensor, in_features: int,
                    bias: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
                    path: int | None = None) -> BitmaskLinear:
        """The layer over already packed tensors (:func:`pack`'s format; ``offsets`` recomputed from ``mask`` when
        not given), taken as they are (no copy, no dense weight ever built): how :func:`load_sparse` streams a
        layer from disk. Raises ``ValueError`` when the tensors do not describe one weight."""
        if values.dtype not in (torch.float32, torch.bfloat16) or values.device.type != "cpu":
            raise BitmaskUnavailable(f"bitmask kernels take float32/bfloat16 CPU values, got {values.dtype} on "
                                     f"{values.device.type}")
        if extension() is None:
            raise BitmaskUnavailable(f"bitmask kernels unavailable: {_EXT['error']}")
        if mask.dtype != torch.uint8 or mask.dim() != 2 or mask.shape[1] != row_bytes(in_features):
            raise ValueError(f"mask must be uint8 (d_out, {row_bytes(in_features)}), got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        offsets = offsets_of(mask) if offsets is None else offsets.to(torch.int64)
        if offsets.numel() != mask.shape[0] + 1 or int(offsets[-1]) != values.numel():
            raise ValueError(f"offsets end at {int(offsets[-1])} for {values.numel()} stored values")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._set(in_features, {"values": values.contiguous(), "mask": mask.contiguous(),
                               "offsets": offsets.contiguous()}, bias, path)
        return mod

    def keep_dense_from(self, rows: int) -> None:
        """Run inputs of ``rows`` or more rows densely (``F.linear`` on a kept dense copy of ``W``): for row counts
        where the dense GEMM was measured faster (prefill), at the memory cost of the dense weight."""
        self.dense_weight = self.weight_dense()
        self.dense_from_rows = int(rows)

    def drop_dense(self) -> None:
        """Free the dense copy of :meth:`keep_dense_from`: every row count runs the packed weight again."""
        self.dense_weight, self.dense_from_rows = None, None

    @classmethod
    def from_linear(cls, linear: nn.Linear, path: int | None = None) -> BitmaskLinear:
        return cls(linear.weight, linear.bias, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ext = extension()
        path = _path() if self.path is None else self.path
        rows = x.reshape(-1, self.in_features).to(self.values.dtype).contiguous()
        if self.dense_weight is not None and rows.shape[0] >= self.dense_from_rows:
            y = F.linear(rows, self.dense_weight, self.bias)
        elif rows.shape[0] <= MAX_KERNEL_ROWS:
            y = ext.spmm_rows(rows, self.values, self.mask, self.offsets, self.bias, path)
        else:
            y = self._tiled(ext, rows, path)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _tiled(self, ext, rows: torch.Tensor, path: int) -> torch.Tensor:
        """``Y`` (n x d_out) for many rows ``X`` (prefill), dense-free: per tile of output rows ``[o0, o1)``
        (:func:`tile_rows`, about :data:`TILE_BYTES`), decode ``W[o0:o1]`` into one scratch buffer and compute
        ``Y[:, o0:o1] = X W[o0:o1]^T + b[o0:o1]`` with ``torch.mm``/``addmm`` written into those columns of ``Y``.

        Orientation: ``X`` is the GEMM's source and the tile its weight, as in the dense ``F.linear(X, W)``, so
        oneDNN's matmul (``brg_matmul``, bfloat16 or float32) repacks each tile once (in all, ``W`` once, as dense
        does) and never ``X``; the former ``W_tile X^T`` orientation made ``X^T`` the weight, repacked for every
        tile (``d_out / tile`` copies of ``X``), the likely cause of the bf16 prefill gap in latency.json.
        Peak extra memory: one tile."""
        n = rows.shape[0]
        out = torch.empty(n, self.out_features, dtype=rows.dtype)
        step = tile_rows(self.in_features, rows.element_size(), self.out_features)
        tile = torch.empty(step, self.in_features, dtype=rows.dtype)
        for o0 in range(0, self.out_features, step):
            o1 = min(o0 + step, self.out_features)
            ext.unpack_rows(tile, self.values, self.mask, self.offsets, o0, o1, path)
            w_t = tile[: o1 - o0].t()
            if self.bias is None:
                torch.mm(rows, w_t, out=out[:, o0:o1])
            else:
                torch.addmm(self.bias[o0:o1], rows, w_t, out=out[:, o0:o1])
        return out

    def weight_dense(self) -> torch.Tensor:
        return unpack(self.values, self.mask, self.in_features)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the dense (masked) weight."""
        return make_linear(self.weight_dense(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
                f"density={self.density:.3f}, dtype={str(self.values.dtype).replace('torch.', '')}, "
                f"bias={self.bias is not None}" + (f", dense_from_rows={self.dense_from_rows}"
                                                   if self.dense_weight is not None else ""))
