"""Pruning masks of one weight matrix, pure and model-agnostic.

For a ``d_out x d_in`` weight ``W`` and a target sparsity ``s``:

- unstructured: zero the ``k = round(s * numel)`` lowest scores (:func:`lowest_k_mask`; ties broken by index);
- N:M: in every group of ``M`` consecutive inputs of a row, zero the ``N`` lowest scores (:func:`nm_mask`);
- magnitude: scores ``|W_ij|`` over the whole layer (:func:`magnitude_mask`);
- Wanda (Sun et al. 2023): scores ``|W_ij| * ||X_j||_2``, compared within each output row, ``int(s * d_in)``
  (floor, as locuslab/wanda ``int(W_metric.shape[1] * sparsity_ratio)``) per row (:func:`wanda_mask`).

``True`` in a mask marks a weight to remove.
"""

from __future__ import annotations

import torch

from ellava_lib.prune.walk import wanda_scores

# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def measured_sparsity(weight: torch.Tensor) -> float:
    """Fraction of entries of ``weight`` that are exactly zero."""
    if weight.numel() == 0:
        return 0.0
    return float((weight == 0).sum().item()) / weight.numel()


def num_to_prune(numel: int, sparsity: float) -> int:
    """Python's ``round(sparsity * numel)`` (half to even), clamped to ``[0, numel]``."""
    return min(numel, max(0, int(round(sparsity * numel))))


def check_sparsity_args(sparsity: float, prune_n: int, prune_m: int, d_in: int) -> None:
    """Validate the pruning arguments (unstructured ``sparsity`` or an ``N:M`` pattern)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if (prune_n > 0) != (prune_m > 0):
        raise ValueError(f"prune_n and prune_m must both be > 0 for N:M, got {prune_n}:{prune_m}")
    if prune_m > 0:
        if prune_n > prune_m:
            raise ValueError(f"prune_n must be <= prune_m, got {prune_n}:{prune_m}")
        if d_in % prune_m != 0:
            raise ValueError(f"d_in={d_in} is not a multiple of prune_m={prune_m}")


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (same shape as ``scores``) marking its ``k`` smallest entries.

    Ties are broken by position (stable sort) so the result is deterministic.
    """
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.argsort(scores.flatten(), stable=True)
        mask[order[:k]] = True
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    """Bool mask marking, in every group of ``prune_m`` consecutive columns, the ``prune_n`` lowest.

    ``scores`` has shape ``(rows, cols)`` with ``cols % prune_m == 0``.
    """
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // prune_m, prune_m)
    order = torch.argsort(grouped, dim=-1, stable=True)[..., :prune_n]
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(rows, cols)


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0
) -> torch.Tensor:
    """Bool mask of the weights to **zero** by magnitude.

    Unstructured (``prune_n == prune_m == 0``): the ``round(sparsity * numel)`` entries with the
    lowest ``|w|`` over the whole layer.  N:M: in every group of ``prune_m`` consecutive input
    columns (last dimension) of every row, the ``prune_n`` entries with the lowest ``|w|``.
    """
    w = weight.detach().float().abs()
    if w.dim() != 2:
        w = w.reshape(w.shape[0], -1)
    check_sparsity_args(sparsity, prune_n, prune_m, w.shape[1])
    if prune_n > 0:
        mask = nm_mask(w, prune_n, prune_m)
    else:
        mask = lowest_k_mask(w, num_to_prune(w.numel(), sparsity))
    return mask.reshape(weight.shape)


def wanda_mask(weight: torch.Tensor, norms: torch.Tensor, sparsity: float, prune_n: int = 0,
               prune_m: int = 0) -> torch.Tensor:
    """Bool mask of the weights Wanda zeroes: per output row, the ``int(d_in * sparsity)`` (floor, as the
    reference locuslab/wanda ``lib/prune.py``) lowest ``|W_ij| * ||X_j||_2`` (ties by column order), or the
    ``prune_n`` lowest of every ``prune_m`` inputs."""
    scores = wanda_scores(weight, norms)
    cols = scores.shape[1]
    if prune_n > 0:
        if cols % prune_m:
            raise ValueError(f"d_in={cols} is not a multiple of prune_m={prune_m}")
        return nm_mask(scores, prune_n, prune_m)
    k = min(cols, max(0, int(cols * sparsity)))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
    return mask


def check_nm(prune_n: int, prune_m: int) -> None:
    if (prune_n, prune_m) != (0, 0) and not 0 < prune_n < prune_m:
        raise ValueError(f"N:M must satisfy 0 < N < M, got {prune_n}:{prune_m}")


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; ``ValueError`` unless it is ``N:M`` with integers ``0 < N < M``."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"expected N:M such as 2:4, got {text!r}")
    n, m = int(parts[0]), int(parts[1])
    check_nm(n, m)
    return n, m
