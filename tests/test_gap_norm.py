"""The ``norm`` gap end to end: the stored weights' Frobenius norms and distances to the dense ones from a level
database (recorded at build time, or computed for a unit file written before they were), J through
``score_losses``, the config's validation of the gap name and lambda (one-line ``ValueError``s)."""

from __future__ import annotations

import math

import pytest
import torch

from ellava_lib.core import units
from ellava_lib.prune import leveldb
from ellava_lib.search import gap as gaps
from ellava_lib.search.config import SearchConfig
from ellava_lib.search.objective import score_losses

GRID = (0.0, 0.5, 0.8)


@pytest.fixture(scope="module")
def db(micro_model_dir, calib, tmp_path_factory):
    from ellava_lib.model.specs import load_model

    model, _ = load_model(micro_model_dir)
    names = list(units.list_units(model))[:2]
    out = tmp_path_factory.mktemp("leveldb_norm")
    leveldb.build_level_db(model, calib, out, grid=GRID, units=names, progress=False)
    return leveldb.LevelDB(out), names


def test_frobenius_sq_by_hand_and_monotone(db, micro_model_dir):
    from ellava_lib.model.specs import load_model

    lvl, names = db
    model, _ = load_model(micro_model_dir)
    for u in names:
        table = lvl.frobenius_sq(u)  # stored at build time: no dense weights needed
        assert sorted(table) == list(GRID)
        dense = {k: lin.weight.detach() for k, lin in units.unit_linears(model)[u].items()}
        for level in GRID:  # by hand: sum over the unit's matrices of ||W_dense * (W_level != 0)||_F^2
            stored = dense if level == 0 else lvl.weights(u, level)
            want = sum(float((dense[k].double() * (stored[k] != 0)).pow(2).sum()) for k in dense)
            assert table[level] == pytest.approx(want, rel=1e-12)
        assert table[0.0] > table[0.5] > table[0.8] > 0
        assert lvl.frobenius_sq(u) == table  # cached, a copy
        lvl.frobenius_sq(u).clear()
        assert lvl.frobenius_sq(u) == table


def test_weight_sq_is_the_stored_weights_norm_and_distance(db, micro_model_dir):
    from ellava_lib.model.specs import load_model

    lvl, names = db
    model, _ = load_model(micro_model_dir)
    for u in names:
        table = lvl.weight_sq(u)  # recorded at build time: no dense weights needed
        assert sorted(table) == list(GRID)
        dense = {k: lin.weight.detach().double() for k, lin in units.unit_linears(model)[u].items()}
        assert table[0.0] == (pytest.approx(sum(float(w.pow(2).sum()) for w in dense.values()), rel=1e-12), 0.0)
        for level in GRID[1:]:  # by hand: the weights the database assembles (OBS-updated), not the masked dense
            stored = {k: w.double() for k, w in lvl.weights(u, level).items()}
            want = (sum(float(stored[k].pow(2).sum()) for k in dense),
                    sum(float((stored[k] - dense[k]).pow(2).sum()) for k in dense))
            assert table[level] == pytest.approx(want, rel=1e-12)
            assert table[level][0] != pytest.approx(lvl.frobenius_sq(u)[level], rel=1e-6)  # OBS moved the rest
        assert 0 < table[0.5][1] < table[0.8][1]


