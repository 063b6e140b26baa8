from __future__ import annotations

import json
import random
import shutil
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, load_file

from ellava_lib.core import units
from ellava_lib.core.policy import DEFAULT_GRID, Policy, search_grid
from ellava_lib.data import calibration
from ellava_lib.model.specs import load_model
from ellava_lib.prune import leveldb, packing, prune, walk
from ellava_lib.prune.obs import SparseGPT


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


# ------------------------------------------------------------------------------------------- format 3


def test_pack_bits_is_little_endian_row_major():
    mask = torch.tensor([[True, False, False, False, False, False, False, False, False, True],
                         [False] * 9 + [True]])  # width 10: rows straddle bytes
    packed = packing.pack_bits(mask)
    # positions 0, 9, 19 set: byte 0 bit 0, byte 1 bit 1 (9 = 8 + 1), byte 2 bit 3 (19 = 16 + 3)
    assert packed.dtype == torch.uint8 and packed.tolist() == [1, 2, 8]
    assert torch.equal(packing.unpack_bits(packed, 20), mask.reshape(-1))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 13), (4, 8), (16, 33)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
def test_packing_round_trip_is_exact(shape, sparsity):
    g = torch.Generator().manual_seed(hash((shape, sparsity)) % 2**31)
    w = torch.randn(shape, generator=g)
    w[torch.rand(shape, generator=g) < sparsity] = 0
    w[0] = 0  # an all-zero row
    n = w.numel()
    packed = packing.pack_bits(w != 0)
    assert packed.numel() == (n + 7) // 8 and torch.equal(packing.unpack_bits(packed, n), (w != 0).reshape(-1))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        values = w.to(dtype).reshape(-1)[(w != 0).reshape(-1)]
        back = packing.unpack_weights(values, packed, shape)
        assert back.dtype == dtype and torch.equal(back, w.to(dtype))
        enc = packing.encode_weights(w, dtype, "x@0.5")
        if set(enc) == {"x@0.5.values", "x@0.5.mask"}:
            assert torch.equal(packing.unpack_weights(enc["x@0.5.values"], enc["x@0.5.mask"], shape), w.to(dtype))
        else:
            assert torch.equal(enc["x@0.5"], w.to(dtype))
    with pytest.raises(ValueError, match="values for a mask"):
        packing.unpack_weights(torch.ones(int((w != 0).sum()) + 1), packed, shape)


@pytest.mark.parametrize("dtype,b", [(torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2)])
def test_storage_picks_the_smaller_representation(dtype, b):
    n = 64  # ceil(n / 8) = 8 mask bytes: packed < dense iff nnz * b + 8 < 64 b
    border = (n * b - 8 + b - 1) // b  # the smallest nnz stored densely
    for nnz, packed in ((border - 1, True), (border, False), (0, True), (n, False)):
        w = torch.zeros(8, 8)
        w.view(-1)[torch.randperm(n, generator=torch.Generator().manual_seed(nnz))[:nnz]] = 1.5
        enc = packing.encode_weights(w, dtype, "k")
        assert (set(enc) == {"k.values", "k.mask"}) is packed, (nnz, packed)
        stored = sum(t.numel() * t.element_size() for t in enc.values())
        assert stored == min(packing.packed_bytes(n, nnz, b), packing.dense_bytes(n, b))
        assert stored == (nnz * b + 8 if packed else n * b)


def test_files_hold_no_dense_level_and_the_build_records(built, micro_model):
    out, _, _ = built
    model, _ = micro_model
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == leveldb.FORMAT == 3 and config["store_dtype"] == "float32"
    for unit, lins in units.unit_linears(model).items():
        with safe_open(str(out / f"{unit}.safetensors"), framework="pt") as f:
            keys, meta = set(f.keys()), f.metadata()
        levels = {float(k.split("@")[1].removesuffix(".values").removesuffix(".mask")) for k in keys}
        assert levels == {g for g in DEFAULT_GRID if g > 0}  # no level 0
        assert any(k.endswith(".mask") for k in keys) and meta["format"] == "3"
        assert json.loads(meta["shapes"]) == {n: list(lin.weight.shape) for n, lin in lins.items()}
        assert meta["dense_sha1"] == leveldb.weights_digest({n: lin.weight for n, lin in lins.items()})
        assert [s for s, _ in json.loads(meta["frobenius_sq"])] == list(DEFAULT_GRID)


