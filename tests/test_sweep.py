from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ellava_lib.prune.leveldb import FORMAT
from ellava_lib.run import pipeline, sweep, tables
from ellava_lib.run.jobs import Job, SweepSpec
from ellava_lib.search.config import ProjectorConfig, SearchConfig

SEARCH = dict(population=3, generations=2, offspring=3, screen_samples=0, survivors=2, projector_steps=2,
              projector_holdout=0.0, loss_kind="ce", init=["uniform"])


def test_job_validation_and_names():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        Job("nope", 0.5)
    with pytest.raises(ValueError, match="apply to the searched methods"):
        Job("wanda", 0.5, gap="capacity")
    with pytest.raises(ValueError, match="sparsity"):
        Job("wanda", 1.2)
    assert Job("ellava", 0.6, 1, 32, gap="capacity", projector=False, assembled=True).name() == \
        "ellava-0.60-s1-n32-gap_capacity-noproj-assembled"
    jobs = sweep.jobs_grid(["dense", "wanda"], [0.5, 0.7], [0, 1], 16)
    assert [j.name() for j in jobs] == ["dense-0.00-s0-n16", "wanda-0.50-s0-n16", "wanda-0.70-s0-n16",
                                        "dense-0.00-s1-n16", "wanda-0.50-s1-n16", "wanda-0.70-s1-n16"]


def test_search_config_of_each_method():
    spec = SweepSpec("m", search=SEARCH, ellava={"gap": "capacity", "lam_scales": [0.5], "projector_every": 1,
                                                 "projector_rows": 0.25})
    plain = sweep.search_config(spec, Job("search", 0.6, 2))
    assert (plain.gap, plain.projector.every, plain.target, plain.seed) == ("none", 0, 0.6, 2)
    full = sweep.search_config(spec, Job("ellava", 0.5))
    assert (full.gap, full.lam_scales, full.projector.every, full.generations) == ("capacity", (0.5,), 1, 2)
    # both searches set the same projector rows aside (the full method's share), so they score on the same rows
    assert plain.projector.rows == full.projector.rows == 0.25 and plain.lam_scales != full.lam_scales
    ablated = sweep.search_config(spec, Job("ellava", 0.5, gap="bernstein", projector=False))
    assert (ablated.gap, ablated.projector.every) == ("bernstein", 0)


def _profile_spec(params: dict) -> SweepSpec:
    """The spec notebooks 04-06 build from a profile's values (model folder aside)."""
    return SweepSpec("m", None, search_preset=params["search_preset"], search=params.get("search", {}),
                     ellava=params.get("ellava", {}))


#: ``(search config digest, row digest)`` of searched jobs of each profile. Recomputed for the task guard
#: (``guard = "task"``: the returned model checked on the selection rows' generated answers); before that for the
#: exact re-prune of every searched row and statistics on the statistic rows only (``reconstruction``,
#: ``stat_rows``), the projector's KL on the text positions (``projector_kl_kind``), the selection revision 2
#: (children screened alone, elites at the last stage) and the default's 32 generations; before that for lambda
#: chosen before the evolution (``lam`` and ``lam_grid`` replaced by ``lam_scales``) and the projector rows
#: set aside by every search; before that for the text-position KL fitness (``loss_revision`` 2), issue 17's finer
#: levels around the target (``fine_step`` 0.05), the full-position KL, held-out selection rows, EvoPress-style
#: stages, revised gaps and lambda grid.
PROFILE_DIGESTS = {
    "ci": {"ellava-0.60-s0-n32": ("bdb47574c831", "593fbb1dffdf"),
           "search-0.60-s0-n32": ("c5ef3d702135", "7d40963fdddf"),
           "ellava-0.60-s0-n32-noproj": ("5406448dac22", "768b95a0a9c7"),
           "ellava-0.60-s0-n32-gap_none": ("0f268c53817f", "c14a96e82477")},
    "default": {"ellava-0.60-s0-n64": ("ec644d8f2386", "47aa87847848"),
                "search-0.60-s0-n64": ("e6384e23cf6c", "eda7cbb09639"),
                "ellava-0.60-s0-n64-noproj": ("acb143f68e26", "8e5f5295af14"),
                "ellava-0.60-s0-n64-gap_none": ("76777164a2bd", "91181f04ff3d")},
    # paper: the 0.1 grid (fine_step 0 in profiles/paper.yaml)
    "paper": {"ellava-0.60-s0-n64": ("a351f6623427", "3b30661c8518"),
              "search-0.60-s0-n64": ("d88515d2939c", "8682d5079b30"),
              "ellava-0.60-s0-n64-noproj": ("e959a3936476", "532c56fdb951"),
              "ellava-0.60-s0-n64-gap_none": ("84a6a6d0f6cc", "386396217e5f")},
}


