"""Sweep backends: failures and retries of the local executor, and the Ray backend against the local one.

The Ray tests start one local Ray limited to 2 CPUs for the module and run a micro-model spec (the micro model
of ``conftest.py``, 2 test items per suite, 8 calibration samples, the tiny search of ``test_sweep.SEARCH``), so
they take about a minute; they are skipped when Ray is not installed (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from ellava_lib.run import backends, sweep
from ellava_lib.run.backends import Failure, SweepFailed, Task
from ellava_lib.run.jobs import Job, SweepSpec

ROOT = Path(__file__).resolve().parents[1]
SEARCH = dict(population=3, generations=2, offspring=3, screen_samples=0, survivors=2, projector_steps=2,
              projector_holdout=0.0, loss_kind="ce", init=["uniform", "ecoflap"])
TIMING = ("seconds", "search_s", "eval_s")


def _spec(model_dir) -> SweepSpec:
    return SweepSpec(str(model_dir), eval_limit=2, search=SEARCH,
                     ellava={"gap": "bernstein", "projector_every": 1})


#: dense, two baselines (ECoFLaP reads the shared importances) and a search (reads the level database and the
#: importances: its start policies include ECoFLaP's)
JOBS = [Job("dense", 0.0, 0, 8), Job("magnitude", 0.5, 0, 8), Job("ecoflap", 0.5, 0, 8), Job("ellava", 0.5, 0, 8)]


def _untimed(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in TIMING if c in frame.columns]).reset_index(drop=True)


def _stamps(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "jobs").glob("*/row.json")}


# ------------------------------------------------------------------------------------- executor rules

def _ok(x):
    return x


def _boom(message):
    raise ValueError(message)


def _flaky(path: str):
    """Fails on its first call (counted in a file), then returns the number of calls."""
    p = Path(path)
    n = int(p.read_text()) + 1 if p.is_file() else 1
    p.write_text(str(n))
    if n == 1:
        raise RuntimeError("first call fails")
    return n


def test_local_executor_reports_failures_and_goes_on(tmp_path):
    shared = [Task("db/a", _ok, (1,)), Task("db/b", _boom, ("no disk\nsecond line",))]
    jobs = [Task("j1", _ok, (10,), ("db/a",)), Task("j2", _ok, (20,), ("db/b",)), Task("j3", _boom, ("bad",)),
            Task("j4", _flaky, (str(tmp_path / "calls"),))]
    done, failed = {}, []
    failures = backends.run_local(shared, jobs, lambda t, r: done.setdefault(t.name, r),
                                  lambda t, f: failed.append(f.name), retries=1)
    assert done == {"j1": 10, "j4": 2}  # j4 failed once and was re-run
    assert failed == ["db/b", "j2", "j3"]  # each reported when it happened
    assert failures["db/b"].error == "ValueError: no disk"  # one line
    assert failures["j2"].error == "needs db/b, which failed: ValueError: no disk"
    assert failures["j3"].error == "ValueError: bad" and "Traceback" in failures["j3"].detail
    assert backends.one_line(KeyError()) == "KeyError"


def test_resources_and_the_missing_ray_message(monkeypatch):
    assert backends.task_resources("cuda") == {"num_cpus": 1, "num_gpus": 1}
    assert backends.task_resources("cuda:1")["num_gpus"] == 1
    assert backends.task_resources("cpu") == {"num_cpus": 1}
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ValueError, match=r'needs Ray: pip install "ellava\[ray\]"'):
        backends.import_ray()
    failure = Failure("j", "E: x", "tb")
    assert failure.line() == "j: E: x" and failure.to_dict() == {"job": "j", "error": "E: x", "detail": "tb"}


def test_the_test_hook_counts_attempts(tmp_path, monkeypatch):
    monkeypatch.setenv(backends.TEST_FAIL_ENV, "other:exit, job-a:raise:2")
    for attempt in (1, 2):
        with pytest.raises(RuntimeError, match=f"attempt {attempt}"):
            backends.test_failure_hook("job-a", tmp_path)
    backends.test_failure_hook("job-a", tmp_path)  # the third attempt goes through
    backends.test_failure_hook("job-b", tmp_path)
    assert (tmp_path / "test_failures").read_text() == "2"


# ------------------------------------------------------------------------------------ local sweeps

def test_local_sweep_failure_then_retry_and_resume(micro_model_dir, tmp_path, monkeypatch):
    spec = _spec(micro_model_dir)
    jobs = JOBS[:2]
    bad = jobs[1].name()
    monkeypatch.setenv(backends.TEST_FAIL_ENV, f"{bad}:raise")  # fails on every attempt
    with pytest.raises(SweepFailed) as info:
        sweep.run_sweep(spec, jobs, tmp_path, progress=False, retries=1)
    assert [f.name for f in info.value.failures] == [bad]
    assert info.value.failures[0].error.startswith("RuntimeError: ELLAVA_TEST_FAIL_JOB makes job")
    assert (tmp_path / "jobs" / bad / "test_failures").read_text() == "2"  # tried, then re-tried once
    report = json.loads((tmp_path / "failed.json").read_text())
    assert [r["job"] for r in report] == [bad] and "Traceback" in report[0]["detail"]
    assert pd.read_csv(tmp_path / "results.csv")["job"].tolist() == [jobs[0].name()]  # the finished row
    stamps = _stamps(tmp_path)
    # the third attempt fails again, the retry (fourth) succeeds: the sweep completes, only that job ran
    monkeypatch.setenv(backends.TEST_FAIL_ENV, f"{bad}:raise:3")
    res = sweep.run_sweep(spec, jobs, tmp_path, progress=False, retries=1)
    assert list(res["job"]) == [j.name() for j in jobs] and not (tmp_path / "failed.json").exists()
    assert {k: v for k, v in _stamps(tmp_path).items() if k != bad} == stamps


def test_unknown_backend_and_negative_retries(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'slurm'"):
        sweep.run_sweep(SweepSpec("m"), [], tmp_path, backend="slurm")
    with pytest.raises(ValueError, match="retries must be >= 0"):
        sweep.run_sweep(SweepSpec("m"), [], tmp_path, retries=-1)


# ------------------------------------------------------------------------------------------------ ray

@pytest.fixture(scope="module")
def local_sweep(micro_model_dir, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """Every job of :data:`JOBS` by the local backend (this process): its folder and rows."""
    out = tmp_path_factory.mktemp("local")
    return out, sweep.run_sweep(_spec(micro_model_dir), JOBS, out, progress=False)


@pytest.fixture(scope="module")
def local_rows(local_sweep) -> pd.DataFrame:
    return local_sweep[1]


def test_a_finished_sweep_starts_no_ray(micro_model_dir, local_sweep, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # importing Ray would fail
    out, rows = local_sweep
    again = sweep.run_sweep(_spec(micro_model_dir), JOBS, out, progress=False, backend="ray")
    pd.testing.assert_frame_equal(again, rows)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray of 2 CPUs for this module; its workers import this checkout's ellava_lib."""
    ray = pytest.importorskip("ray")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([old] if old else [])])
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    yield ray
    ray.shutdown()


