"""Generalization-gap estimators for the SRM objective ``J(pi) = R_hat(pi) + lambda * G_hat(pi)``.

Four estimators share one interface (:func:`gap`, registry :data:`GAP_ESTIMATORS`):

* ``"none"``      -- ``G_hat = 0`` (plain empirical-risk pruning search).
* ``"norm"``      -- the paper's kind of term: a norm-based complexity bound on the weights the pruned model will
  have (Bartlett, Foster & Telgarsky 2017, spectral complexity with the dense weights as reference matrices, in
  Frobenius norms): a size-weighted mean of how far pruning moved each unit's stored (OBS-updated) weights from
  the dense ones (:func:`norm_gap`). 0 for the dense model; at a fixed budget it does not favour uneven
  allocations of i.i.d. Gaussian weights under magnitude pruning.
* ``"capacity"``  -- Vapnik's VC bound evaluated at a normalized, depth-weighted capacity of the pruned
  network (Bartlett, Harvey, Liaw & Mehrabian 2019), divided by its dense value (:func:`capacity_gap`).
* ``"bernstein"`` -- the policy-dependent (sample-variance) term of the empirical Bernstein bound on the
  per-sample calibration losses (Maurer & Pontil 2009, :func:`bernstein_gap`; full bound:
  :func:`bernstein_bound`).

The weight ``lambda`` of the gap term is chosen on held-out selection rows before the evolution, not by hand: on
the initial population, from a grid scaled to the spread of ``R_hat`` (:func:`lambda_grid`, multipliers
:data:`DEFAULT_LAM_SCALES`; :func:`select_lambda`), and the evolution runs at that ``lambda``.

Every function here is pure: no state, no I/O, inputs validated with explicit ``ValueError`` messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: Default normalized capacity of the *dense* network. ``h = C(pi) / C(dense) * h_scale`` so a dense
#: policy has ``h = 100`` and a pruned one ``0 < h <= 100``. The VC bound is only informative for
#: ``h << n`` (it exceeds 1 once ``h`` is close to ``n``) and its ``h``-term is increasing only while
#: ``h < 2n``; 100 keeps it in that regime for calibration sets of a few hundred samples or more.
DEFAULT_H_SCALE: float = 100.0

#: Default exponent of the depth factor ``D_l = ((L - l) / L) ** depth_decay`` (1.0 = Bartlett et al.).
DEFAULT_DEPTH_DECAY: float = 1.0


# --------------------------------------------------------------------------------------------- helpers


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not (0.0 < delta < 1.0) or not math.isfinite(delta):
        raise ValueError(f"delta must lie in the open interval (0, 1); got {delta!r}")
    return delta


def _check_n(n: int | float) -> float:
    if n is None:
        raise ValueError("n (number of samples) is required")
    n_f = float(n)
    if not math.isfinite(n_f) or n_f < 1:
        raise ValueError(f"n (number of samples) must be >= 1; got {n!r}")
    return n_f


def _check_units(units: Mapping[str, int], sparsities: Mapping[str, float]) -> tuple[list[int], list[float]]:
    """Return parameter counts and sparsities in the (depth) order of ``units``."""
    if len(units) == 0:
        raise ValueError("units is empty: need at least one unit")
    missing = [u for u in units if u not in sparsities]
    unknown = [u for u in sparsities if u not in units]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing sparsities for units {missing}")
        if unknown:
            parts.append(f"sparsities given for unknown units {unknown}")
        raise ValueError("sparsities do not match units: " + "; ".join(parts))
    counts: list[int] = []
    sps: list[float] = []
    for name, n_u in units.items():
        if not isinstance(n_u, (int, np.integer)) or isinstance(n_u, bool) or n_u <= 0:
            raise ValueError(f"unit {name!r}: parameter count must be a positive int; got {n_u!r}")
        s = float(sparsities[name])
        if not (0.0 <= s <= 1.0) or not math.isfinite(s):
            raise ValueError(f"unit {name!r}: sparsity must lie in [0, 1]; got {s!r}")
        counts.append(int(n_u))
        sps.append(s)
    return counts, sps


# ------------------------------------------------------------------------------------ capacity pieces


def effective_depth_weights(L: int, depth_decay: float = DEFAULT_DEPTH_DECAY) -> list[float]:
    """Effective-depth factors ``D_l = ((L - l) / L) ** depth_decay`` for unit index ``l = 0..L-1``.

    Source: Bartlett, Harvey, Liaw & Mehrabian (2019), "Nearly-tight VC-dimension and pseudodimension
    bounds for piecewise linear neural networks" (JMLR 20): ``VCdim = O(sum_l (L - l) W_l log U)`` --
    a parameter of layer ``l`` is counted once for every layer at or above it, so earlier weights weigh
    more. With ``depth_decay = 1`` this is exactly the count of layers at/above ``l`` divided by ``L``
    (``D_0 = 1``, ``D_{L-1} = 1/L``); ``depth_decay = 0`` gives ``D_l = 1`` (plain nonzero-weight count).
    ``l`` is the position of the unit in the ordered ``units`` mapping (each unit counts as one layer).
    """
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 1:
        raise ValueError(f"L (number of units) must be an int >= 1; got {L!r}")
    depth_decay = float(depth_decay)
    if not math.isfinite(depth_decay) or depth_decay < 0:
        raise ValueError(f"depth_decay must be a finite float >= 0; got {depth_decay!r}")
    return [((L - layer) / L) ** depth_decay for layer in range(int(L))]


def effective_capacity(
    units: Mapping[str, int],
    sparsities: Mapping[str, float],
    depth_decay: float = DEFAULT_DEPTH_DECAY,
) -> float:
    """Effective capacity ``C(pi) = sum_l D_l * W_l(pi)`` with ``W_l = n_l * (1 - s_l)``.

    ``n_l`` is the parameter count of unit ``l`` (``units``, depth order), ``s_l`` its sparsity and
    ``D_l`` from :func:`effective_depth_weights`. The dense capacity is ``C`` at all ``s_l = 0``.
    """
    counts, sps = _check_units(units, sparsities)
    D = effective_depth_weights(len(counts), depth_decay)
    return float(sum(d * n_l * (1.0 - s) for d, n_l, s in zip(D, counts, sps)))


def vapnik_bound(h: float, n: int | float, delta: float = 0.05) -> float:
    """Vapnik's VC generalization bound ``sqrt((h * (ln(2n/h) + 1) + ln(4/delta)) / n)``.

    Source: Vapnik (1998), *Statistical Learning Theory* (bound for VC dimension ``h``, ``n`` samples,
    confidence ``1 - delta``). Requires ``h > 0``, ``n >= 1``, ``0 < delta < 1`` and ``h < 2n``
    (beyond ``2n`` the term ``h (ln(2n/h) + 1)`` decreases in ``h``; the bound is already vacuous, > 1,
    for ``h >= n``).
    """
    n_f = _check_n(n)
    delta = _check_delta(delta)
    h = float(h)
    if not math.isfinite(h) or h <= 0:
        raise ValueError(f"h (capacity / VC dimension) must be > 0; got {h!r}")
    if h >= 2.0 * n_f:
        raise ValueError(
            f"h = {h!r} must be < 2n = {2.0 * n_f!r} for the Vapnik bound to be monotone in h; "
            "use more samples or a smaller h_scale"
        )
    return math.sqrt((h * (math.log(2.0 * n_f / h) + 1.0) + math.log(4.0 / delta)) / n_f)


def capacity_gap(
    units: Mapping[str, int],
    sparsities: Mapping[str, float],
    n: int | float,
    delta: float = 0.05,
    depth_decay: float = DEFAULT_DEPTH_DECAY,
    h_scale: float = DEFAULT_H_SCALE,
) -> float:
    """Dense-normalised capacity gap ``G = V(h(pi), n) / V(h_scale, n)`` in ``(0, 1]``.

    ``V(h, n) = sqrt((h (ln(2n/h) + 1) + ln(4/delta)) / n)`` is Vapnik's bound (:func:`vapnik_bound`) at
    ``h(pi) = c(pi) * h_scale``, ``c(pi) = C(pi) / C(dense)``, ``C(pi) = sum_l D_l n_l (1 - s_l)``,
    ``D_l = ((L - l) / L) ** depth_decay`` (Bartlett et al. 2019, :func:`effective_depth_weights`).

    Changed from the source: the bound is divided by its dense value ``V(h_scale, n)``, so a dense policy has
    ``G = 1`` and a pruned one ``G < 1`` whatever ``n`` and ``delta``, and a move of sparsity between units is
    bounded (below). It does not make ``G``'s differences as small as loss differences: on the ci model (12
    units, n = 32, sparsity 0.6) the policy-to-policy sd of ``G`` was 0.010 against 0.002 for the KL ``R_hat``,
    so a fixed ``lambda`` of order 1 would let it dominate; :func:`lambda_grid` scales ``lambda`` to the spread
    of ``R_hat`` and :func:`select_lambda` decides on the selection rows.

    Bound on a move: ``V`` is increasing and concave in ``h`` on ``(0, 2n)``, so moving sparsity ``ds`` from
    unit ``u`` to unit ``v`` (``c`` changes by ``|dc| <= ds * max(n_u, n_v) / C(dense)``, as ``D_l <= 1``)
    changes ``G`` by at most :func:`capacity_move_bound` ``= |dc| * h_scale * V'(h_lo) / V(h_scale)``,
    ``V'(h) = ln(2n/h) / (2 n V(h))``, ``h_lo`` the smaller ``h`` of the two policies.
    Raises ``ValueError`` if every weight is pruned (``C(pi) = 0``).
    """
    h_scale = float(h_scale)
    if not math.isfinite(h_scale) or h_scale <= 0:
        raise ValueError(f"h_scale must be > 0; got {h_scale!r}")
    c = effective_capacity(units, sparsities, depth_decay)
    c_dense = effective_capacity(units, {u: 0.0 for u in units}, depth_decay)
    if c <= 0:
        raise ValueError("effective capacity is 0 (every unit fully pruned); the capacity gap is undefined")
    return vapnik_bound(c / c_dense * h_scale, n, delta) / vapnik_bound(h_scale, n, delta)


def capacity_move_bound(dc: float, h_lo: float, n: int | float, delta: float = 0.05,
                        h_scale: float = DEFAULT_H_SCALE) -> float:
    """Largest change of :func:`capacity_gap` when the capacity ratio ``c = C / C(dense)`` changes by ``dc``
    and the smaller ``h = c * h_scale`` of the two policies is ``h_lo``:
    ``|dG| <= |dc| * h_scale * V'(h_lo) / V(h_scale, n)`` with ``V'(h) = ln(2n/h) / (2 n V(h, n))``
    (mean-value theorem; ``V`` concave in ``h``, so ``V'`` is largest at the smaller ``h``)."""
    n_f = _check_n(n)
    v_lo = vapnik_bound(h_lo, n_f, delta)
    return abs(float(dc)) * float(h_scale) * math.log(2.0 * n_f / h_lo) / (2.0 * n_f * v_lo) / vapnik_bound(
        h_scale, n_f, delta)


# -------------------------------------------------------------------------------------------- norm gap


def relative_distances(norm_sq: Mapping[str, float], dist_sq: Mapping[str, float]) -> dict[str, float]:
    """Per-unit ``x_u = ||W_u(s_u) - W_u||_F^2 / ||W_u(s_u)||_F^2 = dist_sq_u / norm_sq_u`` (``>= 0``): how far
    pruning moved the unit's weights from the dense ones ``W_u``, relative to the weights ``W_u(s_u)`` it keeps
    (both squared Frobenius norms summed over the unit's matrices, :meth:`LevelDB.weight_sq`)."""
    if len(norm_sq) == 0:
        raise ValueError("no units: norm_sq is empty")
    if set(norm_sq) != set(dist_sq):
        raise ValueError(f"norm_sq and dist_sq name different units: {sorted(set(norm_sq) ^ set(dist_sq))}")
    out: dict[str, float] = {}
    for u, p in norm_sq.items():
        p, d = float(p), float(dist_sq[u])
        if not (math.isfinite(p) and p > 0):
            raise ValueError(f"unit {u!r}: squared norm of its pruned weights must be finite and > 0 (fully "
                             f"pruned?); got {p!r}")
        if not (math.isfinite(d) and d >= 0):
            raise ValueError(f"unit {u!r}: squared distance to the dense weights must be finite and >= 0; got {d!r}")
        out[u] = d / p
    return out


def norm_gap(units: Mapping[str, int], norm_sq: Mapping[str, float], dist_sq: Mapping[str, float],
             n: int | float, scale: float = 1.0) -> float:
    """Spectral-complexity gap with the dense weights as reference, in Frobenius norms of the pruned weights:
    ``G = scale / sqrt(n) * (sum_u w_u x_u ** (1/3)) ** (3/2)``, ``w_u = n_u ** (1/3) / sum_v n_v ** (1/3)``.

    ``x_u = ||W_u(s_u) - W_u||_F^2 / ||W_u(s_u)||_F^2`` (:func:`relative_distances`): ``W_u(s_u)`` the weights unit
    ``u`` will have at its sparsity (the level database's stored, OBS-updated weights), ``W_u`` its dense weights,
    norms summed over the unit's matrices; ``n_u`` its parameter count (``units``); ``n`` the number of samples.

    Source: Bartlett, Foster & Telgarsky (2017), "Spectrally-normalized margin bounds for neural networks",
    Theorem 1.1: for a network ``x -> A_L s_L(... A_1 x)`` with ``rho_i``-Lipschitz activations, reference
    matrices ``M_i`` fixed before the sample is drawn, ``n`` samples ``X`` and margin ``gamma``, with probability
    ``>= 1 - delta`` the 0-1 risk is at most the empirical ``gamma``-margin risk plus
    ``O~(||X||_F R_A / (gamma n) * ln W + sqrt(ln(1/delta) / n))``, the spectral complexity
    ``R_A = (prod_i rho_i ||A_i||_s) (sum_i (||A_i^T - M_i^T||_{2,1} / ||A_i||_s) ** (2/3)) ** (3/2)``.
    Here ``A_u = W_u(s_u)`` and ``M_u = W_u``: the dense model was trained before the calibration rows were drawn,
    so it is a valid reference, and a unit is charged for how far pruning moved it. With ``||X||_F <= B sqrt(n)``
    the term is ``B R_A / (gamma sqrt(n))``. Frobenius norms replace the others by upper bounds: for an
    ``r x m`` matrix, ``||D^T||_{2,1} <= sqrt(r) ||D||_F`` and ``||A||_s >= ||A||_F / sqrt(min(r, m))``, so
    ``||D^T||_{2,1} / ||A||_s <= sqrt(n_u) ||D||_F / ||A||_F`` and the unit's term is at most
    ``(n_u x_u) ** (1/3)``: a unit counts by its size, as ``n_u ** (1/3)``, and by its relative distance.

    Changed from the source: (1) a unit (several matrices, some of them in series) is one layer, its matrices
    concatenated; (2) the Lipschitz product ``prod_u rho_u ||A_u||_s`` is held at its dense value (a transformer
    is residual, so the product over its ~60 units is not its Lipschitz constant; it is part of ``scale``); it is
    the part that rewards uneven allocations, its log ``sum_u ln ||W_u(s_u)||`` being concave in ``s`` under
    magnitude pruning, as the geometric mean of norm ratios of ``gap_revision`` 1 did; (3) ``B``, ``1 / gamma``,
    ``ln W``, that dense product and the constant ``(sum_u n_u ** (1/3)) ** (3/2)`` (dividing by which makes the
    ``w_u`` sum to 1) are one number, ``scale`` (default 1), and the policy-independent ``sqrt(ln(1/delta) / n)``
    is left out of ``J`` (as the Bernstein range term); (4) the 0-1 margin risk is replaced by the search's loss
    ``R_hat``.

    Properties: the dense network has ``G = 0``; ``G = scale sqrt(x / n)`` when every unit has the same ``x``;
    ``G`` grows with each ``x_u``. Under magnitude pruning of i.i.d. Gaussian weights ``x(s) ** (1/3)`` is convex
    in ``s`` (256 x 256: 0.080, 0.161, 0.244, 0.331, 0.424, 0.527, 0.650, 0.812, 1.084 at ``s = 0.1 .. 0.9``), so
    at a fixed budget over units of one size an even allocation has the smallest ``G``: two such units at
    0.6 / 0.6 give ``G sqrt(n) = 0.384``, at 0.3 / 0.9 ``0.543`` (the geometric-mean norm ratio used before,
    ``gap_revision`` 1, gave 0.3 / 0.9 the smaller gap).
    """
    n_f = _check_n(n)
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0; got {scale!r}")
    x = relative_distances(norm_sq, dist_sq)
    counts, _ = _check_units(units, dict.fromkeys(units, 0.0))
    if set(units) != set(x):
        raise ValueError(f"units and the norms name different units: {sorted(set(units) ^ set(x))}")
    roots = {u: float(c) ** (1.0 / 3.0) for u, c in zip(units, counts)}
    total = sum(roots.values())
    mean = sum(roots[u] / total * x[u] ** (1.0 / 3.0) for u in units)
    return scale * mean ** 1.5 / math.sqrt(n_f)


def level_norms(weight_sq: Mapping[str, Mapping[float, Sequence[float]]],
                sparsities: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """``(norm_sq, dist_sq)`` for :func:`norm_gap` from a per-unit, per-level table
    ``weight_sq[u][level] = (||W_u(level)||_F^2, ||W_u(level) - W_u||_F^2)`` (``LevelDB.weight_sq``)."""
    if len(sparsities) == 0:
        raise ValueError("sparsities is empty: need at least one unit")
    norm_sq, dist_sq = {}, {}
    for u, s in sparsities.items():
        if u not in weight_sq:
            raise ValueError(f"no weight norms for unit {u!r}")
        hits = [v for k, v in weight_sq[u].items() if abs(float(k) - float(s)) <= 1e-6]
        if not hits:
            raise ValueError(f"unit {u!r}: no weight norms at level {s!r}")
        if len(hits[0]) != 2:
            raise ValueError(f"unit {u!r}: weight norms must be (norm_sq, dist_sq) pairs; got {hits[0]!r}")
        norm_sq[u], dist_sq[u] = float(hits[0][0]), float(hits[0][1])
    return norm_sq, dist_sq


# ---------------------------------------------------------------------------------- other estimators


def _check_losses(losses: Any) -> np.ndarray:
    if losses is None:
        raise ValueError("losses (per-sample losses) are required")
    x = np.asarray(losses, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"losses must be a 1-D sequence; got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"the Bernstein gap needs n >= 2 losses; got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError("losses contain NaN or inf")
    return x


def bernstein_bound(losses: Sequence[float] | np.ndarray, delta: float = 0.05,
                    loss_range: float | None = None) -> float:
    """Full empirical Bernstein gap (Maurer & Pontil 2009, "Empirical Bernstein bounds and sample variance
    penalization", Theorem 4).

    For i.i.d. losses in ``[a, b]``, with probability ``>= 1 - delta``:
    ``E[l] - mean(l) <= sqrt(2 Var(l) ln(2/delta) / n) + 7 (b - a) ln(2/delta) / (3 (n - 1))``, ``Var`` the
    unbiased sample variance (``ddof = 1``); the ``[0, 1]`` theorem applied to ``(l - a) / (b - a)``.
    ``loss_range = b - a``; ``None`` = the observed range ``max(l) - min(l)`` (a plug-in: the real spread of the
    losses, not an a-priori bound). Requires ``n >= 2`` and ``max(l) - min(l) <= loss_range``.
    """
    delta = _check_delta(delta)
    x = _check_losses(losses)
    spread = float(x.max() - x.min())
    if loss_range is None:
        loss_range = spread
    loss_range = float(loss_range)
    if not math.isfinite(loss_range) or loss_range < 0:
        raise ValueError(f"loss_range must be >= 0; got {loss_range!r}")
    if spread > loss_range * (1.0 + 1e-12):
        raise ValueError(f"losses span {spread!r} > loss_range {loss_range!r}; pass the true range b - a")
    n = x.shape[0]
    return bernstein_gap(x, delta) + 7.0 * loss_range * math.log(2.0 / delta) / (3.0 * (n - 1))


def bernstein_gap(losses: Sequence[float] | np.ndarray, delta: float = 0.05) -> float:
    """Sample-variance term of the empirical Bernstein bound: ``G = sqrt(2 Var(l) ln(2/delta) / n)``.

    ``Var`` the unbiased sample variance (``ddof = 1``) of the ``n >= 2`` per-sample losses. This is the
    policy-dependent part of :func:`bernstein_bound` (Maurer & Pontil 2009, Theorem 4); the range term
    ``7 (b - a) ln(2/delta) / (3 (n - 1))`` is left out of ``J``: with ``b - a`` the range of the loss it is
    the same for every policy at a given ``n`` (with ``b - a = 10`` nats it added 1.366 to every ``J`` at
    ``n = 64``, ~100x ``R_hat``). ``R_hat + lambda G`` is then Maurer & Pontil's sample variance penalization.
    """
    delta = _check_delta(delta)
    x = _check_losses(losses)
    var = float(np.var(x, ddof=1))
    return math.sqrt(2.0 * var * math.log(2.0 / delta) / x.shape[0])


def none_gap(*args: Any, **kwargs: Any) -> float:
    """Zero gap: ``G = 0`` (empirical-risk-only search)."""
    return 0.0


# ----------------------------------------------------------------------------------------- lambda


#: Default multipliers ``c`` of :func:`lambda_grid` (``SearchConfig.lam_scales``): ``lambda = c * spread(R) /
#: spread(G)`` makes the spread of ``lambda * G_hat`` over the initial population ``c`` times that of ``R_hat``,
#: so the grid tries a gap term from a quarter of ``R_hat``'s spread (a tie-breaker) to four times it (the gap
#: decides), x2 apart, whatever the units of ``G_hat``; ``lambda = 0`` is always tried as well. (A fixed grid of
#: lambdas, 0.01 to 3, was used before: the gaps' spreads differ from ``R_hat``'s by factors of 5 to 100 between
#: estimators and models, so most of a fixed grid was either negligible or dominant.)
DEFAULT_LAM_SCALES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


def lambda_grid(r: Sequence[float], g: Sequence[float], scales: Sequence[float]) -> tuple[float, ...]:
    """The lambdas to try, scaled to the spread of the risk: ``(lambda_1, ...)``, sorted, distinct.

    ``Lambda = {0} | {c * spread(r) / spread(g) : c in scales, c > 0}``, ``spread(x) = max(x) - min(x)`` over the
    candidates (the initial population's ``R_hat`` and ``G_hat`` on the scoring rows), so ``lambda * G_hat`` spreads
    ``c`` times as far as ``R_hat``. ``Lambda = {0}`` when ``spread(g) == 0`` (the gap does not tell the candidates
    apart) or ``spread(r) == 0``. ``r``, ``g``: finite, of one length ``>= 1``; ``scales``: finite, ``>= 0``.

    Example: ``r = [1.0, 1.2, 1.5]``, ``g = [0.1, 0.3, 0.2]``, ``scales = (0.5, 1, 2)``: spreads 0.5 and 0.2,
    ``Lambda = (0.0, 1.25, 2.5, 5.0)``.
    """
    rr, gg, cc = (_finite_1d(name, seq) for name, seq in (("r", r), ("g", g), ("scales", scales)))
    if rr.shape != gg.shape:
        raise ValueError(f"r and g must have equal lengths; got {rr.shape[0]}, {gg.shape[0]}")
    if np.any(cc < 0):
        raise ValueError(f"scales must be >= 0; got {cc.tolist()}")
    spread_r, spread_g = float(rr.max() - rr.min()), float(gg.max() - gg.min())
    if spread_r <= 0 or spread_g <= 0:
        return (0.0,)
    return tuple(sorted({0.0} | {float(c) * spread_r / spread_g for c in cc.tolist() if c > 0}))


def _finite_1d(name: str, seq: Sequence[float]) -> np.ndarray:
    try:
        a = np.asarray(seq, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers") from None
    if a.ndim != 1 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence; got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def select_lambda(r_search: Sequence[float], g: Sequence[float], r_select: Sequence[float],
                  lambdas: Sequence[float]) -> tuple[float, int]:
    """Choose ``lambda`` on the selection rows: ``(lambda, i)``.

    For each ``lambda`` in ``lambdas`` the pick is ``i(lambda) = argmin_i r_search[i] + lambda * g[i]`` (ties:
    the lowest ``i``); the result is the ``(lambda, i(lambda))`` whose pick has the lowest ``r_select[i]``
    (ties: the smaller ``lambda``). ``r_search``, ``g``: risk and gap of each candidate on the search rows;
    ``r_select``: its risk on the selection rows. Inputs must be finite, of one length ``>= 1``; ``lambda >= 0``.
    """
    arrays = {name: _finite_1d(name, seq)
              for name, seq in (("r_search", r_search), ("g", g), ("r_select", r_select), ("lambdas", lambdas))}
    r, gg, rs, lams = arrays["r_search"], arrays["g"], arrays["r_select"], arrays["lambdas"]
    if not (r.shape == gg.shape == rs.shape):
        raise ValueError(f"r_search, g, r_select must have equal lengths; got {r.shape[0]}, {gg.shape[0]}, "
                         f"{rs.shape[0]}")
    if np.any(lams < 0):
        raise ValueError(f"lambdas must be >= 0; got {lams.tolist()}")
    best: tuple[float, float, int] | None = None  # (r_select of the pick, lambda, pick)
    for lam in sorted(float(v) for v in lams):
        i = int(np.argmin(r + lam * gg))  # first minimum: lowest index
        if best is None or rs[i] < best[0]:
            best = (float(rs[i]), lam, i)
    assert best is not None
    return best[1], best[2]


# ----------------------------------------------------------------------------------- single interface


def _capacity_entry(*, units: Any, sparsities: Any, losses: Any, n: Any, delta: float, **kw: Any) -> float:
    if units is None or sparsities is None:
        raise ValueError("gap kind 'capacity' needs units and sparsities")
    return capacity_gap(units, sparsities, n, delta, **kw)


def _bernstein_entry(*, units: Any, sparsities: Any, losses: Any, n: Any, delta: float, **kw: Any) -> float:
    if losses is None:
        raise ValueError("gap kind 'bernstein' needs losses")
    if n is not None and int(n) != len(losses):
        raise ValueError(f"n = {n!r} disagrees with len(losses) = {len(losses)}")
    return bernstein_gap(losses, delta, **kw)


def _norm_entry(*, units: Any, sparsities: Any, losses: Any, n: Any, delta: float, weight_sq: Any = None,
                **kw: Any) -> float:
    if units is None or sparsities is None or weight_sq is None:
        raise ValueError("gap kind 'norm' needs units, sparsities and weight_sq (per-unit, per-level squared norms "
                         "of the stored weights and their distances to the dense ones)")
    if n is None:
        raise ValueError("gap kind 'norm' needs n")
    missing = [u for u in sparsities if u not in units]
    if missing:
        raise ValueError(f"gap kind 'norm': no parameter counts for units {missing}")
    norm_sq, dist_sq = level_norms(weight_sq, sparsities)
    return norm_gap({u: units[u] for u in sparsities}, norm_sq, dist_sq, n, **kw)


def _none_entry(*, units: Any, sparsities: Any, losses: Any, n: Any, delta: float, **kw: Any) -> float:
    return none_gap()


#: name -> estimator with the uniform keyword signature ``(*, units, sparsities, losses, n, delta, **kw)``.
GAP_ESTIMATORS: dict[str, Callable[..., float]] = {
    "none": _none_entry,
    "capacity": _capacity_entry,
    "bernstein": _bernstein_entry,
    "norm": _norm_entry,
}


#: Revision of an estimator whose formula changed after searches were run with it (issue 17: ``bernstein`` lost
#: its policy-independent range term, ``capacity`` is divided by its dense value; ``norm`` 2: Bartlett et al.'s
#: spectral complexity on the stored weights' distances to the dense ones, size-weighted, instead of the geometric
#: mean of the masked dense norm ratios). A search config with such a gap serialises it (``gap_revision``), so
#: checkpoints and sweep rows made with the old formula are not reused; configs with the other gaps keep their
#: digests.
GAP_REVISION: dict[str, int] = {"bernstein": 2, "capacity": 2, "norm": 2}


def gap(
    kind: str,
    *,
    units: Mapping[str, int] | None = None,
    sparsities: Mapping[str, float] | None = None,
    losses: Sequence[float] | np.ndarray | None = None,
    n: int | None = None,
    delta: float = 0.05,
    **kw: Any,
) -> float:
    """Estimate ``G_hat(pi)`` with the estimator ``kind`` (one of :data:`GAP_ESTIMATORS`).

    ``"capacity"`` uses ``units``, ``sparsities``, ``n`` (+ ``depth_decay``, ``h_scale`` in ``kw``);
    ``"bernstein"`` uses ``losses`` (``n`` if given must equal ``len(losses)``);
    ``"norm"`` uses ``units``, ``sparsities``, ``n`` and ``weight_sq`` in ``kw`` (+ ``scale``); ``"none"`` returns 0.
    """
    try:
        fn = GAP_ESTIMATORS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown gap kind {kind!r}; valid kinds: {', '.join(sorted(GAP_ESTIMATORS))}") from None
    return float(fn(units=units, sparsities=sparsities, losses=losses, n=n, delta=delta, **kw))


def objective(r_hat: float, g_hat: float, lam: float) -> float:
    """SRM objective ``J = R_hat + lambda * G_hat`` (``lambda >= 0``)."""
    r_hat, g_hat, lam = float(r_hat), float(g_hat), float(lam)
    for name, v in (("r_hat", r_hat), ("g_hat", g_hat), ("lam", lam)):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite; got {v!r}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0; got {lam!r}")
    if g_hat < 0:
        raise ValueError(f"g_hat must be >= 0; got {g_hat!r}")
    return r_hat + lam * g_hat
