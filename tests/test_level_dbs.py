"""Level databases held one at a time (``tier.level_dbs: one``): a sweep over several calibration sizes (notebook
06's n-ablation) builds each database once, runs the jobs that read it, and deletes it before the next is built;
the disk preflight checks that peak (one database) instead of the sum; ``ellava plan`` reports it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ellava_lib.core.units import list_units
from ellava_lib.model import structure
from ellava_lib.prune import leveldb
from ellava_lib.run import plan, sweep
from ellava_lib.run.jobs import Job, SweepSpec
from ellava_lib.run.tier import Tier

SEARCH = dict(population=3, generations=1, offspring=3, screen_samples=0, survivors=2, projector_steps=1,
              projector_holdout=0.0, loss_kind="ce", init=["uniform"])
#: two calibration sizes (two level databases) and a baseline that reads none
JOBS = [Job("search", 0.5, 0, 8), Job("magnitude", 0.5, 0, 8), Job("search", 0.5, 0, 6)]
REAL_BUILD, REAL_JOB = leveldb.build_level_db, sweep.run_job


def _spec(model_dir, mode: str) -> SweepSpec:
    return SweepSpec(str(model_dir), eval_limit=1, search=SEARCH, calib_eval=False,
                     tier=Tier(level_dbs=mode).to_dict())


def _run(model_dir, out, mode, monkeypatch) -> tuple[pd.DataFrame, list[str], dict[str, list[str]]]:
    """The sweep's rows, the databases built (in order) and the databases on disk while each job ran."""
    built: list[str] = []
    present: dict[str, list[str]] = {}

    def build(model, batch, out_dir, *args, **kw):
        built.append(out_dir.name)
        return REAL_BUILD(model, batch, out_dir, *args, **kw)

    def job(j, spec, out_dir, threads=1):
        present[j.name()] = sorted(p.name for p in (out_dir / "leveldb").glob("s*-n*"))
        return REAL_JOB(j, spec, out_dir, threads)
    monkeypatch.setattr(leveldb, "build_level_db", build)
    monkeypatch.setattr(sweep, "run_job", job)
    rows = sweep.run_sweep(_spec(model_dir, mode), JOBS, out, progress=False)
    return rows.drop(columns=["seconds", "search_s", "eval_s"]), built, present


def test_one_database_at_a_time_builds_each_once_frees_it_and_keeps_the_rows(micro_model_dir, tmp_path,
                                                                              monkeypatch):
    keep, built_keep, present_keep = _run(micro_model_dir, tmp_path / "keep", "keep", monkeypatch)
    one, built_one, present_one = _run(micro_model_dir, tmp_path / "one", "one", monkeypatch)
    pd.testing.assert_frame_equal(one.sort_values("job").reset_index(drop=True),
                                  keep.sort_values("job").reset_index(drop=True))
    assert sorted(built_keep) == sorted(built_one) == ["s0-n6", "s0-n8"]  # each database built once
    assert sorted(p.name for p in (tmp_path / "keep" / "leveldb").iterdir()) == ["s0-n6", "s0-n8"]
    assert present_keep == {j.name(): ["s0-n6", "s0-n8"] for j in JOBS}  # keep: all built before the jobs
    # one: the jobs that read no database first, then each searched job beside its own database alone
    assert present_one == {"magnitude-0.50-s0-n8": [], "search-0.50-s0-n6": ["s0-n6"],
                           "search-0.50-s0-n8": ["s0-n8"]}
    assert list(present_one) == ["magnitude-0.50-s0-n8", "search-0.50-s0-n6", "search-0.50-s0-n8"]
    assert [p.name for p in (tmp_path / "one" / "leveldb").iterdir()] == [built_one[-1]]  # the last one is left
    # a second sweep starts with the database the first one left, so nothing is rebuilt for it
    assert sweep.db_rounds(_spec(micro_model_dir, "one"), JOBS, tmp_path / "one")[1][0] == \
        (0, int(built_one[-1].split("-n")[1]))


