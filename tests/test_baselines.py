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
    """luuyin/OWL: a_l = (D_l - min) / (max - min) * 2 lam, s_l = S + mean(a) - a_l (one value per layer)."""
    sizes = {"a": 10, "b": 10}
    raw = allocate.owl_allocation({"a": 0.0, "b": 0.02}, sizes, 0.5, lam=0.08)
    assert raw == pytest.approx({"a": 0.58, "b": 0.42})  # more outliers -> lower sparsity
    flat = allocate.owl_allocation({"a": 0.01, "b": 0.01}, sizes, 0.5, lam=0.08)
    assert flat == pytest.approx({"a": 0.5, "b": 0.5})
    # unequal sizes: a = (0, .08, .16), weighted mean(a) = 1.36 / 10, so c = 0.736 (no clip: OWL has none)
    skew = allocate.owl_allocation({"a": 0.0, "b": 0.01, "c": 0.02}, {"a": 1, "b": 1, "c": 8}, 0.6, lam=0.08)
    assert skew == pytest.approx({"a": 0.736, "b": 0.656, "c": 0.576})
    assert policy.weighted_mean(skew, {"a": 1, "b": 1, "c": 8}) == pytest.approx(0.6)


def test_owl_allocation_is_per_layer():
    """Both units of a decoder layer get the layer's sparsity; the layer ratio pools its units by size."""
    sizes = {"lm.0.attn": 1, "lm.0.mlp": 3, "lm.1.attn": 1, "lm.1.mlp": 3}
    ratios = {"lm.0.attn": 0.0, "lm.0.mlp": 0.04, "lm.1.attn": 0.0, "lm.1.mlp": 0.0}  # D_0 = 0.03, D_1 = 0
    raw = allocate.owl_allocation(ratios, sizes, 0.5, lam=0.08)
    assert raw == pytest.approx({"lm.0.attn": 0.42, "lm.0.mlp": 0.42, "lm.1.attn": 0.58, "lm.1.mlp": 0.58})


def test_ecoflap_allocation_by_hand():
    """ylsung/ECoFLaP: every block keeps n_B (1 - s_max), s_max = S + 0.1, the rest in proportion to I_B."""
    sizes = {"a": 100, "b": 100}
    assert allocate.ecoflap_allocation({"a": 1.0, "b": 1.0}, sizes, 0.5) == pytest.approx({"a": 0.5, "b": 0.5})
    # keep = 0.4 + t * I / n: with I_b = 3 I_a, a keeps 0.4 + x and b 0.4 + 3x, x = 0.05
    out = allocate.ecoflap_allocation({"a": 1.0, "b": 3.0}, sizes, 0.5)
    assert out == pytest.approx({"a": 0.55, "b": 0.45})
    # an unimportant block sits at the cap s_max = S + 0.1
    out = allocate.ecoflap_allocation({"a": 0.0, "b": 1.0}, sizes, 0.5)
    assert out["a"] == pytest.approx(0.6, abs=1e-4) and out["b"] == pytest.approx(0.4, abs=1e-4)
    # the cap is clipped to the grid's top level
    out = allocate.ecoflap_allocation({"a": 0.0, "b": 1.0}, sizes, 0.85)
    assert out["a"] == pytest.approx(0.9, abs=1e-4) and out["b"] == pytest.approx(0.8, abs=1e-4)
    assert allocate.ecoflap_cap() == 0.9
    with pytest.raises(ValueError, match="grid range"):
        allocate.ecoflap_allocation({"a": 1.0, "b": 1.0}, sizes, 0.95)


