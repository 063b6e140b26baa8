from __future__ import annotations

import pytest
import torch
from helpers import build_micro_level_db
from safetensors.torch import load_file

from ellava_lib.core.policy import Policy
from ellava_lib.core.units import list_units
from ellava_lib.model.specs import load_model
from ellava_lib.prune import leveldb
from ellava_lib.search import objective, projector
from ellava_lib.search.config import ProjectorConfig, SearchConfig


@pytest.fixture(scope="module")
def setup(micro_model_dir, tmp_path_factory):
    """Calibration batch (12 samples), a level database, the 70% uniform policy and the dense logits."""
    model, batch, out = build_micro_level_db(micro_model_dir, tmp_path_factory, n_calib=12)
    dense = objective.dense_logprobs_of(model, batch)
    return micro_model_dir, batch, leveldb.LevelDB(out), Policy.uniform(list_units(model), 0.7), dense


def _pruned(setup):
    model_dir, _, db, policy, _ = setup
    model, _ = load_model(model_dir)
    db.assemble(model, policy)
    return model


def test_a_projector_step_lowers_the_calibration_loss_at_70_percent(setup):
    _, batch, db, policy, dense = setup
    model = _pruned(setup)
    others = {k: v.clone() for k, v in model.state_dict().items() if "multi_modal_projector" not in k}
    before = float(objective.per_sample_losses(model, batch).mean())
    state, log = projector.evolve_projector(model, batch, [policy], db, dense,
                                            ProjectorConfig(steps=1, lr=1e-3, kl_weight=1.0, holdout=0.0, patience=1,
                                                            eval_every=1, ce_weight=1.0), seed=0)
    db.assemble(model, policy, check=False)
    after = float(objective.per_sample_losses(model, batch).mean())
    assert after < before, (before, after)
    assert [r["step"] for r in log] == [0, 1] and log[1]["policy_id"] == policy.policy_id()
    # only the projector moved, and every parameter is trainable again afterwards
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in others.items())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, projector.projector_state(model)[k]) for k, v in state.items())


def test_early_stopping_never_returns_a_worse_holdout_loss(setup):
    _, batch, db, policy, dense = setup
    model = _pruned(setup)
    start = projector.projector_state(model)
    _, hold = projector.split_holdout(12, 0.25, 7)
    state, log = projector.evolve_projector(model, batch, [policy, Policy.uniform(list_units(model), 0.5)], db,
                                            dense, ProjectorConfig(steps=6, lr=0.05, kl_weight=0.5, holdout=0.25,
                                                                   patience=2, eval_every=1, ce_weight=1.0),
                                            seed=7)
    losses = [r["holdout_loss"] for r in log if r["holdout_loss"] is not None]
    assert losses[0] == log[0]["holdout_loss"] and len(log) <= 7
    kept = min(losses)
    projector.set_projector_state(model, state)
    # the returned projector scores the best holdout loss seen (the start one if nothing improved)
    check = projector._holdout_loss(model, batch, hold, [policy, Policy.uniform(list_units(model), 0.5)], db,
                                    dense, 0.5, 1.0, 0, "kl")  # the default config's KL: text positions
    assert check == pytest.approx(kept, rel=1e-6)
    if kept == losses[0]:
        assert all(torch.equal(start[k], state[k]) for k in start)


