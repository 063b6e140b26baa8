"""Projector evolution at 7B scale, checked on the micro model: logits only where the loss reads them,
micro-batched gradient accumulation, decoder-block checkpointing restored afterwards, fp32 master weights."""

from __future__ import annotations

import pytest
import torch
from helpers import build_micro_level_db

from ellava_lib.core.policy import Policy
from ellava_lib.core.units import list_units, lm_layers
from ellava_lib.model.losses import per_sample_ce
from ellava_lib.model.specs import load_model
from ellava_lib.prune import leveldb
from ellava_lib.search import objective, projector
from ellava_lib.search.config import ProjectorConfig


@pytest.fixture(scope="module")
def setup(micro_model_dir, tmp_path_factory):
    model, batch, out = build_micro_level_db(micro_model_dir, tmp_path_factory, n_calib=10)
    dense = objective.dense_logprobs_of(model, batch)
    db = leveldb.LevelDB(out)
    policy = Policy.uniform(list_units(model), 0.6)
    db.assemble(model, policy)
    return model, batch, db, policy, dense


def _grads(model, fn):
    for p in projector.projector_module(model).parameters():
        p.grad = None
    value = fn()
    return value, [p.grad.clone() for p in projector.projector_module(model).parameters()]


@pytest.mark.parametrize("kl_weight,ce_weight,kind", [(1.0, 0.0, "kl_all"), (0.0, 1.0, "kl_all"),
                                                      (0.5, 2.0, "kl_all"), (1.0, 0.0, "kl"), (0.5, 2.0, "kl")])
def test_sliced_logits_give_the_full_logit_loss(setup, kl_weight, ce_weight, kind):
    model, batch, _, _, dense = setup
    idx = [0, 3, 4, 7, 9]
    with torch.no_grad():
        sliced = float(projector.projector_loss(model, batch, idx, dense, kl_weight, ce_weight, kind))
        part = objective.subset(batch, idx)
        logits = objective.model_logits(model, part)  # the B x T x V logits of a plain forward
        full = ce_weight * float(per_sample_ce(logits, part["labels"]).mean())
        if kl_weight:
            mask = objective.loss_mask(kind, part, objective.image_token_id(model))
            kl = objective.per_sample_kl(logits, dense[idx], mask)
            full += kl_weight * float(kl.mean())
    assert sliced == pytest.approx(full, rel=1e-5, abs=1e-7)
    need = projector.loss_positions(part, kl_weight, ce_weight, kind, objective.image_token_id(model))
    if kind == "kl":  # the text positions: the image placeholders are not read
        assert int(need.sum()) < int(projector.loss_positions(part, kl_weight, ce_weight, "kl_all").sum())
    assert 0 < int(need.sum()) <= need.numel()
    if kl_weight == 0:  # CE alone reads the answer positions only: far fewer logits than B x (T-1)
        assert int(need.sum()) < need.numel() / 3


def test_micro_batched_gradients_equal_the_one_batch_gradients(setup):
    """10 rows in micro-batches of 3 (3+3+3+1, each weighted by its share): loss and gradient equal those of
    one pass over the 10 rows to fp32 rounding (relative 1e-5 of the largest entry)."""
    model, batch, _, _, dense = setup
    rows = list(range(10))
    one, g1 = _grads(model, lambda: projector._rows_loss(model, batch, rows, dense, 1.0, 0.5, 0, True))
    micro, g3 = _grads(model, lambda: projector._rows_loss(model, batch, rows, dense, 1.0, 0.5, 3, True))
    assert micro == pytest.approx(one, rel=1e-6)
    for a, b in zip(g1, g3):
        assert float(a.abs().max()) > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    # a micro-batch alone has another gradient: the accumulation is what makes them agree
    _, g_first = _grads(model, lambda: projector._rows_loss(model, batch, rows[:3], dense, 1.0, 0.5, 0, True))
    assert not torch.allclose(g_first[0], g1[0], rtol=1e-3)


def test_checkpointing_recomputes_the_blocks_and_is_switched_off_afterwards(setup):
    model, batch, _, _, dense = setup
    calls = []
    hooks = [b.self_attn.register_forward_hook(lambda *a: calls.append(1)) for b in lm_layers(model)]
    try:
        _, plain = _grads(model, lambda: projector._rows_loss(model, batch, [1, 2], dense, 1.0, 0.0, 0, True))
        n_plain = len(calls)
        calls.clear()
        with projector.checkpointed_blocks(model):
            assert all("forward" in vars(b) for b in lm_layers(model))
            _, ckpt = _grads(model, lambda: projector._rows_loss(model, batch, [1, 2], dense, 1.0, 0.0, 0, True))
        assert n_plain == len(lm_layers(model)) and len(calls) == 2 * n_plain  # forward + recompute in backward
        for a, b in zip(plain, ckpt):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        assert not any("forward" in vars(b) for b in lm_layers(model))
        with pytest.raises(RuntimeError, match="boom"), projector.checkpointed_blocks(model):
            raise RuntimeError("boom")
        assert not any("forward" in vars(b) for b in lm_layers(model))
    finally:
        for h in hooks:
            h.remove()


def test_evolution_with_micro_batches_and_checkpointing_matches_the_plain_one(setup, micro_model_dir):
    _, batch, db, policy, dense = setup
    states = []
    for mb, ck in ((0, False), (2, True)):
        model, _ = load_model(micro_model_dir)
        db.forget(model)
        cfg = ProjectorConfig(steps=3, lr=1e-3, holdout=0.25, patience=5, eval_every=1, micro_batch=mb,
                              checkpointing=ck)
        state, log = projector.evolve_projector(model, batch, [policy], db, dense, cfg, seed=1)
        assert not any("forward" in vars(b) for b in lm_layers(model))
        assert all(p.requires_grad for p in model.parameters())
        states.append((state, [r["holdout_loss"] for r in log]))
    (a, la), (b, lb) = states
    assert la == pytest.approx(lb, rel=1e-3, abs=1e-7)  # Adam magnifies rounding of tiny gradients
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_fp32_master_keeps_updates_fp16_rounds_away():
    """AdamW's first steps move a weight by ~lr = 1e-4 each; fp16 spacing just below 1.0 is 2^-11 (4.9e-4), so
    fp16 weights stepped directly round every update away and stay 1.0, while the fp32 master accumulates
    5 x 1e-4 and its fp16 copy lands on 1 - 2^-11."""
    out = {}
    for fp32 in (True, False):
        w = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
        opt = projector.MasterAdamW([w], lr=1e-4, grad_clip=1e9, fp32=fp32)
        for _ in range(5):
            opt.zero_grad()
            w.grad = torch.ones_like(w)
            opt.step()
        out[fp32] = (w.detach().clone(), opt)
    w16, _ = out[False]
    w32, opt = out[True]
    assert torch.equal(w16, torch.ones(4, dtype=torch.float16))
    assert opt.master[0].dtype == torch.float32
    assert float(opt.master[0][0].detach()) == pytest.approx(1 - 5e-4, rel=1e-5)
    assert torch.equal(w32, opt.master[0].half()) and float(w32[0]) == 1 - 2 ** -11
    # an fp32 parameter is stepped in place (no copy), as a plain AdamW
    p = torch.nn.Parameter(torch.ones(3))
    assert projector.MasterAdamW([p], lr=1e-4, grad_clip=1.0).master[0] is p
