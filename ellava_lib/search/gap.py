"""Generalization-gap estimators for the SRM objective ``J(pi) = R_hat(pi) + lambda * G_hat(pi)``.

Three estimators share one interface (:func:`gap`, registry :data:`GAP_ESTIMATORS`):

* ``"none"``      -- ``G_hat = 0`` (plain empirical-risk pruning search).
* ``"capacity"``  -- Vapnik's VC bound evaluated at a normalized, depth-weighted capacity of the pruned
  network (Bartlett, Harvey, Liaw & Mehrabian 2019).
* ``"bernstein"`` -- empirical Bernstein bound on the per-sample calibration losses (Maurer & Pontil 2009).

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
    """Capacity gap ``G = sqrt((h (ln(2n/h) + 1) + ln(4/delta)) / n)`` with ``h = C(pi) / C(dense) * h_scale``.

    ``C(pi) = sum_l D_l n_l (1 - s_l)``, ``D_l = ((L - l) / L) ** depth_decay`` (Bartlett et al. 2019,
    see :func:`effective_depth_weights`); the bound is Vapnik's (:func:`vapnik_bound`). A dense policy
    gives ``h = h_scale``; more sparsity anywhere gives smaller ``h`` and (for ``h < 2n``) a smaller gap.
    Raises ``ValueError`` if every weight is pruned (``C(pi) = 0``).
    """
    h_scale = float(h_scale)
    if not math.isfinite(h_scale) or h_scale <= 0:
        raise ValueError(f"h_scale must be > 0; got {h_scale!r}")
    c = effective_capacity(units, sparsities, depth_decay)
    c_dense = effective_capacity(units, {u: 0.0 for u in units}, depth_decay)
    if c <= 0:
        raise ValueError("effective capacity is 0 (every unit fully pruned); the capacity gap is undefined")
    return vapnik_bound(c / c_dense * h_scale, n, delta)


# ---------------------------------------------------------------------------------- other estimators


def bernstein_gap(losses: Sequence[float] | np.ndarray, delta: float = 0.05, loss_range: float = 1.0) -> float:
    """Empirical Bernstein gap (Maurer & Pontil 2009, "Empirical Bernstein bounds and sample variance
    penalization", Theorem 4).

    For i.i.d. losses in ``[0, 1]``, with probability ``>= 1 - delta``:
    ``E[l] - mean(l) <= sqrt(2 V ln(2/delta) / n) + 7 ln(2/delta) / (3 (n - 1))``, ``V`` the unbiased
    sample variance (``ddof = 1``). For losses in ``[a, b]`` with ``loss_range = b - a``, apply it to
    ``z = (l - a) / (b - a)`` and multiply by ``b - a``; since ``Var(l) = (b - a)^2 Var(z)``:
    ``G = (b - a) * [sqrt(2 Var(z) ln(2/delta) / n) + 7 ln(2/delta) / (3 (n - 1))]
        = sqrt(2 Var(l) ln(2/delta) / n) + 7 (b - a) ln(2/delta) / (3 (n - 1))``.
    Requires ``n >= 2`` and ``max(l) - min(l) <= loss_range``.
    """
    delta = _check_delta(delta)
    loss_range = float(loss_range)
    if not math.isfinite(loss_range) or loss_range <= 0:
        raise ValueError(f"loss_range must be > 0; got {loss_range!r}")
    if losses is None:
        raise ValueError("losses (per-sample losses) are required")
    x = np.asarray(losses, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"losses must be a 1-D sequence; got shape {x.shape}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"bernstein_gap needs n >= 2 losses; got {n}")
    if not np.all(np.isfinite(x)):
        raise ValueError("losses contain NaN or inf")
    spread = float(x.max() - x.min())
    if spread > loss_range * (1.0 + 1e-12):
        raise ValueError(f"losses span {spread!r} > loss_range {loss_range!r}; pass the true range b - a")
    var = float(np.var(x, ddof=1))
    log_term = math.log(2.0 / delta)
    return math.sqrt(2.0 * var * log_term / n) + 7.0 * loss_range * log_term / (3.0 * (n - 1))


def none_gap(*args: Any, **kwargs: Any) -> float:
    """Zero gap: ``G = 0`` (empirical-risk-only search)."""
    return 0.0


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


def _none_entry(*, units: Any, sparsities: Any, losses: Any, n: Any, delta: float, **kw: Any) -> float:
    return none_gap()


#: name -> estimator with the uniform keyword signature ``(*, units, sparsities, losses, n, delta, **kw)``.
GAP_ESTIMATORS: dict[str, Callable[..., float]] = {
    "none": _none_entry,
    "capacity": _capacity_entry,
    "bernstein": _bernstein_entry,
}


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
    ``"bernstein"`` uses ``losses`` (+ ``loss_range``; ``n`` if given must equal ``len(losses)``);
    ``"none"`` returns 0.
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


def select_lambda(r_search: Sequence[float], g: Sequence[float], r_select: Sequence[float],
                  lambdas: Sequence[float]) -> tuple[float, int]:
    """``lambda`` chosen on held-out rows: for each ``lambda`` in ``lambdas`` the candidate
    ``i(lambda) = argmin_i r_search[i] + lambda * g[i]`` (ties: smaller index); returns the
    ``(lambda, i(lambda))`` whose pick has the lowest ``r_select`` (ties: smaller ``lambda``).
    (Stand-in of the search branch; the gap branch owns this function.)"""
    n = len(r_search)
    if n == 0 or len(g) != n or len(r_select) != n:
        raise ValueError(f"need equally long, non-empty r_search, g, r_select; got {n}, {len(g)}, {len(r_select)}")
    if not lambdas:
        raise ValueError("lambdas is empty")
    best: tuple[float, float, int] | None = None
    for lam in sorted(float(x) for x in lambdas):
        i = min(range(n), key=lambda k: (float(r_search[k]) + lam * float(g[k]), k))
        if best is None or float(r_select[i]) < best[0]:
            best = (float(r_select[i]), lam, i)
    return best[1], best[2]
