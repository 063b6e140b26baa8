"""Projector evolution: fine-tune the vision projector ``P`` for the current top-k pruning policies.

For steps ``t = 1..T``, policy ``pi_{(t-1) mod k}`` is assembled from the level database (round-robin) and
only ``P``'s parameters take an AdamW step on the training part of the calibration set::

    L(P; pi) = ce_weight * mean_i CE_i(P, pi) + kl_weight * mean_i KL(p_dense,i || p_{P,pi},i)

(per-sample means: CE over the answer positions, KL over the positions of ``kl_kind``, by default the text
positions the search's ``kl`` fitness reads, :mod:`objective`). The rows
are the ones the caller passes (the search passes its projector rows only, :mod:`evolve`). Early stopping:
a held-out part of those rows (``holdout``, drawn with ``seed``) is scored, averaged over all k policies, before
training and every ``eval_every`` steps; training stops after ``patience`` evaluations without
improvement and the best projector is kept (the starting one if nothing helped). With
``holdout = 0`` every step runs and the last projector is kept. The knobs (``T = steps``, ``lr``, the loss
weights, ``holdout``, ``patience``, ``eval_every``, ``grad_clip``) come in one :class:`config.ProjectorConfig`.

Memory at 7B (:mod:`ellava_lib.speed.memory` predicts it): a step runs ``micro_batch`` rows per forward /
backward pass and accumulates their weighted gradients (:func:`_rows_loss`); with ``checkpointing`` the decoder
blocks recompute their activations in the backward pass (:func:`checkpointed_blocks`); logits are computed only
at the positions the loss reads (:func:`sliced_logits`); a half-precision projector is stepped through an fp32
master copy (:class:`MasterAdamW`).

Saved projectors (:func:`save_projector`) are safetensors whose keys are the model's own state-dict keys
(``model.multi_modal_projector.linear_1.weight``, ...), so a model folder holding one still loads, with
their config JSON beside them (same name, ``.json``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ellava_lib.core import files
from ellava_lib.core.policy import Policy
from ellava_lib.core.units import lm_layers
from ellava_lib.model.kernels import onednn_linears
from ellava_lib.model.losses import answer_mask, model_inputs
from ellava_lib.prune.leveldb import LevelDB
from ellava_lib.search.config import ProjectorConfig
from ellava_lib.search.objective import KL_CHUNK, image_token_id, loss_mask, subset


def projector_module(model: nn.Module) -> nn.Module:
    """LLaVA's multi-modal projector."""
    return model.model.multi_modal_projector


def projector_prefix(model: nn.Module) -> str:
    """The projector's key prefix in ``model.state_dict()`` (``"model.multi_modal_projector."``)."""
    target = projector_module(model)
    for name, module in model.named_modules():
        if module is target:
            return f"{name}."
    raise ValueError("the projector is not a submodule of the model")


def projector_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the projector's state dict (keys relative to the projector)."""
    return {k: v.detach().clone().contiguous() for k, v in projector_module(model).state_dict().items()}


def set_projector_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a projector state (relative keys) into ``model`` in place; shapes must match."""
    projector_module(model).load_state_dict(dict(state), strict=True)


def save_projector(path: str | Path, state: Mapping[str, torch.Tensor], prefix: str,
                   config: Mapping[str, Any] | None = None) -> Path:
    """Write ``state`` as safetensors with keys ``prefix + key`` (atomically), and ``config`` as JSON beside."""
    path = Path(path)
    tensors = {prefix + k: v.detach().cpu().contiguous() for k, v in state.items()}
    files.write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"prefix": prefix}))
    files.write_json(path.with_suffix(".json"), {"prefix": prefix, **dict(config or {})})
    return path


def load_projector(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state with relative keys, config)`` of a file written by :func:`save_projector`."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        prefix = (f.metadata() or {}).get("prefix", "")
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys()}
    cfg_path = path.with_suffix(".json")
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    return state, config


def split_holdout(n: int, holdout_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, holdout)`` row indices: ``round(holdout_frac * n)`` rows (at least 1 when the fraction is
    positive, at most ``n - 1``) drawn with ``random.Random(f"projector/{seed}")``."""
    if not 0.0 <= holdout_frac < 1.0:
        raise ValueError(f"holdout_frac must lie in [0, 1); got {holdout_frac!r}")
    k = 0 if holdout_frac == 0 else min(max(1, round(holdout_frac * n)), n - 1)
    hold = sorted(random.Random(f"projector/{seed}").sample(range(n), k))
    return [i for i in range(n) if i not in set(hold)], hold


