"""OWL / ECoFLaP allocators and the grid rounding.

Budget tolerance: a policy on a grid with step ``g`` (0.1) cannot hit every mean exactly, so
:func:`allocate.round_to_grid` guarantees ``S <= S(pi) < S + g * max_u n_u / N`` (one grid step of the
largest unit); on the micro model that is ``0.1 * 13824 / 46080 = 0.03``.
"""

from __future__ import annotations

import pytest
import torch

from ellava_lib.core import policy, units
from ellava_lib.core.policy import DEFAULT_GRID, Policy
from ellava_lib.model.specs import load_model
from ellava_lib.prune import allocate, prune


def _budget_tol(sizes) -> float:
    return 0.1 * max(sizes.values()) / sum(sizes.values())


def _grid_floor(x: float) -> float:
    return max(g for g in DEFAULT_GRID if g <= x + 1e-9)


def _grid_ceil(x: float) -> float:
    return min((g for g in DEFAULT_GRID if g >= x - 1e-9), default=max(DEFAULT_GRID))


# ------------------------------------------------------------------------------------ pure functions


def test_round_to_grid_by_hand():
    sizes = {"a": 10, "b": 10}
    assert allocate.round_to_grid({"a": 0.55, "b": 0.55}, sizes, 0.55) == {"a": 0.6, "b": 0.5}
    # b has the larger remainder, so it is raised first; that already meets the budget
    assert allocate.round_to_grid({"a": 0.52, "b": 0.58}, sizes, 0.55) == {"a": 0.5, "b": 0.6}
    # the last raise goes to the unit that overshoots least (here: exactly on budget)
    big = {"a": 30, "b": 10}
    assert allocate.round_to_grid({"a": 0.51, "b": 0.57}, big, 0.525) == {"a": 0.5, "b": 0.6}
    # a big unit overshoots by at most one step of its weight
    out = allocate.round_to_grid({"a": 0.57, "b": 0.45}, big, 0.54)
    assert out == {"a": 0.6, "b": 0.4} and 0.54 <= policy.weighted_mean(out, big) < 0.54 + _budget_tol(big)


def test_owl_allocation_by_hand():
    sizes = {"a": 10, "b": 10}
    raw = allocate.owl_allocation({"a": 0.0, "b": 0.02}, sizes, 0.5, lam=0.08)
    assert raw == pytest.approx({"a": 0.58, "b": 0.42})  # more outliers -> lower sparsity
    flat = allocate.owl_allocation({"a": 0.01, "b": 0.01}, sizes, 0.5, lam=0.08)
    assert flat == pytest.approx({"a": 0.5, "b": 0.5})
    # unequal sizes: the shift makes the weighted mean exact, the clip keeps [S - lam, S + lam]
    skew = allocate.owl_allocation({"a": 0.0, "b": 0.01, "c": 0.02}, {"a": 1, "b": 1, "c": 8}, 0.6, lam=0.08)
    assert policy.weighted_mean(skew, {"a": 1, "b": 1, "c": 8}) == pytest.approx(0.6)
    assert all(0.52 - 1e-9 <= v <= 0.68 + 1e-9 for v in skew.values())


def test_ecoflap_allocation_by_hand():
    sizes = {"a": 100, "b": 100}
    assert allocate.ecoflap_allocation({"a": 1.0, "b": 1.0}, sizes, 0.5) == pytest.approx({"a": 0.5, "b": 0.5})
    # keep = floor + t * I: with I_b = 3 I_a, b keeps 0.2 + 3x and a 0.2 + x, x = 0.15
    out = allocate.ecoflap_allocation({"a": 1.0, "b": 3.0}, sizes, 0.5, floor=0.2)
    assert out == pytest.approx({"a": 0.65, "b": 0.35})
    # an unimportant unit sits at the floor (sparsity 1 - floor)
    out = allocate.ecoflap_allocation({"a": 0.0, "b": 1.0}, sizes, 0.5, floor=0.2)
    assert out["a"] == pytest.approx(0.8, abs=1e-4) and out["b"] == pytest.approx(0.2, abs=1e-4)
    with pytest.raises(ValueError, match="cap"):
        allocate.ecoflap_allocation({"a": 1.0, "b": 1.0}, sizes, 0.85, floor=0.2)


