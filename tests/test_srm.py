from __future__ import annotations

import math

import numpy as np
import pytest
import torch

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


def test_capacity_gap_is_normalised_to_dense():
    for h_scale in (5.0, 100.0):
        assert gaps.capacity_gap(UNITS, dense(UNITS), n=500, h_scale=h_scale) == pytest.approx(1.0, rel=1e-12)
    # h for a pruned policy: 100/150 * 100, divided by the dense value V(100, 500)
    g = gaps.capacity_gap(UNITS, {"lm.0.attn": 0.5, "lm.0.mlp": 0.0}, n=500)
    assert g == pytest.approx(gaps.vapnik_bound(100.0 / 150.0 * 100.0, 500, 0.05) / gaps.vapnik_bound(100, 500, 0.05))
    # by hand: h = 66.667, n = 500: ln(1000/66.667) = ln 15 = 2.70805 ; (3.70805 * 66.667 + ln 80) / 500
    #   = (247.2036 + 4.38203) / 500 = 0.503171 -> sqrt 0.709346 ; dense h = 100: ln 10 = 2.302585,
    #   (330.2585 + 4.38203) / 500 = 0.669281 -> sqrt 0.818096 ; ratio 0.867069
    assert g == pytest.approx(0.867069, abs=2e-6)


def test_capacity_move_changes_g_by_at_most_the_documented_bound():
    # 12 equal units (as the ci model): move 0.1 of sparsity from the last unit to the first, from uniform 0.6
    units = {f"lm.{i // 2}.{'attn' if i % 2 == 0 else 'mlp'}": 1000 for i in range(12)}
    n, h_scale, ds = 64, 64.0, 0.1
    uniform = {u: 0.6 for u in units}
    moved = dict(uniform, **{"lm.0.attn": 0.7, "lm.5.mlp": 0.5})
    g0, g1 = (gaps.capacity_gap(units, p, n=n, h_scale=h_scale) for p in (uniform, moved))
    c_dense = gaps.effective_capacity(units, dense(units))
    c0, c1 = (gaps.effective_capacity(units, p) / c_dense for p in (uniform, moved))
    assert abs(c1 - c0) <= ds * 1000 / c_dense  # |dc| <= ds * max(n_u, n_v) / C(dense)
    bound = gaps.capacity_move_bound(ds * 1000 / c_dense, min(c0, c1) * h_scale, n, 0.05, h_scale)
    assert 0 < abs(g1 - g0) <= bound
    assert g1 < g0  # sparsity moved into the earlier unit still lowers the capacity (Bartlett et al.)
    assert bound < 0.02  # a 0.1 move changes the dense-normalised G by under 2% of its dense value


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
    # variance term sqrt(2 * (1/3) * 3.68888 / 4) = sqrt(0.6148132423523227) = 0.7841002756996854
    assert gaps.bernstein_gap([0, 1, 0, 1]) == pytest.approx(0.7841002756996854, rel=1e-12)
    # constant losses: variance 0 -> no gap (the policy-independent range term is not part of G)
    assert gaps.bernstein_gap([0.3] * 5) == 0.0
    # shift-invariant, scales with the losses
    assert gaps.bernstein_gap([5, 7, 5, 7]) == pytest.approx(2 * 0.7841002756996854, rel=1e-12)


def test_bernstein_bound_by_hand():
    # full bound, observed range 1: 0.7841002756996854 + 7 * 1 * ln 40 / (3 * 3) = 0.78410 + 2.869128464310839
    assert gaps.bernstein_bound([0, 1, 0, 1]) == pytest.approx(3.6532287400105243, rel=1e-12)
    # an a-priori range b - a = 2: range term doubles
    assert gaps.bernstein_bound([0, 1, 0, 1], loss_range=2.0) == pytest.approx(
        0.7841002756996854 + 2 * 2.869128464310839, rel=1e-12)
    assert gaps.bernstein_bound([0.3] * 5) == 0.0  # observed range 0, variance 0
    with pytest.raises(ValueError, match="loss_range"):
        gaps.bernstein_bound([0, 2], loss_range=1.0)


def test_bernstein_gap_does_not_carry_a_constant():
    # two policies with the same variance but different means: same G, so J ranks them by R_hat only
    a, b = [0.01, 0.03, 0.01, 0.03], [0.11, 0.13, 0.11, 0.13]
    assert gaps.bernstein_gap(a) == pytest.approx(gaps.bernstein_gap(b), rel=1e-9)
    assert gaps.bernstein_gap(a) == pytest.approx(0.01 * 2 * 0.7841002756996854, rel=1e-9)


