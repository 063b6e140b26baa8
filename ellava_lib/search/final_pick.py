"""Which policy a search returns: the best candidate on the selection rows, or its best start when the gain is
within noise.

The search ends with candidates scored on the held-out *selection* rows (the final population and the start
policies, :func:`ellava_lib.search.evolve._select`): ``best`` has the lowest selection-row ``R_hat``, ``start``
the lowest among the start policies alone (``start_pick``, the policy the search would return had it not evolved).
With ``m`` selection rows and clipped per-row losses ``l_{c,i}`` (the terms of ``R_hat``), the paired gain of
``best`` over ``start`` and its standard error are::

    d_i = l_{start,i} - l_{best,i},   gain = mean(d),   se = sd(d) / sqrt(m)   (ddof 1)

Rules (``SearchConfig.select_rule``, :data:`SELECT_RULES`):

* ``min``: return ``best`` (the lowest selection-row ``R_hat``, however small its lead);
* ``paired_se``: return ``best`` only when ``gain > se``, else ``start``. This is the one-standard-error rule of
  model selection (Breiman, Friedman, Olshen & Stone 1984, *Classification and Regression Trees*, section 3.4.3;
  Hastie, Tibshirani & Friedman 2009, *The Elements of Statistical Learning*, section 7.10: take the simplest
  model whose error is within one standard error of the best), with the start as the simple model (it was not
  chosen among the hundreds of candidates the evolution scored) and the standard error of the *paired*
  difference, since both are scored on the same rows. Departure: the rule compares ``best`` with one model, the
  start pick, rather than scanning a complexity path.

Both rules read the selection rows only, never a test item.

**Task guard** (``SearchConfig.guard = "task"``, :func:`guard`). ``R_hat`` is a distillation loss; the tables
score generated answers. On smol the two disagreed twice: the search without the gap term at 60 % returned an
evolved policy with a lower selection-row ``R_hat`` than its start pick (ECoFLaP) that scored 58.4 on the test
items against the ECoFLaP row's 61.6, and EfficientLLaVA at 70 % returned a projector tuned to a lower
selection-row ``R_hat`` (1.53 to 1.26 for the same start policy) under which its policy scored 33.6 on the
selection rows' generated answers, against 56.1 with the model's own projector (its test score: 40.5; seed 0,
ledger rows of commit cf5f7e8, diagnosed by re-scoring the selection rows under both projectors). So the
search's answer is checked by the task score on the selection rows. The options, simplest first::

    start pick, original projector  <  returned policy, original projector  <  returned policy, evolved projector

(the last only when the projector evolved; an option equal to an earlier one is left out). Each is scored on the
``m`` selection rows by the caller's task scorer: per-row contributions ``t_{o,i}`` whose mean is the task score
(higher is better). With ``b`` the option of the highest mean (ties: the simpler), the guard returns the simplest
option ``o`` whose paired shortfall is within one standard error::

    d_i = t_{b,i} - t_{o,i},   gain = mean(d),   se = sd(d) / sqrt(m)   (ddof 1),   keep o when not gain > se

(the one-standard-error rule above, applied to the task score along the order of added machinery; with one row
``se`` is undefined and the simplest option is kept).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ellava_lib.core.stats import paired_mean_se

#: How a search chooses what it returns (module docstring).
SELECT_RULES: tuple[str, ...] = ("min", "paired_se")

#: How the pick is checked against the task score (module docstring, **Task guard**).
GUARDS: tuple[str, ...] = ("none", "task")


def paired_gain(start: Sequence[float], best: Sequence[float]) -> tuple[float, float]:
    """``(gain, se)`` of the module docstring: the mean of ``start_i - best_i`` and its standard error
    (:func:`ellava_lib.core.stats.paired_mean_se`: ``sd`` with ddof 1 over ``sqrt(m)``; ``nan`` for one row).
    ``ValueError`` when the lengths differ or are 0."""
    return paired_mean_se(start, best)


def choose(losses: Sequence[Sequence[float]], best: int, start: int | None, rule: str) -> tuple[int, dict[str, Any]]:
    """The index to return among candidates with per-row selection losses ``losses[c]``, given ``best`` (lowest
    ``R_hat``) and ``start`` (the start pick; None: no start policy), and the record of the choice: ``rule``,
    ``best_index``, ``gain`` and ``gain_se`` (None when ``best`` is the start or there is none) and ``kept_start``
    (True when the start was returned although another candidate scored lower)."""
    if rule not in SELECT_RULES:
        raise ValueError(f"select_rule must be one of {SELECT_RULES}, got {rule!r}")
    record: dict[str, Any] = {"rule": rule, "best_index": best, "gain": None, "gain_se": None, "kept_start": False}
    if start is None or start == best:
        return best, record
    gain, se = paired_gain(losses[start], losses[best])
    record.update(gain=gain, gain_se=se)
    if rule == "min" or (math.isfinite(se) and gain > se):
        return best, record
    record["kept_start"] = True
    return start, record


def guard(scores: Sequence[Sequence[float]]) -> tuple[int, dict[str, Any]]:
    """The option to return among options ordered simplest first, each with per-row task scores ``scores[o]``
    (higher is better, the same rows for all), and the record of the choice: ``means``, ``best_index`` (the highest
    mean, ties the simpler), ``gains`` / ``gain_ses`` (of the best over each option; None for the best itself) and
    ``index`` (module docstring, **Task guard**). ``ValueError`` when there is no option or the lengths differ."""
    if not scores:
        raise ValueError("no option to guard")
    means = [sum(s) / len(s) if len(s) else float("nan") for s in scores]
    best = min(range(len(scores)), key=lambda o: (-means[o], o))
    gains: list[float | None] = []
    ses: list[float | None] = []
    index = best
    for o in range(len(scores)):
        if o == best:
            gains.append(None)
            ses.append(None)
            continue
        gain, se = paired_mean_se(scores[best], scores[o])
        gains.append(gain)
        ses.append(se)
        if o < index and not (math.isfinite(se) and gain > se):
            index = o
    return index, {"means": means, "best_index": best, "gains": gains, "gain_ses": ses, "index": index}
