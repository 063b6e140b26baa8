"""Export of a pruned model: plain ``transformers`` loads it back (no ellava code) with identical logits and
evaluation scores; policy and sparsity report travel with it. A sparse folder (save_sparse) keeps bitmask and
CSR layers sparse and loads back exactly."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from ellava_lib.core import units
from ellava_lib.core.policy import Policy
from ellava_lib.eval.evaluate import EvalConfig, evaluate
from ellava_lib.model.specs import load_model
from ellava_lib.prune.prune import prune_model
from ellava_lib.speed import bitmask, sparse
from ellava_lib.speed.export import export_pruned, load_sparse, save_sparse


@pytest.fixture(scope="module")
def pruned(micro_model_dir):
    model, proc = load_model(micro_model_dir)
    levels = (0.5, 0.7, 0.3, 0.6)
    policy = Policy({u: levels[i % 4] for i, u in enumerate(units.list_units(model))})
    report = prune_model(model, policy, "magnitude", None, progress=False)
    return model, proc, policy, report


@pytest.fixture(scope="module")
def exported(pruned, tmp_path_factory):
    model, proc, policy, report = pruned
    return export_pruned(model, proc, policy, report, tmp_path_factory.mktemp("export") / "pruned")


def _inputs(calib):
    return {k: calib[k][:4] for k in ("input_ids", "attention_mask", "pixel_values")}


def test_files_policy_and_report(pruned, exported):
    _, _, policy, report = pruned
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "policy.json", "sparsity.csv"} <= names
    assert Policy.from_json(exported / "policy.json").sparsities == policy.sparsities
    pd.testing.assert_frame_equal(pd.read_csv(exported / "sparsity.csv"), report, check_dtype=False)
    assert json.loads((exported / "config.json").read_text())["model_type"] == "llava"


def test_plain_transformers_load_gives_identical_logits(pruned, exported, calib):
    model, _, policy, report = pruned
    plain = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    assert type(plain) is LlavaForConditionalGeneration
    for name, lin in units.unit_linears(plain).items():
        for layer, w in lin.items():  # the zeros survive the round trip
            assert (w.weight == 0).float().mean().item() == pytest.approx(
                report.set_index("layer").at[layer, "measured"], abs=1e-6)
    with torch.no_grad():
        assert torch.equal(plain(**_inputs(calib)).logits, model(**_inputs(calib)).logits)


def test_plain_load_gives_identical_scores(pruned, exported):
    model, proc, _, _ = pruned
    plain = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    plain_proc = AutoProcessor.from_pretrained(exported)
    cfg = EvalConfig(limit=3, batch_size=8)
    ours = evaluate(model, proc, cfg, progress=False)
    theirs = evaluate(plain, plain_proc, cfg, progress=False)
    pd.testing.assert_frame_equal(ours, theirs)


def test_sparse_modules_export_dense_and_stale_reports_are_refused(pruned, tmp_path, calib):
    model, proc, policy, report = pruned
    fast = copy.deepcopy(model)
    sparse.sparsify_model(fast, policy, backend="csr", example_inputs=[1], min_speedup=0.0, min_time_s=0.0)
    assert any(isinstance(m, sparse.SparseLinear) for m in fast.modules())
    out = export_pruned(fast, proc, policy, report, tmp_path / "from_sparse")
    assert any(isinstance(m, sparse.SparseLinear) for m in fast.modules())  # the caller's model is untouched
    plain = LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**_inputs(calib)).logits, model(**_inputs(calib)).logits)
    stale = report.assign(measured=report["measured"] * 0.5)
    with pytest.raises(ValueError, match="does not match"):
        export_pruned(model, proc, policy, stale, tmp_path / "stale")


def test_sparse_folder_round_trip_is_exact(pruned, exported, tmp_path, calib):
    if bitmask.extension() is None:
        pytest.skip("bitmask extension not built here")
    model, proc, policy, _ = pruned
    fast = copy.deepcopy(model)
    sparse.sparsify_model(fast, policy, backend="bitmask", example_inputs=[1], min_speedup=0.0, min_time_s=0.0)
    names = [n for n, m in fast.named_modules() if isinstance(m, bitmask.BitmaskLinear)]
    for n in names[:3]:  # some layers as CSR: both sparse kinds in one folder
        fast.set_submodule(n, sparse.SparseLinear.from_linear(fast.get_submodule(n).to_linear()))
    out = save_sparse(fast, tmp_path / "sparse", proc, policy)
    entry = json.loads((out / "config.json").read_text())["ellava_sparse"]
    kinds = [spec["kind"] for spec in entry["layers"].values()]
    assert entry["format"] == "ellava-sparse-v1"
    assert kinds.count("csr") == 3 and kinds.count("bitmask") == len(names) - 3
    back = load_sparse(out)
    mods = dict(back.named_modules())
    assert all(type(mods[n]) is type(m) for n, m in fast.named_modules())
    ours, theirs = fast.state_dict(), back.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(back(**_inputs(calib)).logits, fast(**_inputs(calib)).logits)
    with pytest.raises(ValueError, match="ellava_sparse"):
        load_sparse(exported)  # a plain (dense) export is not a sparse folder
