"""speed.timing: best-of-N and median timing of a callable (warm-up, device sync, repeat counts)."""

from __future__ import annotations

import math
import statistics

import pytest
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


def test_interleaved_medians_keep_the_ratio_when_the_load_changes(monkeypatch):
    """A fake clock: a call costs ``cost * load``, and the load triples halfway (another job starts). Interleaved
    rounds see the load change on both functions alike; timing one series after the other would not."""
    clock = {"now": 0.0, "calls": 0}

    def make(cost: float):
        def fn():
            clock["calls"] += 1
            clock["now"] += cost * (1.0 if clock["calls"] <= 12 else 3.0)
        return fn

    monkeypatch.setattr(timing, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock["now"])}))
    dense, sparse = make(2e-3), make(1e-3)
    td, ts = timing.interleaved_ms((dense, sparse), CPU, rounds=11, warmup=1)
    assert len(td) == len(ts) == 11 and clock["calls"] == 24
    assert statistics.median(td) / statistics.median(ts) == pytest.approx(2.0)  # the true ratio
    clock.update(now=0.0, calls=0)
    back_to_back = [timing.interleaved_ms((fn,), CPU, rounds=11, warmup=1)[0] for fn in (dense, sparse)]
    assert statistics.median(back_to_back[0]) / statistics.median(back_to_back[1]) < 1.0  # the load change wins


def test_rounds_for_is_clamped():
    calls, fn = _counter()
    assert timing.rounds_for((fn, fn), CPU, 0.0, min_rounds=5, max_rounds=9) == 5 and len(calls) == 2
    assert timing.rounds_for((fn,), CPU, 60.0, min_rounds=5, max_rounds=9) == 9
