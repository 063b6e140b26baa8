from __future__ import annotations

import json
import os

import pytest

from ellava_lib.core.policy import DEFAULT_GRID, Policy, on_grid, weighted_mean

UNITS = {"vision.0.mlp": 100, "lm.0.attn": 300, "lm.0.mlp": 600}


def test_default_grid():
    assert DEFAULT_GRID == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def test_on_grid_within_the_tolerance():
    assert on_grid(0.3, DEFAULT_GRID) and on_grid(0.1 + 0.2, DEFAULT_GRID) and on_grid(0.0, DEFAULT_GRID)
    assert not on_grid(0.35, DEFAULT_GRID) and not on_grid(0.3 + 1e-8, DEFAULT_GRID) and not on_grid(0.5, ())


def test_mean_sparsity_is_the_weighted_mean_to_the_bit():
    p = Policy({"vision.0.mlp": 0.7, "lm.0.attn": 0.1, "lm.0.mlp": 0.3})
    assert weighted_mean(p.sparsities, UNITS) == (100 * 0.7 + 300 * 0.1 + 600 * 0.3) / 1000
    assert p.mean_sparsity(UNITS) == weighted_mean(p.sparsities, UNITS)


def test_json_round_trip(tmp_path):
    p = Policy({"vision.0.mlp": 0.1, "lm.0.attn": 0.3, "lm.0.mlp": 0.7}, meta={"search": "srm", "lam": 0.5,
                                                                             "hist": [1, 2]})
    path = p.to_json(tmp_path / "sub" / "pol.json")
    q = Policy.from_json(path)
    assert q == p
    assert list(q.sparsities) == list(p.sparsities)  # order kept
    assert q.grid == DEFAULT_GRID and isinstance(q.grid, tuple)
    assert Policy.from_dict(p.to_dict()) == p
    assert json.loads(path.read_text()) == p.to_dict()
    # atomic write leaves no temp files behind; overwrite works
    Policy.uniform(UNITS, 0.5).to_json(path)
    assert os.listdir(tmp_path / "sub") == ["pol.json"]
    assert Policy.from_json(path) == Policy.uniform(UNITS, 0.5)


def test_round_trip_awkward_floats(tmp_path):
    p = Policy({"a": 0.1 + 0.2, "b": 1 / 3}, grid=(0.0, 1 / 3, 0.1 + 0.2))
    q = Policy.from_json(p.to_json(tmp_path / "p.json"))
    assert q.sparsities["a"] == 0.1 + 0.2 and q.sparsities["b"] == 1 / 3 and q.grid == p.grid


def test_from_dict_errors():
    with pytest.raises(ValueError, match="sparsities"):
        Policy.from_dict({"grid": [0.0]})
    with pytest.raises(ValueError, match="unknown policy keys"):
        Policy.from_dict({"sparsities": {}, "sparsity": {}})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Policy({"a": 1.5})


def test_validate():
    Policy.uniform(UNITS, 0.3).validate(UNITS)
    Policy({"vision.0.mlp": 0.1 + 0.2, "lm.0.attn": 0.0, "lm.0.mlp": 0.9}).validate(UNITS)  # within 1e-9
    bad = Policy({"vision.0.mlp": 0.35, "lm.0.attn": 0.3, "lm.x.mlp": 0.1})
    with pytest.raises(ValueError) as e:
        bad.validate(UNITS)
    msg = str(e.value)
    assert "unknown units ['lm.x.mlp']" in msg
    assert "missing units ['lm.0.mlp']" in msg
    assert "off-grid" in msg and "vision.0.mlp" in msg and "0.35" in msg
    with pytest.raises(ValueError, match="off-grid"):
        Policy({"a": 0.5}, grid=(0.0, 0.25)).validate({"a": 10})


def test_mean_sparsity_by_hand():
    p = Policy({"vision.0.mlp": 0.9, "lm.0.attn": 0.5, "lm.0.mlp": 0.0})
    # (100*0.9 + 300*0.5 + 600*0) / 1000 = (90 + 150) / 1000 = 0.24
    assert p.mean_sparsity(UNITS) == pytest.approx(0.24)
    assert Policy.uniform(UNITS, 0.4).mean_sparsity(UNITS) == pytest.approx(0.4)
    assert p.budget_ok(UNITS, 0.24)
    assert p.budget_ok(UNITS, 0.25, tol=0.02)
    assert not p.budget_ok(UNITS, 0.25)
    with pytest.raises(ValueError, match="missing"):
        p.mean_sparsity({**UNITS, "lm.1.mlp": 10})
    with pytest.raises(ValueError, match="parameter count"):
        p.mean_sparsity({"vision.0.mlp": 0, "lm.0.attn": 300, "lm.0.mlp": 600})


def test_uniform():
    p = Policy.uniform(UNITS, 0.2, meta={"kind": "uniform"})
    assert p.sparsities == {u: 0.2 for u in UNITS} and p.meta == {"kind": "uniform"}
    with pytest.raises(ValueError, match="grid"):
        Policy.uniform(UNITS, 0.25)
    assert Policy.uniform(UNITS, 0.25, grid=(0.0, 0.25)).grid == (0.0, 0.25)


def test_policy_id():
    p = Policy({"a": 0.1, "b": 0.2})
    pid = p.policy_id()
    assert len(pid) == 10 and all(c in "0123456789abcdef" for c in pid)
    # stable: hard-coded value (sha1 of '{"a":0.1,"b":0.2}'), key order, meta and grid do not matter
    assert pid == "36f49741b2"
    assert Policy({"b": 0.2, "a": 0.1}, meta={"x": 1}, grid=(0.1, 0.2)).policy_id() == pid
    assert Policy({"a": 0.1 + 1e-13, "b": 0.2}).policy_id() == pid
    assert Policy({"a": 0.2, "b": 0.1}).policy_id() != pid
    assert Policy({"a": 0.1, "c": 0.2}).policy_id() != pid
    assert Policy.uniform(UNITS, 0.0).policy_id() != Policy.uniform(UNITS, 0.1).policy_id()


def test_search_grid_adds_half_steps_around_each_target():
    from ellava_lib.core.policy import search_grid

    assert search_grid([0.6]) == (0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9)
    assert search_grid([0.6], step=0) == DEFAULT_GRID
    # two targets: the union; levels past the base range are dropped (0.95 at target 0.8)
    assert search_grid([0.5, 0.8]) == (0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8,
                                       0.85, 0.9)
    # an off-grid target becomes a level itself; nothing is duplicated within the tolerance
    levels = search_grid([0.63], span=0.05)
    assert 0.63 in levels and 0.58 in levels and 0.68 in levels and len(levels) == len(set(levels)) == 13


def test_search_config_levels_follow_its_own_target():
    import dataclasses

    from ellava_lib.search.config import SearchConfig

    cfg = SearchConfig(target=0.6)
    assert cfg.grid == DEFAULT_GRID and cfg.levels == (0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75,
                                                        0.8, 0.9)
    moved = dataclasses.replace(cfg, target=0.7)  # no 0.45 left over from the 0.6 levels
    assert 0.45 not in moved.levels and 0.85 in moved.levels
    assert SearchConfig(fine_step=0).levels == DEFAULT_GRID
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg
    # a config saved before fine levels existed reads back without them (its searches used the 0.1 grid)
    old = {k: v for k, v in cfg.to_dict().items() if k != "fine_step"}
    assert SearchConfig.from_dict(old).levels == DEFAULT_GRID
    for bad in (-0.05, 0.5, float("nan")):
        with pytest.raises(ValueError, match="fine_step"):
            SearchConfig(fine_step=bad)