# ------------------------------------------------------------------------------- on the micro model


@pytest.mark.parametrize("S", [0.5, 0.6, 0.7])
def test_owl_policy_meets_budget_bounds_and_is_deterministic(micro_model, calib, S):
    model, _ = micro_model
    sizes = units.list_units(model)
    lam = 0.08
    p = allocate.owl_policy(model, calib, S, lam=lam)
    p.validate(sizes)
    assert S - 1e-9 <= p.mean_sparsity(sizes) < S + _budget_tol(sizes)
    raw = p.meta["continuous"]
    assert all(S - lam - 1e-9 <= raw[u] <= S + lam + 1e-9 for u in sizes)
    assert all(p.sparsities[u] in (_grid_floor(raw[u]), _grid_ceil(raw[u])) for u in sizes)
    ratios = p.meta["outlier_ratio"]
    order = sorted(sizes, key=lambda u: ratios[u])
    assert all(raw[a] >= raw[b] - 1e-9 for a, b in zip(order, order[1:]))  # more outliers, less pruning
    assert allocate.owl_policy(model, calib, S, lam=lam).sparsities == p.sparsities


@pytest.mark.parametrize("S", [0.5, 0.7])
def test_ecoflap_policy_meets_budget_bounds_and_is_deterministic(micro_model, calib, S):
    model, _ = micro_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sizes = units.list_units(model)
    p = allocate.ecoflap_policy(model, calib, S, floor=0.2, seed=0, draws=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored exactly
    p.validate(sizes)
    assert S - 1e-9 <= p.mean_sparsity(sizes) < S + _budget_tol(sizes)
    raw = p.meta["continuous"]
    assert all(0.0 <= raw[u] <= 0.8 + 1e-9 for u in sizes)
    assert all(p.sparsities[u] in (_grid_floor(raw[u]), _grid_ceil(raw[u])) for u in sizes)
    assert all(v > 0 for v in p.meta["importance"].values())
    again = allocate.ecoflap_policy(model, calib, S, floor=0.2, seed=0, draws=2)
    assert again.sparsities == p.sparsities and again.meta["importance"] == p.meta["importance"]


def test_magnitude_nm_leaves_dense_units_dense(micro_model_dir):
    model, _ = load_model(micro_model_dir)
    names = list(units.list_units(model))
    policy = Policy({u: (0.5 if i % 2 else 0.0) for i, u in enumerate(names)})
    report = prune.magnitude_prune(model, policy, prune_n=2, prune_m=4)
    dense = report[report["target"] == 0.0]
    assert len(dense) and (dense["measured"] == 0.0).all()
    assert (report.loc[report["target"] > 0, "measured"] == 0.5).all()


def test_owl_policy_off_the_grid_is_its_continuous_allocation(micro_model, calib):
    """What the sweep and `ellava prune --method owl` prune: OWL's own per-unit sparsities, mean exactly S."""
    model, _ = micro_model
    sizes = units.list_units(model)
    p = allocate.owl_policy(model, calib, 0.6, lam=0.08, on_grid=False)
    p.validate(sizes)
    assert p.sparsities == p.meta["continuous"]
    assert abs(p.mean_sparsity(sizes) - 0.6) < 1e-6
    assert len(set(round(v, 9) for v in p.sparsities.values())) > 1  # not uniform


def test_owl_rows_carry_a_revision_in_the_sweep_spec():
    from ellava_lib.run.sweep import Job, SweepSpec, spec_digest

    spec = SweepSpec("m")
    assert spec_digest(spec, Job("owl", 0.6)) != spec_digest(spec, Job("sparsegpt", 0.6))
    assert spec_digest(spec, Job("sparsegpt", 0.6)) == spec_digest(spec, Job("wanda", 0.6))
