from __future__ import annotations

import math

import pytest
import torch

from ellava_lib.core import units
from ellava_lib.core.policy import Policy
from ellava_lib.core.schema import SUITES
from ellava_lib.data import calibration
from ellava_lib.model.specs import load_model
from ellava_lib.prune import masks, prune, walk


def _fresh(micro_model_dir):
    return load_model(micro_model_dir)[0]


def _mixed_policy(model, include_vision=False):
    levels = (0.5, 0.7, 0.3, 0.6)
    return Policy({u: levels[i % 4] for i, u in enumerate(units.list_units(model, include_vision))})


# ------------------------------------------------------------------------------------------ calibration


def test_draw_calibration_is_balanced_seeded_and_bounded():
    a = calibration.draw_calibration(10, seed=3)
    assert [s.id for s in a] == [s.id for s in calibration.draw_calibration(10, seed=3)]
    assert [s.id for s in a] != [s.id for s in calibration.draw_calibration(10, seed=4)]
    counts = {s: sum(x.suite == s for x in a) for s in SUITES}
    assert sorted(counts.values()) == [2, 2, 3, 3] and len({s.id for s in a}) == 10
    assert all(s.split == "calib" and s.image is not None for s in a)
    with pytest.raises(ValueError, match="exceed the calibration pool"):
        calibration.draw_calibration(calibration.pool_capacity() + 1, seed=0)


def test_encode_calibration_labels_only_the_answer(micro_model):
    _, proc = micro_model
    samples = calibration.draw_calibration(4, seed=0)
    batch = calibration.encode_calibration(samples, proc)
    assert batch["pixel_values"].shape[0] == 4 and batch["input_ids"].shape == batch["labels"].shape
    for row, s in enumerate(samples):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        assert ids.shape[0] == int(batch["attention_mask"][row].sum())  # right padding
        answer = batch["labels"][row][batch["labels"][row] != -100]
        assert proc.tokenizer.decode(answer) == proc.tokenizer.decode(
            proc.tokenizer(f" {s.answer} </s>", add_special_tokens=False)["input_ids"])


def test_capture_reproduces_the_models_own_layer0_input(micro_model, calib):
    model, _ = micro_model
    inputs = walk.capture_layer_inputs(model, calib)
    with torch.no_grad():
        out = model(input_ids=calib["input_ids"], attention_mask=calib["attention_mask"],
                    pixel_values=calib["pixel_values"], output_hidden_states=True, use_cache=False)
    assert torch.equal(inputs.hidden, out.hidden_states[0])
    for layer in units.lm_layers(model):  # the blocks run standalone give the model's logits
        inputs = inputs.with_hidden(inputs.run(layer))
    with torch.no_grad():
        logits = model.lm_head(model.model.language_model.norm(inputs.hidden))
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- pruning


def test_sequential_sparsegpt_hits_every_target_within_the_solver_bound(micro_model_dir, calib):
    model = _fresh(micro_model_dir)
    policy = _mixed_policy(model, include_vision=True)
    report = prune.prune_model(model, policy, "sparsegpt", calib, blocksize=32, progress=False)
    assert len(report) == sum(len(v) for v in units.unit_linears(model, True).values())
    for unit, lins in units.unit_linears(model, True).items():
        s = policy.sparsities[unit]
        for name, lin in lins.items():
            zeros = int((lin.weight == 0).sum())
            bound = 0.5 * math.ceil(lin.weight.shape[1] / 32)
            assert abs(zeros - s * lin.weight.numel()) <= bound, name
    assert set(report.columns) >= {"layer", "unit", "target", "measured", "params", "error"}
    assert (report["error"] >= 0).all()


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_two_four_masks_are_exact(micro_model_dir, calib, method):
    model = _fresh(micro_model_dir)
    policy = Policy.uniform(units.list_units(model), 0.5)
    report = prune.prune_model(model, policy, method, calib, prune_n=2, prune_m=4, progress=False)
    for lins in units.unit_linears(model).values():
        for lin in lins.values():
            groups = (lin.weight == 0).reshape(lin.weight.shape[0], -1, 4).sum(-1)
            assert (groups == 2).all()
    assert (report["target"] == 0.5).all() and (report["measured"] == 0.5).all()


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, use_cache=False).logits[batch["attention_mask"].bool()]


