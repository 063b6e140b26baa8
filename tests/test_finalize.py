"""The exact model of a searched policy: the search's projector, then a sequential SparseGPT re-prune."""

from __future__ import annotations

import torch

from ellava_lib.core.policy import Policy
from ellava_lib.core.units import list_units
from ellava_lib.model.specs import load_model
from ellava_lib.prune.prune import prune_model
from ellava_lib.search import projector
from ellava_lib.search.finalize import exact_reprune


def test_exact_reprune_loads_the_projector_then_prunes_sequentially(micro_model_dir, calib, tmp_path):
    model, _ = load_model(micro_model_dir)
    levels = (0.3, 0.6)
    policy = Policy({u: levels[i % 2] for i, u in enumerate(list_units(model))})
    evolved = {k: v + 0.01 for k, v in projector.projector_state(model).items()}
    path = projector.save_projector(tmp_path / "projector.safetensors", evolved, projector.projector_prefix(model))

    report = exact_reprune(model, policy, path, calib)

    state = projector.projector_state(model)
    assert all(torch.equal(state[k], evolved[k]) for k in evolved)  # the searched projector is in place
    by_hand, _ = load_model(micro_model_dir)
    projector.set_projector_state(by_hand, evolved)
    expected = prune_model(by_hand, policy, "sparsegpt", calib, sequential=True, progress=False)
    assert report.equals(expected)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), by_hand.state_dict().values()))


def test_exact_reprune_without_a_projector_keeps_the_models_own(micro_model_dir, calib):
    model, _ = load_model(micro_model_dir)
    before = projector.projector_state(model)
    policy = Policy.uniform(list_units(model), 0.5)
    report = exact_reprune(model, policy, None, calib)
    assert all(torch.equal(projector.projector_state(model)[k], v) for k, v in before.items())
    assert set(report["target"]) == {0.5}