@pytest.mark.parametrize("profile", sorted(PROFILE_DIGESTS))
def test_profiles_keep_their_search_digests(profile):
    params = pipeline.load_profile(profile)
    spec, n = _profile_spec(params), params["calib_n"]
    jobs = [Job("ellava", 0.6, 0, n), Job("search", 0.6, 0, n), Job("ellava", 0.6, 0, n, projector=False),
            Job("ellava", 0.6, 0, n, gap="none")]
    got = {j.name(): (sweep.search_config(spec, j).digest(), sweep.spec_digest(spec, j)) for j in jobs}
    assert got == PROFILE_DIGESTS[profile]


@pytest.mark.parametrize("profile", sorted(PROFILE_DIGESTS))
def test_a_profile_runs_its_preset_with_its_overrides(profile):
    params = pipeline.load_profile(profile)
    preset, search, ellava = params["search_preset"], params.get("search", {}), params.get("ellava", {})
    for key, value in {**search, **ellava}.items():  # an override names a value the preset does not have
        assert SearchConfig.from_preset(preset, **{key: value}) != SearchConfig.from_preset(preset), (profile, key)
    spec = _profile_spec(params)
    for sparsity in params["sparsities"]:
        for seed in params["seeds"]:
            extra = {"calib_n": params["calib_n"], "db_method": "sparsegpt"}
            full = sweep.search_config(spec, Job("ellava", sparsity, seed, params["calib_n"]))
            assert full == SearchConfig.from_preset(preset, **search, **ellava, target=sparsity, seed=seed, extra=extra)
            plain = sweep.search_config(spec, Job("search", sparsity, seed, params["calib_n"]))
            assert plain == SearchConfig.from_preset(preset, projector=ProjectorConfig(every=0), **search,
                                                     gap="none", target=sparsity, seed=seed, extra=extra)


def test_the_plain_search_ignores_the_presets_projector_schedule():
    for preset in ("ci", "default", "paper"):
        plain = sweep.search_config(SweepSpec("m", search_preset=preset), Job("search", 0.6))
        assert plain.gap == "none" and plain.projector == ProjectorConfig(every=0)
        full = sweep.search_config(SweepSpec("m", search_preset=preset), Job("ellava", 0.6))
        assert full.projector == getattr(ProjectorConfig, preset)()
        on = sweep.search_config(SweepSpec("m", search_preset=preset, ellava={"projector_every": 0}),
                                 Job("ellava", 0.6, projector=True))
        assert on.projector.every == ProjectorConfig().every  # switched on: the default schedule
    with pytest.raises(ValueError, match="unknown search preset 'huge'"):
        SweepSpec("m", search_preset="huge")


def test_sweep_rows_resume_and_workers(micro_model_dir, tmp_path):
    spec = SweepSpec(str(micro_model_dir), eval_limit=2, search=SEARCH,
                     ellava={"gap": "bernstein", "projector_every": 1})
    jobs = [Job("dense", 0.0, 0, 8), Job("magnitude", 0.5, 0, 8), Job("ellava", 0.5, 0, 8)]
    out = tmp_path / "a"
    res = sweep.run_sweep(spec, jobs, out, progress=False)
    assert list(res["job"]) == [j.name() for j in jobs]
    assert {"sqa", "vizwiz", "mmvet", "llavabench", "mean", "calib_mean", "gap_calib_test"} <= set(res.columns)
    assert np.allclose(res["gap_calib_test"], res["calib_mean"] - res["mean"])
    assert res.loc[1, "measured"] == pytest.approx(0.5, abs=0.01)
    assert res.loc[2, "measured"] == pytest.approx(0.5, abs=0.05) and np.isfinite(res.loc[2, "j"])
    # the task guard's choice is in the row; the search folder holds an evolved projector only when it was chosen
    assert res.loc[2, "guard"] in ("start", "searched", "start+projector", "searched+projector")
    assert ((out / "jobs" / jobs[2].name() / "search" / "projector.safetensors").exists()
            == res.loc[2, "guard"].endswith("+projector"))
    histories = sweep.search_histories(out, res)  # the searched row's history, read back under its spec
    assert list(histories) == [jobs[2].name()] and histories[jobs[2].name()][0]["phase"] == "init"
    assert sweep.search_histories(out, res.assign(spec="another")) == {}
    assert pd.read_csv(out / "results.csv")["job"].tolist() == list(res["job"])
    # resume: finished rows are read back, nothing re-runs
    stamp = (out / "jobs" / jobs[1].name() / "row.json").stat().st_mtime_ns
    again = sweep.run_sweep(spec, jobs, out, progress=False)
    assert (out / "jobs" / jobs[1].name() / "row.json").stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again, res)
    # two worker processes give the same rows (seconds aside)
    par = sweep.run_sweep(spec, jobs[1:], tmp_path / "b", workers=2, progress=False)
    cols = [c for c in par.columns if c not in ("seconds", "search_s", "eval_s")]
    pd.testing.assert_frame_equal(par[cols], res.iloc[1:].reset_index(drop=True)[cols])
    # a row made under another spec (here: evaluation size) is re-run, never mixed in
    # (a search re-run under another search config starts its folder over instead of resuming a foreign
    # checkpoint)
    other_spec = SweepSpec(**{**spec.to_dict(), "eval_limit": 3, "search": {**SEARCH, "offspring": 4}})
    other = sweep.run_sweep(other_spec, jobs[1:], out, progress=False)
    assert (out / "jobs" / jobs[1].name() / "row.json").stat().st_mtime_ns != stamp
    assert list(other["spec"]) != list(res["spec"][1:]) and other.loc[1, "j"] == other.loc[1, "j"]