def loss_positions(part: Mapping[str, torch.Tensor], kl_weight: float, ce_weight: float,
                   kl_kind: str = "kl_all", image_id: int | None = None) -> torch.Tensor:
    """``(B, T-1)`` bool: the next-token positions the loss reads, the answer positions ``A`` (when
    ``ce_weight > 0``) united with the KL positions ``M`` (those of ``kl_kind``, :func:`objective.loss_mask`, when
    ``kl_weight > 0``; ``image_id``: the image placeholder token, which ``kl`` leaves out)."""
    need = torch.zeros_like(part["input_ids"][:, 1:], dtype=torch.bool)
    if ce_weight > 0:
        need |= answer_mask(part["labels"])
    if kl_weight > 0:
        need |= loss_mask(kl_kind, part, image_id)
    return need


def sliced_logits(model: nn.Module, part: Mapping[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """``(N, V)`` logits at the ``N`` true entries of ``positions`` (``(B, T-1)``, row-major order): the
    language model's last hidden states ``h`` are gathered there first and only those go through the LM head,
    ``logits = lm_head(h[positions])``, so the ``B x T x V`` logits of a full forward never exist (at 7B, 4 rows
    of 650 tokens: 333 MB of fp32 logits for the positions read instead of ``B T V``; the saving is the LM
    head's output at every position the loss does not read, and its fp32 upcasts)."""
    with onednn_linears(model):
        hidden = model.model(**model_inputs(part), use_cache=False)[0]
        return model.lm_head(hidden[:, :-1][positions.to(hidden.device)])


def projector_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], idx: Sequence[int],
                   dense_logits: torch.Tensor | None, kl_weight: float, ce_weight: float = 1.0,
                   kl_kind: str = "kl_all") -> torch.Tensor:
    """``ce_weight * mean CE + kl_weight * mean KL(dense || model)`` on rows ``idx`` (a differentiable scalar;
    CE over the answer positions, KL over the positions ``M`` of ``kl_kind`` as the search's fitness of that
    kind: ``kl_all`` every real position, image placeholders included, ``kl`` the text positions; ``dense_logits``:
    the dense log-probabilities of :func:`objective.dense_logprobs_of`).
    ``ce_weight = 0`` distils the dense model only: the projector cannot learn the calibration answers beyond
    what the dense model predicts.

    Logits only where the loss reads them (:func:`loss_positions`, :func:`sliced_logits`): with ``(b, t)`` the
    position of row ``j`` of the sliced logits ``z_j``,
    ``CE_b = sum_{j: b_j = b, t_j in A_b} -log softmax(z_j)[y_{b, t_j + 1}] / max(|A_b|, 1)`` and
    ``KL_b = sum_{j: b_j = b, t_j in M_b} KL(p_dense,b,t_j || softmax(z_j)) / max(|M_b|, 1)``: the terms of
    :func:`losses.per_sample_ce` and :func:`objective.per_sample_kl`, summed per sample (equal to them on the
    full logits up to rounding, tests/test_projector_memory.py)."""
    if ce_weight < 0 or kl_weight < 0 or ce_weight + kl_weight <= 0:
        raise ValueError(f"need ce_weight, kl_weight >= 0, not both 0; got {ce_weight}, {kl_weight}")
    if kl_weight > 0 and dense_logits is None:
        raise ValueError("kl_weight > 0 needs the dense model's logits")
    part = subset(batch, idx)
    image_id = image_token_id(model)
    need = loss_positions(part, kl_weight, ce_weight, kl_kind, image_id)
    logits = sliced_logits(model, part, need)
    dev = logits.device
    rows, cols = need.nonzero(as_tuple=True)
    rows_d = rows.to(dev)
    n = need.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=dev)
    if ce_weight > 0:
        ans = answer_mask(part["labels"])
        on = ans[rows, cols].to(dev)
        target = part["labels"][:, 1:][rows, cols].to(dev)
        nll = F.cross_entropy(logits.float(), target.masked_fill(~on, -100), ignore_index=-100, reduction="none")
        per = torch.zeros(n, device=dev).index_add(0, rows_d, nll * on)
        loss = loss + ce_weight * (per / ans.sum(1).to(dev).clamp(min=1)).mean()
    if kl_weight > 0:
        m = loss_mask(kl_kind, part, image_id)
        on = m[rows, cols].to(dev)
        dense = dense_logits[list(idx)]
        per = torch.zeros(n, device=dev)
        for a in range(0, len(rows), KL_CHUNK * n):  # bounds the fp32 temporaries to KL_CHUNK * B * V floats
            b = min(a + KL_CHUNK * n, len(rows))
            logp = F.log_softmax(logits[a:b].float(), dim=-1)
            logq = dense[rows[a:b].to(dense.device), cols[a:b].to(dense.device)].to(dev).float()
            kl = (logq.exp() * (logq - logp)).sum(-1)
            per = per.index_add(0, rows_d[a:b], kl * on[a:b])
        loss = loss + kl_weight * (per / m.sum(1).to(dev).clamp(min=1)).mean()
    return loss