def _old_format_levels(model_dir, batch, grid):
    """What format 1 stored: ``{layer: {level: weights}}`` from :func:`leveldb._prune_levels` on the same walk
    (dense inputs), level 0 = the dense weights."""
    model, _ = load_model(model_dir)
    names = list(units.list_units(model))
    old: dict[str, dict[float, torch.Tensor]] = {}

    def visit(block, block_units, stats):
        for lins in block_units.values():
            for name, lin in lins.items():
                old[name] = leveldb._prune_levels(lin, stats[name], grid, "sparsegpt", 128, 0.01)
                stats[name].free()
        return False

    with torch.no_grad():
        walk.walk_blocks(model, batch, names, SparseGPT, visit, sequential=False, progress=False)
    return old


def test_assembly_equals_the_old_format_at_every_level(built, micro_model_dir, calib):
    out, _, _ = built
    _, batch = calib
    old = _old_format_levels(micro_model_dir, batch, DEFAULT_GRID)
    model, _ = load_model(micro_model_dir)
    db = leveldb.LevelDB(out)
    lins = units.unit_linears(model)
    for level in (*DEFAULT_GRID[1:], 0.0):
        db.assemble(model, Policy.uniform(list(lins), level))
        for unit_lins in lins.values():
            assert all(torch.equal(lin.weight, old[name][level]) for name, lin in unit_lins.items()), level
    for unit, unit_lins in lins.items():  # the Frobenius table equals format 1's formula on format 1's tensors
        dense = {k: old[k][0.0].double() for k in sorted(unit_lins)}
        want = {float(s): float(sum((dense[k] * (old[k][s] != 0)).pow(2).sum() for k in dense)) for s in DEFAULT_GRID}
        assert db.frobenius_sq(unit) == want
    assert db.weights("lm.0.attn", 0.0).keys() == lins["lm.0.attn"].keys()  # level 0: the snapshot


def test_sixteen_bit_storage_assembles_the_rounded_weights(micro_model_dir, calib, tmp_path):
    _, batch = calib
    grid = (0.0, 0.5, 0.8)
    old = _old_format_levels(micro_model_dir, batch, grid)
    model, _ = load_model(micro_model_dir)
    names = list(units.list_units(model))
    sizes = {}
    for dtype in ("bfloat16", "float32"):
        leveldb.build_level_db(model, batch, tmp_path / dtype, grid, progress=False, store_dtype=dtype)
        sizes[dtype] = leveldb.LevelDB(tmp_path / dtype).disk_bytes()
    assert sizes["bfloat16"] < 0.6 * sizes["float32"]
    assert json.loads((tmp_path / "bfloat16" / "config.json").read_text())["store_dtype"] == "bfloat16"
    db = leveldb.LevelDB(tmp_path / "bfloat16")
    for level in (0.5, 0.8, 0.0):
        db.assemble(model, Policy.uniform(names, level, grid=grid))
        for lins in units.unit_linears(model).values():
            for name, lin in lins.items():
                want = old[name][level] if level == 0 else old[name][level].to(torch.bfloat16).float()
                assert lin.weight.dtype == torch.float32 and torch.equal(lin.weight, want), (name, level)
    with pytest.raises(ValueError, match="store_dtype must be"):
        leveldb.build_level_db(model, batch, tmp_path / "x", grid, progress=False, store_dtype="int8")


@pytest.mark.parametrize("cache_bytes", [leveldb.DECODE_CACHE_BYTES, 0, 200_000], ids=["cache", "none", "evicting"])
def test_delta_assembly_copies_only_changed_units(built, micro_model_dir, cache_bytes):
    out, _, _ = built
    db = leveldb.LevelDB(out, cache_bytes=cache_bytes)
    walker, _ = load_model(micro_model_dir)
    full, _ = load_model(micro_model_dir)
    names = list(units.list_units(walker))
    rng = random.Random(7)
    sp = {u: rng.choice(DEFAULT_GRID) for u in names}
    db.assemble(walker, Policy(sp))
    assert db.last_assemble_units == len(names)  # the first assembly into a model copies everything
    for _ in range(50):
        new = dict(sp)
        for u in rng.sample(names, rng.randint(0, 2)):
            new[u] = rng.choice(DEFAULT_GRID)
        db.assemble(walker, Policy(new), check=False)
        assert db.last_assemble_units == sum(new[u] != sp[u] for u in names)
        sp = new
        db.forget(full)
        db.assemble(full, Policy(sp), check=False)
        assert db.last_assemble_units == len(names)
        assert all(torch.equal(a, b) for a, b in zip(walker.state_dict().values(), full.state_dict().values()))
    db.assemble(walker, Policy(sp), check=False)
    assert db.last_assemble_units == 0
    lin = units.unit_linears(walker)["lm.1.mlp"]["lm.1.mlp.up_proj"]
    with torch.no_grad():
        lin.weight.mul_(2)  # a change outside the database: that unit is copied again
    db.assemble(walker, Policy(sp), check=False)
    assert db.last_assemble_units == 1
    assert torch.equal(lin.weight, db.weights("lm.1.mlp", sp["lm.1.mlp"])["lm.1.mlp.up_proj"])
    db.forget(walker)
    db.assemble(walker, Policy(sp), check=False)
    assert db.last_assemble_units == len(names)
    assert db._cache_used <= cache_bytes and (len(db._cache) > 0) is (cache_bytes > 0)


