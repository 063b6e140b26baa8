"""Compact storage of one weight matrix: dense, or its nonzeros plus a 1-bit mask, whichever is smaller.

For ``n`` weights, ``nnz`` of them nonzero, ``b`` bytes per stored value::

    dense  = n * b                        packed = nnz * b + ceil(n / 8)

:func:`encode_weights` picks the smaller form (packed wins from sparsity ``1 / (8 b)`` on: 6.25% in 16-bit);
:func:`unpack_into` / :func:`unpack_weights` decode the packed form exactly. The mask is :func:`pack_bits`:
``uint8`` bytes, 8 positions each, little-endian bit order, of the row-major (flattened) matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Key suffixes of a packed matrix: its nonzero values and its mask.
PACKED_SUFFIXES = (".values", ".mask")


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as ``uint8`` bytes, 8 positions per byte: position ``8 k + j`` of the row-major
    (flattened) mask is bit ``j`` (value ``2^j``, little-endian bit order) of byte ``k``; the last byte is padded
    with zeros. ``ceil(n / 8)`` bytes for ``n`` positions."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` positions of :func:`pack_bits`'s bytes as a flat boolean tensor (on ``packed``'s device):
    each byte looks up the 8 bytes of its bits (:func:`_bit_table`), read back as booleans."""
    if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"a packed mask of {n} positions is {(n + 7) // 8} uint8 bytes, "
                         f"got {packed.numel()} {packed.dtype}")
    bits = _bit_table(packed.device).index_select(0, packed.reshape(-1).int())
    return bits.view(torch.uint8).view(torch.bool)[:n]


def _bit_table(device: torch.device) -> torch.Tensor:
    """256 ``int64`` whose 8 bytes in memory are the bits 0..7 of their index as 0 / 1 (made once per device)."""
    if device not in _BIT_TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _BIT_TABLES[device] = bits.to(torch.uint8).view(torch.int64).reshape(256).to(device)
    return _BIT_TABLES[device]


_BIT_TABLES: dict[torch.device, torch.Tensor] = {}


def dense_bytes(n: int, b: int) -> int:
    """Bytes of ``n`` weights stored densely at ``b`` bytes each: ``n * b``."""
    return n * b


def packed_bytes(n: int, nnz: int, b: int) -> int:
    """Bytes of ``n`` weights stored packed, ``nnz`` of them nonzero: ``nnz * b + ceil(n / 8)``."""
    return nnz * b + (n + 7) // 8


def encode_weights(w: torch.Tensor, dtype: torch.dtype, key: str) -> dict[str, torch.Tensor]:
    """``w`` in ``dtype`` the smaller way: ``{key: w}`` dense, or ``{key + ".values": nonzeros (row-major),
    key + ".mask": pack_bits(w != 0)}`` when ``packed_bytes < dense_bytes`` (CPU tensors)."""
    v = w.detach().to("cpu", dtype).contiguous()
    mask = v != 0
    n, nnz, b = v.numel(), int(mask.sum()), v.element_size()
    if packed_bytes(n, nnz, b) < dense_bytes(n, b):
        return {key + ".values": v.reshape(-1)[mask.reshape(-1)], key + ".mask": pack_bits(mask)}
    return {key: v}


def unpack_into(out: torch.Tensor, values: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Write the packed form of :func:`encode_weights` into the contiguous tensor ``out`` in place: zeros, then
    ``values`` (converted to ``out``'s dtype) in row-major order where the mask is set. Returns ``out``."""
    mask = unpack_bits(packed.to(out.device), out.numel())
    out.zero_().view(-1).masked_scatter_(mask, values.to(out.device, out.dtype))
    return out


def unpack_weights(values: torch.Tensor, packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of the packed form of :func:`encode_weights`: a tensor of ``shape`` (``values``' dtype and device)
    holding ``values`` in row-major order where the mask is set, zeros elsewhere (:func:`unpack_into`).
    ``ValueError`` when the number of values and of set positions differ."""
    nnz = int(unpack_bits(packed, math.prod(shape)).sum())
    if nnz != values.numel():
        raise ValueError(f"packed weights hold {values.numel()} values for a mask of {nnz} positions")
    return unpack_into(values.new_empty(tuple(shape)), values, packed)