def _rows_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], rows: Sequence[int],
               dense_logits: torch.Tensor | None, kl_weight: float, ce_weight: float, micro_batch: int,
               backward: bool, kl_kind: str = "kl_all") -> float:
    """The loss of :func:`projector_loss` on ``rows``, ``micro_batch`` rows per pass (0: all at once):
    ``L = sum_m (|R_m| / |R|) L(R_m)`` (each term is a mean over its rows, so this is the mean over all rows);
    with ``backward`` each weighted term is back-propagated at once (gradient accumulation: the summed gradient
    is the gradient of ``L``). Returns ``L``."""
    rows = list(rows)
    step = micro_batch or len(rows)
    total = 0.0
    for a in range(0, len(rows), step):
        chunk = rows[a:a + step]
        part = projector_loss(model, batch, chunk, dense_logits, kl_weight, ce_weight, kl_kind) * \
            (len(chunk) / len(rows))
        if backward:
            part.backward()
        total += float(part.detach())
    return total


@contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """Activation (gradient) checkpointing of the language model's decoder blocks for the ``with`` block.

    Each block gets an instance attribute ``forward`` that runs its own ``forward`` under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the backward pass recomputes a block's
    activations from its input instead of keeping them, so a step holds one block input per block plus one
    block's activations. Works in eval mode (transformers' own ``gradient_checkpointing_enable`` acts in
    training mode only, which would switch dropout on); on exit (also on an exception) the attributes are
    deleted, so every block is back to its class's ``forward``. The class and other models are never touched."""
    blocks = list(lm_layers(model))
    swapped = []
    try:
        for block in blocks:
            if "forward" in vars(block):
                continue  # already replaced on the instance (an offload hook, or a nested block): left alone
            original = block.forward

            def forward(*args: Any, _run: Any = original, **kwargs: Any) -> Any:
                return checkpoint(_run, *args, use_reentrant=False, **kwargs)
            block.forward = forward
            swapped.append(block)
        yield
    finally:
        for block in swapped:
            del block.forward


class MasterAdamW:
    """AdamW on fp32 master copies of ``params`` (the model's, possibly half precision).

    ``step()``: ``g32 = p.grad`` upcast to fp32 and clipped jointly to norm ``grad_clip``
    (``g <- g * min(1, c / ||g||)``, as ``clip_grad_norm_``), an AdamW step on the fp32 master ``w32``
    (``torch.optim.AdamW``, weight decay 0), then ``p <- w32`` rounded to ``p``'s dtype. The master keeps the
    updates a half-precision weight would round away (an update below half an ulp of ``p``: for fp16 near 1.0,
    ``|update| < 2^-11``). With ``fp32 = False`` or fp32 parameters the optimiser steps ``params`` themselves
    (no copies; identical to a plain AdamW)."""

    def __init__(self, params: Sequence[nn.Parameter], lr: float, grad_clip: float, fp32: bool = True) -> None:
        self.params = list(params)
        self.grad_clip = grad_clip
        self.copies = fp32 and any(p.dtype != torch.float32 for p in self.params)
        self.master = ([p.detach().float().clone().requires_grad_(True) for p in self.params] if self.copies
                       else self.params)
        self.opt = torch.optim.AdamW(self.master, lr=lr, weight_decay=0.0)

    def step(self) -> None:
        if self.copies:
            for p, w in zip(self.params, self.master):
                w.grad = None if p.grad is None else p.grad.float()
        torch.nn.utils.clip_grad_norm_(self.master, self.grad_clip)
        self.opt.step()
        if self.copies:
            with torch.no_grad():
                for p, w in zip(self.params, self.master):
                    p.copy_(w)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self.copies:
            for w in self.master:
                w.grad = None


