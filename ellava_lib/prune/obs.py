"""Optimal-Brain-Surgeon pruning of one linear layer: the SparseGPT solver.

Model-agnostic: this module only ever sees one ``torch.nn.Linear`` (or a weight matrix and its
Hessian); it knows nothing about LLaVA.

Notation (one layer, weight ``W`` of shape ``(d_out, d_in)``, calibration inputs ``x_1..x_N`` in
``R^{d_in}``)::

    H = 2/N * sum_i x_i x_i^T                      (d_in x d_in, kept in fp32)

    ||W X - Ŵ X||_F^2 / N = trace((W - Ŵ) H (W - Ŵ)^T) / 2

The reconstruction loss decouples over the rows of ``W``; every row shares the same ``H``.  For one
row ``w`` and the inverse Hessian ``H^{-1}`` of the weights that are still free, Optimal Brain
Surgeon removes weight ``q`` at the cost (the *saliency*)::

    L_q = w_q^2 / (2 [H^{-1}]_qq)

and compensates with the closed-form update of the remaining free weights::

    delta = -w_q / [H^{-1}]_qq * H^{-1}[:, q]

after which weight ``q`` is frozen and row/column ``q`` is eliminated from ``H^{-1}``::

    H^{-1} <- H^{-1} - H^{-1}[:, q] H^{-1}[q, :] / [H^{-1}]_qq   (then drop row/col q)

SparseGPT (Frantar & Alistarh, 2023) visits the columns left to right and freezes every column
after its visit, so the free set is always the suffix ``{j, ..., d_in-1}``.  The inverse Hessians
of all suffixes are read off one upper Cholesky factor ``U`` of the (damped) ``H^{-1}``
(``H^{-1} = U^T U``)::

    [H_{j:}^{-1}]_jj = U_jj^2,     H_{j:}^{-1}[j, j:] = U_jj * U[j, j:]

so the per-column update is ``W[:, j:] -= ((w_j - q_j) / U_jj) U[j, j:]`` and the saliency is
``w^2 / U_jj^2`` (``= w^2 / [H_{j:}^{-1}]_jj``).  Updates are applied lazily per block of
``blocksize`` columns: inside the block column by column, and to the columns right of the block in
one matrix product ``W[:, i2:] -= Err1 @ U[i1:i2, i2:]``.

Masks are chosen adaptively per block from the saliency at the time the block is reached:

* unstructured: within each block the ``round(sparsity * d_out * blocksize)`` weights with the
  lowest ``w^2 / U_jj^2`` (all rows of the block pooled, so per-row sparsity varies);
* N:M (``prune_n, prune_m > 0``): in every group of ``M`` consecutive input columns of every row,
  the ``N`` weights with the lowest saliency, chosen when the solver reaches the group.

**Exact sparsity.** Per-block masks round ``sparsity * d_out * blocksize`` to an integer in every
block, so the number of zeros differs from ``sparsity * numel`` by round-off only.  Documented
bound: the measured sparsity equals the target to within one weight per row per block, i.e.
``|zeros - sparsity * numel| <= d_out * ceil(d_in / blocksize)``.  This implementation rounds to
the nearest integer per block and therefore actually achieves ``<= 0.5`` weight per block.  (The reference code
thresholds with ``<=`` on the sorted saliencies and prunes one extra weight per block, plus ties;
we select exactly the rounded count.)  Weights that are already exactly zero — in particular the
columns of dead inputs, which are zeroed up front — have saliency 0 and are counted first, so they
only raise the measured sparsity above the target when there are more of them in a block than the
block's pruning budget.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ellava_lib.prune.masks import (
    check_sparsity_args,
    lowest_k_mask,
    magnitude_mask,
    measured_sparsity,
    nm_mask,
    num_to_prune,
)

__all__ = [
    "PruneStats",
    "SparseGPT",
    "reconstruction_error",
]

#: How many times the Cholesky factorisation is retried, each with 10x more damping.
MAX_DAMP_RETRIES = 4
#: Relative damping used for the first retry when ``percdamp == 0``.
_RETRY_PERCDAMP_FLOOR = 1e-4


@dataclass
class PruneStats:
    """What one call to :meth:`SparseGPT.prune` did.

    ``error`` is the sum of the OBS losses ``sum_q (w_q - q_q)^2 / (2 U_qq^2)``, which equals
    ``trace((W - Ŵ) H_damped (W - Ŵ)^T) / 2`` with ``H_damped = H + damp_used * I``.
    ``damp_used`` is the absolute damping added to the diagonal of ``H`` (NaN when the solver fell
    back to magnitude pruning; ``method`` is then ``"magnitude"`` and ``error`` is measured with the
    undamped ``H``, NaN when that is not finite).
    """

    sparsity_target: float
    sparsity_measured: float
    error: float
    seconds: float
    damp_used: float
    method: str = "sparsegpt"


def reconstruction_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Layer reconstruction error ``||W X - Ŵ X||_F^2 / N`` computed from the Hessian.

    With ``H = 2/N X X^T`` (``X`` of shape ``(d_in, N)``)::

        ||W X - Ŵ X||_F^2 / N = trace((W - Ŵ) H (W - Ŵ)^T) / 2

    Evaluated in float64.
    """
    delta = (w.detach().double() - w_hat.detach().double().to(w.device)).reshape(w.shape[0], -1)
    Hd = H.detach().double().to(delta.device)
    return float(((delta @ Hd) * delta).sum().item()) / 2.0


