"""The paper-tier code paths that run without a GPU or the hub: one decoder block at a time on an execution
device, hub-style loading in half precision from a local ``save_pretrained`` folder, and a clear error
when the hub cannot be reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ellava_lib.core.policy import Policy
from ellava_lib.core.units import list_units, lm_layers
from ellava_lib.model import loading, specs
from ellava_lib.prune.prune import prune_model


def test_one_block_at_a_time_gives_the_same_pruned_model(micro_model_dir, calib):
    """``device=`` moves each decoder block there for its turn and back (never two at once), and the
    pruned weights equal those of the plain run."""
    plain, _ = specs.load_model(micro_model_dir)
    policy = Policy.uniform(list_units(plain), 0.5)
    prune_model(plain, policy, "sparsegpt", calib, progress=False)

    model, _ = specs.load_model(micro_model_dir)
    moves: list[tuple[int, str]] = []
    for i, layer in enumerate(lm_layers(model)):
        original = layer.to

        def logged(*args, _i=i, _orig=original, **kw):
            moves.append((_i, str(args[0] if args else kw.get("device"))))
            return _orig(*args, **kw)
        layer.to = logged
    prune_model(model, policy, "sparsegpt", calib, progress=False, device="cpu")
    n = len(lm_layers(model))
    assert [i for i, _ in moves] == [i for i in range(n) for _ in range(2)]  # to device, back, next block
    for a, b in zip(plain.state_dict().items(), model.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]


def test_load_pretrained_reads_a_save_pretrained_folder_in_half_precision(micro_model, tmp_path):
    model, processor = micro_model
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    half, proc = loading.load_pretrained(str(tmp_path), "bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16 and not half.training
    assert proc.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    with pytest.raises(loading.ModelLoadError, match="dtype must be one of"):
        loading.load_pretrained(str(tmp_path), "int3")


def test_hub_model_without_the_hub_is_a_one_line_error():
    code = ("from ellava_lib.model import loading, specs\n"
            "try:\n    specs.load_model('llava-1.5-7b')\n"
            "except loading.ModelLoadError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-ellava-test"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300).stdout
    assert out.startswith("ERR cannot load 'llava-hf/llava-1.5-7b-hf' (needs the Hugging Face hub or a local copy)")
    assert out.count("\n") == 1


def test_place_moves_the_model_placed_before_back_to_the_cpu(monkeypatch):
    """One model on a device at a time: placing another releases the earlier one (notebook 02's dense model
    before its magnitude copies, the sweep's searched model before the exact re-prune)."""
    from ellava_lib.run import tier as tiers

    released = []
    monkeypatch.setattr(tiers, "release", lambda m: released.append(m))
    t = tiers.Tier(device="cpu:0")  # not "cpu": goes through the placement path without a GPU
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    tiers.place(t, a)
    tiers.place(t, a)
    assert released == []
    tiers.place(t, b)
    assert released == [a]
    tiers.place(t, b)
    assert released == [a]
    tiers.place(tiers.Tier(), a)  # the CPU tier places nothing
    assert released == [a]


def test_the_sweep_builds_level_databases_one_block_at_a_time_with_tier_offload(micro_model_dir, tmp_path,
                                                                                monkeypatch):
    from ellava_lib.prune import leveldb
    from ellava_lib.run import sweep
    from ellava_lib.run.tier import Tier

    seen = {}
    real_build, real_prune = leveldb.build_level_db, sweep.prune_model

    def build(*args, **kw):
        seen["db_device"] = kw.get("device")
        return real_build(*args, **kw)

    def prune(*args, **kw):
        seen["prune_device"] = kw.get("device")
        return real_prune(*args, **kw)
    monkeypatch.setattr(leveldb, "build_level_db", build)
    monkeypatch.setattr(sweep, "prune_model", prune)
    for offload, want in ((False, None), (True, "cpu")):
        spec = sweep.SweepSpec(str(micro_model_dir), eval_limit=1, calib_eval=False,
                               tier=Tier(offload=offload).to_dict())
        sweep.prepare_level_db(spec, 0, 8, tmp_path / f"o{offload}", grid=(0.0, 0.5))
        sweep.run_job(sweep.Job("wanda", 0.5, 0, 8), spec, tmp_path / f"o{offload}")
        assert seen == {"db_device": want, "prune_device": want}


def _db_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{f.stem}/{k}": v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_notebook_03_builds_its_level_database_as_the_sweep_does_offloaded_or_placed(micro_model_dir, tmp_path,
                                                                                     monkeypatch):
    """Notebook 03 builds through ``sweep.build_tier_level_db`` (run/leveldbs.py): with ``tier.offload`` the model
    stays on the CPU and one block at a time goes to the device (nothing placed); without it the whole model is placed
    first.
    Both give the database the notebook's former direct ``build_level_db`` call wrote, bit for bit."""
    from ellava_lib.data.calibration import draw_calibration, encode_calibration
    from ellava_lib.prune import leveldb
    from ellava_lib.run import leveldbs, sweep
    from ellava_lib.run import tier as tiers

    samples = draw_calibration(8, 0)
    grid = (0.0, 0.5, 0.7)
    model, proc = specs.load_model(micro_model_dir)
    batch = encode_calibration(samples, proc)
    old = tmp_path / "old"
    leveldb.build_level_db(model, batch, old, sweep.db_build_grid(old, grid), progress=False,
                           calib_info={"ids": [s.id for s in samples], "seed": 0})
    seen: dict[str, list] = {"place": [], "device": []}
    real_place, real_build = leveldbs.place, leveldb.build_level_db
    monkeypatch.setattr(leveldbs, "place",
                        lambda t, m, b=None: (seen["place"].append(t.offload), real_place(t, m, b))[1])
    monkeypatch.setattr(leveldb, "build_level_db",
                        lambda *a, **kw: (seen["device"].append(kw.get("device")), real_build(*a, **kw))[1])
    for offload in (False, True):
        tier = tiers.Tier(device="cpu:0", offload=offload)  # "cpu:0": the placement path, without a GPU
        model, _ = specs.load_model(micro_model_dir)
        sweep.build_tier_level_db(tier, model, batch, tmp_path / f"o{offload}", grid, samples, 0)
        got = _db_tensors(tmp_path / f"o{offload}")
        want = _db_tensors(old)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), offload
        config = json.loads((tmp_path / f"o{offload}" / "config.json").read_text())
        assert config == json.loads((old / "config.json").read_text())
    assert seen == {"place": [False], "device": [None, "cpu:0"]}  # offload: nothing placed, one block at a time


@pytest.mark.parametrize("profile", ["ci", "default", "smol", "paper"])
def test_notebook_03_builds_the_levels_the_sweep_reads(profile):
    """Notebook 03's levels (``sweep.db_levels`` of its profile) are those its former ``search_grid`` call printed
    where the profile keeps the finer levels (ci, default, smol: its checked output unchanged), and the 0.1 grid
    where the profile sets ``fine_step: 0`` (paper: the 65.6 GB database ``ellava plan`` counts, not 101.6 GB)."""
    from ellava_lib.core.policy import DEFAULT_GRID, search_grid
    from ellava_lib.run import pipeline, sweep

    params = {**pipeline.notebook_defaults(pipeline.notebooks_dir() / "03_search_space.ipynb"),
              **pipeline.load_profile(profile)}
    spec = sweep.SweepSpec("m", search_preset=params["search_preset"], search=params["search"] or {},
                           ellava=params["ellava"] or {})
    levels = sweep.db_levels(spec, [params["sparsity"], *params["sparsities"]], params["seed"], params["calib_n"])
    former = search_grid([params["sparsity"], *params["sparsities"]])
    assert levels == (DEFAULT_GRID if profile == "paper" else former)
    assert len(former) == 16
