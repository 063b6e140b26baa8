"""The search objective ``J(pi) = R_hat(pi) + lambda * G_hat(pi)`` of a candidate (pruned) model.

Per-sample losses ``l_i`` (:func:`per_sample_losses`). ``M_i`` = the next-token positions of sample ``i``:
positions ``t`` (predicting token ``t+1``) where both ``t`` and ``t+1`` are real tokens (``attention_mask`` 1);
``X_i`` = its text positions, those of ``M_i`` whose input token ``y_t`` is not the image token (the expanded
``<image>`` placeholders: 576 per sample on LLaVA-1.5, 9 on the tiny model; :func:`image_token_id` of the
model); ``A_i`` = its answer positions (``labels[t+1] != -100``, all of them text):

* ``kind="kl"`` (the default fitness, EvoPress's on text): the divergence from the dense model's next-token
  distribution over the text positions (question and answer, not the image placeholders),
  ``l_i = (1/|X_i|) sum_{t in X_i} KL(p_dense(. | y_<=t) || p(. | y_<=t))``,
  ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` (:func:`per_sample_kl`); a per-sample mean, so ``R_hat`` is the
  mean over samples of each sample's mean over its own text positions;
* ``kind="kl_answer"``: the same divergence averaged over the answer positions ``A_i`` only;
* ``kind="kl_all"``: the same divergence over every real position ``M_i``, image placeholders included (the ``kl``
  fitness before revision 2, :data:`LOSS_REVISION`; on LLaVA-1.5 the text is a few percent of those positions);
* ``kind="ce"``: answer cross-entropy ``l_i = (1/|A_i|) sum_{t in A_i} -log p(y_{t+1} | y_<=t)``
  (:func:`losses.per_sample_ce`, the per-sample term of :func:`losses.answer_loss`).

A position whose input is the image token predicts from an image token's hidden state (the next placeholder, or
after the last one the first text token); a text position before the image (``USER:``) is kept, whatever it
predicts. A sample without text positions scores 0.

The dense side is cached once as fp32 **log-probabilities** (:func:`dense_logprobs_of`, on the CPU; ``n * T * V``
floats, as many as the logits it replaces); the KL is computed ``kl_chunk`` positions at a time, so the extra
memory of a candidate's KL is ``rows * kl_chunk * V`` floats whatever the sequence length.

Bounded losses: :func:`score_losses` clips the per-sample losses at ``loss_cap``:
``l~_i = min(max(l_i, 0), loss_cap)`` (both kinds are ``>= 0``); ``R_hat = mean_i l~_i`` and the Bernstein gap
use the same clipped losses. The default cap (10 nats) is above ``ln |V|`` of the tiny vocabulary, so it only
bites on models worse than uniform; :class:`Score` reports how many samples were clipped.

``G_hat`` comes from :func:`gaps.gap`: ``"norm"`` from the Frobenius norms of each unit's stored weights at its
level and their distances to the dense ones (``gap_kw`` ``weight_sq``, :meth:`LevelDB.weight_sq`) and the unit
sizes, ``"capacity"`` from its sparsities and unit sizes, ``"bernstein"`` from the sample variance of the
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

LOSS_KINDS: tuple[str, ...] = ("ce", "kl", "kl_answer", "kl_all")

#: Loss kinds that need the dense model's log-probabilities.
KL_KINDS: tuple[str, ...] = ("kl", "kl_answer", "kl_all")

#: Revision of a loss kind whose meaning changed after searches were run with it: ``kl`` averaged over every real
#: position (image placeholders included, now ``kl_all``) before revision 2 and over the text positions since. A
#: search config with such a loss serialises it (``loss_revision``, :meth:`config.SearchConfig.to_dict`), so
#: checkpoints and sweep rows made with the old loss are not reused.
LOSS_REVISION: dict[str, int] = {"kl": 2}

#: Positions per KL chunk (bounds the temporaries of :func:`per_sample_kl` to ``rows * KL_CHUNK * V`` floats).
KL_CHUNK: int = 128

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


def position_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T-1)`` bool: position ``t`` predicts a real token from a real token (``attention_mask[t]`` and
    ``attention_mask[t+1]`` both 1)."""
    m = attention_mask.bool()
    return m[:, :-1] & m[:, 1:]


