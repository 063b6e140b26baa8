"""benchmarks/accuracy_speed.py on the smol recipe's micro model (``TrainConfig.smol_micro()``) and a ledger made by a
tiny real sweep: rows read from the ledger (test means as written there, stale and missing rows pending), pruned
models rebuilt bit for bit as the sweep evaluated them (the search's final projector from the run folder, or the
shipped one, said so), a fast timing, the spliced block, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark

from ellava_lib.model.specs import build_or_load
from ellava_lib.model.train import TrainConfig
from ellava_lib.run import sweep
from ellava_lib.run.jobs import Job, SweepSpec

#: ``guard="none"``: the searches keep their evolved projector (the task guard would choose by the micro model's
#: answers, and the projector's path through the benchmark is what these tests follow).
SEARCH = dict(population=3, generations=1, offspring=2, screen_samples=0, survivors=2, projector_steps=1,
              projector_holdout=0.0, loss_kind="ce", init=["uniform"], guard="none")
JOBS = [Job("dense", 0.0, 0, 8), Job("sparsegpt", 0.5, 0, 8), Job("sparsegpt", 0.7, 0, 8), Job("search", 0.5, 0, 8),
        Job("ellava", 0.5, 0, 8)]
FAST = ["--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--threads", "1"]
BLOCK = "# speed\n<!-- smol-accuracy-speed:start -->\nold\n<!-- smol-accuracy-speed:end -->\ntail\n"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("accuracy_speed")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The micro model, a sweep of :data:`JOBS` into a ledger (the state dict each job evaluated kept), then the
    ledger edited: dense and SparseGPT 50% get test means no evaluation made (a table that shows them read them),
    SparseGPT 70% another digest (stale)."""
    root = tmp_path_factory.mktemp("accspeed")
    model_dir = build_or_load(TrainConfig.smol_micro(), cache=root / "cache", progress=False)
    spec = SweepSpec(str(model_dir), eval_limit=1, search_preset="ci", search=SEARCH, tier={"db_dtype": "bfloat16"})
    evaluated: dict[str, dict[str, torch.Tensor]] = {}
    real = sweep.evaluate

    def spy(model, processor, cfg, out_dir, *args, **kwargs):
        evaluated[Path(out_dir).parent.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real(model, processor, cfg, out_dir, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep, "evaluate", spy)
        sweep.run_sweep(spec, JOBS, root / "run" / "sweep", progress=False, ledger_dir=root / "ledger")
    for key, change in (("dense-0.00-s0-n8", {"mean": 70.4}), ("sparsegpt-0.50-s0-n8", {"mean": 61.7}),
                        ("sparsegpt-0.70-s0-n8", {"digest": "0123456789ab"})):
        path = root / "ledger" / f"{key}.json"
        entry = json.loads(path.read_text())
        if "mean" in change:
            entry["row"]["mean"] = change["mean"]
        else:
            entry.update(change)
        path.write_text(json.dumps(entry))
    return {"root": root, "spec": spec, "evaluated": evaluated}


@pytest.fixture
def setup(bench, made, monkeypatch):
    """The benchmark's profile setup replaced by the micro sweep's (its ``--run`` kept when given)."""
    base = bench.Setup(made["spec"], made["root"] / "ledger", 1, 8, made["root"] / "run", "micro")
    monkeypatch.setattr(bench, "profile_setup",
                        lambda profile, ledger, run: base if run is None else base._replace(run=run))
    return base


def test_rows_come_from_the_ledger_and_are_timed(bench, made, setup, tmp_path):
    out, readme = tmp_path / "acc.json", tmp_path / "README.md"
    readme.write_text(BLOCK)
    packed = "bitmask" if bench._e2e().bitmask.extension() is not None else "dense"  # its kernels built here, or not
    assert bench.main(["--method", "sparsegpt", "search", "ellava", "--sparsities", "0.5", "0.7", *FAST,
                       "--backends", f"{packed},auto", "--out", str(out), "--readme", str(readme)]) == 0
    result = json.loads(out.read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ["dense-0.00-s0-n8", "sparsegpt-0.50-s0-n8", "sparsegpt-0.70-s0-n8", "search-0.50-s0-n8",
                          "search-0.70-s0-n8", "ellava-0.50-s0-n8", "ellava-0.70-s0-n8"]
    assert [r["status"] for r in rows.values()] == ["measured", "measured", "pending", "measured", "pending",
                                                     "measured", "pending"]
    assert rows["dense-0.00-s0-n8"]["test_mean"] == 70.4 and rows["sparsegpt-0.50-s0-n8"]["test_mean"] == 61.7
    ledger = made["root"] / "ledger"
    assert rows["search-0.70-s0-n8"]["pending"] == f"no ledger row yet: `{ledger / 'search-0.70-s0-n8.json'}`"
    assert rows["sparsegpt-0.70-s0-n8"]["pending"].startswith(
        f"no ledger row yet: `{ledger / 'sparsegpt-0.70-s0-n8.json'}` is stale (digest 0123456789ab, the job's is ")
    for key in ("sparsegpt-0.50-s0-n8", "search-0.50-s0-n8", "ellava-0.50-s0-n8"):
        r = rows[key]
        assert abs(r["measured_sparsity"] - r["measured_ledger"]) < 1e-6 and abs(r["measured_sparsity"] - 0.5) < 1e-3
        assert r["exact"] and r["flop_ratio"] > 1
        for backend in (packed, "auto"):
            s = r["speed"][backend]
            assert s["pruned_tokens_per_s"] > 0 and s["dense_tokens_per_s"] > 0 and len(s["pruned_ms"]) == 1
            assert s["ratio_q1"] == s["ratio_q3"] == pytest.approx(s["measured_ratio"])  # one pair
        assert r["speed"][packed]["swapped"] == ("14/14" if packed == "bitmask" else "0/14")  # 2 layers x 7 linears
    assert rows["sparsegpt-0.50-s0-n8"]["measured_sparsity"] == 0.5
    projector = made["root"] / "run/sweep/jobs/ellava-0.50-s0-n8/search/projector.safetensors"
    assert rows["ellava-0.50-s0-n8"]["projector"] == f"the search's final projector (`{projector}`)"
    assert rows["search-0.50-s0-n8"]["projector"] == "the model's own"
    assert rows["dense-0.00-s0-n8"]["speed"][packed]["runs"] == 3  # every dense run of the three timed rows
    assert result["env"]["new_tokens"] == 2 and result["env"]["threads"] == 1 and result["env"]["cpus"] >= 1
    text = readme.read_text()
    assert "old" not in text and text.startswith("# speed\n<!-- smol-accuracy-speed:start -->\n| model |")
    assert text.endswith("<!-- smol-accuracy-speed:end -->\ntail\n")
    assert "| dense | 70.4 | - | 0% | 1.00x |" in text
    assert "| SparseGPT 50% | 61.7 | -8.7 | 50.0% (50.0%) |" in text
    assert f"| search (no gap) 70% | *pending: no ledger row yet: `{ledger / 'search-0.70-s0-n8.json'}`* |" in text
    assert "Pending: 3 row(s)" in text
    assert "Generated by `python benchmarks/accuracy_speed.py --method sparsegpt search ellava" in text
    assert "not recoverable" not in text  # every model rebuilt exactly
    again = tmp_path / "other" / "README.md"
    again.parent.mkdir()
    again.write_text(BLOCK)  # --results splices the same block from the JSON, timing nothing
    assert bench.main(["--results", str(out), "--readme", str(again)]) == 0
    assert again.read_text() == text


def test_the_rebuilt_models_are_the_evaluated_ones(bench, made, setup):
    """Bit for bit the state dict each sweep job evaluated; without its searched projector EfficientLLaVA's is not."""
    for job in JOBS[1:2] + JOBS[3:]:
        entry, pending = bench.ledger_entry(setup, job)
        projector, _, exact = bench.searched_projector(setup, job, entry)
        model, _, _ = bench.rebuild(setup, job, entry, projector)
        evaluated = made["evaluated"][job.name()]
        assert pending is None and exact
        assert all(torch.equal(v, evaluated[k]) for k, v in model.state_dict().items()), job.name()
    job = JOBS[-1]
    model, _, report = bench.rebuild(setup, job, bench.ledger_entry(setup, job)[0], None)
    assert not all(torch.equal(v, made["evaluated"][job.name()][k]) for k, v in model.state_dict().items())


def test_a_projector_not_in_the_run_folder_is_said(bench, setup, tmp_path):
    out, readme = tmp_path / "acc.json", tmp_path / "README.md"
    readme.write_text(BLOCK)
    assert bench.main(["--method", "ellava", "--sparsities", "0.5", "--backends", "auto", *FAST,
                       "--run", str(tmp_path / "elsewhere"), "--out", str(out), "--readme", str(readme)]) == 0
    row = json.loads(out.read_text())["rows"][1]
    assert row["key"] == "ellava-0.50-s0-n8" and row["exact"] is False and row["measured_sparsity"] == 0.5
    assert row["projector"].startswith("shipped: the search's final projector is not in the ledger")
    text = readme.read_text()
    assert "| EfficientLLaVA 50% \\* |" in text and "final projector is not recoverable from the ledger" in text


@pytest.mark.parametrize("args, message", [
    (["--method", "magic"], "unknown method magic; choose from magnitude, "),
    (["--method", "dense"], "unknown method dense; "),
    (["--sparsities", "0.5", "1.0"], "sparsity must lie in (0, 1), got 1"),
    (["--sparsities", "0"], "sparsity must lie in (0, 1), got 0"),
    (["--backends", "csr"], "unknown backend csr; choose from dense, bitmask, auto"),
    (["--ledger", "NOPE"], "ledger folder "),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--sparsities", "half"], "argument --sparsities: invalid float value: 'half'"),
    (["--readme", "NOBLOCK"], "no file holds the block <!-- smol-accuracy-speed:start -->"),
])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(bench, monkeypatch, tmp_path, capsys, args, message):
    monkeypatch.setattr(bench, "profile_setup", lambda *a: pytest.fail("no setup for bad input"))
    (tmp_path / "NOBLOCK").write_text("# no block\n")
    args = [str(tmp_path / a) if a in ("NOPE", "NOBLOCK") else a for a in args]
    out = tmp_path / "acc.json"
    try:
        rc = bench.main([*args, "--out", str(out)])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"accuracy_speed: error: {message}") and err.count("\n") == 1, err
    assert not out.exists() and (tmp_path / "NOBLOCK").read_text() == "# no block\n"


def test_bad_results_and_profiles_are_one_line(bench, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(BLOCK)
    assert bench.main(["--results", str(tmp_path / "none.json"), "--readme", str(readme)]) == 2
    (tmp_path / "list.json").write_text("[1]")
    assert bench.main(["--results", str(tmp_path / "list.json"), "--readme", str(readme)]) == 2
    assert bench.main(["--results", str(tmp_path / "list.json")]) == 2
    assert bench.main(["--method", "ellava"]) == 2  # no --out
    assert capsys.readouterr().err.splitlines() == [
        f"accuracy_speed: error: cannot read results {tmp_path / 'none.json'}: FileNotFoundError",
        f"accuracy_speed: error: {tmp_path / 'list.json'} is not a results file of accuracy_speed.py (format 1)",
        "accuracy_speed: error: --results needs --readme",
        "accuracy_speed: error: --out is required (or --results FILE --readme README.md)"]
    assert readme.read_text() == BLOCK
    with pytest.raises(bench.BadInput, match=r"^ledger folder .*nope does not exist$"):
        bench.profile_setup("smol", tmp_path / "nope", None)
    with pytest.raises(bench.BadInput, match=r"^unknown profile 'nosuch'"):
        bench.profile_setup("nosuch", None, None)


def test_a_pending_results_file_is_spliced_as_one_line(bench, tmp_path):
    """The committed results file before the first measurement: why nothing is measured and the command."""
    pending = tmp_path / "pending.json"
    pending.write_text(json.dumps({"format": 1, "pending": "no EfficientLLaVA row in the ledger yet.",
                                   "command": "python benchmarks/accuracy_speed.py --out X.json", "rows": []}))
    readme = tmp_path / "README.md"
    readme.write_text(BLOCK)
    assert bench.main(["--results", str(pending), "--readme", str(readme)]) == 0
    assert readme.read_text().splitlines()[2] == (
        f"*Not measured yet ({pending}): no EfficientLLaVA row in the ledger yet. Measure with "
        "`python benchmarks/accuracy_speed.py --out X.json`.*")
