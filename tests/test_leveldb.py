from __future__ import annotations

import json
import random
import time

import pytest
import torch
from safetensors.torch import load, load_file

from ellava_lib.core import units
from ellava_lib.core.policy import DEFAULT_GRID, Policy
from ellava_lib.data import calibration
from ellava_lib.model.specs import load_model
from ellava_lib.prune import leveldb, prune


@pytest.fixture(scope="module")
def calib(micro_model):
    """Overrides conftest's ``calib`` (the same 16 samples, seed 0) to return the samples with the batch: the
    level database records their ids."""
    _, proc = micro_model
    samples = calibration.draw_calibration(16, 0)
    return samples, calibration.encode_calibration(samples, proc)


@pytest.fixture(scope="module")
def built(micro_model_dir, calib, tmp_path_factory):
    """A level database of the micro model (every LM unit, the default grid) and its build time."""
    samples, batch = calib
    model, _ = load_model(micro_model_dir)
    out = tmp_path_factory.mktemp("leveldb")
    tick = time.perf_counter()
    records = leveldb.build_level_db(model, batch, out, progress=False,
                                     calib_info={"ids": [s.id for s in samples], "seed": 0})
    return out, records, time.perf_counter() - tick


def test_level_keys():
    assert [leveldb.level_key("lm.0.mlp.up_proj", g) for g in (0.0, 0.1, 0.55)] == [
        "lm.0.mlp.up_proj@0", "lm.0.mlp.up_proj@0.1", "lm.0.mlp.up_proj@0.55"]


def _random_policy(model, seed):
    rng = random.Random(seed)
    return Policy({u: rng.choice(DEFAULT_GRID) for u in units.list_units(model)})


def test_build_writes_one_file_per_unit_and_its_config(built, micro_model):
    out, records, _ = built
    model, _ = micro_model
    names = list(units.list_units(model))
    assert list(records["unit"]) == names and (records["status"] == "built").all()
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(f"{u}.safetensors" for u in names)
    config = json.loads((out / "config.json").read_text())
    assert config["grid"] == list(DEFAULT_GRID) and config["method"] == "sparsegpt"
    assert config["calibration"]["seed"] == 0 and len(config["calibration"]["ids"]) == 16
    assert config["model"]["identity"] == leveldb.model_identity(model)
    db = leveldb.LevelDB(out)
    assert set(db.weights("lm.0.mlp", 0.3)) == set(units.unit_linears(model)["lm.0.mlp"])
    assert (db.build_seconds()["build_seconds"] > 0).all()
    assert not list(out.glob(".*.tmp"))


def test_assemble_copies_the_stored_weights(built, micro_model_dir):
    out, _, _ = built
    model, _ = load_model(micro_model_dir)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    db = leveldb.LevelDB(out)
    for seed in (0, 1):  # assembling into an already assembled model works too
        policy = _random_policy(model, seed)
        db.assemble(model, policy)
        for unit, lins in units.unit_linears(model).items():
            stored = db.weights(unit, policy.sparsities[unit])
            for name, lin in lins.items():
                assert torch.equal(lin.weight, stored[name])
    zero = Policy.uniform(units.list_units(model), 0.0)
    db.assemble(model, zero)  # level 0 is the dense model
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_levels_equal_non_sequential_sparsegpt(built, micro_model_dir, calib):
    out, _, _ = built
    _, batch = calib
    db = leveldb.LevelDB(out)
    for s in (0.4, 0.8):
        model, _ = load_model(micro_model_dir)
        policy = Policy.uniform(units.list_units(model), s)
        prune.prune_model(model, policy, "sparsegpt", batch, sequential=False, progress=False)
        for unit, lins in units.unit_linears(model).items():
            stored = db.weights(unit, s)
            assert all(torch.equal(lin.weight, stored[name]) for name, lin in lins.items())


def test_assembling_costs_far_less_than_building(built, micro_model_dir):
    out, records, build_seconds = built
    model, _ = load_model(micro_model_dir)
    db = leveldb.LevelDB(out)
    db.assemble(model, _random_policy(model, 2))  # opens the files
    seconds = min(db.assemble(model, _random_policy(model, k), check=False) for k in range(5))
    assert seconds * 10 < build_seconds and seconds * 10 < records["seconds"].sum()


def test_resume_rebuilds_only_the_missing_unit(built, micro_model_dir, calib):
    out, _, _ = built
    _, batch = calib
    victim = out / "lm.1.attn.safetensors"
    before = victim.read_bytes()
    others = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors") if p != victim}
    victim.unlink()
    model, _ = load_model(micro_model_dir)
    records = leveldb.build_level_db(model, batch, out, progress=False)
    assert dict(zip(records["unit"], records["status"])) == {
        "lm.0.attn": "skipped", "lm.0.mlp": "skipped", "lm.1.attn": "built", "lm.1.mlp": "skipped"}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors") if p != victim} == others
    rebuilt, original = load_file(victim), load(before)  # deterministic: the same tensors again
    assert rebuilt.keys() == original.keys() and all(torch.equal(rebuilt[k], original[k]) for k in rebuilt)


def test_clear_errors(built, micro_model_dir, calib):
    out, _, _ = built
    _, batch = calib
    model, _ = load_model(micro_model_dir)
    db = leveldb.LevelDB(out)
    names = list(units.list_units(model))
    with pytest.raises(ValueError, match="not a level"):
        db.assemble(model, Policy({u: 0.55 for u in names}, grid=(0.55,)))
    with pytest.raises(ValueError, match="another grid"):
        leveldb.build_level_db(model, batch, out, grid=(0.0, 0.5), progress=False)
    with torch.no_grad():
        model.lm_head.weight.add_(1e-3)
    with pytest.raises(ValueError, match="another model"):
        db.assemble(model, Policy.uniform(units.list_units(model), 0.5))
    partial = leveldb.build_level_db(load_model(micro_model_dir)[0], batch, out.parent / "partial",
                                     units=["lm.0.attn"], grid=(0.0, 0.5), progress=False)
    assert list(partial["unit"]) == ["lm.0.attn"]
    fresh, _ = load_model(micro_model_dir)
    with pytest.raises(ValueError, match="not in the level database"):
        leveldb.LevelDB(out.parent / "partial").assemble(fresh, Policy.uniform(units.list_units(fresh), 0.5))
    with pytest.raises(FileNotFoundError):
        leveldb.LevelDB(out.parent / "nowhere")
