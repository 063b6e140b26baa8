"""The search objective ``J(pi) = R_hat(pi) + lambda * G_hat(pi)`` of a candidate (pruned) model.

Per-sample losses ``l_i`` (:func:`per_sample_losses`), on the answer positions ``A_i`` of sample ``i``
(positions ``t`` whose next token ``y_{t+1}`` is an answer token, ``labels != -100``):

* ``kind="ce"``: answer cross-entropy ``l_i = (1/|A_i|) sum_{t in A_i} -log p(y_{t+1} | y_<=t)``
  (:func:`losses.per_sample_ce`, the per-sample term of :func:`losses.answer_loss`);
* ``kind="kl"``: ``l_i = (1/|A_i|) sum_{t in A_i} KL(p_dense(. | y_<=t) || p(. | y_<=t))``, the divergence
  from the dense model's next-token distribution (where no reference answer should be trusted).

Bounded losses: :func:`score_losses` clips the per-sample losses at ``loss_cap``:
``l~_i = min(max(l_i, 0), loss_cap)`` (both kinds are ``>= 0``); ``R_hat = mean_i l~_i`` and the Bernstein gap
use the same clipped losses. The default cap (10 nats) is above ``ln |V|`` of the tiny vocabulary, so it only
bites on models worse than uniform; :class:`Score` reports how many samples were clipped.

``G_hat`` comes from :func:`gaps.gap`: ``"norm"`` from the policy's per-unit Frobenius norms (``gap_kw``
``frob_sq``), ``"capacity"`` from its sparsities and unit sizes, ``"bernstein"`` from the sample variance of the
clipped losses (the policy-independent range term of the bound is left out of ``J``), ``"none"`` = 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ellava_lib.model.kernels import onednn_linears
from ellava_lib.model.losses import answer_mask, model_inputs, per_sample_ce
from ellava_lib.search import gap as gaps

LOSS_KINDS: tuple[str, ...] = ("ce", "kl")

#: Default clip of a per-sample loss (nats): the range ``b`` passed to the Bernstein gap.
DEFAULT_LOSS_CAP: float = 10.0

@dataclass(frozen=True)
class Score:
    """``j = r_hat + lambda * g_hat`` on ``n_used`` samples (``n_clipped`` of them hit ``loss_cap``)."""

    r_hat: float
    g_hat: float
    j: float
    n_used: int
    n_clipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Score:
        return cls(float(d["r_hat"]), float(d["g_hat"]), float(d["j"]), int(d["n_used"]), int(d.get("n_clipped", 0)))


# ------------------------------------------------------------------------------------------- batches


def subset(batch: Mapping[str, torch.Tensor], idx: Sequence[int] | None) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of a right-padded batch (all rows when ``None``), trailing all-padding columns dropped."""
    rows = dict(batch) if idx is None else {k: v[list(idx)] for k, v in batch.items()}
    if "attention_mask" in rows:
        width = int(rows["attention_mask"].sum(1).max())
        rows = {k: (v[:, :width] if k in ("input_ids", "attention_mask", "labels") else v) for k, v in rows.items()}
    return rows


