from __future__ import annotations

import math

import numpy as np
import pytest

from ellava_lib.search import gap as gaps

UNITS = {"lm.0.attn": 100, "lm.0.mlp": 100}  # L = 2 -> D = [1, 1/2]; C(dense) = 100 + 50 = 150


def dense(units):
    return {u: 0.0 for u in units}


# ------------------------------------------------------------------------------------- vapnik_bound


def test_vapnik_bound_by_hand():
    # h=10, n=1000, delta=0.05:
    # ln(2n/h) = ln(200) = 5.298317366548036 ; +1 -> 6.298317366548036 ; *10 -> 62.98317366548036
    # ln(4/delta) = ln(80) = 4.382026634673881 ; sum = 67.36520030015424 ; /1000 = 0.06736520030015424
    # sqrt -> 0.25954806934391605
    assert gaps.vapnik_bound(10, 1000, 0.05) == pytest.approx(0.25954806934391605, rel=1e-12)


@pytest.mark.parametrize(
    "h,n,delta",
    [(0, 100, 0.05), (-1, 100, 0.05), (10, 0, 0.05), (10, 100, 0.0), (10, 100, 1.0), (10, 100, -0.1),
     (200, 100, 0.05), (float("nan"), 100, 0.05)],
)
def test_vapnik_bound_bad_input(h, n, delta):
    with pytest.raises(ValueError):
        gaps.vapnik_bound(h, n, delta)


# ----------------------------------------------------------------------------------- capacity pieces


def test_effective_depth_weights():
    assert gaps.effective_depth_weights(4) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert gaps.effective_depth_weights(3, depth_decay=0.0) == [1.0, 1.0, 1.0]
    assert gaps.effective_depth_weights(1) == [1.0]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError):
            gaps.effective_depth_weights(bad)
    with pytest.raises(ValueError):
        gaps.effective_depth_weights(3, depth_decay=-1.0)


def test_effective_capacity_by_hand():
    assert gaps.effective_capacity(UNITS, dense(UNITS)) == pytest.approx(150.0)
    # prune unit 0 by 0.5: 1 * 100 * 0.5 + 0.5 * 100 * 1 = 100
    assert gaps.effective_capacity(UNITS, {"lm.0.attn": 0.5, "lm.0.mlp": 0.0}) == pytest.approx(100.0)
    # prune unit 1 by 0.5: 1 * 100 * 1 + 0.5 * 100 * 0.5 = 125
    assert gaps.effective_capacity(UNITS, {"lm.0.attn": 0.0, "lm.0.mlp": 0.5}) == pytest.approx(125.0)
    # depth_decay = 0: plain nonzero-weight count 50 + 100
    assert gaps.effective_capacity(UNITS, {"lm.0.attn": 0.5, "lm.0.mlp": 0.0}, depth_decay=0.0) == 150.0


def test_earlier_units_count_more():
    units = {f"lm.{i}.mlp": 1000 for i in range(6)}
    first = dict(dense(units), **{"lm.0.mlp": 0.5})
    last = dict(dense(units), **{"lm.5.mlp": 0.5})
    c_dense = gaps.effective_capacity(units, dense(units))
    assert c_dense - gaps.effective_capacity(units, first) > c_dense - gaps.effective_capacity(units, last)
    assert gaps.capacity_gap(units, first, n=1000) < gaps.capacity_gap(units, last, n=1000)


def test_capacity_gap_dense_is_h_scale():
    for h_scale in (5.0, 100.0):
        assert gaps.capacity_gap(UNITS, dense(UNITS), n=500, h_scale=h_scale) == pytest.approx(
            gaps.vapnik_bound(h_scale, 500, 0.05)
        )
    # default h_scale = 100 -> h = 100
    assert gaps.capacity_gap(UNITS, dense(UNITS), n=500, delta=0.1) == pytest.approx(gaps.vapnik_bound(100, 500, 0.1))
    # h for a pruned policy: 100/150 * 100
    g = gaps.capacity_gap(UNITS, {"lm.0.attn": 0.5, "lm.0.mlp": 0.0}, n=500)
    assert g == pytest.approx(gaps.vapnik_bound(100.0 / 150.0 * 100.0, 500, 0.05))


def test_capacity_gap_monotone_in_sparsity():
    units = {f"vision.{i}.mlp": 10 * (i + 1) for i in range(4)} | {"lm.0.attn": 40, "lm.0.mlp": 80}
    bounds = [gaps.capacity_gap(units, {u: s for u in units}, n=1000) for s in np.linspace(0.0, 0.9, 10)]
    assert all(a > b for a, b in zip(bounds, bounds[1:]))
    # raising one unit's sparsity also lowers the gap
    base = dense(units)
    for u in units:
        assert gaps.capacity_gap(units, dict(base, **{u: 0.3}), n=1000) < gaps.capacity_gap(units, base, n=1000)


