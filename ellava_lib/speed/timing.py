"""Wall-clock timing of small kernels on the CPU or a GPU: device synchronisation before the clock stops, best or
median of repeated runs, or medians of interleaved runs of several functions (:func:`interleaved_ms`: what a
comparison of two kernels on a shared machine needs).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the kernels queued on ``device`` (``torch.cuda.synchronize`` on a GPU; nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn()``, its kernels on ``device`` finished (:func:`sync`) before the clock stops."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """``min`` over ``repeats`` timed calls of ``fn()``, in seconds, after one untimed warm-up call
    (``inf`` when ``repeats`` is 0)."""
    fn()
    sync(device)
    return min((_timed(fn, device) for _ in range(repeats)), default=math.inf)


def time_ms(fn: Callable[[], object], device: torch.device, min_time_s: float = 0.02, max_repeats: int = 50,
            min_repeats: int = 3) -> float:
    """Median wall time of ``fn()`` in ms: one timed warm-up call (``t_warm``), then
    ``clamp(ceil(min_time_s / t_warm), min_repeats, max_repeats)`` timed calls."""
    warm = _timed(fn, device)
    n = int(min(max_repeats, max(min_repeats, math.ceil(min_time_s / max(warm, 1e-7)))))
    return 1e3 * statistics.median([_timed(fn, device) for _ in range(n)])


def interleaved_ms(fns: Sequence[Callable[[], object]], device: torch.device, rounds: int,
                   warmup: int = 1) -> list[list[float]]:
    """Wall times in ms of ``rounds`` calls of each of ``fns``, **interleaved** (round ``k`` calls ``fns[0]``,
    ``fns[1]``, ... once each), after ``warmup`` untimed rounds: a change of machine load during the measurement
    hits every function alike, so the ratio of two medians is robust where two back-to-back series are not.
    Returns one list of ``rounds`` times per function (take :func:`statistics.median`)."""
    times: list[list[float]] = [[] for _ in fns]
    for k in range(warmup + rounds):
        for i, fn in enumerate(fns):
            t = _timed(fn, device)
            if k >= warmup:
                times[i].append(1e3 * t)
    return times


def rounds_for(fns: Sequence[Callable[[], object]], device: torch.device, min_time_s: float, min_rounds: int = 5,
               max_rounds: int = 50) -> int:
    """Rounds of :func:`interleaved_ms` for about ``min_time_s`` of timing: one timed call of each function (also
    the warm-up), then ``clamp(ceil(min_time_s / sum of those times), min_rounds, max_rounds)``."""
    once = sum(_timed(fn, device) for fn in fns)
    return int(min(max_rounds, max(min_rounds, math.ceil(min_time_s / max(once, 1e-7)))))