def per_sample_kl(logits: torch.Tensor, dense_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` per-sample mean over answer positions of ``KL(p_dense || p) = sum_v p_d (log p_d - log p)``."""
    width = logits.shape[1]
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    logq = F.log_softmax(dense_logits[:, : width - 1].to(logits.device).float(), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    mask = answer_mask(labels)
    return (kl * mask).sum(1) / mask.sum(1).clamp(min=1)


def model_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(B, T, V)`` next-token logits of ``model`` on the batch (no cache; ``model``'s CPU fp32 linears through
    oneDNN where no gradient is needed, :func:`kernels.onednn_linears`)."""
    with onednn_linears(model):
        return model(**model_inputs(batch), use_cache=False).logits


@torch.no_grad()
def dense_logits_of(model: nn.Module, batch: Mapping[str, torch.Tensor], batch_size: int | None = None) -> torch.Tensor:
    """``(n, T, V)`` fp32 logits (on the CPU) of the (dense) model on every row of the batch, computed in
    chunks of ``batch_size`` rows exactly as :func:`per_sample_losses` chunks (so ``KL(dense || dense) = 0``).
    Memory: ``n * T * V`` floats (about 5 GB for 64 LLaVA-1.5 samples of ~650 tokens, V = 32064)."""
    model.eval()
    n, width = batch["input_ids"].shape
    out = None
    for idx in _chunks(n, batch_size):
        logits = model_logits(model, subset(batch, idx)).float()
        if out is None:
            out = torch.zeros(n, width, logits.shape[-1])
        out[idx[0]: idx[-1] + 1, : logits.shape[1]] = logits.cpu()
    return out


def _chunks(n: int, batch_size: int | None) -> list[list[int]]:
    step = n if not batch_size else int(batch_size)
    return [list(range(i, min(i + step, n))) for i in range(0, n, step)]


@torch.no_grad()
def per_sample_losses(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str = "ce",
                      dense_logits: torch.Tensor | None = None, idx: Sequence[int] | None = None,
                      batch_size: int | None = None) -> torch.Tensor:
    """``(n,)`` raw per-sample losses (see the module docstring) on rows ``idx`` of the batch (all if None).

    ``kind="kl"`` needs ``dense_logits`` of the *whole* batch (:func:`dense_logits_of`), indexed by ``idx``.
    Rows are run in chunks of ``batch_size`` (all at once when None).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; choose from {', '.join(LOSS_KINDS)}")
    if kind == "kl" and dense_logits is None:
        raise ValueError("loss kind 'kl' needs the dense model's logits (dense_logits_of)")
    model.eval()
    rows = list(range(batch["input_ids"].shape[0])) if idx is None else [int(i) for i in idx]
    out = []
    for chunk in _chunks(len(rows), batch_size):
        sel = [rows[c] for c in chunk]
        part = subset(batch, sel)
        logits = model_logits(model, part)
        if kind == "ce":
            out.append(per_sample_ce(logits, part["labels"]))
        else:
            out.append(per_sample_kl(logits, dense_logits[sel], part["labels"]))
    return torch.cat(out).float().cpu()


# ------------------------------------------------------------------------------------------- scoring


def score_losses(losses: torch.Tensor | Sequence[float], *, gap: str, lam: float, delta: float = 0.05,
                 loss_cap: float = DEFAULT_LOSS_CAP, units: Mapping[str, int] | None = None,
                 sparsities: Mapping[str, float] | None = None, n_capacity: int | None = None,
                 gap_kw: Mapping[str, Any] | None = None) -> Score:
    """``Score`` of per-sample losses: ``l~ = clip(l, 0, loss_cap)``, ``R_hat = mean(l~)``,
    ``G_hat = gaps.gap(gap, ...)``, ``J = R_hat + lam * G_hat``.

    The Bernstein gap gets the clipped losses; the capacity and norm gaps get ``units``, ``sparsities`` and
    ``n = n_capacity`` (default: the number of losses). ``gap_kw`` is passed on (``depth_decay``, ``h_scale``
    for capacity; ``frob_sq``, ``scale`` for norm).
    """
    x = torch.as_tensor(losses, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("no losses to score")
    if not torch.isfinite(x).all():
        raise ValueError("per-sample losses contain NaN or inf")
    if not loss_cap > 0:
        raise ValueError(f"loss_cap must be > 0; got {loss_cap!r}")
    clipped = x.clamp(0.0, float(loss_cap))
    r_hat = float(clipped.mean())
    kw = dict(gap_kw or {})
    n = n_capacity if (gap in ("capacity", "norm") and n_capacity is not None) else int(x.numel())
    g_hat = gaps.gap(gap, units=units, sparsities=sparsities, losses=clipped.numpy() if gap == "bernstein" else None,
                    n=n, delta=delta, **kw)
    return Score(r_hat, g_hat, gaps.objective(r_hat, g_hat, lam), int(x.numel()), int((x > loss_cap).sum()))