def _position_kl(logits: torch.Tensor, dense_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(p_dense || p) = sum_v p_d (log p_d - log p)`` per position (the last dim is the vocabulary), in fp32 on
    ``logits``' device."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logq = dense_logprobs.to(logits.device).float()
    return (logq.exp() * (logq - logp)).sum(-1)


def per_sample_kl(logits: torch.Tensor, dense_logprobs: torch.Tensor, mask: torch.Tensor,
                  chunk: int | None = KL_CHUNK) -> torch.Tensor:
    """``(B,)`` per-sample mean over the positions of ``mask`` of ``KL(p_dense || p) = sum_v p_d (log p_d - log p)``.

    ``logits``: ``(B, T, V)`` of the candidate; ``dense_logprobs``: ``(B, >= T-1, V)`` log-softmax of the dense
    model (:func:`dense_logprobs_of`); ``mask``: ``(B, T-1)`` bool (:func:`loss_mask`: the text positions, the
    answer positions or every real position); position ``t`` compares the distributions of token
    ``t+1``. Computed ``chunk`` positions at a time (None: all at once); differentiable in ``logits``.
    Rows with an empty mask get 0."""
    width = logits.shape[1] - 1
    step = width if not chunk else int(chunk)
    total = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    for a in range(0, width, step):
        b = min(a + step, width)
        m = mask[:, a:b].to(logits.device)
        if not bool(m.any()):
            continue
        kl = _position_kl(logits[:, a:b], dense_logprobs[:, a:b])
        total = total + (kl * m).sum(1)
    return total / mask.to(logits.device).sum(1).clamp(min=1)


def text_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int | None) -> torch.Tensor:
    """``(B, T-1)`` bool: the text positions, :func:`position_mask` less the positions ``t`` whose input token
    ``input_ids[t]`` is ``image_token_id`` (``None``: a model without image tokens, every real position)."""
    m = position_mask(attention_mask)
    if image_token_id is None:
        return m
    return m & (input_ids[:, :-1] != int(image_token_id))


def image_token_id(model: nn.Module) -> int | None:
    """The id of the image placeholder token in ``model``'s inputs (``config.image_token_id``, or
    ``image_token_index`` as llava-hf's configs name it), ``None`` for a model without one."""
    config = getattr(model, "config", None)
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    return None


def loss_mask(kind: str, batch: Mapping[str, torch.Tensor], image_id: int | None = None) -> torch.Tensor:
    """The positions a KL kind averages over: the text positions (``kl``, :func:`text_mask` with the image token
    ``image_id``), the answer positions (``kl_answer``) or every real position (``kl_all``)."""
    if kind == "kl_answer":
        return answer_mask(batch["labels"])
    attention = batch["attention_mask"] if "attention_mask" in batch else torch.ones_like(batch["input_ids"])
    if kind == "kl_all":
        return position_mask(attention)
    if kind != "kl":
        raise ValueError(f"loss kind {kind!r} is not a KL kind; choose from {', '.join(KL_KINDS)}")
    return text_mask(batch["input_ids"], attention, image_id)


