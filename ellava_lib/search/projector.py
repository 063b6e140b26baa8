"""Projector evolution: fine-tune the vision projector ``P`` for the current top-k pruning policies.

For steps ``t = 1..T``, policy ``pi_{(t-1) mod k}`` is assembled from the level database (round-robin) and
only ``P``'s parameters take an AdamW step on the training part of the calibration set::

    L(P; pi) = ce_weight * mean_i CE_i(P, pi) + kl_weight * mean_i KL(p_dense,i || p_{P,pi},i)

(per-sample means: CE over the answer positions, KL over every real position, :mod:`objective`). The rows
are the ones the caller passes (the search passes its projector rows only, :mod:`evolve`). Early stopping:
a held-out part of those rows (``holdout``, drawn with ``seed``) is scored, averaged over all k policies, before
training and every ``eval_every`` steps; training stops after ``patience`` evaluations without
improvement and the best projector is kept (the starting one if nothing helped). With
``holdout = 0`` every step runs and the last projector is kept. The knobs (``T = steps``, ``lr``, the loss
weights, ``holdout``, ``patience``, ``eval_every``, ``grad_clip``) come in one :class:`config.ProjectorConfig`.

Saved projectors (:func:`save_projector`) are safetensors whose keys are the model's own state-dict keys
(``model.multi_modal_projector.linear_1.weight``, ...), so a model folder holding one still loads, with
their config JSON beside them (same name, ``.json``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ellava_lib.core import files
from ellava_lib.core.policy import Policy
from ellava_lib.model.losses import per_sample_ce
from ellava_lib.prune.leveldb import LevelDB
from ellava_lib.search.config import ProjectorConfig
from ellava_lib.search.objective import loss_mask, model_logits, per_sample_kl, subset


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


def projector_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], idx: Sequence[int],
                   dense_logits: torch.Tensor | None, kl_weight: float, ce_weight: float = 1.0) -> torch.Tensor:
    """``ce_weight * mean CE + kl_weight * mean KL(dense || model)`` on rows ``idx`` (a differentiable scalar;
    CE over the answer positions, KL over every real position as the search's ``kl`` fitness; ``dense_logits``:
    the dense log-probabilities of :func:`objective.dense_logprobs_of`).
    ``ce_weight = 0`` distils the dense model only: the projector cannot learn the calibration answers beyond
    what the dense model predicts."""
    if ce_weight < 0 or kl_weight < 0 or ce_weight + kl_weight <= 0:
        raise ValueError(f"need ce_weight, kl_weight >= 0, not both 0; got {ce_weight}, {kl_weight}")
    part = subset(batch, idx)
    logits = model_logits(model, part)
    loss = ce_weight * per_sample_ce(logits, part["labels"]).mean()
    if kl_weight > 0:
        if dense_logits is None:
            raise ValueError("kl_weight > 0 needs the dense model's logits")
        loss = loss + kl_weight * per_sample_kl(logits, dense_logits[list(idx)], loss_mask("kl", part)).mean()
    return loss


def _holdout_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], hold: list[int], policies: Sequence[Policy],
                  db: LevelDB, dense_logits: torch.Tensor | None, kl_weight: float, ce_weight: float) -> float:
    with torch.no_grad():
        total = 0.0
        for pol in policies:
            db.assemble(model, pol, check=False)
            total += float(projector_loss(model, batch, hold, dense_logits, kl_weight, ce_weight))
    return total / len(policies)


def evolve_projector(model: nn.Module, batch: Mapping[str, torch.Tensor], policies: Sequence[Policy],
                     level_db: LevelDB, dense_logits: torch.Tensor | None, config: ProjectorConfig,
                     seed: int, rows: Sequence[int] | None = None
                     ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Fine-tune the projector for ``policies`` (see the module docstring); returns ``(state, log)``.

    ``config``: steps, learning rate, loss weights, held-out share, patience, evaluation interval and gradient
    clip (:class:`config.ProjectorConfig`; its ``every`` / ``topk`` are the search's schedule, unused here).
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
    steps, kl_weight, ce_weight = config.steps, config.kl_weight, config.ce_weight
    allowed = list(range(int(batch["input_ids"].shape[0]))) if rows is None else [int(r) for r in rows]
    train, hold = split_holdout(len(allowed), config.holdout, seed)
    train, hold = [allowed[i] for i in train], [allowed[i] for i in hold]
    proj = projector_module(model)
    own = {id(p) for p in proj.parameters()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(proj.parameters(), lr=config.lr, weight_decay=0.0)
    tick = time.perf_counter()
    best_state = projector_state(model)
    best = _holdout_loss(model, batch, hold, policies, level_db, dense_logits, kl_weight, ce_weight) if hold else None
    log: list[dict[str, Any]] = [{"step": 0, "policy_id": "", "train_loss": None, "holdout_loss": best,
                                  "seconds": time.perf_counter() - tick}]
    bad = 0
    try:
        model.eval()
        for step in range(1, steps + 1):
            pol = policies[(step - 1) % len(policies)]
            level_db.assemble(model, pol, check=False)
            loss = projector_loss(model, batch, train, dense_logits, kl_weight, ce_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(proj.parameters()), config.grad_clip)
            opt.step()
            row = {"step": step, "policy_id": pol.policy_id(), "train_loss": float(loss.detach()),
                   "holdout_loss": None}
            if hold and step % config.eval_every == 0:
                row["holdout_loss"] = h = _holdout_loss(model, batch, hold, policies, level_db, dense_logits,
                                                        kl_weight, ce_weight)
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
        opt.zero_grad(set_to_none=True)
    set_projector_state(model, best_state)
    return best_state, log