def test_ecoflap_allocation_is_per_block():
    """The block score is the sum of its units' scores (``_sum``); both units get the block's sparsity."""
    sizes = {"lm.0.attn": 50, "lm.0.mlp": 50, "lm.1.attn": 50, "lm.1.mlp": 50}
    imp = {"lm.0.attn": 1.5, "lm.0.mlp": 0.5, "lm.1.attn": 0.25, "lm.1.mlp": 0.75}  # I_0 = 2, I_1 = 1
    out = allocate.ecoflap_allocation(imp, sizes, 0.5)
    # keep_0 = 0.4 + 2x, keep_1 = 0.4 + x, mean 0.5 -> x = 0.2 / 3
    assert out["lm.0.attn"] == out["lm.0.mlp"] == pytest.approx(1 - 0.4 - 0.4 / 3)
    assert out["lm.1.attn"] == out["lm.1.mlp"] == pytest.approx(1 - 0.4 - 0.2 / 3)


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
    assert max(raw.values()) - min(raw.values()) <= 2 * lam + 1e-9  # OWL's range 2 lam
    assert all(raw[f"lm.{i}.attn"] == raw[f"lm.{i}.mlp"] for i in range(len(sizes) // 2))  # one per layer
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
    p = allocate.ecoflap_policy(model, calib, S, seed=0, draws=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored exactly
    p.validate(sizes)
    assert S - 1e-9 <= p.mean_sparsity(sizes) < S + _budget_tol(sizes)
    raw = p.meta["continuous"]
    assert all(0.0 <= raw[u] <= S + 0.1 + 1e-9 for u in sizes)  # ECoFLaP's cap S + 0.1
    assert all(p.sparsities[u] in (_grid_floor(raw[u]), _grid_ceil(raw[u])) for u in sizes)
    assert all(v > 0 for v in p.meta["importance"].values())
    again = allocate.ecoflap_policy(model, calib, S, seed=0, draws=2)
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
    from ellava_lib.run.jobs import Job, SweepSpec, spec_digest

    spec = SweepSpec("m")
    assert spec_digest(spec, Job("owl", 0.6)) != spec_digest(spec, Job("sparsegpt", 0.6))
    # sparsegpt (no revision) differs from magnitude only in reading statistics on the statistic rows
    assert spec_digest(spec, Job("sparsegpt", 0.6)) != spec_digest(spec, Job("magnitude", 0.6))
    assert spec_digest(spec, Job("wanda", 0.6)) != spec_digest(spec, Job("magnitude", 0.6))


def test_ecoflap_importance_in_batches_of_rows(micro_model, calib, monkeypatch):
    """``loader_batch = 2`` over 5 samples: per weight matrix and per sign, three forwards of 2, 2 and 1 rows (the
    calibration loader's batches; batch by batch, every matrix of a batch before the next batch), instead of
    five one-row forwards; with a loss that ignores the weights the finite differences, hence every importance,
    are 0; ``batch = 1`` is the one-row estimator as before."""
    model, _ = micro_model
    n_linears = sum(len(lins) for lins in units.unit_linears(model).values())
    seen: list[int] = []
    monkeypatch.setattr(allocate, "calibration_loss", lambda m, b: seen.append(b["input_ids"].shape[0]) or 1.5)
    monkeypatch.setattr(allocate, "_suffix_loss", lambda m, inputs, start, labels: seen.append(labels.shape[0]) or 1.5)
    scores = allocate.zeroth_order_importance(model, calib, samples=5, loader_batch=2)
    assert seen == [2] * 2 * n_linears + [2] * 2 * n_linears + [1] * 2 * n_linears
    assert set(scores.values()) == {0.0}
    seen.clear()
    allocate.zeroth_order_importance(model, calib, samples=3)
    assert seen == [1] * 6 * n_linears
    with pytest.raises(ValueError, match="loader batch must be >= 1"):
        allocate.zeroth_order_importance(model, calib, loader_batch=0)


def _full_forward_importance(model, calib, unit_names, eps, draws, seed, include_vision, samples, loader_batch):
    """The ECoFLaP estimator restated with a full model forward (:func:`losses.calibration_loss`) per loss, for
    the units ``unit_names`` only: matrix by matrix, batch by batch, draw by draw, one generator per unit."""
    from ellava_lib.model.losses import calibration_loss

    order = list(units.unit_linears(model, include_vision).items())
    n = min(samples, calib["input_ids"].shape[0])
    rows = [allocate._rows(calib, b, min(b + loader_batch, n)) for b in range(0, n, loader_batch)]
    out = {}
    with torch.no_grad():
        for k, (unit, lins) in enumerate(order):
            if unit not in unit_names:
                continue
            gen = torch.Generator().manual_seed(seed * 100003 + 1009 * k)
            total = 0.0
            for lin in lins.values():
                dense = lin.weight.detach().clone()
                for row in rows:
                    acc = 0.0
                    for _ in range(draws):
                        z = torch.randn(dense.shape, generator=gen).to(dense)
                        lin.weight.copy_(dense + eps * z)
                        up = calibration_loss(model, row)
                        lin.weight.copy_(dense - eps * z)
                        down = calibration_loss(model, row)
                        acc += abs(up - down) / (2 * eps)
                    total += abs(acc)
                lin.weight.copy_(dense)
            out[unit] = total
    return out


@pytest.mark.parametrize("include_vision", [False, True])
def test_ecoflap_importance_equals_full_forwards(micro_model, calib, include_vision):
    """A language-model matrix's losses run from its own block on the dense model's captured block inputs: the
    importances are those of full forwards, bitwise (CPU, fp32), for the first, a middle and the last block,
    with two draws per batch and loader batches of 2, 2 and 1 rows; vision units (full forwards) too. The dense
    weights are back bitwise afterwards."""
    model, _ = micro_model
    names = list(units.unit_linears(model, include_vision))
    lm = [u for u in names if u.startswith("lm.")]
    check = [lm[0], lm[len(lm) // 2 + 1], lm[-1]] + ([names[1]] if include_vision else [])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(eps=1e-3, draws=2, seed=3, include_vision=include_vision, samples=5, loader_batch=2)
    fast = allocate.zeroth_order_importance(model, calib, **kw)
    assert list(fast) == names
    ref = _full_forward_importance(model, calib, check, **kw)
    assert all(ref[u] > 0 for u in check)
    assert {u: fast[u] for u in check} == ref  # bitwise
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