def _results():
    rows = []
    for seed, bump in enumerate([0.0, 1.0, 2.0]):
        rows.append({"method": "dense", "sparsity": 0.0, "seed": seed, "mean": 60.0, "calib_mean": 70.0 + bump})
        rows.append({"method": "wanda", "sparsity": 0.5, "seed": seed, "mean": 50.0 + bump, "calib_mean": 60.0})
        rows.append({"method": "ellava", "sparsity": 0.5, "seed": seed, "mean": 55.0 + bump, "calib_mean": 58.0})
    frame = pd.DataFrame(rows)
    frame["gap_calib_test"] = frame["calib_mean"] - frame["mean"]
    return frame


def test_main_table_mean_std_and_margin():
    table = tables.main_table(_results())
    assert list(table["method"]) == ["dense", "wanda", "ellava"]
    ell = table.set_index("method").loc["ellava"]
    assert ell["mean"] == pytest.approx(56.0) and ell["mean_std"] == pytest.approx(1.0)
    assert ell["gap_calib_test"] == pytest.approx(2.0) and ell["seeds"] == 3
    shown = tables.format_main_table(table)
    assert shown.loc[2, "mean (test)"] == "56.0 ± 1.0" and shown.loc[2, "method"] == "EfficientLLaVA"
    margin = tables.paired_margins(_results(), baselines=("wanda",)).iloc[0]
    assert margin["mean_diff"] == pytest.approx(5.0) and margin["share_of_dense_%"] == pytest.approx(56 / 60 * 100)
    assert margin["k"] == 3 and margin["se"] == pytest.approx(0.0) and margin["ours_std"] == pytest.approx(1.0)


def test_paired_margins_by_hand():
    """d = (3, 1, 2) over seeds 0..2 (seed 3 has no wanda row: unpaired, left out): mean 2, sd 1, se 1/sqrt 3."""
    rows = [{"method": "dense", "sparsity": 0.0, "seed": 0, "mean": 80.0}]
    for seed, (ours, theirs) in enumerate([(53.0, 50.0), (51.0, 50.0), (56.0, 54.0)]):
        rows += [{"method": "ellava", "sparsity": 0.6, "seed": seed, "mean": ours},
                 {"method": "wanda", "sparsity": 0.6, "seed": seed, "mean": theirs},
                 {"method": "owl", "sparsity": 0.6, "seed": seed, "mean": ours}]
    rows.append({"method": "ellava", "sparsity": 0.6, "seed": 3, "mean": 60.0})
    out = tables.paired_margins(pd.DataFrame(rows), baselines=("wanda", "owl", "ecoflap")).set_index("baseline")
    assert list(out.index) == ["Wanda", "OWL"]  # no ecoflap rows: no margin
    w = out.loc["Wanda"]
    assert w["k"] == 3 and w["mean_diff"] == pytest.approx(2.0) and w["se"] == pytest.approx(1 / np.sqrt(3))
    assert w["ours"] == pytest.approx(55.0) and w["baseline_score"] == pytest.approx(154 / 3)
    assert w["sparsity"] == "60%" and w["share_of_dense_%"] == pytest.approx(55.0 / 80 * 100)
    assert out.loc["OWL", "mean_diff"] == 0.0 and out.loc["OWL", "se"] == 0.0
    one = tables.paired_margins(pd.DataFrame(rows[:3]), baselines=("wanda",)).iloc[0]
    assert one["k"] == 1 and np.isnan(one["se"])


