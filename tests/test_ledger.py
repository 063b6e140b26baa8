"""The results ledger (run/ledger.py) on the smol recipe's micro model (``TrainConfig.smol_micro()``: the smol build
on a micro Llama shaped like SmolLM2, trained in seconds; the smol tier's bf16 level databases): a sweep stopped
halfway continues from a copy of its ledger folder (a fresh clone) without running a finished job twice and ends with
the uninterrupted run's tables; rows of another digest and corrupted rows re-run; rows are written atomically; a row
does not depend on the caller's thread count; notebook 04's showcased search reads its row from the ledger
(run/showcase.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from ellava_lib.core import files
from ellava_lib.model.specs import build_or_load
from ellava_lib.model.train import TrainConfig
from ellava_lib.run import backends, ledger, pipeline, sweep, tables
from ellava_lib.run.jobs import Job, SweepSpec, job_digest, model_identity

SEARCH = dict(population=3, generations=1, offspring=2, screen_samples=0, survivors=2, projector_steps=1,
              projector_holdout=0.0, loss_kind="ce", init=["uniform"])
JOBS = [Job("dense", 0.0, 0, 8), Job("magnitude", 0.5, 0, 8), Job("sparsegpt", 0.5, 0, 8), Job("search", 0.5, 0, 8)]
#: What differs between two runs of the same job: wall times.
CLOCKS = ["seconds", "search_s", "eval_s"]
REAL_JOB = sweep._run_job


@pytest.fixture(scope="module")
def smol_micro_dir(tmp_path_factory) -> Path:
    """The smol recipe built on the micro Llama (the smol profile's model kind, at test size)."""
    return build_or_load(TrainConfig.smol_micro(), cache=tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="module")
def spec(smol_micro_dir) -> SweepSpec:
    return SweepSpec(str(smol_micro_dir), eval_limit=1, search_preset="ci", search=SEARCH,
                     tier={"db_dtype": "bfloat16"})


@pytest.fixture(scope="module")
def uninterrupted(spec, tmp_path_factory) -> pd.DataFrame:
    """The sweep of :data:`JOBS` run once, to the end."""
    root = tmp_path_factory.mktemp("whole")
    return sweep.run_sweep(spec, JOBS, root / "runs", progress=False, ledger_dir=root / "results")


def _count(monkeypatch, fail_after: int | None = None) -> list[str]:
    """The names of the jobs that run (appended as each starts); with ``fail_after`` every job after that many
    raises (a sweep stopped halfway)."""
    ran: list[str] = []

    def counted(job, spec, out_dir, threads):
        ran.append(job.name())
        if fail_after is not None and len(ran) > fail_after:
            raise RuntimeError("stopped")
        return REAL_JOB(job, spec, out_dir, threads)

    monkeypatch.setattr(sweep, "_run_job", counted)
    return ran


def test_a_stopped_sweep_continues_from_a_copy_of_its_ledger(spec, uninterrupted, tmp_path, monkeypatch):
    first = tmp_path / "clone1"
    ran = _count(monkeypatch, fail_after=2)
    with pytest.raises(backends.SweepFailed):
        sweep.run_sweep(spec, JOBS, first / "runs", progress=False, ledger_dir=first / "results" / "micro")
    assert ran == [j.name() for j in JOBS]  # two rows, then two failures
    assert sorted(p.name for p in (first / "results" / "micro").iterdir()) == \
        ["dense-0.00-s0-n8.json", "magnitude-0.50-s0-n8.json"]
    second = tmp_path / "clone2"  # a fresh clone: the committed rows only, no run folder, no level database
    shutil.copytree(first / "results", second / "results")
    ran = _count(monkeypatch)
    rows = sweep.run_sweep(spec, JOBS, second / "runs", progress=False, ledger_dir=second / "results" / "micro")
    assert ran == ["sparsegpt-0.50-s0-n8", "search-0.50-s0-n8"]  # no finished job ran twice
    assert len(list((second / "results" / "micro").glob("*.json"))) == 4
    pd.testing.assert_frame_equal(rows.drop(columns=CLOCKS), uninterrupted.drop(columns=CLOCKS))
    pd.testing.assert_frame_equal(tables.main_table(rows, ["dense", "magnitude", "sparsegpt", "search"]),
                                  tables.main_table(uninterrupted, ["dense", "magnitude", "sparsegpt", "search"]))
    ran = _count(monkeypatch)
    again = sweep.run_sweep(spec, JOBS, tmp_path / "clone3" / "runs", progress=False,
                            ledger_dir=second / "results" / "micro")
    assert ran == []  # every row in the ledger: nothing runs, only the rows are read
    pd.testing.assert_frame_equal(again, rows)


def test_the_model_is_named_by_its_recipe(smol_micro_dir, tmp_path):
    """A built model by its recipe digest (its folder differs from machine to machine), a hub name as given."""
    assert model_identity(smol_micro_dir) == {"kind": "smol", "digest": TrainConfig.smol_micro().digest()}
    assert model_identity("llava-hf/llava-1.5-7b-hf") == {"name": "llava-hf/llava-1.5-7b-hf"}
    assert model_identity(tmp_path) == {"path": str(tmp_path.resolve())}


def test_ledger_row_format(spec, tmp_path):
    job = Job("search", 0.5, 0, 8)
    sweep.run_sweep(spec, [job], tmp_path / "runs", progress=False, ledger_dir=tmp_path / "results")
    entry = json.loads((tmp_path / "results" / f"{job.name()}.json").read_text())
    assert sorted(entry) == sorted(ledger.FIELDS)
    assert (entry["format"], entry["key"], entry["digest"]) == (1, "search-0.50-s0-n8", job_digest(spec, job, 1))
    assert entry["job"] == {"method": "search", "sparsity": 0.5, "seed": 0, "calib_n": 8, "gap": None,
                            "projector": None, "assembled": False}
    assert {"j", "r_hat", "g_hat", "mean", "calib_mean", "seconds", "eval_s", "measured"} <= set(entry["row"])
    assert entry["row"]["eval_s"] > 0
    assert entry["lam"] is None  # the search without the gap term has no lambda
    assert entry["row"]["lam"] == 0.0  # but its results row records the lambda of its J, 0 (column lam)
    assert sorted(entry["policy"]) == ["grid", "meta", "sparsities"] and entry["policy"]["meta"]["gap"] == "none"
    assert sorted(entry["machine"]) == ["cpu", "cpu_count", "platform", "threads", "torch"] and entry["machine"]["cpu"]
    assert entry["machine"]["threads"] == 1
    assert entry["commit"] is None or len(entry["commit"]) == 40


def test_a_row_of_another_digest_is_rerun_and_overwritten(spec, tmp_path, monkeypatch):
    job, out, folder = Job("magnitude", 0.5, 0, 8), tmp_path / "runs", tmp_path / "results"
    other = SweepSpec(spec.model_dir, eval_limit=2, search_preset="ci", search=SEARCH, tier=spec.tier)
    sweep.run_sweep(other, [job], tmp_path / "other", progress=False, ledger_dir=folder)
    assert json.loads((folder / f"{job.name()}.json").read_text())["digest"] == job_digest(other, job, 1)
    ran = _count(monkeypatch)
    rows = sweep.run_sweep(spec, [job], out, progress=False, ledger_dir=folder)
    assert ran == ["magnitude-0.50-s0-n8"]  # another evaluation size: re-run, never mixed in
    entry = json.loads((folder / f"{job.name()}.json").read_text())
    assert entry["digest"] == job_digest(spec, job, 1) != job_digest(other, job, 1)
    assert entry["row"]["mean"] == rows.loc[0, "mean"]
    assert job_digest(spec, job, 2) != job_digest(spec, job, 1)  # the thread count is part of the digest


@pytest.mark.parametrize("text,reason", [
    ("{\"format\": 1, \"key\": ", "invalid JSON (JSONDecodeError)"),
    ("{\"format\": 1}\n", "missing key, digest, job, row, policy, lam, machine, commit"),
    ("[1, 2]\n", "not a JSON object but list"),
])
def test_a_corrupted_row_is_named_in_one_line_and_rerun(spec, tmp_path, monkeypatch, capsys, text, reason):
    job, folder = Job("dense", 0.0, 0, 8), tmp_path / "results"
    path = folder / f"{job.name()}.json"
    files.write_text(path, text)
    ran = _count(monkeypatch)
    sweep.run_sweep(spec, [job], tmp_path / "runs", progress=False, ledger_dir=folder)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ledger:")]
    assert err == [f"ledger: corrupted row {path}: {reason}; its job re-runs"]
    assert ran == ["dense-0.00-s0-n8"]
    assert json.loads(path.read_text())["digest"] == job_digest(spec, job, 1)


def test_rows_are_written_atomically(spec, tmp_path, monkeypatch):
    folder = tmp_path / "results"
    old = {"format": 1, "key": "dense-0.00-s0-n8", "digest": "old"}
    ledger.write(folder, old)
    real = Path.write_text

    def half(self, text, *args, **kwargs):  # the disk fills up halfway through the file
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(OSError, match="No space left"):
        ledger.write(folder, {**old, "digest": "new", "row": {"mean": 1.0}})
    monkeypatch.undo()
    assert [p.name for p in folder.iterdir()] == ["dense-0.00-s0-n8.json"]  # no temp file left
    assert json.loads((folder / "dense-0.00-s0-n8.json").read_text()) == old
    ran = _count(monkeypatch, fail_after=0)  # a job that raises leaves no row
    with pytest.raises(backends.SweepFailed):
        sweep.run_sweep(spec, [Job("magnitude", 0.5, 0, 8)], tmp_path / "runs", progress=False, ledger_dir=folder)
    assert ran == ["magnitude-0.50-s0-n8"] and [p.name for p in folder.iterdir()] == ["dense-0.00-s0-n8.json"]


def test_a_row_does_not_depend_on_the_callers_threads(spec, tmp_path):
    job, before = Job("sparsegpt", 0.5, 0, 8), torch.get_num_threads()
    entries = []
    try:
        for outer in (2, 1):
            torch.set_num_threads(outer)
            sweep.run_sweep(spec, [job], tmp_path / f"t{outer}", progress=False, ledger_dir=tmp_path / f"l{outer}")
            assert torch.get_num_threads() == outer  # restored after the job
            entries.append(json.loads((tmp_path / f"l{outer}" / f"{job.name()}.json").read_text()))
    finally:
        torch.set_num_threads(before)
    assert [e["machine"]["threads"] for e in entries] == [1, 1]
    rows = [{k: v for k, v in e["row"].items() if k not in CLOCKS} for e in entries]
    assert rows[0] == rows[1] and entries[0]["policy"] == entries[1]["policy"]


def test_the_pipeline_reads_the_tracked_ledger_only_from_its_own_runs_folder(tmp_path):
    root = tmp_path / "project"
    assert pipeline.ledger_folder("results/smol", root, root / "runs", root / "runs" / "smol") == \
        root / "results" / "smol"
    assert pipeline.ledger_folder("results/smol", root, tmp_path / "fresh", tmp_path / "fresh" / "smol") == \
        tmp_path / "fresh" / "smol" / "ledger"


def test_the_showcased_search_reads_its_row_from_the_ledger(spec, tmp_path, monkeypatch, capsys):
    """Notebook 04's helper: run once, the search's row and policy go to the ledger and its history stays in the run
    folder; on a fresh clone holding that row nothing is searched, the policy is the row's, and the history is a
    one-line note. The baselines' policies come from their ledger rows without loading the model."""
    from ellava_lib.core.policy import Policy
    from ellava_lib.run import showcase
    from ellava_lib.search import evolve

    job, folder = Job("ellava", 0.5, 0, 8), tmp_path / "results"
    ran = _count(monkeypatch)
    first = showcase.showcase_search(spec, job, tmp_path / "here" / "sweep", ledger_dir=folder, progress=False)
    assert ran == [job.name()]
    entry = json.loads(ledger.row_path(folder, job.name()).read_text())
    assert first.policy.to_dict() == entry["policy"] == Policy.from_json(first.job_dir / "policy.json").to_dict()
    assert first.history() is not None and list(first.projector_rounds().columns) == list(showcase.ROUND_COLUMNS)
    guard = first.guard()  # the task guard's options, simplest first, the returned one marked (the row's guard)
    assert list(guard.columns) == list(showcase.GUARD_COLUMNS) and guard["option"].iloc[0] == "start"
    assert guard["returned"].sum() == 1 and guard.loc[guard["returned"], "option"].item() == entry["row"]["guard"]

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(sweep, "_run_job", fail)
    monkeypatch.setattr(evolve, "run_search", fail)
    capsys.readouterr()
    clone = showcase.showcase_search(spec, job, tmp_path / "clone" / "sweep", ledger_dir=folder, progress=False)
    assert clone.policy.to_dict() == entry["policy"] and clone.entry == entry
    assert {k: v for k, v in clone.row.items() if k not in CLOCKS} == \
        {k: v for k, v in entry["row"].items() if k not in CLOCKS}
    assert f"{job.name()}: read from the ledger" in capsys.readouterr().out
    assert clone.history() is None and clone.phases().empty and clone.projector_rounds().empty and clone.guard().empty
    assert clone.no_history().startswith(f"no search history: the run folder has no finished search of {job.name()}")

    policies = {}
    for method, label in showcase.ALLOCATIONS:  # the main table's rows of the baselines at this (sparsity, seed, n)
        base = Job(method, 0.5, 0, 8)
        policies[label] = {u: round(0.5 + 0.1 * (i % 2), 1) for i, u in enumerate(entry["policy"]["sparsities"])}
        policy = {"sparsities": policies[label], "grid": entry["policy"]["grid"]}
        ledger.write(folder, ledger.make_row(base.name(), job_digest(spec, base, 1), {},
                                             dict.fromkeys(ledger.ROW_FIELDS), policy, None))
    monkeypatch.setattr(showcase, "load_model", fail)
    assert showcase.allocation_policies(spec, 0.5, 0, 8, tmp_path / "clone" / "sweep", ledger_dir=folder) == policies


def test_projector_rounds_read_the_best_j_before_and_after_a_round(tmp_path):
    """A round after generation 3: the best J on all scoring rows of generation 3 before it (screen rows and the
    selection-row lambda phase aside), and of generation 4, where the elites are rescored with the new projector."""
    from ellava_lib.core.policy import Policy
    from ellava_lib.run import showcase

    search = tmp_path / "jobs" / "ellava" / "search"
    files.ensure_dir(search / "projector_rounds")
    pd.DataFrame([
        {"generation": 0, "policy_id": "a", "r_hat": 0.5, "g_hat": 0.0, "j": 0.5, "phase": "init"},
        {"generation": 0, "policy_id": "a", "r_hat": 0.1, "g_hat": 0.0, "j": 0.1, "phase": "lambda"},
        {"generation": 3, "policy_id": "b", "r_hat": 0.2, "g_hat": 0.0, "j": 0.2, "phase": "screen"},
        {"generation": 3, "policy_id": "c", "r_hat": 0.4, "g_hat": 0.0, "j": 0.4, "phase": "full"},
        {"generation": 3, "policy_id": "d", "r_hat": 0.3, "g_hat": 0.0, "j": 0.3, "phase": "full"},
        {"generation": 4, "policy_id": "d", "r_hat": 0.35, "g_hat": 0.0, "j": 0.35, "phase": "full"},
        {"generation": 4, "policy_id": "e", "r_hat": 0.05, "g_hat": 0.0, "j": 0.05, "phase": "screen"},
    ]).to_csv(search / "history.csv", index=False)
    files.write_json(search / "projector_rounds" / "round-001.json",
                     {"round": 1, "generation": 3, "steps_run": 20, "holdout_start": 1.0, "holdout_best": 0.9})
    files.write_json(search / "projector_rounds" / "round-002.json",
                     {"round": 2, "generation": 4, "steps_run": 5, "holdout_start": 0.9, "holdout_best": 0.9})
    files.write_json(search / "policy.json", {"sparsities": {}, "grid": [0.0], "meta": {}})
    files.write_text(tmp_path / "jobs" / "ellava" / "spec.txt", "abc\n")
    shown = showcase.Showcase(Job("ellava", 0.6), {}, Policy({}, (0.0,)), tmp_path / "jobs" / "ellava", "abc")
    rounds = shown.projector_rounds()
    assert list(rounds["best_J_before"]) == [0.3, 0.35]
    assert rounds["best_J_after"].iloc[0] == 0.35 and pd.isna(rounds["best_J_after"].iloc[1])


def test_the_progress_of_a_sweep_is_read_from_its_ledger_alone(spec, tmp_path):
    """``ellava sweep --status`` (run/progress.py): the jobs with a row under their current digest count as done,
    with their hours; a row of another digest does not."""
    from ellava_lib.run import progress

    folder = tmp_path / "results"
    hand = {JOBS[0].name(): (1800.0, 900.0, 70.0), JOBS[2].name(): (3600.0, None, 60.0)}  # seconds, eval_s, mean
    for job in JOBS:
        if job.name() in hand:
            seconds, eval_s, mean = hand[job.name()]
            row = {"job": job.name(), "method": job.method, "sparsity": job.sparsity, "seed": job.seed,
                   "calib_n": job.calib_n, "measured": job.sparsity, "flops_rel": 1.0, "mean": mean, "seconds": seconds,
                   **({} if eval_s is None else {"eval_s": eval_s})}
            ledger.write(folder, ledger.make_row(job.name(), job_digest(spec, job, 1), {}, row, None, None))
    state = progress.ledger_progress(spec, JOBS, folder, 1, main=JOBS)
    assert sorted(state.done) == ["dense-0.00-s0-n8", "sparsegpt-0.50-s0-n8"] and state.total == 4
    assert state.pending == ["magnitude-0.50-s0-n8", "search-0.50-s0-n8"]
    assert state.compute_hours() == (1.5, 0.25, 1)  # (1800 + 3600) / 3600, 900 / 3600, one row timed its evaluation
    text = progress.markdown(state, ["dense", "sparsegpt"], "results/micro")
    assert text.startswith("2 of 4 sweep jobs") and "1.50 hours of pruning and search, 0.25 hours of evaluation" in text
    assert "| SparseGPT |  | 60.0 (1) |" in text and "Pending (2): magnitude-0.50-s0-n8, search-0.50-s0-n8" in text
    other = SweepSpec(spec.model_dir, eval_limit=2, search_preset="ci", search=SEARCH, tier={"db_dtype": "bfloat16"})
    assert progress.ledger_progress(other, JOBS, folder, 1).done == {}  # another digest: would re-run


def test_ecoflap_importances_are_kept_in_the_ledger_and_not_computed_again(spec, tmp_path, monkeypatch, capsys):
    """ECoFLaP's importances of a draw (tens of minutes on the smol tier) go into the ledger's ``ecoflap/`` with
    the first finished job; a sweep in a fresh run folder (a fresh clone) reads them instead of computing them, for
    the other sparsities of that draw; another thread count, a stale digest or a corrupted entry computes them."""
    calls: list[int] = []
    real = sweep.zeroth_order_importance

    def counting(*args, **kwargs):
        calls.append(kwargs.get("seed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "zeroth_order_importance", counting)
    book = tmp_path / "results"
    first = sweep.run_sweep(spec, [Job("ecoflap", 0.5, 0, 8)], tmp_path / "a", progress=False, ledger_dir=book)
    assert calls == [0]
    entry = json.loads((book / "ecoflap" / "s0-n8.json").read_text())
    assert set(entry) == set(ledger.IMPORTANCE_FIELDS) and entry["key"] == "s0-n8"
    cache = json.loads(sweep.ecoflap_importance_path(tmp_path / "a", 0, 8).read_text())
    assert entry["seconds"] == cache["seconds"] > 0  # the computation's own wall time, measured where it ran
    assert entry["digest"] == sweep.importance_digest(spec, 0, 8, 1) != sweep.importance_digest(spec, 0, 8, 2)
    made = json.loads((tmp_path / "a" / "jobs" / "ecoflap-0.50-s0-n8" / "policy.json").read_text())
    assert entry["importance"] == made["meta"]["importance"] and len(first) == 1
    assert [e["key"] for e in ledger.entries(book)] == ["ecoflap-0.50-s0-n8"]  # not a row of the tables

    # a fresh run folder: the other sparsity's job uses the ledger's importances, computing nothing
    sweep.run_sweep(spec, [Job("ecoflap", 0.6, 0, 8)], tmp_path / "b", progress=False, ledger_dir=book)
    assert calls == [0]
    policy = json.loads((tmp_path / "b" / "jobs" / "ecoflap-0.60-s0-n8" / "policy.json").read_text())
    assert policy["meta"]["importance"] == entry["importance"]

    # another thread count is another digest: computed, and the entry rewritten under it
    sweep.run_sweep(spec, [Job("ecoflap", 0.7, 0, 8)], tmp_path / "c", threads=2, progress=False, ledger_dir=book)
    assert calls == [0, 0]
    assert json.loads((book / "ecoflap" / "s0-n8.json").read_text())["digest"] == sweep.importance_digest(spec, 0, 8, 2)

    # a corrupted entry is named in one line and computed again
    (book / "ecoflap" / "s0-n8.json").write_text('{"format": 1, "key": "s0-n8"}')
    capsys.readouterr()
    sweep.run_sweep(spec, [Job("ecoflap", 0.6, 0, 8)], tmp_path / "d", threads=2, progress=False, ledger_dir=book)
    err = capsys.readouterr().err
    assert calls == [0, 0, 0]
    assert "corrupted importance entry" in err and "missing digest, importance, seconds, machine, commit" in err