def test_capacity_gap_bad_input():
    with pytest.raises(ValueError, match="missing"):
        gaps.capacity_gap(UNITS, {"lm.0.attn": 0.0}, n=100)
    with pytest.raises(ValueError, match="unknown"):
        gaps.capacity_gap(UNITS, dict(dense(UNITS), extra=0.1), n=100)
    with pytest.raises(ValueError, match="sparsity"):
        gaps.capacity_gap(UNITS, {"lm.0.attn": 1.5, "lm.0.mlp": 0.0}, n=100)
    with pytest.raises(ValueError, match="parameter count"):
        gaps.capacity_gap({"a": 0}, {"a": 0.0}, n=100)
    with pytest.raises(ValueError, match="empty"):
        gaps.capacity_gap({}, {}, n=100)
    with pytest.raises(ValueError, match="capacity is 0"):
        gaps.capacity_gap(UNITS, {"lm.0.attn": 1.0, "lm.0.mlp": 1.0}, n=100)
    with pytest.raises(ValueError, match="h_scale"):
        gaps.capacity_gap(UNITS, dense(UNITS), n=100, h_scale=0.0)
    with pytest.raises(ValueError, match="delta"):
        gaps.capacity_gap(UNITS, dense(UNITS), n=1000, delta=1.0)
    with pytest.raises(ValueError, match=r"n \(number of samples\)"):
        gaps.capacity_gap(UNITS, dense(UNITS), n=0)
    with pytest.raises(ValueError, match="2n"):  # h = 100 >= 2n = 20
        gaps.capacity_gap(UNITS, dense(UNITS), n=10)


# ----------------------------------------------------------------------------------- bernstein_gap


def test_bernstein_by_hand():
    # losses [0,1,0,1]: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3 ; ln(2/0.05) = ln(40) = 3.6888794541139363
    # sqrt(2 * (1/3) * 3.68888 / 4) = sqrt(0.6148132423523227) = 0.7841002756996854
    # 7 * 3.68888 / (3 * 3) = 2.869128464310839 ; total 3.6532287400105243
    assert gaps.bernstein_gap([0, 1, 0, 1]) == pytest.approx(3.6532287400105243, rel=1e-12)
    # constant losses: variance 0 -> only the range term 7 ln(40) / (3 * 4)
    assert gaps.bernstein_gap([0.3] * 5) == pytest.approx(7 * math.log(40) / 12, rel=1e-12)


def test_bernstein_loss_range_scales_linearly():
    # losses in [0, 2]: gap = 2 * gap of the [0, 1]-scaled losses
    assert gaps.bernstein_gap([0, 2, 0, 2], loss_range=2.0) == pytest.approx(2 * gaps.bernstein_gap([0, 1, 0, 1]))
    # shift-invariant: losses in [5, 7]
    assert gaps.bernstein_gap([5, 7, 5, 7], loss_range=2.0) == pytest.approx(2 * gaps.bernstein_gap([0, 1, 0, 1]))


def test_bernstein_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = gaps.bernstein_gap(rng.uniform(size=50))
    large = gaps.bernstein_gap(rng.uniform(size=5000))
    assert large < small


@pytest.mark.parametrize(
    "losses,kw",
    [([0.5], {}), ([], {}), ([0, 1], {"delta": 0.0}), ([0, 1], {"delta": 1.2}), ([0, 2], {}),
     ([0, float("nan")], {}), ([[0, 1], [1, 0]], {}), ([0, 1], {"loss_range": 0.0})],
)
def test_bernstein_bad_input(losses, kw):
    with pytest.raises(ValueError):
        gaps.bernstein_gap(losses, **kw)


# ----------------------------------------------------------------------------- registry / objective


def test_gap_dispatch():
    assert set(gaps.GAP_ESTIMATORS) == {"none", "capacity", "bernstein"}
    assert gaps.gap("none", units=UNITS, sparsities=dense(UNITS), losses=[0, 1], n=2, delta=0.05) == 0.0
    assert gaps.gap("none") == 0.0
    assert gaps.gap("capacity", units=UNITS, sparsities=dense(UNITS), n=1000, delta=0.05, h_scale=10.0) == (
        pytest.approx(gaps.vapnik_bound(10.0, 1000, 0.05))
    )
    assert gaps.gap("bernstein", losses=[0, 1, 0, 1], n=4) == pytest.approx(3.6532287400105243)
    assert gaps.gap("bernstein", losses=[0, 2, 0, 2], loss_range=2.0) == pytest.approx(2 * 3.6532287400105243)


def test_gap_errors():
    with pytest.raises(ValueError, match="bernstein, capacity, none"):
        gaps.gap("vc")
    with pytest.raises(ValueError, match="losses"):
        gaps.gap("bernstein", units=UNITS, n=10)
    with pytest.raises(ValueError, match="disagrees"):
        gaps.gap("bernstein", losses=[0, 1, 0], n=4)
    with pytest.raises(ValueError, match="units"):
        gaps.gap("capacity", n=10)


def test_objective():
    assert gaps.objective(0.2, 0.5, 0.1) == pytest.approx(0.25)
    assert gaps.objective(0.2, 0.5, 0.0) == 0.2
    with pytest.raises(ValueError):
        gaps.objective(0.2, 0.5, -1.0)
    with pytest.raises(ValueError):
        gaps.objective(float("nan"), 0.5, 1.0)
    with pytest.raises(ValueError):
        gaps.objective(0.2, -0.5, 1.0)