def test_ray_matches_local_after_a_killed_job_and_a_resume(micro_model_dir, tmp_path, monkeypatch, local_rows,
                                                           ray_session):
    spec, out = _spec(micro_model_dir), tmp_path / "sweep"
    killed = JOBS[1].name()
    # its worker process dies (os._exit) on the first attempt; no retries: reported, the others finish
    monkeypatch.setenv(backends.TEST_FAIL_ENV, f"{killed}:exit:1")
    with pytest.raises(SweepFailed) as info:
        sweep.run_sweep(spec, JOBS, out, workers=2, progress=False, backend="ray")
    assert [f.name for f in info.value.failures] == [killed]
    assert "WorkerCrashedError" in info.value.failures[0].error
    assert set(_stamps(out)) == {j.name() for j in JOBS} - {killed}
    assert pd.read_csv(out / "results.csv")["job"].tolist() == [j.name() for j in JOBS if j.name() != killed]
    assert json.loads((out / "failed.json").read_text())[0]["job"] == killed
    assert not list(out.glob(".ellava-ray-probe-*"))
    stamps = _stamps(out)
    # resumed (the hook has spent its one failure): only the killed job runs
    res = sweep.run_sweep(spec, JOBS, out, workers=2, progress=False, backend="ray")
    assert {k: v for k, v in _stamps(out).items() if k != killed} == stamps and killed in _stamps(out)
    assert not (out / "failed.json").exists()
    pd.testing.assert_frame_equal(_untimed(res), _untimed(local_rows))


def test_ray_retries_a_crashed_and_a_raising_job(micro_model_dir, tmp_path, monkeypatch, local_rows,
                                                 ray_session):
    crashed, raising = JOBS[0].name(), JOBS[1].name()
    monkeypatch.setenv(backends.TEST_FAIL_ENV, f"{crashed}:exit:1,{raising}:raise:1")
    res = sweep.run_sweep(_spec(micro_model_dir), JOBS[:2], tmp_path, workers=2, progress=False, backend="ray",
                          retries=1)
    for name in (crashed, raising):
        assert (tmp_path / "jobs" / name / "test_failures").read_text() == "1"
    pd.testing.assert_frame_equal(_untimed(res), _untimed(local_rows.iloc[:2][res.columns]))  # no search columns


def test_ray_run_folder_must_be_the_drivers(tmp_path, ray_session):
    """A task that does not find the driver's probe file (a run folder on a node's local disk) fails clearly."""
    remote = ray_session.remote(backends._ray_call)
    with pytest.raises(Exception, match="not the driver's on node"):
        ray_session.get(remote.remote(abs, (1,), 1, (str(tmp_path / ".ellava-ray-probe-x"), "x")))