def test_ecoflap_importance_computed_once_per_calibration_draw(micro_model_dir, tmp_path, monkeypatch):
    from ellava_lib.core.policy import Policy
    from ellava_lib.prune import allocate
    from ellava_lib.run import tier

    calls = []
    real = sweep.zeroth_order_importance

    def counting(*args, **kwargs):
        calls.append(kwargs.get("seed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "zeroth_order_importance", counting)
    spec = SweepSpec(str(micro_model_dir), eval_limit=2, calib_eval=False,
                     search={"population": 3, "generations": 1, "offspring": 2, "screen_samples": 0,
                             "init": ["uniform", "ecoflap"], "loss_kind": "ce", "survivors": 4},
                     ellava={"projector_every": 0})
    jobs = [Job("ecoflap", 0.5, 0, 8), Job("ecoflap", 0.6, 0, 8), Job("ellava", 0.6, 0, 8)]
    sweep.run_sweep(spec, jobs, tmp_path, progress=False)
    assert calls == [0]  # one computation serves both sparsities and the search that starts from ECoFLaP
    cache = sweep.ecoflap_importance_path(tmp_path, 0, 8)
    stored = json.loads(cache.read_text())
    pols = [Policy.from_json(tmp_path / "jobs" / j.name() / "policy.json") for j in jobs]
    assert pols[0].meta["importance"] == pols[1].meta["importance"] == stored["importance"]
    # the same policy as computing the importances inside ecoflap_policy
    model, _, samples, batch = sweep._load(tier.Tier(), spec, 0, 8)
    batch = sweep.statistic_draw(spec, 0, samples, batch)[1]  # ECoFLaP reads the statistic rows only
    direct = allocate.ecoflap_policy(model, batch, 0.6, seed=0)
    assert direct.sparsities == pols[1].sparsities
    history = pd.read_csv(tmp_path / "jobs" / jobs[2].name() / "search" / "history.csv")
    assert pols[1].policy_id() in set(history.loc[history["phase"] == "init", "policy_id"])
    # a cache made for another model or tier is not used
    cache.write_text(json.dumps({**stored, "key": "stale"}))
    sweep.ecoflap_importance(spec, 0, 8, tmp_path)
    assert calls == [0, 0] and json.loads(cache.read_text())["key"] == stored["key"]
    with pytest.raises(ValueError, match="importance misses units"):
        allocate.ecoflap_policy(model, batch, 0.6, importance={"nope": 1.0})


def test_level_databases_hold_the_levels_of_every_search_on_them(tmp_path):
    spec = SweepSpec("m", search=SEARCH)
    jobs = [Job("wanda", 0.5), Job("search", 0.5), Job("ellava", 0.7)]
    grid = sweep.level_grid(spec, jobs)
    assert set(grid) == set(sweep.search_config(spec, jobs[1]).levels) | set(sweep.search_config(spec, jobs[2]).levels)
    assert 0.35 in grid and 0.85 in grid and sweep.level_grid(spec, jobs[:1]) == sweep.DEFAULT_GRID
    db = tmp_path / "db"
    assert sweep.db_build_grid(db, grid) == grid  # nothing there yet
    db.mkdir()
    (db / "config.json").write_text(json.dumps({"grid": list(grid), "format": FORMAT, "store_dtype": "float32"}))
    (db / "lm.0.attn.safetensors").write_text("kept")
    assert sweep.db_build_grid(db, sweep.DEFAULT_GRID) == grid and (db / "lm.0.attn.safetensors").exists()
    assert sweep.db_build_grid(db, sweep.DEFAULT_GRID, "float32") == grid and db.exists()
    # a database without some wanted levels is the sweep's cache: removed, rebuilt with the union
    assert sweep.db_build_grid(db, (0.0, 0.25, 0.9)) == tuple(sorted({*grid, 0.25})) and not db.exists()
    # one of another format or storage dtype: removed, built afresh with the wanted levels
    for stale in ({"format": 1, "store_dtype": "float32"}, {"format": FORMAT, "store_dtype": "bfloat16"}):
        db.mkdir()
        (db / "config.json").write_text(json.dumps({"grid": list(grid), **stale}))
        assert sweep.db_build_grid(db, sweep.DEFAULT_GRID, "float32") == sweep.DEFAULT_GRID and not db.exists()


def test_search_against_its_best_start_and_the_gap_check_by_hand():
    rows = []
    per_seed = [(60, 61, 62, 61.5, 63), (61, 60, 63, 62.0, 64), (59, 62, 64, 63.5, 65)]
    for seed, (s, o, e, srch, ell) in enumerate(per_seed):
        for method, mean, calib in (("sparsegpt", s, s + 1), ("owl", o, o - 1), ("ecoflap", e, e), ("search", srch, 0),
                                    ("ellava", ell, ell + 2.5), ("dense", 70, 70)):
            rows.append({"method": method, "sparsity": 0.0 if method == "dense" else 0.6, "seed": seed,
                         "mean": float(mean), "calib_mean": float(calib), "gap_calib_test": float(calib - mean)})
    res = pd.DataFrame(rows)
    starts = tables.search_vs_starts(res)
    assert len(starts) == 1 and starts.loc[0, "best_start"] == "ECoFLaP (by test)"  # no start_pick: 63 > 60, 61
    d = np.array([61.5 - 62, 62.0 - 63, 63.5 - 64])
    assert starts.loc[0, "mean_diff"] == pytest.approx(d.mean())
    assert starts.loc[0, "se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert not starts.loc[0, "holds"]  # -0.667 below, se 0.167
    gap = tables.gap_vs_baselines(res)  # ours +2.5; baselines' mean gaps: +1, -1, 0
    assert (gap.loc[0, "gap"], gap.loc[0, "baselines_min"], gap.loc[0, "baselines_max"]) == (2.5, -1.0, 1.0)
    assert gap.loc[0, "holds"] and not tables.gap_vs_baselines(res, tolerance=1.0).loc[0, "holds"]


def test_search_against_the_start_it_ranked_best_on_its_selection_rows_by_hand():
    """Each seed's search row is paired with the row of the start it picked on its selection rows (``start_pick``),
    not with the start that scored best on test."""
    per_seed = [(60, 61, 66, 61.5, "uniform"), (61, 60, 66, 60.5, "owl"), (59, 62, 66, 62.0, "owl")]
    rows = []
    for seed, (s, o, e, srch, pick) in enumerate(per_seed):
        for method, mean in (("sparsegpt", s), ("owl", o), ("ecoflap", e), ("wanda", 70)):
            rows.append({"method": method, "sparsity": 0.6, "seed": seed, "mean": float(mean), "start_pick": None})
        rows.append({"method": "search", "sparsity": 0.6, "seed": seed, "mean": srch, "start_pick": pick})
    starts = tables.search_vs_starts(pd.DataFrame(rows))
    # d = 61.5 - 60, 60.5 - 60, 62 - 62 = 1.5, 0.5, 0: mean 2/3, sd 0.763763, se 0.440959
    assert len(starts) == 1 and starts.loc[0, "best_start"] == "SparseGPT, OWL x2" and starts.loc[0, "k"] == 3
    assert starts.loc[0, "mean_diff"] == pytest.approx(0.6666667)
    assert starts.loc[0, "se"] == pytest.approx(0.440959, abs=1e-6)
    assert starts.loc[0, "best_start_score"] == pytest.approx(182 / 3) and starts.loc[0, "holds"]
    rows[4]["mean"] = 58.0  # seed 0's search now 2 below its start: d = -2, 0.5, 0, mean -0.5, se 0.763763
    starts = tables.search_vs_starts(pd.DataFrame(rows))
    assert starts.loc[0, "mean_diff"] == pytest.approx(-0.5) and starts.loc[0, "holds"]
    rows[9]["mean"] = 58.5  # seed 1: d = -2, -1.5, 0: mean -7/6, se 0.600925
    starts = tables.search_vs_starts(pd.DataFrame(rows))
    assert starts.loc[0, "se"] == pytest.approx(0.600925, abs=1e-6) and not starts.loc[0, "holds"]
    # the picked start's baseline has no row (not a table method): left out, and said so when no seed pairs
    frame = pd.DataFrame(rows)
    starts = tables.search_vs_starts(frame[frame["method"] != "owl"])
    assert starts.loc[0, "k"] == 1 and starts.loc[0, "best_start"] == "SparseGPT"
    starts = tables.search_vs_starts(frame[~frame["method"].isin(["owl", "sparsegpt"])])
    assert starts.loc[0, "k"] == 0 and starts.loc[0, "best_start"] == "SparseGPT (no row), OWL (no row)"
    assert starts.loc[0, "holds"] is None and np.isnan(starts.loc[0, "mean_diff"])


def test_search_vs_starts_counts_the_seeds_that_kept_their_start():
    """``kept_start``: how many paired seeds' searches returned their start pick (the one-SE rule); absent when
    the rows do not say."""
    rows = []
    for seed, (kept, srch) in enumerate([(True, 60.0), (False, 61.0), (True, 60.0)]):
        rows.append({"method": "sparsegpt", "sparsity": 0.5, "seed": seed, "mean": 60.0, "start_pick": None,
                     "kept_start": None})
        rows.append({"method": "search", "sparsity": 0.5, "seed": seed, "mean": srch, "start_pick": "uniform",
                     "kept_start": kept})
    starts = tables.search_vs_starts(pd.DataFrame(rows))
    assert starts.loc[0, "kept_start"] == "2/3" and starts.loc[0, "mean_diff"] == pytest.approx(1 / 3)
    frame = pd.DataFrame(rows).drop(columns="kept_start")
    assert "kept_start" not in tables.search_vs_starts(frame).columns


def _row_tokens(batch) -> set[tuple[int, ...]]:
    """Each row of a calibration batch as its unpadded token ids."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return {tuple(ids[i][mask[i].bool()].tolist()) for i in range(ids.shape[0])}


def test_no_statistic_reads_a_selection_row_and_searched_rows_are_re_pruned_exactly(micro_model_dir, tmp_path,
                                                                                      monkeypatch):
    """Every batch a method computes statistics on (solver Hessians and norms, Taylor scores, OWL ratios, ECoFLaP
    scores, the level database, the start policies, the exact re-prune) holds the 6 statistic rows of the 8-row
    draw and none of its 2 selection rows; the searched row is the exact re-prune, its ``assembled`` ablation not."""
    from ellava_lib.prune import leveldb
    from ellava_lib.run import tier
    from ellava_lib.search import evolve, finalize

    seen: dict[str, list[set]] = {}

    def spy(module, name, arg):
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            seen.setdefault(name, []).append(_row_tokens(args[arg]))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)

    spy(sweep, "prune_model", 3)
    spy(sweep, "owl_policy", 1)
    spy(sweep, "zeroth_order_importance", 1)
    spy(leveldb, "build_level_db", 1)
    spy(evolve, "start_policies", 1)
    spy(finalize, "exact_reprune", 3)
    spec = SweepSpec(str(micro_model_dir), eval_limit=2,
                     search={**SEARCH, "init": ["uniform", "owl", "ecoflap"], "generations": 1},
                     ellava={"projector_every": 0})
    jobs = [Job(m, 0.5, 0, 8) for m in ("wanda", "sparsegpt", "owl", "ecoflap", "llm_pruner", "ellava")]
    jobs.append(Job("ellava", 0.5, 0, 8, assembled=True))
    res = sweep.run_sweep(spec, jobs, tmp_path, progress=False).set_index("job")
    _, _, samples, batch = sweep._load(tier.Tier(), spec, 0, 8)
    stat, select = sweep.draw_split(spec, 0, samples)
    assert len(stat) == 6 and len(select) == 2
    from ellava_lib.search.objective import subset
    stat_rows, select_rows = _row_tokens(subset(batch, stat)), _row_tokens(subset(batch, select))
    assert len(select_rows) == 2 and not stat_rows & select_rows
    assert set(seen) == {"prune_model", "owl_policy", "zeroth_order_importance", "build_level_db",
                         "start_policies", "exact_reprune"}
    for name, calls in seen.items():
        for rows in calls:
            assert rows == stat_rows, name
    assert len(seen["prune_model"]) == 5  # the five baselines (the exact re-prune calls it from finalize)
    assert len(seen["exact_reprune"]) == 1  # the default searched row, not its assembled ablation
    exact, assembled = res.loc[jobs[5].name()], res.loc[jobs[6].name()]
    pol = json.loads((tmp_path / "jobs" / jobs[5].name() / "policy.json").read_text())
    assert pol == json.loads((tmp_path / "jobs" / jobs[6].name() / "policy.json").read_text())
    assert assembled["measured"] == pytest.approx(pol["meta"]["mean_sparsity"], abs=1e-6)
    assert exact["measured"] == pytest.approx(0.5, abs=0.01)
    assert exact["spec"] != assembled["spec"]