@contextmanager
def _tf32_disabled(device: torch.device) -> Iterator[None]:
    """Turn TF32 matmuls/convolutions off on CUDA for the duration; restore the flags after."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = False
    cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def _prepare_hessian(H: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Handle dead inputs in place on copies: ``diag(H)==0`` -> ``H[i,i] = 1`` and ``W[:, i] = 0``.

    Returns ``(H, dead)``.
    """
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return H, dead


def _damped_inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^{-1}`` (``U^T U = (H + damp I)^{-1}``).

    Returns ``None`` when ``H + damp I`` is not (numerically) positive definite or any factor is
    not finite.
    """
    Hd = H.clone()
    Hd.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info.item()) != 0 or not bool(torch.isfinite(L).all()):
        return None
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info.item()) != 0 or not bool(torch.isfinite(U).all()):
        return None
    return U


def _sparsegpt_sweep(
    W: torch.Tensor,
    U: torch.Tensor,
    sparsity: float,
    prune_n: int,
    prune_m: int,
    blocksize: int,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, float]:
    """The SparseGPT column-block sweep over ``W`` (fp32, modified in place), given ``U``.

    For each block ``[i1, i2)``: choose the block mask from ``w^2 / U_jj^2`` (unless ``mask`` is
    given), then for every column ``j`` of the block::

        q_j   = w_j with the masked rows set to 0
        err_j = (w_j - q_j) / U_jj
        W1[:, j:] -= err_j U[j, j:]          (OBS update inside the block)
        loss  += sum((w_j - q_j)^2 / U_jj^2) / 2

    and finally ``W[:, i2:] -= Err1 @ U[i1:i2, i2:]`` (lazy update of the remaining columns).
    Returns ``(W, total OBS loss)``.
    """
    rows, cols = W.shape
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        Err1 = torch.zeros_like(W1)
        if mask is not None:
            mask1 = mask[:, i1:i2]
        elif prune_n > 0:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            scores = W1**2 / d.unsqueeze(0) ** 2
            mask1 = lowest_k_mask(scores, num_to_prune(W1.numel(), sparsity))
        for i in range(i2 - i1):
            if mask is None and prune_n > 0 and i % prune_m == 0:
                scores = W1[:, i : i + prune_m] ** 2 / d[i : i + prune_m].unsqueeze(0) ** 2
                mask1[:, i : i + prune_m] = nm_mask(scores, prune_n, prune_m)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            loss += (err.double() ** 2).sum() / 2
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W, float(loss.item())


def _check_blocksize(blocksize: int, prune_m: int) -> None:
    """N:M groups must not straddle blocks: ``blocksize`` has to be a multiple of ``prune_m``."""
    if blocksize <= 0:
        raise ValueError(f"blocksize must be > 0, got {blocksize}")
    if prune_m > 0 and blocksize % prune_m != 0:
        raise ValueError(f"blocksize={blocksize} is not a multiple of prune_m={prune_m}")


# --------------------------------------------------------------------------------------------
# the solver
# --------------------------------------------------------------------------------------------


class SparseGPT:
    """Accumulates the Hessian of one ``torch.nn.Linear`` and prunes it with the SparseGPT solver.

    Usage: call :meth:`add_batch` with the layer's inputs (e.g. from a forward hook), then
    :meth:`prune` once, then :meth:`free`.  All state lives on the layer's device; ``H`` is fp32.
    """

    def __init__(self, layer: torch.nn.Linear) -> None:
        if not isinstance(layer, torch.nn.Linear):
            raise TypeError(f"SparseGPT expects a torch.nn.Linear, got {type(layer).__name__}")
        self.layer = layer
        self.device = layer.weight.device
        self.rows, self.columns = layer.weight.shape
        self.H: torch.Tensor | None = torch.zeros(
            (self.columns, self.columns), dtype=torch.float32, device=self.device
        )
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """Fold a batch of inputs into the running-mean Hessian ``H = 2/N sum_i x_i x_i^T``.

        ``inp`` has shape ``(..., d_in)``; all leading dimensions are flattened into rows, and ``N``
        counts every row seen so far.  With ``m`` new rows ``X_new`` (``(m, d_in)``)::

            H <- H * N / (N + m) + 2 / (N + m) * X_new^T X_new,     N <- N + m

        computed in fp32 whatever ``inp.dtype``.  ``out`` is ignored (forward-hook signature).
        """
        if self.H is None:
            raise RuntimeError("SparseGPT.add_batch called after free()")
        if inp.shape[-1] != self.columns:
            raise ValueError(f"input has {inp.shape[-1]} features, layer expects {self.columns}")
        x = inp.detach().reshape(-1, self.columns).to(device=self.device, dtype=torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.nsamples + m
        self.H.addmm_(x.t(), x, beta=self.nsamples / total, alpha=2.0 / total)
        self.nsamples = total

    def prune(
        self,
        sparsity: float,
        prune_n: int = 0,
        prune_m: int = 0,
        blocksize: int = 128,
        percdamp: float = 0.01,
        *,
        mask: torch.Tensor | None = None,
    ) -> PruneStats:
        """Prune ``layer.weight`` in place with the SparseGPT column-block OBS solver.

        Steps: dead inputs (``diag(H) == 0``) get ``H_ii = 1`` and ``W[:, i] = 0``; damping
        ``damp = percdamp * mean(diag(H))`` is added to the diagonal; ``U`` = upper Cholesky factor
        of ``(H + damp I)^{-1}`` (itself obtained via a Cholesky factorisation of ``H + damp I``);
        then the block sweep described in the module docstring.  If a factorisation fails (not
        positive definite) or produces non-finite numbers, it is retried with 10x the damping, up to
        :data:`MAX_DAMP_RETRIES` times, with a ``RuntimeWarning`` each time; if every attempt fails
        the layer is magnitude-pruned instead (with a warning).  The pruned weight is written back
        into ``layer.weight`` in its original dtype.  ``H`` itself is left untouched.

        ``mask`` (keyword-only, optional) fixes the bool mask of weights to zero instead of choosing
        it adaptively; ``sparsity``/``prune_n``/``prune_m`` are then not used for selection.
        """
        if self.H is None:
            raise RuntimeError("SparseGPT.prune called after free()")
        check_sparsity_args(sparsity, prune_n, prune_m, self.columns)
        _check_blocksize(blocksize, prune_m)
        if mask is not None:
            if mask.shape != self.layer.weight.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape")
            mask = mask.to(device=self.device, dtype=torch.bool)
            sparsity_target = float(mask.float().mean().item())
        else:
            sparsity_target = prune_n / prune_m if prune_n > 0 else float(sparsity)
        tick = time.perf_counter()
        with _tf32_disabled(self.device), torch.no_grad():
            W_hat, error, damp_used, method = self._solve(
                sparsity, prune_n, prune_m, blocksize, percdamp, mask
            )
            weight = self.layer.weight
            weight.copy_(W_hat.to(dtype=weight.dtype))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - tick
        return PruneStats(
            sparsity_target=sparsity_target,
            sparsity_measured=measured_sparsity(self.layer.weight),
            error=error,
            seconds=seconds,
            damp_used=damp_used,
            method=method,
        )

    def _solve(
        self,
        sparsity: float,
        prune_n: int,
        prune_m: int,
        blocksize: int,
        percdamp: float,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, float, float, str]:
        """Damping/retry loop around the sweep; returns ``(W_hat, error, damp_used, method)``."""
        assert self.H is not None
        W = self.layer.weight.detach().to(dtype=torch.float32).clone()
        H, _ = _prepare_hessian(self.H.clone(), W)
        mean_diag = float(torch.diag(H).mean().item())
        rel = float(percdamp)
        for attempt in range(MAX_DAMP_RETRIES + 1):
            damp = rel * mean_diag
            U = _damped_inverse_cholesky(H, damp) if math.isfinite(damp) else None
            if U is not None:
                W_hat, error = _sparsegpt_sweep(
                    W.clone(), U, sparsity, prune_n, prune_m, blocksize, mask
                )
                if bool(torch.isfinite(W_hat).all()) and math.isfinite(error):
                    return W_hat, error, damp, "sparsegpt"
            rel = rel * 10.0 if rel > 0 else _RETRY_PERCDAMP_FLOOR
            if attempt < MAX_DAMP_RETRIES:
                warnings.warn(
                    f"SparseGPT: H + {damp:.3g} I is not positive definite (or the solve was not "
                    f"finite) for a {self.rows}x{self.columns} layer; retrying with 10x damping "
                    f"(percdamp={rel:.3g})",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return self._magnitude_fallback(W, sparsity, prune_n, prune_m, mask)

    def _magnitude_fallback(
        self,
        W: torch.Tensor,
        sparsity: float,
        prune_n: int,
        prune_m: int,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, float, float, str]:
        """Last resort when every factorisation failed: zero the magnitude mask, no update."""
        warnings.warn(
            f"SparseGPT: all {MAX_DAMP_RETRIES + 1} damping levels failed for a "
            f"{self.rows}x{self.columns} layer; falling back to magnitude pruning",
            RuntimeWarning,
            stacklevel=4,
        )
        W = torch.nan_to_num(W, nan=0.0, posinf=0.0, neginf=0.0)
        if mask is None:
            mask = magnitude_mask(W, sparsity, prune_n, prune_m)
        W_hat = W.masked_fill(mask, 0.0)
        assert self.H is not None
        error = reconstruction_error(W, W_hat, self.H)
        return W_hat, (error if math.isfinite(error) else float("nan")), float("nan"), "magnitude"

    def free(self) -> None:
        """Drop the Hessian (and release cached CUDA memory when on GPU)."""
        self.H = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