def _holdout_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], hold: list[int], policies: Sequence[Policy],
                  db: LevelDB, dense_logits: torch.Tensor | None, kl_weight: float, ce_weight: float,
                  micro_batch: int = 0, kl_kind: str = "kl_all") -> float:
    with torch.no_grad():
        total = 0.0
        for pol in policies:
            db.assemble(model, pol, check=False)
            total += _rows_loss(model, batch, hold, dense_logits, kl_weight, ce_weight, micro_batch, False, kl_kind)
    return total / len(policies)


def evolve_projector(model: nn.Module, batch: Mapping[str, torch.Tensor], policies: Sequence[Policy],
                     level_db: LevelDB, dense_logits: torch.Tensor | None, config: ProjectorConfig,
                     seed: int, rows: Sequence[int] | None = None
                     ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Fine-tune the projector for ``policies`` (see the module docstring); returns ``(state, log)``.

    ``config``: steps, learning rate, loss weights, held-out share, patience, evaluation interval, gradient
    clip, micro-batch, checkpointing and fp32 master (:class:`config.ProjectorConfig`; its ``every`` / ``topk`` are
    the search's schedule, unused here).
    ``rows``: the batch rows the round may use (all when None; the search passes its projector rows, never the
    rows candidates are scored on); ``seed`` draws the held-out (early-stopping) rows among them. The kept
    projector (best on the held-out rows) is loaded into ``model`` and
    returned (relative keys); the model's units are left at whatever policy was assembled last. ``log`` has one
    row per step (``step, policy_id, train_loss, holdout_loss, seconds``; step 0 = the starting projector).
    """
    if not policies:
        raise ValueError("projector evolution needs at least one policy")
    if not isinstance(config, ProjectorConfig):
        raise TypeError(f"config must be a ProjectorConfig, got {type(config).__name__}")
    steps, kl_weight, ce_weight, kind = config.steps, config.kl_weight, config.ce_weight, config.kl_kind
    allowed = list(range(int(batch["input_ids"].shape[0]))) if rows is None else [int(r) for r in rows]
    train, hold = split_holdout(len(allowed), config.holdout, seed)
    train, hold = [allowed[i] for i in train], [allowed[i] for i in hold]
    proj = projector_module(model)
    own = {id(p) for p in proj.parameters()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    for p in frozen:
        p.requires_grad_(False)
    opt = MasterAdamW(list(proj.parameters()), config.lr, config.grad_clip, config.fp32_master)
    mb = config.micro_batch
    tick = time.perf_counter()
    best_state = projector_state(model)
    best = (_holdout_loss(model, batch, hold, policies, level_db, dense_logits, kl_weight, ce_weight, mb, kind)
            if hold else None)
    log: list[dict[str, Any]] = [{"step": 0, "policy_id": "", "train_loss": None, "holdout_loss": best,
                                  "seconds": time.perf_counter() - tick}]
    bad = 0
    try:
        model.eval()
        with checkpointed_blocks(model) if config.checkpointing else nullcontext():
            for step in range(1, steps + 1):
                pol = policies[(step - 1) % len(policies)]
                level_db.assemble(model, pol, check=False)
                opt.zero_grad()
                loss = _rows_loss(model, batch, train, dense_logits, kl_weight, ce_weight, mb, True, kind)
                opt.step()
                row = {"step": step, "policy_id": pol.policy_id(), "train_loss": loss, "holdout_loss": None}
                if hold and step % config.eval_every == 0:
                    row["holdout_loss"] = h = _holdout_loss(model, batch, hold, policies, level_db, dense_logits,
                                                            kl_weight, ce_weight, mb, kind)
                    if h < best:
                        best, best_state, bad = h, projector_state(model), 0
                    else:
                        bad += 1
                row["seconds"] = time.perf_counter() - tick
                log.append(row)
                if hold and bad >= config.patience:
                    break
        if not hold:
            best_state = projector_state(model)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        opt.zero_grad()
    set_projector_state(model, best_state)
    return best_state, log
