"""The paper-tier code paths that run without a GPU or the hub: one decoder block at a time on an execution
device, hub-style loading in half precision from a local ``save_pretrained`` folder, and a clear error
when the hub cannot be reached."""

from __future__ import annotations

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
