"""speed.timing: best-of-N and median timing of a callable (warm-up, device sync, repeat counts)."""

from __future__ import annotations

import math

import torch

from ellava_lib.speed import timing

CPU = torch.device("cpu")


def _counter():
    calls = []
    return calls, lambda: calls.append(1)


def test_best_time_warms_up_once_then_times_repeats_calls():
    calls, fn = _counter()
    t = timing.best_time(fn, 4, CPU)
    assert len(calls) == 5 and 0.0 <= t < 1.0
    assert timing.best_time(fn, 0, CPU) == math.inf


def test_time_ms_repeats_between_the_bounds():
    calls, fn = _counter()
    assert timing.time_ms(fn, CPU, min_time_s=0.0, min_repeats=3, max_repeats=7) >= 0.0
    assert len(calls) == 1 + 3  # a zero time budget: the minimum count after the warm-up
    calls.clear()
    timing.time_ms(fn, CPU, min_time_s=60.0, min_repeats=3, max_repeats=7)
    assert len(calls) == 1 + 7  # a budget far above the call's time: the maximum count
    timing.sync(CPU)  # nothing to wait for on the CPU
