"""The memory model (speed/memory.py), ``ellava plan`` (run/plan.py) and the random-weight dry run
(run/dryrun.py): formulas against their terms, batch choice maximal and fitting, the paper presets equal to the
40 GB plan, the README block generated, the dry run of a shrunken LLaVA-1.5 on the CPU."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ellava_lib import cli
from ellava_lib.model import structure
from ellava_lib.model.loading import random_weights
from ellava_lib.run import dryrun, plan, report
from ellava_lib.run.tier import Tier
from ellava_lib.search.config import SearchConfig
from ellava_lib.speed import memory

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dims():
    return memory.Dims.of(structure.load_config("llava-1.5-7b"))


@pytest.fixture(scope="module")
def paper40():
    return plan.make_plan("paper", 40.0)


def test_dims_count_the_parameters_of_the_real_model():
    config = dryrun.shrunk_config(structure.load_config("llava-1.5-7b"))
    model = random_weights(config, "cpu", "float16", seed=3)
    dm = memory.Dims.of(config)
    assert dm.params == sum(p.numel() for p in model.parameters())
    assert dm.block_params == sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    assert dm.projector_params == sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    again = random_weights(config, "cpu", "float16", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(),
                                                       random_weights(config, "cpu", "float16", 4).parameters()))


def test_memory_terms(dims):
    wl = memory.Workload()
    b = wl.dtype_bytes
    # one more generated token adds one KV entry per layer, row and key/value: 2 L B d_kv b
    longer = replace(wl, max_new_tokens=wl.max_new_tokens + 1)
    assert memory.eval_bytes(dims, longer, 8) - memory.eval_bytes(dims, wl, 8) == pytest.approx(
        2 * dims.layers * 8 * dims.d_kv * b)
    assert dims.params * b < memory.eval_bytes(dims, wl, 1) < memory.eval_bytes(dims, wl, 2)
    # offloading keeps one decoder block instead of all of them
    saved = memory.leveldb_bytes(dims, wl, False) - memory.leveldb_bytes(dims, wl, True)
    assert saved == pytest.approx((dims.layers - 1) * dims.block_params * b)
    # checkpointing keeps the L block inputs and one block's activations instead of L blocks' activations
    for m in (1, 4):
        assert memory.projector_bytes(dims, wl, m, True) < memory.projector_bytes(dims, wl, m, False)
    # 7B fp16 weights: 14.1 GB (7,063,427,072 parameters)
    assert dims.params * b / 1e9 == pytest.approx(14.13, abs=0.01)


@pytest.mark.parametrize("gb", [80.0, 40.0, 24.0])
def test_choose_fits_and_is_maximal(dims, gb):
    wl = memory.Workload()
    room = gb * 1e9 - memory.RESERVE_BYTES
    batches, peaks, fits = memory.choose(dims, wl, gb * 1e9)
    assert fits and all(v <= room for v in peaks.values())
    bigger = [c for c in memory.BATCH_CANDIDATES if c > batches.eval_batch and c <= 64]
    assert not bigger or memory.eval_bytes(dims, wl, min(bigger)) > room
    bigger = [c for c in memory.BATCH_CANDIDATES if batches.micro_batch < c <= wl.projector_rows]
    assert not bigger or memory.projector_bytes(dims, wl, min(bigger), batches.checkpointing) > room
    assert batches.offload == (memory.leveldb_bytes(dims, wl, False) > room)


def test_a_gpu_too_small_is_reported(dims):
    batches, peaks, fits = memory.choose(dims, memory.Workload(), 12e9)  # the weights alone are 14.1 GB
    assert not fits and batches.eval_batch == 1 and batches.offload and batches.checkpointing


def test_paper_presets_are_the_40gb_plan(paper40):
    """SearchConfig.paper() and profiles/paper.yaml carry the batch sizes the memory model picks at 40 GB."""
    setup = plan.profile_setup("paper")
    over = paper40.overrides
    assert paper40.fits and paper40.gpu_gb == 40.0
    assert setup.search.eval_batch_size == over["search"]["eval_batch_size"]
    assert setup.search.projector.micro_batch == over["search"]["projector_micro_batch"]
    assert setup.search.projector.checkpointing == over["search"]["projector_checkpointing"]
    assert setup.tier.eval_batch_size == over["tier"]["eval_batch_size"]
    assert setup.tier.offload == over["tier"]["offload"]
    assert SearchConfig.paper().eval_batch_size == over["search"]["eval_batch_size"]
    names = [s.name for s in paper40.stages]
    assert names == ["dense_eval", "leveldb", "search", "projector", "final_eval"]
    db = paper40.stages[1]
    assert db.disk_gb == pytest.approx(65.64, abs=0.01)  # leveldb.estimate_bytes on the 0.1 grid
    assert all(s.seconds > 0 and s.runs >= 1 for s in paper40.stages)


def test_readme_paper_figures_are_the_spliced_plan(paper40):
    """The docs' GPU / disk / time figures of the paper setting (docs/paper.md) are the block `ellava plan --readme`
    writes."""
    text = report.doc_with(ROOT, plan.README_MARKER).read_text()
    assert report.splice(text, plan.README_MARKER, plan.markdown(paper40)) == text


def test_plan_cli(capsys, tmp_path):
    assert cli.main(["plan", "--profile", "paper", "--gpu-mem", "24", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["gpu_gb"] == 24.0 and got["batches"]["offload"] and got["fits"]
    assert max(s["peak_gb"] for s in got["stages"]) <= 24 - memory.RESERVE_BYTES / 1e9
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- paper-plan:start -->\nold\n<!-- paper-plan:end -->\nb\n")
    assert cli.main(["plan", "--profile", "paper", "--readme", str(readme)]) == 0
    assert "| leveldb |" in readme.read_text() and "old" not in readme.read_text()
    for bad in (["--profile", "nope"], ["--profile", "paper", "--gpu-mem", "0"],
                ["--profile", "paper", "--gpu-mem", "-1"], ["--profile", "default"]):
        capsys.readouterr()
        assert cli.main(["plan", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ellava: error:") and err.count("\n") == 1, err


def test_dryrun_of_a_shrunken_llava_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "dry"
    assert cli.main(["dryrun", "--profile", "paper", "--out", str(out)]) == 2  # no --random-weights
    assert not out.exists()
    assert cli.main(["dryrun", "--profile", "paper", "--random-weights", "--device", "cpu", "--shrink",
                     "--out", str(out)]) == 0
    record = json.loads((out / "dryrun.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["dense_eval", "leveldb", "search", "projector", "final_eval"]
    for s in record["stages"]:
        assert s["seconds"] > 0 and s["peak_gb_measured"] is None and s["peak_gb_predicted"] > 0
        assert s["seconds_predicted"] > 0
    assert record["dtype"] == "float16" and record["plan"]["profile"] == "paper"
    assert (out / "leveldb" / "config.json").is_file()


def test_tier_memory_fields():
    t = Tier(model="llava-1.5-7b", device="cuda", offload=True, eval_batch_size=8)
    assert Tier.from_dict(t.to_dict()) == t and t.to_dict()["offload"] is True
    assert "offload" not in Tier().to_dict() and "eval_batch_size" not in Tier().to_dict()
    from ellava_lib.run.tier import block_device, eval_config

    assert block_device(t) == "cuda" and block_device(Tier(device="cuda")) is None
    assert eval_config(Tier(eval_batch_size=5)).batch_size == 5
    assert eval_config(Tier(eval_batch_size=5), batch_size=7).batch_size == 7
    with pytest.raises(ValueError, match="eval_batch_size"):
        Tier(eval_batch_size=-1)


def test_batch_sizes_are_not_part_of_a_search_identity(tmp_path):
    """A search moved to another GPU (other batch sizes) keeps its digest, its sweep rows and its folder."""
    from ellava_lib.search import checkpoint as ckpt

    cfg = SearchConfig.paper()
    other = SearchConfig.from_preset("paper", eval_batch_size=3, projector_micro_batch=1,
                                     projector_checkpointing=True)
    assert other.to_dict() != cfg.to_dict() and other.digest() == cfg.digest()
    baseline = SearchConfig.from_dict({**cfg.to_dict(), **ckpt.MEMORY_FIELDS})
    assert other.identity() == cfg.identity() == baseline.to_dict()
    ckpt.check_compatible({"config": cfg.to_dict()}, other.to_dict(), None, tmp_path)  # resumes
    with pytest.raises(ValueError, match="population"):
        ckpt.check_compatible({"config": cfg.to_dict()}, replace(other, population=3).to_dict(), None, tmp_path)


def test_tier_memory_knobs_keep_the_sweep_rows(micro_model_dir):
    from ellava_lib.run.jobs import Job, SweepSpec, spec_digest

    job = Job("sparsegpt", 0.5, 0, 8)
    plain = SweepSpec(str(micro_model_dir), 8, tier=Tier(device="cuda").to_dict())
    moved = SweepSpec(str(micro_model_dir), 8, tier=Tier(device="cuda", offload=True, eval_batch_size=4).to_dict())
    assert spec_digest(plain, job) == spec_digest(moved, job)
    assert spec_digest(plain, job) != spec_digest(SweepSpec(str(micro_model_dir), 8, tier=Tier().to_dict()), job)
