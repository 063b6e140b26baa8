from __future__ import annotations

import pytest
import torch

from ellava_lib.core import units
from ellava_lib.core.policy import Policy
from ellava_lib.prune import prune


def test_units_cover_every_decoder_linear(micro_model):
    model, _ = micro_model
    u = units.list_units(model)
    n_layers = model.config.text_config.num_hidden_layers
    assert list(u) == [f"lm.{i}.{g}" for i in range(n_layers) for g in ("attn", "mlp")]
    lm_linears = [m for n, m in model.model.language_model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sum(u.values()) == sum(m.weight.numel() for m in lm_linears)
    with_vision = units.list_units(model, include_vision=True)
    assert list(with_vision)[0] == "vision.0.attn"
    assert len(with_vision) == len(u) + 2 * model.config.vision_config.num_hidden_layers
    comp = units.params_by_component(model)
    assert comp["total"] == sum(p.numel() for p in model.parameters())
    assert units.names_vision(with_vision) and not units.names_vision(u) and not units.names_vision([])
    assert [units.is_vision_unit(n) for n in ("vision.0.mlp", "lm.0.mlp", "lm.vision.x")] == [True, False, False]


@pytest.mark.parametrize("s", [0.0, 0.5, 0.7])
def test_magnitude_prune_hits_the_target_exactly(micro_model_dir, s):
    from ellava_lib.model.specs import load_model

    model, _ = load_model(micro_model_dir)
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = prune.magnitude_prune(model, Policy.uniform(units.list_units(model), s))
    for row in report.itertuples():
        assert abs(row.measured - s) <= 0.5 / row.params + 1e-9
    # only language-model linear weights change, and only by being zeroed
    for n, p in model.named_parameters():
        changed = p != before[n]
        if changed.any():
            assert "language_model.layers" in n and (p[changed] == 0).all()


def test_magnitude_prune_rejects_a_policy_for_another_model(micro_model_dir):
    from ellava_lib.model.specs import load_model

    model, _ = load_model(micro_model_dir)
    with pytest.raises(ValueError, match="lm.99.attn"):
        prune.magnitude_prune(model, Policy({"lm.99.attn": 0.5}))