def test_bernstein_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = gaps.bernstein_gap(rng.uniform(size=50))
    large = gaps.bernstein_gap(rng.uniform(size=5000))
    assert large < small


@pytest.mark.parametrize(
    "losses,kw",
    [([0.5], {}), ([], {}), ([0, 1], {"delta": 0.0}), ([0, 1], {"delta": 1.2}),
     ([0, float("nan")], {}), ([[0, 1], [1, 0]], {}), (None, {})],
)
def test_bernstein_bad_input(losses, kw):
    with pytest.raises(ValueError):
        gaps.bernstein_gap(losses, **kw)
    with pytest.raises(ValueError):
        gaps.bernstein_bound(losses, **kw)


# ---------------------------------------------------------------------------------------- norm_gap


def test_norm_gap_by_hand():
    # unit a: n = 8, ||W(s)||^2 = 2.0, ||W(s) - W||^2 = 0.25 -> x = 1/8, (n x)^(1/3) = 1
    # unit b: n = 27, ||W(s)||^2 = 2.7, ||W(s) - W||^2 = 0.8 -> x = 8/27, (n x)^(1/3) = 2
    # sum_u n_u^(1/3) = 2 + 3 = 5 ; G = (3 / 5)^(3/2) / sqrt(16) = 0.1161895003862225
    units, norm_sq, dist_sq = {"a": 8, "b": 27}, {"a": 2.0, "b": 2.7}, {"a": 0.25, "b": 0.8}
    assert gaps.relative_distances(norm_sq, dist_sq) == pytest.approx({"a": 0.125, "b": 8 / 27}, abs=1e-15)
    assert gaps.norm_gap(units, norm_sq, dist_sq, 16) == pytest.approx(0.1161895003862225, abs=1e-9)
    assert gaps.norm_gap(units, norm_sq, dist_sq, 16, scale=2.0) == pytest.approx(0.232379000772445, abs=1e-9)
    # the dense network (no distance): 0 ; every unit at the same x: sqrt(x / n)
    assert gaps.norm_gap(units, norm_sq, {"a": 0.0, "b": 0.0}, 16) == 0.0
    assert gaps.norm_gap(units, {"a": 4.0, "b": 1.0}, {"a": 1.0, "b": 0.25}, 16) == pytest.approx(0.125, abs=1e-12)