def logits_at(model: nn.Module, batch: Mapping[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """``(P, V)`` next-token logits of ``model`` at the ``P`` true entries of ``positions`` (``(B, T)`` bool, row
    by row as ``positions.nonzero()`` orders them): the decoder's last hidden states gathered there, then the LM
    head on those alone (equal to :func:`model_logits` indexed by ``positions``, up to the matmul's rounding; the LM
    head of a 49k-token vocabulary is a fifth of a SmolLM2 forward, and the padding and image positions of a batch
    are half of its positions). A model without a separate ``model`` / ``lm_head`` takes the full logits."""
    if not (hasattr(model, "model") and isinstance(getattr(model, "lm_head", None), nn.Module)):
        return model_logits(model, batch)[positions.to(next(model.parameters()).device)]
    with onednn_linears(model):
        hidden = model.model(**model_inputs(batch), use_cache=False).last_hidden_state
        return model.lm_head(hidden[positions.to(hidden.device)])


def kl_at(logits: torch.Tensor, dense_logprobs: torch.Tensor, rows: torch.Tensor, n_rows: int,
          chunk: int | None = None) -> torch.Tensor:
    """``(n_rows,)`` per-row mean of ``KL(p_dense || p)`` over gathered positions: ``logits`` ``(P, V)`` of the
    candidate and ``dense_logprobs`` ``(P, V)`` at the same positions, ``rows`` ``(P,)`` the row of each;
    ``sum_v p_d (log p_d - log p)`` per position, summed per row and divided by the row's count (0 for a row
    without positions). :func:`per_sample_kl` on the gathered positions, ``chunk`` positions at a time (default
    ``8 * KL_CHUNK``: a chunk of ``per_sample_kl`` holds its rows times ``KL_CHUNK`` positions)."""
    chunk = int(chunk or 8 * KL_CHUNK)
    kl = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for a in range(0, logits.shape[0], chunk):
        b = min(a + chunk, logits.shape[0])
        kl[a:b] = _position_kl(logits[a:b], dense_logprobs[a:b])
    rows = rows.to(logits.device)
    total = torch.zeros(n_rows, dtype=torch.float32, device=logits.device).index_add_(0, rows, kl)
    count = torch.zeros(n_rows, dtype=torch.float32, device=logits.device).index_add_(0, rows, torch.ones_like(kl))
    return total / count.clamp(min=1)


def model_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(B, T, V)`` next-token logits of ``model`` on the batch (no cache; ``model``'s CPU fp32 linears through
    oneDNN where no gradient is needed, :func:`kernels.onednn_linears`)."""
    with onednn_linears(model):
        return model(**model_inputs(batch), use_cache=False).logits


@torch.no_grad()
def dense_logprobs_of(model: nn.Module, batch: Mapping[str, torch.Tensor],
                      batch_size: int | None = None) -> torch.Tensor:
    """``(n, T-1, V)`` fp32 log-softmax (on the CPU) of the (dense) model's next-token logits at positions
    ``0..T-2`` of every row, computed in chunks of ``batch_size`` rows exactly as :func:`per_sample_losses`
    chunks (so ``KL(dense || dense) = 0``). Memory: ``n * (T-1) * V`` floats (about 5 GB for 64 LLaVA-1.5
    samples of ~650 tokens, V = 32064); positions past a row's padding are zeros, never read (masked)."""
    model.eval()
    n, width = batch["input_ids"].shape
    out = None
    for idx in _chunks(n, batch_size):
        logits = model_logits(model, subset(batch, idx))
        if out is None:
            out = torch.zeros(n, max(width - 1, 0), logits.shape[-1])
        w = logits.shape[1] - 1
        for a in range(0, w, KL_CHUNK):
            b = min(a + KL_CHUNK, w)
            out[idx[0]: idx[-1] + 1, a:b] = F.log_softmax(logits[:, a:b].float(), dim=-1).cpu()
    return out


def _chunks(n: int, batch_size: int | None) -> list[list[int]]:
    step = n if not batch_size else int(batch_size)
    return [list(range(i, min(i + step, n))) for i in range(0, n, step)]


@torch.no_grad()
def per_sample_losses(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str = "ce",
                      dense_logits: torch.Tensor | None = None, idx: Sequence[int] | None = None,
                      batch_size: int | None = None) -> torch.Tensor:
    """``(n,)`` raw per-sample losses (see the module docstring) on rows ``idx`` of the batch (all if None).

    The KL kinds need ``dense_logits``: the dense log-probabilities of the *whole* batch (:func:`dense_logprobs_of`),
    indexed by ``idx``; ``kl`` leaves out the positions of ``model``'s image token (:func:`image_token_id`).
    Rows are run in chunks of ``batch_size`` (all at once when None). The KL kinds compute the LM head and the
    divergence at the positions of their mask only (:func:`logits_at`, :func:`kl_at`): the same losses as
    :func:`per_sample_kl` on the full logits, up to float rounding, for about half the head and KL work.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; choose from {', '.join(LOSS_KINDS)}")
    if kind in KL_KINDS and dense_logits is None:
        raise ValueError(f"loss kind {kind!r} needs the dense model's log-probabilities (dense_logprobs_of)")
    model.eval()
    rows = list(range(batch["input_ids"].shape[0])) if idx is None else [int(i) for i in idx]
    image_id = image_token_id(model)
    out = []
    for chunk in _chunks(len(rows), batch_size):
        sel = [rows[c] for c in chunk]
        part = subset(batch, sel)
        if kind == "ce":
            out.append(per_sample_ce(model_logits(model, part), part["labels"]))
            continue
        mask = loss_mask(kind, part, image_id)  # (b, T-1): position t predicts token t+1
        at = torch.nonzero(mask)  # (P, 2): (row in the chunk, position), row by row
        positions = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
        dense = dense_logits[torch.as_tensor(sel)[at[:, 0]], at[:, 1]]  # (P, V), gathered without a (b, T, V) copy
        out.append(kl_at(logits_at(model, part, positions), dense, at[:, 0], len(sel)))
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
    for capacity; ``weight_sq``, ``scale`` for norm).
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