def _paper_spec(mode: str) -> SweepSpec:
    """The paper profile's spec (hub model: unit sizes from its shipped config, nothing loaded or downloaded)."""
    params = plan.profile_params("paper")
    return SweepSpec("llava-1.5-7b", search_preset=params["search_preset"], search=params["search"],
                     tier={**params["tier"], "level_dbs": mode})


def test_the_disk_preflight_checks_the_peak_of_the_mode(tmp_path, monkeypatch):
    """Notebook 06's n-ablation at the paper profile: four 65.6 GB databases; keep needs their sum, one the
    largest. With 100 GB free keep is refused before any work (one line naming the bytes), one goes ahead."""
    params = plan.profile_params("paper")
    jobs = sweep.ablation_jobs(_paper_spec("one"), params["sparsity"], 0, params["calib_n"], params["gaps"],
                               params["calib_ns"])
    one_db = leveldb.estimate_bytes(list_units(structure.meta_model(structure.load_config("llava-1.5-7b"))),
                                    sweep.level_grid(_paper_spec("one"), jobs), 2)
    assert one_db == 65_636_663_808  # leveldb.estimate_bytes' docstring: the 0.1 grid in fp16
    monkeypatch.setattr(leveldb, "free_bytes", lambda path: 100 * 10**9)
    keep = sweep.level_db_disk(_paper_spec("keep"), jobs, tmp_path)
    one = sweep.level_db_disk(_paper_spec("one"), jobs, tmp_path)
    assert len(keep["per_draw"]) == 4 and set(keep["per_draw"].values()) == {one_db}
    assert keep["need"] == 4 * one_db and not keep["ok"]
    assert one["need"] == one_db and one["ok"]
    with pytest.raises(OSError) as err:
        sweep.run_sweep(_paper_spec("keep"), jobs, tmp_path / "run", progress=False)
    line = str(err.value)
    assert "\n" not in line and f"{4 * one_db:,} bytes" in line and f"{100 * 10**9:,} bytes" in line
    assert not (tmp_path / "run").exists()  # nothing written
    # one: a database already on disk counts as free space, since it is deleted before the next is built
    old = tmp_path / "leveldb" / "s0-n999"
    old.mkdir(parents=True)
    (old / "x.safetensors").write_bytes(b"0" * 1000)
    assert sweep.level_db_disk(_paper_spec("one"), jobs, tmp_path)["free"] == 100 * 10**9 + 1000


def test_plan_reports_the_peak_disk_of_the_level_databases(monkeypatch):
    one = plan.make_plan("paper")
    real = plan.profile_params

    def keep_params(name, root=None):
        params = real(name, root)
        return {**params, "tier": {**params["tier"], "level_dbs": "keep"}}
    monkeypatch.setattr(plan, "profile_params", keep_params)
    keep = plan.make_plan("paper")
    db_one, db_keep = (next(s for s in p.stages if s.name == "leveldb") for p in (one, keep))
    assert one.level_dbs == "one" and keep.level_dbs == "keep"
    assert db_one.disk_gb == db_keep.disk_gb == pytest.approx(65.64, abs=0.01) and db_one.runs == 4
    assert one.disk_held_gb(db_one) == pytest.approx(65.64, abs=0.01)
    assert keep.disk_held_gb(db_keep) == pytest.approx(4 * 65.64, abs=0.04)
    assert keep.disk_peak_gb - one.disk_peak_gb == pytest.approx(3 * db_one.disk_gb)
    assert "65.6 GB" in plan.markdown(one).split("| leveldb |")[1].split("\n")[0]
    assert "262.5 GB" in plan.markdown(keep).split("| leveldb |")[1].split("\n")[0]
    assert json.loads(json.dumps(one.to_dict()))["disk_peak_gb"] == pytest.approx(one.disk_peak_gb)


def test_tier_level_dbs_is_a_disk_knob():
    assert Tier(level_dbs="one").to_dict()["level_dbs"] == "one" and "level_dbs" not in Tier().to_dict()
    assert Tier(level_dbs="one").identity() == Tier().identity()  # no row or cache depends on it
    with pytest.raises(ValueError, match="level_dbs"):
        Tier(level_dbs="all")