def test_another_database_on_an_assembled_model_reuses_its_snapshot(built, micro_model_dir):
    out, _, _ = built
    model, _ = load_model(micro_model_dir)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    names = list(units.list_units(model))
    leveldb.LevelDB(out).assemble(model, Policy.uniform(names, 0.5))
    again = leveldb.LevelDB(out)  # e.g. a second search on the same model object
    again.assemble(model, Policy.uniform(names, 0.0))
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_a_pruned_model_is_refused_for_the_snapshot(built, micro_model_dir, calib):
    out, _, _ = built
    _, batch = calib
    model, _ = load_model(micro_model_dir)
    names = list(units.list_units(model))
    prune.prune_model(model, Policy.uniform(names, 0.5), "sparsegpt", batch, progress=False)
    db = leveldb.LevelDB(out)
    with pytest.raises(ValueError, match="not the dense one") as err:
        db.assemble(model, Policy.uniform(names, 0.0))  # the identity check passes: embeddings are untouched
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="stores no dense weights"):
        db.weights(names[0], 0.0)


def test_disk_preflight_fails_in_one_line_and_writes_nothing(micro_model, calib, tmp_path, monkeypatch):
    model, _ = micro_model
    _, batch = calib
    sizes = units.list_units(model)
    need = leveldb.estimate_bytes(sizes, DEFAULT_GRID, 4)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * need, 9 * need, need - 1))
    out = tmp_path / "nested" / "db"
    with pytest.raises(OSError, match=f"{need:,} bytes .* needed .* {need - 1:,} bytes .* free") as err:
        leveldb.build_level_db(model, batch, out, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "nested").exists()


def test_the_estimate_bounds_the_written_bytes(built, micro_model):
    out, _, _ = built
    model, _ = micro_model
    need = leveldb.estimate_bytes(units.list_units(model), DEFAULT_GRID, 4)
    written = leveldb.LevelDB(out).disk_bytes()
    payload = need - len(units.list_units(model)) * leveldb.UNIT_FILE_SLACK
    assert written <= need and payload <= written * 1.05  # tight on the weights, the slack covers headers


def test_the_7b_estimate():
    """LLaVA-1.5-7B's 64 LM units at fp16: 101.6 GB on the 16-level grid of a 0.5 / 0.6 / 0.7 sweep (over the
    70 GB target: 2 bytes per kept weight on 15 levels is 89.4 GB alone), 65.6 GB on the 0.1 grid (under it)."""
    from ellava_lib.model import structure

    sizes = units.list_units(structure.meta_model(structure.load_config()))
    assert len(sizes) == 64 and sum(sizes.values()) == 6_476_005_376
    sweep_grid = search_grid([0.5, 0.6, 0.7])
    assert len(sweep_grid) == 16
    assert leveldb.estimate_bytes(sizes, sweep_grid, 2) == 101_578_493_952
    assert leveldb.estimate_bytes(sizes, DEFAULT_GRID, 2) == 65_636_663_808 <= 70e9
    assert 16 * 2 * sum(sizes.values()) > 2 * leveldb.estimate_bytes(sizes, sweep_grid, 2)  # format 1: 207 GB


def test_another_format_is_refused_with_a_rebuild_hint(built, micro_model, calib, tmp_path):
    out, _, _ = built
    model, _ = micro_model
    _, batch = calib
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((out / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "format": 1}))
    for call in (lambda: leveldb.LevelDB(old), lambda: leveldb.build_level_db(model, batch, old, progress=False)):
        with pytest.raises(ValueError, match="format 1, this version reads format 3: rebuild it") as err:
            call()
        assert "\n" not in str(err.value)