@pytest.mark.parametrize("s", [0.5, 0.6, 0.7])
def test_sparsegpt_distorts_the_output_less_than_magnitude(micro_model_dir, calib, s):
    """OBS minimises each layer's reconstruction error on the calibration inputs, so the pruned model's
    output logits stay closer to the dense ones than after magnitude pruning at the same sparsity. (The
    micro model's task loss is near chance, so its differences are noise; the distortion is not.)"""
    dense = _logits(_fresh(micro_model_dir), calib)
    distortion = {}
    for method in ("magnitude", "sparsegpt"):
        model = _fresh(micro_model_dir)
        prune.prune_model(model, Policy.uniform(units.list_units(model), s), method, calib, progress=False)
        distortion[method] = float(((_logits(model, calib) - dense) ** 2).mean())
    assert distortion["sparsegpt"] < distortion["magnitude"]


def test_same_calibration_seed_gives_identical_weights(micro_model_dir, micro_model):
    _, proc = micro_model
    states = []
    for seed in (7, 7, 8):
        model = _fresh(micro_model_dir)
        batch = calibration.encode_calibration(calibration.draw_calibration(8, seed), proc)
        prune.prune_model(model, _mixed_policy(model), "sparsegpt", batch, progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_wanda_per_row_sparsity_is_exact(micro_model_dir, calib):
    model = _fresh(micro_model_dir)
    policy = _mixed_policy(model)
    prune.prune_model(model, policy, "wanda", calib, progress=False)
    for unit, lins in units.unit_linears(model).items():
        for lin in lins.values():
            per_row = (lin.weight == 0).sum(1)
            assert (per_row == int(lin.weight.shape[1] * policy.sparsities[unit])).all()  # floor, as Wanda


def test_wanda_count_is_the_floor():
    """locuslab/wanda prunes ``int(d_in * s)`` per row: 0.29 * 100 = 28.999... -> 28 (round() would say 29)."""
    w = torch.arange(1.0, 201.0).reshape(2, 100)
    mask = masks.wanda_mask(w, torch.ones(100), 0.29)
    assert mask.sum(1).tolist() == [28, 28]
    assert masks.wanda_mask(w, torch.ones(100), 0.5).sum(1).tolist() == [50, 50]


def test_wanda_mask_follows_the_score():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    norms = torch.tensor([1.0, 0.1, 1.0, 10.0])  # scores: [1, .2, 3, 5], [4, .1, 1, 20]
    mask = masks.wanda_mask(w, norms, 0.5)
    assert mask.tolist() == [[True, True, False, False], [False, True, True, False]]


def test_non_sequential_mode_also_meets_the_policy(micro_model_dir, calib):
    model = _fresh(micro_model_dir)
    report = prune.prune_model(model, _mixed_policy(model), "sparsegpt", calib, sequential=False, progress=False)
    assert ((report["measured"] - report["target"]).abs() < 0.01).all()


def test_post_condition_and_argument_errors(micro_model_dir, calib):
    model = _fresh(micro_model_dir)
    policy = Policy.uniform(units.list_units(model), 0.5)
    with pytest.raises(RuntimeError, match="zeros"):
        prune.check_sparsity(model, policy, "sparsegpt")  # still dense
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune.prune_model(model, policy, "optimal", calib)
    with pytest.raises(ValueError, match="0 < N < M"):
        prune.prune_model(model, policy, "wanda", calib, prune_n=4, prune_m=2)
    with pytest.raises(ValueError, match="calibration batch"):
        prune.prune_model(model, policy, "wanda", None)
    assert masks.parse_nm("2:4") == (2, 4)
    for bad in ("2-4", "2:4:8", "a:b", "0:4", "4:4"):
        with pytest.raises(ValueError):
            masks.parse_nm(bad)