def _loose_argument_evolution(model, batch, policies, db, dense, steps, lr, kl_weight, holdout_frac, patience, seed,
                              eval_every, grad_clip, ce_weight, kl_kind):
    """The projector evolution as it ran before ProjectorConfig (its loop with the loose arguments, restated)."""
    train, hold = projector.split_holdout(int(batch["input_ids"].shape[0]), holdout_frac, seed)
    proj = projector.projector_module(model)
    own = {id(p) for p in proj.parameters()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    best_state = projector.projector_state(model)
    best = (projector._holdout_loss(model, batch, hold, policies, db, dense, kl_weight, ce_weight, 0, kl_kind)
            if hold else None)
    losses, bad = [], 0
    model.eval()
    for step in range(1, steps + 1):
        db.assemble(model, policies[(step - 1) % len(policies)], check=False)
        loss = projector.projector_loss(model, batch, train, dense, kl_weight, ce_weight, kl_kind)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(proj.parameters()), grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if hold and step % eval_every == 0:
            h = projector._holdout_loss(model, batch, hold, policies, db, dense, kl_weight, ce_weight, 0, kl_kind)
            if h < best:
                best, best_state, bad = h, projector.projector_state(model), 0
            else:
                bad += 1
        if hold and bad >= patience:
            break
    for p in frozen:
        p.requires_grad_(True)
    return (best_state if hold else projector.projector_state(model)), losses


@pytest.mark.parametrize("knobs", [
    dict(steps=4, lr=2e-3, kl_weight=0.5, holdout=0.0, patience=3, eval_every=2, grad_clip=0.5, ce_weight=0.0,
         kl_kind="kl_all"),
    dict(steps=6, lr=0.05, kl_weight=1.0, holdout=0.25, patience=2, eval_every=1, grad_clip=1.0, ce_weight=1.0,
         kl_kind="kl"),
], ids=["no-holdout", "early-stopping"])
def test_a_projector_config_gives_the_projector_of_the_loose_arguments(setup, knobs):
    """Every ProjectorConfig field reaches the evolution: the same projector and step losses as the loop run
    with the same values as loose arguments (the call before ProjectorConfig), and as the search's config."""
    model_dir, batch, db, policy, dense = setup
    policies = [policy, Policy.uniform(list_units(load_model(model_dir)[0]), 0.5)]
    cfg = ProjectorConfig(**knobs)
    model = _pruned(setup)
    state, log = projector.evolve_projector(model, batch, policies, db, dense, cfg, seed=5)
    ref = _pruned(setup)
    loose = {k: v for k, v in knobs.items() if k != "holdout"}
    ref_state, ref_losses = _loose_argument_evolution(ref, batch, policies, db, dense, holdout_frac=knobs["holdout"],
                                                      seed=5, **loose)
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    assert [r["train_loss"] for r in log[1:]] == ref_losses
    # the search hands its projector fields over as this same config
    flat = {f"projector_{k}": v for k, v in knobs.items()}
    assert SearchConfig.from_preset("ci", **flat).projector == ProjectorConfig.from_preset("ci", **knobs) == \
        ProjectorConfig(every=1, **knobs)
    again, _ = projector.evolve_projector(_pruned(setup), batch, policies, db, dense,
                                          SearchConfig.from_preset("ci", **flat).projector, seed=5)
    assert all(torch.equal(again[k], state[k]) for k in state)
    with pytest.raises(TypeError, match="ProjectorConfig"):
        projector.evolve_projector(_pruned(setup), batch, policies, db, dense, knobs, seed=5)


def test_distillation_only_projector_loss(setup):
    """``ce_weight = 0``: the loss is the KL to the dense model alone (zero for the dense model itself)."""
    model_dir, batch, _, _, dense = setup
    model, _ = load_model(model_dir)
    rows = list(range(6))
    with torch.no_grad():
        own = float(projector.projector_loss(model, batch, rows, dense, 1.0, ce_weight=0.0))
        assert own == pytest.approx(0, abs=1e-5)
        pruned = _pruned(setup)
        both = float(projector.projector_loss(pruned, batch, rows, dense, 1.0))
        kl = float(projector.projector_loss(pruned, batch, rows, dense, 1.0, ce_weight=0.0))
        ce = float(projector.projector_loss(pruned, batch, rows, None, 0.0))
    assert both == pytest.approx(kl + ce, rel=1e-5) and 0 < kl < both
    for weights in ((0.0, 0.0), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="ce_weight"):
            projector.projector_loss(model, batch, rows, dense, weights[1], ce_weight=weights[0])


def test_holdout_split_is_seeded_and_disjoint():
    train, hold = projector.split_holdout(64, 0.25, 3)
    assert len(hold) == 16 and sorted(train + hold) == list(range(64))
    assert projector.split_holdout(64, 0.25, 3) == (train, hold) != projector.split_holdout(64, 0.25, 4)
    assert projector.split_holdout(10, 0.0, 0) == (list(range(10)), [])
    with pytest.raises(ValueError):
        projector.split_holdout(10, 1.0, 0)


def test_saved_projector_loads_back_identically(setup, tmp_path):
    model = _pruned(setup)
    with torch.no_grad():
        for p in projector.projector_module(model).parameters():
            p.add_(torch.randn_like(p) * 0.01)
    state = projector.projector_state(model)
    prefix = projector.projector_prefix(model)
    path = projector.save_projector(tmp_path / "projector.safetensors", state, prefix, {"round": 1})
    raw = load_file(path)
    assert prefix == "model.multi_modal_projector." and all(k.startswith(prefix) for k in raw)
    assert set(raw) <= set(model.state_dict())  # the model's own keys: a model folder holding it still loads
    back, config = projector.load_projector(path)
    assert config == {"prefix": prefix, "round": 1}
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    fresh, _ = load_model(setup[0])
    projector.set_projector_state(fresh, back)
    assert all(torch.equal(projector.projector_state(fresh)[k], state[k]) for k in state)
