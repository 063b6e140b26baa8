"""Wall-clock timing of small kernels on the CPU or a GPU: device synchronisation before and after, best or
median of repeated runs.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, repeats: int, device: torch.device) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def time_ms(fn: Callable[[], object], device: torch.device, min_time_s: float = 0.02, max_repeats: int = 50,
            min_repeats: int = 3) -> float:
    """Median wall time of ``fn()`` in ms: one warm-up call, then ``clamp(min_time_s / t_warm, min_repeats,
    max_repeats)`` timed calls."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    warm = time.perf_counter() - t0
    n = int(min(max_repeats, max(min_repeats, math.ceil(min_time_s / max(warm, 1e-7)))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