def test_weight_sq_of_a_unit_file_without_it(db, micro_model_dir, tmp_path):
    """A unit file written before ``weight_sq`` was recorded: computed from its stored levels and the dense snapshot
    (after the database wrote the unit into a model), equal to the recorded table."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ellava_lib.core.policy import Policy
    from ellava_lib.model.specs import load_model

    lvl, names = db
    old = tmp_path / "old"
    shutil.copytree(lvl.path, old)
    for u in names:
        with safe_open(str(old / f"{u}.safetensors"), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        save_file(tensors, str(old / f"{u}.safetensors"), metadata={k: v for k, v in meta.items() if k != "weight_sq"})
    older = leveldb.LevelDB(old)
    with pytest.raises(ValueError, match="dense weights"):
        older.weight_sq(names[0])
    model, _ = load_model(micro_model_dir)
    older.assemble(model, Policy.uniform(names, 0.5))
    for u in names:
        have, want = older.weight_sq(u), lvl.weight_sq(u)
        assert sorted(have) == sorted(want) == list(GRID)
        for level in GRID:
            assert have[level] == pytest.approx(want[level], rel=1e-12, abs=1e-15)


def test_norm_gap_in_score_losses(db):
    lvl, names = db
    table = {u: lvl.weight_sq(u) for u in names}
    sizes = {names[0]: 8, names[1]: 27}
    sp = {names[0]: 0.5, names[1]: 0.8}
    losses = torch.tensor([0.1, 0.3])
    s = score_losses(losses, gap="norm", lam=2.0, units=sizes, sparsities=sp, n_capacity=16,
                     gap_kw={"weight_sq": table})
    x = [table[u][sp[u]][1] / table[u][sp[u]][0] for u in names]
    want = ((2 * x[0] ** (1 / 3) + 3 * x[1] ** (1 / 3)) / 5) ** 1.5 / math.sqrt(16)  # 8^(1/3) = 2, 27^(1/3) = 3
    assert s.r_hat == pytest.approx(0.2) and s.g_hat == pytest.approx(want, rel=1e-12)
    assert s.j == pytest.approx(s.r_hat + 2 * want, rel=1e-12)
    denser = score_losses(losses, gap="norm", lam=2.0, units=sizes, sparsities={names[0]: 0.5, names[1]: 0.5},
                          n_capacity=16, gap_kw={"weight_sq": table})
    assert denser.g_hat < s.g_hat  # closer to the dense weights


def test_bernstein_in_score_losses_has_no_range_constant():
    # losses 1, 2, 3, 4: Var (ddof 1) = 5/3 ; sqrt(2 * 5/3 * ln 40 / 4) = 1.753301517640823 ; J = 2.5 + 0.5 G
    s = score_losses([1.0, 2.0, 3.0, 4.0], gap="bernstein", lam=0.5, loss_cap=10.0)
    assert s.g_hat == pytest.approx(1.753301517640823, rel=1e-12)
    assert s.j == pytest.approx(2.5 + 0.5 * 1.753301517640823, rel=1e-12)
    assert score_losses([0.0, 0.0], gap="bernstein", lam=1.0, loss_cap=2.0).g_hat == 0.0


@pytest.mark.parametrize("bad,match", [({"gap": "vc"}, "gap must be one of"),
                                       ({"lam_scales": (-0.1,)}, "multipliers >= 0"),
                                       ({"lam_scales": (float("nan"),)}, "multipliers >= 0"),
                                       ({"lam_scales": (float("inf"),)}, "multipliers >= 0"),
                                       ({"lam_scales": ()}, "multipliers >= 0")])
def test_config_rejects_bad_gap_and_lambda(bad, match):
    with pytest.raises(ValueError, match=match) as err:
        SearchConfig(**bad)
    assert "\n" not in str(err.value)


def test_config_accepts_every_gap_and_keeps_its_serialised_form():
    for name in gaps.GAP_ESTIMATORS:
        cfg = SearchConfig(gap=name)
        assert cfg.to_dict()["gap"] == name and SearchConfig.from_dict(cfg.to_dict()) == cfg
    # no new fields: norm's serialised form has the keys of a no-gap config and its revision
    assert set(SearchConfig(gap="none").to_dict()) | {"gap_revision"} == set(SearchConfig(gap="norm").to_dict())


def test_changed_estimators_carry_a_revision_in_the_serialised_config():
    for name in ("bernstein", "capacity", "norm"):
        d = SearchConfig(gap=name).to_dict()
        assert d["gap_revision"] == gaps.GAP_REVISION[name] == 2
        old = {k: v for k, v in d.items() if k != "gap_revision"}  # as written before the formula changed
        assert SearchConfig.from_dict(old) == SearchConfig.from_dict(d) == SearchConfig(gap=name)
        assert old != SearchConfig.from_dict(old).to_dict()  # so an old checkpoint's config does not match
    assert "gap_revision" not in SearchConfig(gap="none").to_dict()


def test_a_search_with_the_norm_gap_scores_every_policy_with_it(db, micro_model_dir, calib, tmp_path):
    import pandas as pd

    from ellava_lib.model.specs import load_model
    from ellava_lib.search import evolve
    from ellava_lib.search.config import ProjectorConfig

    lvl, names = db
    model, _ = load_model(micro_model_dir)
    sizes = {u: n for u, n in units.list_units(model).items() if u in names}
    cfg = SearchConfig(target=0.5, grid=GRID, fine_step=0, gap="norm", loss_kind="ce", init=("uniform",),
                       population=2, generations=1, offspring=2, screen_samples=0, survivors=1,
                       projector=ProjectorConfig(every=0), guard="none")
    result = evolve.run_search(model, calib, lvl, sizes, cfg, tmp_path, progress=False)
    hist = pd.read_csv(tmp_path / "history.csv")
    assert len(hist) >= 1 and (hist["g_hat"] > 0).all()
    table = {u: lvl.weight_sq(u) for u in names}
    # the gap's n: the rows the search fits on (its scoring rows; the projector rows are set aside without
    # projector evolution too)
    n_fit = len(evolve.score_rows(evolve.split_rows(16, cfg.select_frac, cfg.seed)[0], cfg)[0])
    assert n_fit == 6
    want = gaps.gap("norm", units=sizes, sparsities=result.policy.sparsities, n=n_fit, weight_sq=table)
    assert result.score.g_hat == pytest.approx(want, rel=1e-12)


def test_cli_takes_the_norm_gap_and_has_no_lambda_flag():
    from ellava_lib import cli
    from ellava_lib.cli.prune import search_config

    parse = cli.build_parser().parse_args
    base = ["search", "--sparsity", "0.6", "--out", "x"]
    assert search_config(parse([*base, "--gap", "norm"])).gap == "norm"
    with pytest.raises(SystemExit):  # lambda is chosen by the search: no --lam (argparse exits 2)
        parse([*base, "--lam", "1"])