def _gaussian_magnitude_table(seed: int, shape=(256, 256), levels=(0.0, 0.3, 0.6, 0.9)):
    """``{level: (||W(s)||^2, ||W(s) - W||^2)}`` of an i.i.d. Gaussian matrix magnitude-pruned at each level."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = {}
    for s in levels:
        k = round(s * w.numel())
        kept = w if k == 0 else w * (w.abs() > w.abs().flatten().kthvalue(k).values)
        out[s] = (float(kept.pow(2).sum()), float((kept - w).pow(2).sum()))
    return out


def test_norm_gap_does_not_reward_uneven_allocations_of_gaussian_weights():
    """Two units of 256 x 256 i.i.d. Gaussian weights, magnitude pruned, budget 0.6 either way: 0.6 / 0.6 has the
    smaller gap than 0.3 / 0.9 (G sqrt(n) = 0.384 vs 0.543 at seeds 0, 1), unlike the geometric-mean norm ratio of
    gap_revision 1 (0.6 / 0.6: 0.622, 0.3 / 0.9: 0.540 at n = 16)."""
    tables = {"a": _gaussian_magnitude_table(0), "b": _gaussian_magnitude_table(1)}
    units = {"a": 256 * 256, "b": 256 * 256}

    def g(sa, sb):
        return gaps.gap("norm", units=units, sparsities={"a": sa, "b": sb}, n=16, weight_sq=tables)

    def old(sa, sb):  # gap_revision 1: (sqrt(2 ln 2 L) + 1) / sqrt(n) * geometric mean of ||W * M|| / ||W||
        rho = [math.sqrt(tables[u][s][0] / tables[u][0.0][0]) for u, s in (("a", sa), ("b", sb))]
        return (math.sqrt(2 * math.log(2) * 2) + 1) / 4 * math.sqrt(rho[0] * rho[1])

    even, uneven = g(0.6, 0.6), g(0.3, 0.9)
    assert even == pytest.approx(0.384 / 4, abs=5e-4) and uneven == pytest.approx(0.543 / 4, abs=5e-4)
    assert uneven > 1.3 * even
    assert g(0.9, 0.3) > even
    assert old(0.3, 0.9) < old(0.6, 0.6)  # what revision 1 did: it preferred the uneven allocation
    assert old(0.6, 0.6) == pytest.approx(0.622, abs=1e-3) and old(0.3, 0.9) == pytest.approx(0.540, abs=1e-3)


def test_norm_gap_grows_with_every_units_distance_and_shrinks_with_n():
    units = {f"u{i}": 10 * (i + 1) for i in range(5)}
    norm_sq = {u: float(i + 1) for i, u in enumerate(units)}
    dist_sq = {u: 0.1 * p for u, p in norm_sq.items()}
    g0 = gaps.norm_gap(units, norm_sq, dist_sq, 64)
    for u in units:
        assert gaps.norm_gap(units, norm_sq, dict(dist_sq, **{u: 0.2 * norm_sq[u]}), 64) > g0
        assert gaps.norm_gap(units, dict(norm_sq, **{u: 0.5 * norm_sq[u]}), dist_sq, 64) > g0
    assert gaps.norm_gap(units, norm_sq, dist_sq, 256) == pytest.approx(g0 / 2, rel=1e-12)  # and in n


def test_norm_gap_through_level_table_and_registry():
    table = {"a": {0.0: (4.0, 0.0), 0.5: (2.0, 0.25), 0.7: (1.0, 0.5)},
             "b": {0.0: (9.0, 0.0), 0.5: (2.7, 0.8), 0.7: (2.0, 1.0)}}
    sp = {"a": 0.5, "b": 0.5}
    assert gaps.level_norms(table, sp) == ({"a": 2.0, "b": 2.7}, {"a": 0.25, "b": 0.8})
    units = {"a": 8, "b": 27}
    assert gaps.gap("norm", units=units, sparsities=sp, n=16, weight_sq=table) == pytest.approx(
        0.1161895003862225, abs=1e-9)
    # further from the dense weights in a unit: higher G
    assert gaps.gap("norm", units=units, sparsities={"a": 0.7, "b": 0.5}, n=16, weight_sq=table) > 0.1161895003862225
    assert gaps.gap("norm", units=units, sparsities={"a": 0.0, "b": 0.0}, n=16, weight_sq=table) == 0.0
    with pytest.raises(ValueError, match="level 0.3"):
        gaps.level_norms(table, {"a": 0.3, "b": 0.5})
    with pytest.raises(ValueError, match="weight_sq"):
        gaps.gap("norm", units=units, sparsities=sp, n=16)
    with pytest.raises(ValueError, match="parameter counts"):
        gaps.gap("norm", units={"a": 8}, sparsities=sp, n=16, weight_sq=table)


@pytest.mark.parametrize(
    "units,norm_sq,dist_sq,n",
    [({"a": 1}, {"a": 1.0}, {"a": 0.0}, 0), ({"a": 1}, {"a": 0.0}, {"a": 0.5}, 4),
     ({"a": 1}, {"a": 1.0}, {"a": -1.0}, 4), ({"a": 1}, {"a": 1.0}, {"b": 1.0}, 4), ({}, {}, {}, 4),
     ({"b": 1}, {"a": 1.0}, {"a": 0.1}, 4), ({"a": 0}, {"a": 1.0}, {"a": 0.1}, 4),
     ({"a": 1}, {"a": float("nan")}, {"a": 0.1}, 4), ({"a": 1}, {"a": 1.0}, {"a": float("inf")}, 4)],
)
def test_norm_gap_bad_input(units, norm_sq, dist_sq, n):
    with pytest.raises(ValueError):
        gaps.norm_gap(units, norm_sq, dist_sq, n)


# ----------------------------------------------------------------------------------- select_lambda


def test_select_lambda_by_hand():
    r_search = [0.10, 0.12, 0.20]
    g = [1.00, 0.50, 0.00]
    r_select = [0.30, 0.15, 0.25]
    # lambda 0: J = r_search -> i 0 (r_select 0.30); lambda 0.1: J = .20, .17, .20 -> i 1 (0.15);
    # lambda 1: J = 1.10, .62, .20 -> i 2 (0.25). Best r_select: 0.15 at lambda 0.1.
    assert gaps.select_lambda(r_search, g, r_select, [0.0, 0.1, 1.0]) == (0.1, 1)
    # order of the grid does not matter
    assert gaps.select_lambda(r_search, g, r_select, [1.0, 0.1, 0.0]) == (0.1, 1)
    # ties in r_select: the smaller lambda (lambda 0.1 picks i 1, lambda 1 picks i 2, both r_select 0.15)
    assert gaps.select_lambda(r_search, g, [0.3, 0.15, 0.15], [1.0, 0.1]) == (0.1, 1)
    # ties in J: lowest index (exact binary floats; lambda 0.5: J = 1.0, 1.0, 1.0 -> i 0)
    assert gaps.select_lambda([0.5, 0.75, 1.0], [1.0, 0.5, 0.0], [0.3, 0.1, 0.2], [0.5]) == (0.5, 0)
    # one candidate
    assert gaps.select_lambda([1.0], [2.0], [3.0], [0.0, 1.0]) == (0.0, 0)


def test_lambda_grid_scales_to_the_spread_of_the_risk():
    # spread R = 1.5 - 1.0 = 0.5, spread G = 0.3 - 0.1 = 0.2: lambda = c * 2.5 for c = 0.5, 1, 2, and 0
    grid = gaps.lambda_grid([1.0, 1.2, 1.5], [0.1, 0.3, 0.2], (0.5, 1.0, 2.0))
    assert grid == pytest.approx((0.0, 1.25, 2.5, 5.0), rel=1e-12, abs=0)
    assert gaps.lambda_grid([1.0, 1.2, 1.5], [0.1, 0.3, 0.2], (2.0, 0.0, 0.5, 1.0)) == grid  # 0 and order: no change
    # a gap (or a risk) that does not tell the candidates apart: no lambda but 0
    assert gaps.lambda_grid([1.0, 1.2, 1.5], [0.2, 0.2, 0.2], (0.5, 1.0, 2.0)) == (0.0,)
    assert gaps.lambda_grid([1.0, 1.0], [0.1, 0.3], (1.0,)) == (0.0,)
    assert gaps.lambda_grid([1.0], [0.1], (1.0,)) == (0.0,)
    # the default multipliers: a quarter to four times the spread of R_hat, x2 apart
    assert gaps.DEFAULT_LAM_SCALES == (0.25, 0.5, 1.0, 2.0, 4.0)
    assert gaps.lambda_grid([0.0, 1.0], [0.0, 4.0], gaps.DEFAULT_LAM_SCALES) == (0.0, 0.0625, 0.125, 0.25, 0.5, 1.0)
    for args, match in ((([1.0, 2.0], [0.1], (1.0,)), "equal lengths"), (([1.0], [0.1], (-1.0,)), ">= 0"),
                        (([1.0, float("nan")], [0.1, 0.2], (1.0,)), "NaN"), (([], [], (1.0,)), "non-empty")):
        with pytest.raises(ValueError, match=match):
            gaps.lambda_grid(*args)


@pytest.mark.parametrize(
    "args,match",
    [(([0.1, 0.2], [1.0], [0.1, 0.2], [0.0]), "equal lengths"),
     (([], [], [], [0.0]), "non-empty"),
     (([0.1], [1.0], [0.1], []), "non-empty"),
     (([0.1], [1.0], [0.1], [-0.1]), ">= 0"),
     (([0.1], [float("nan")], [0.1], [0.0]), "NaN or inf"),
     (([0.1], [1.0], [0.1], [float("inf")]), "NaN or inf"),
     (([0.1], [1.0], ["x"], [0.0]), "sequence of numbers")],
)
def test_select_lambda_bad_input(args, match):
    with pytest.raises(ValueError, match=match) as err:
        gaps.select_lambda(*args)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- registry / objective


def test_gap_dispatch():
    assert set(gaps.GAP_ESTIMATORS) == {"none", "capacity", "bernstein", "norm"}
    assert gaps.gap("none", units=UNITS, sparsities=dense(UNITS), losses=[0, 1], n=2, delta=0.05) == 0.0
    assert gaps.gap("none") == 0.0
    assert gaps.gap("capacity", units=UNITS, sparsities=dense(UNITS), n=1000, delta=0.05, h_scale=10.0) == (
        pytest.approx(1.0)
    )
    assert gaps.gap("bernstein", losses=[0, 1, 0, 1], n=4) == pytest.approx(0.7841002756996854)
    assert gaps.gap("bernstein", losses=[0, 2, 0, 2]) == pytest.approx(2 * 0.7841002756996854)


def test_gap_errors():
    with pytest.raises(ValueError, match="bernstein, capacity, none, norm"):
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
