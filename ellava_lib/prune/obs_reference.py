"""A straightforward dense-algebra formulation of the SparseGPT algorithm, the solver's reference.

Explicit inverse Hessians instead of the Cholesky trick: for each column ``j`` the free set's inverse
Hessian is updated by eliminating the frozen weight
(``H^{-1} <- H^{-1}[1:, 1:] - H^{-1}[1:, 0] H^{-1}[0, 1:] / [H^{-1}]_00``). Used by the tests and by
``benchmarks/obs_solver.py``; see :mod:`ellava_lib.prune.obs` for the notation.
"""

from __future__ import annotations

import torch

from ellava_lib.prune.masks import (
    check_sparsity_args,
    lowest_k_mask,
    nm_mask,
    num_to_prune,
)
from ellava_lib.prune.obs import _check_blocksize, _prepare_hessian

__all__ = ["obs_prune_reference"]



def _eliminate_first(Hinv: torch.Tensor) -> torch.Tensor:
    """Inverse Hessian of the free set after freezing its first weight::

        H^{-1} <- H^{-1}[1:, 1:] - H^{-1}[1:, 0] H^{-1}[0, 1:] / [H^{-1}]_00
    """
    return Hinv[1:, 1:] - torch.outer(Hinv[1:, 0], Hinv[0, 1:]) / Hinv[0, 0]


def _sequential_pivots(Hinv: torch.Tensor, count: int) -> torch.Tensor:
    """``[H_{j:}^{-1}]_jj`` for the next ``count`` columns, by eliminating them one by one."""
    A = Hinv[:count, :count].clone()
    pivots = torch.empty(count, dtype=Hinv.dtype, device=Hinv.device)
    for j in range(count):
        pivots[j] = A[0, 0]
        A = _eliminate_first(A)
    return pivots


def obs_prune_reference(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    *,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, float]:
    """Dense-algebra formulation of the SparseGPT algorithm, for tests and benchmarks.

    Same dead-input handling, damping and per-block mask rule as :meth:`SparseGPT.prune`, but
    with an explicit inverse ``Hinv = (H + damp I)^{-1}`` instead of the Cholesky trick and every
    update applied eagerly, column by column, to all remaining columns::

        for j = 0 .. d_in - 1:           (Hinv = inverse Hessian of the free columns j..d_in-1)
            err   = (w_j - q_j) / [Hinv]_00
            W[:, j:] -= err Hinv[0, :]           (= OBS delta for every row)
            loss += sum((w_j - q_j)^2 / [Hinv]_00) / 2
            Hinv  <- eliminate column j from Hinv

    The block mask uses the saliency ``w^2 / [H_{j:}^{-1}]_jj`` with the pivots of the block
    obtained by eliminating its columns one by one.  O(d_in^3) work in ``dtype`` (default
    float64).  Returns ``(Ŵ in weight's dtype, total OBS loss)``; no retry logic (a non
    positive-definite damped ``H`` raises).
    """
    W = weight.detach().to(dtype=dtype).clone()
    rows, cols = W.shape
    check_sparsity_args(sparsity, prune_n, prune_m, cols)
    _check_blocksize(blocksize, prune_m)
    Hd, _ = _prepare_hessian(H.detach().to(device=W.device, dtype=dtype).clone(), W)
    Hd.diagonal().add_(percdamp * torch.diag(Hd).mean())
    Hinv = torch.linalg.inv(Hd)
    Hinv = (Hinv + Hinv.T) / 2
    loss = 0.0
    full_mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        rel = j % blocksize
        if mask is not None:
            full_mask[:, j] = mask[:, j]
        elif prune_n > 0 and j % prune_m == 0:
            d2 = _sequential_pivots(Hinv, prune_m)
            full_mask[:, j : j + prune_m] = nm_mask(
                W[:, j : j + prune_m] ** 2 / d2, prune_n, prune_m
            )
        elif prune_n == 0 and rel == 0:
            count = min(blocksize, cols - j)
            d2 = _sequential_pivots(Hinv, count)
            scores = W[:, j : j + count] ** 2 / d2
            full_mask[:, j : j + count] = lowest_k_mask(
                scores, num_to_prune(scores.numel(), sparsity)
            )
        w = W[:, j]
        q = torch.where(full_mask[:, j], torch.zeros_like(w), w)
        err = (w - q) / Hinv[0, 0]
        loss += float(((w - q) ** 2).sum().item() / Hinv[0, 0].item()) / 2
        W[:, j:] -= torch.outer(err, Hinv[0, :])
        W[:, j] = q
        Hinv = _eliminate_first(Hinv)
    return W.to(dtype=weight.dtype), loss
