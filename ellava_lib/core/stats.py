"""Paired differences and their standard error: the one statistic behind every "A against B" the kit reports
(the search's final pick on its selection rows, :mod:`ellava_lib.search.final_pick`; the tables' margins over
seeds and the search-against-its-start check, :mod:`ellava_lib.run.tables`).

For ``k`` pairs ``(a_i, b_i)`` measured on the same unit (a selection row, or a seed's calibration draw)::

    d_i = a_i - b_i,   mean = (1/k) sum_i d_i,   se = sqrt( sum_i (d_i - mean)^2 / (k - 1) ) / sqrt(k)

the standard error of the mean of the paired differences, with the sample standard deviation (ddof 1; e.g.
Wasserman 2004, *All of Statistics*, section 6.3 and Example 10.19, the paired comparison). Pairing removes what
the two share on one unit (a hard row, a lucky draw) from the spread. ``se`` is ``nan`` for one pair: a single
difference says nothing about its own noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def paired_mean_se(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(mean, se)`` of ``d_i = a_i - b_i`` (module docstring); ``se`` is ``nan`` for one pair.

    ``ValueError`` when the lengths differ or are 0, or when a value is not finite (a missing score is dropped
    by the caller, which knows why it is missing)."""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"need equal, non-empty sequences of paired values; got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    if not all(math.isfinite(x) for x in d):
        raise ValueError("paired values must be finite (drop the missing pairs first)")
    k = len(d)
    mean = math.fsum(d) / k
    if k < 2:
        return mean, float("nan")
    var = math.fsum((x - mean) ** 2 for x in d) / (k - 1)
    return mean, math.sqrt(var / k)
