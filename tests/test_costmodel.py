"""The cost model: units of its outputs, monotonicity, presets, and the quick CPU measurement."""

from __future__ import annotations

import json
import time

import pytest

from ellava_lib.model import structure
from ellava_lib.speed import costmodel

PRUNABLE_LM = 6_476_005_376
PARAMS = 7_063_427_072


@pytest.fixture(scope="module")
def config():
    return structure.load_config()


def test_measure_cpu_profile_is_quick_and_positive():
    t0 = time.perf_counter()
    p = costmodel.measure_device_profile("cpu")
    assert time.perf_counter() - t0 < 5.0
    for x in (p.matmul_flops, p.solver_flops, p.mem_bandwidth, p.mem_bytes, p.link_bandwidth, p.op_latency_s):
        assert x > 0
    assert 1e8 < p.matmul_flops < 1e14 and 1e8 < p.mem_bandwidth < 1e13 and p.op_latency_s < 1e-2
    assert p.efficiency == 1.0 and p.forward_bytes == 4


def test_presets():
    for name in ("h100", "a100", "cpu-2core"):
        p = costmodel.get_profile(name)
        assert 0 < p.efficiency <= 1 and p.matmul_flops > 0 and p.mem_bytes > 0
    with pytest.raises(KeyError):
        costmodel.get_profile("tpu")


def test_units_of_the_estimate(config):
    est = costmodel.estimate_cost(config, "h100", levels=9, n_samples=64, generations=10, population=8,
                                  n_visual_tokens=576, n_text_tokens=64)
    db, se = est.level_db, est.search
    assert db.seconds == pytest.approx(sum(db.detail.values())) and db.seconds > 0
    assert se.seconds == pytest.approx(sum(se.detail.values())) and se.seconds > 0
    assert est.total_seconds == pytest.approx(db.seconds + se.seconds)
    # FLOPs: search = candidates x samples x forward FLOPs of one sample
    assert se.flops == pytest.approx(10 * 8 * 64 * 9_078_220_357_632)
    # bytes: every level of every LM unit stored densely in bf16; the whole model in bf16 on the host
    assert db.storage_bytes == 9 * PRUNABLE_LM * 2
    assert db.host_bytes == se.host_bytes == PARAMS * 2
    assert PARAMS * 2 < se.device_peak_bytes < 80e9 and est.fits
    assert json.loads(json.dumps(est.to_dict()))["inputs"]["levels"] == 9
    text = costmodel.format_estimate(est)
    assert "ESTIMATE" in text and "level_db" in text and "search" in text and "GB" in text


def test_monotonic_in_levels_and_samples(config):
    p = costmodel.get_profile("a100")
    db = [costmodel.estimate_level_db(config, p, levels=g, n_samples=64).seconds for g in (1, 4, 9)]
    assert db[0] < db[1] < db[2]
    db_n = [costmodel.estimate_level_db(config, p, levels=9, n_samples=n).seconds for n in (16, 64, 128)]
    assert db_n[0] < db_n[1] < db_n[2]
    se_n = [costmodel.estimate_search(config, p, generations=10, population=8, n_samples=n).seconds
            for n in (16, 64, 128)]
    assert se_n[0] < se_n[1] < se_n[2]
    se_g = [costmodel.estimate_search(config, p, generations=g, population=8).seconds for g in (10, 20)]
    assert se_g[1] == pytest.approx(2 * se_g[0])


def test_faster_device_is_faster(config):
    h = costmodel.estimate_cost(config, "h100", generations=10, population=8)
    a = costmodel.estimate_cost(config, "a100", generations=10, population=8)
    assert h.level_db.seconds < a.level_db.seconds and h.search.seconds < a.search.seconds
