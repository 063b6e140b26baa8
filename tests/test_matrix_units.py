"""Matrix units (``SearchConfig.units = "matrix"``, ``ellava search --units matrix``): one sparsity per weight matrix,
assembled from the block units' level database, budgeted, searched and re-pruned exactly."""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest
import torch
from helpers import build_micro_level_db

from ellava_lib import cli
from ellava_lib.cli.prune import search_config
from ellava_lib.core import units
from ellava_lib.core.policy import Policy
from ellava_lib.model.specs import load_model
from ellava_lib.prune import leveldb, prune
from ellava_lib.run import sweep
from ellava_lib.run.jobs import Job, SweepSpec
from ellava_lib.search import budget, evolve
from ellava_lib.search.config import SearchConfig
from ellava_lib.search.finalize import exact_reprune
from ellava_lib.speed import flops

#: The micro model's matrices (hidden 48, MLP 96, two decoder layers, no grouped-query attention).
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MICRO_MATRICES = {f"lm.{i}.{n}": 48 * 48 if n in ATTN else 48 * 96 for i in range(2) for n in ATTN + MLP}


def test_matrix_units_are_named_by_their_linear_and_sum_to_their_block(micro_model):
    model, _ = micro_model
    assert units.list_units(model, kind="matrix") == MICRO_MATRICES  # names, sizes and depth order
    assert units.block_unit("lm.3.self_attn.q_proj") == "lm.3.attn"
    assert units.block_unit("lm.0.mlp.down_proj") == "lm.0.mlp"
    assert units.block_unit("vision.1.self_attn.out_proj") == "vision.1.attn"
    assert units.block_unit("vision.1.mlp.fc2") == "vision.1.mlp"
    assert [units.block_unit(u) for u in ("lm.3.attn", "lm.3.self_attn.out_proj", "u7")] == [
        "lm.3.attn", "lm.3.self_attn.out_proj", "u7"]  # o_proj is the decoder's, out_proj the vision tower's
    assert units.unit_matrices("lm.2.mlp") == ["lm.2.mlp.gate_proj", "lm.2.mlp.up_proj", "lm.2.mlp.down_proj"]
    assert units.unit_matrices("lm.2.mlp.up_proj") == ["lm.2.mlp.up_proj"]
    assert units.unit_kind(MICRO_MATRICES) == "matrix" and units.unit_kind(["lm.0.attn"]) == "block"
    assert units.unit_kind([]) == "block"
    with pytest.raises(ValueError, match="mix block units"):
        units.unit_kind(["lm.0.attn", "lm.0.mlp.up_proj"])
    with pytest.raises(ValueError, match="unit kind must be one of block, matrix"):
        units.list_units(model, kind="row")
    blocks = units.list_units(model)
    assert {b: sum(n for m, n in MICRO_MATRICES.items() if units.block_unit(m) == b) for b in blocks} == blocks
    vision = units.list_units(model, include_vision=True, kind="matrix")
    assert next(iter(vision)) == "vision.0.self_attn.q_proj" and units.names_vision(vision)
    assert units.to_kind({"lm.1.attn": 0.5}, "matrix") == {f"lm.1.{n}": 0.5 for n in ATTN}


def test_the_budget_of_a_matrix_policy_by_hand():
    """Sizes 4 and 12 at 0.5 and 0.25: (4 * 0.5 + 12 * 0.25) / 16 = 5 / 16 = 0.3125."""
    sizes = {"lm.0.self_attn.q_proj": 4, "lm.0.self_attn.k_proj": 12}
    policy = Policy({"lm.0.self_attn.q_proj": 0.5, "lm.0.self_attn.k_proj": 0.25})
    assert policy.mean_sparsity(sizes) == 0.3125
    assert budget.budget_error(policy, budget.budget_weights(sizes), 0.3125) == 0.0
    # FLOP weights: a vision matrix (here 5 tokens per sample) against a decoder matrix (3 tokens)
    w = budget.budget_weights({"vision.0.mlp.fc1": 4, "lm.0.mlp.up_proj": 12}, "flops", lm_tokens=3.0,
                              vision_tokens=5.0)
    assert w == {"vision.0.mlp.fc1": 20.0, "lm.0.mlp.up_proj": 36.0}


def test_flops_and_accounting_read_matrix_policies(micro_model):
    model, _ = micro_model
    sps = {u: 0.0 for u in MICRO_MATRICES}
    sps["lm.0.self_attn.q_proj"] = 0.5
    dense = flops.unit_flops(model, {}, 0, 10)
    pruned = flops.unit_flops(model, sps, 0, 10)
    assert dense["pruned_total"] - pruned["pruned_total"] == pytest.approx(2 * 2304 * 10 * 0.5)  # 10 tokens
    acc = flops.policy_accounting(model, sps, 0, 10)
    assert acc["params_pruned"] == 1152.0
    rows = flops.unit_accounting(model, sps, 0, 10)
    assert list(rows["unit"]) == list(MICRO_MATRICES) and rows["kind"].iloc[0] == "lm.attn"


def test_the_policy_profile_draws_block_policies_over_the_matrices_beside_a_matrix_one():
    from ellava_lib.run import viz

    block = {"lm.0.attn": 0.5, "lm.0.mlp": 0.7, "lm.1.attn": 0.6, "lm.1.mlp": 0.6}
    matrix = {u: 0.6 for u in MICRO_MATRICES}
    fig = viz.policy_profile({"uniform": block, "searched": matrix})
    first = fig.axes[0].lines[0].get_ydata()
    assert list(first) == [50.0] * 4 + [70.0] * 3 + [60.0] * 7
    viz.plt.close(fig)


# ------------------------------------------------------------------------------------------ level database


@pytest.fixture(scope="module")
def db(micro_model_dir, tmp_path_factory):
    """A level database of the micro model (12 calibration rows; the search grids of 0.5 and 0.6)."""
    _, batch, out = build_micro_level_db(micro_model_dir, tmp_path_factory, n_calib=12)
    return micro_model_dir, batch, out


def test_a_matrix_policy_assembles_each_matrix_at_its_own_level(db):
    model_dir, _, out = db
    model, _ = load_model(model_dir)
    base = leveldb.LevelDB(out)
    levels = (0.3, 0.5, 0.6, 0.0)
    policy = Policy({u: levels[i % 4] for i, u in enumerate(MICRO_MATRICES)}, base.grid)
    base.assemble(model, policy)
    blocks = units.unit_linears(model)
    dense = dict(load_model(model_dir)[0].named_parameters())
    for m, s in policy.sparsities.items():  # each matrix is its block unit's stored layer at the matrix's level
        block = units.block_unit(m)
        want = base.weights(block, s)[m] if s else dense[_param(model, m)]  # level 0: the dense weights
        assert torch.equal(blocks[block][m].weight, want), m
    # one block policy against one matrix policy that moves k_proj of block 0 to another level
    block_policy = Policy({u: 0.5 for u in units.list_units(model)}, base.grid)
    matrix_policy = Policy({u: 0.5 for u in MICRO_MATRICES}, base.grid)
    matrix_policy.sparsities["lm.0.self_attn.k_proj"] = 0.3
    one, two = load_model(model_dir)[0], load_model(model_dir)[0]
    base.assemble(one, block_policy)
    base.assemble(two, matrix_policy)
    a, b = units.layer_sparsities(one, block_policy.sparsities), units.layer_sparsities(two, matrix_policy.sparsities)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == ["lm.0.self_attn.k_proj"]
    differ = [n for n, lin in units.unit_linears(one, kind="matrix").items()
              if not torch.equal(lin[n].weight, units.unit_linears(two, kind="matrix")[n][n].weight)]
    assert differ == ["lm.0.self_attn.k_proj"]
    # switching one model between the kinds leaves nothing stale: the block policy's weights, then the matrix one's
    base.assemble(two, block_policy, check=False)
    assert all(torch.equal(x.weight, y.weight) for x, y in zip(_linears(one), _linears(two)))
    base.assemble(two, matrix_policy, check=False)
    assert torch.equal(units.unit_linears(two)["lm.0.attn"]["lm.0.self_attn.k_proj"].weight,
                       base.weights("lm.0.attn", 0.3)["lm.0.self_attn.k_proj"])
    base.assemble(two, matrix_policy, check=False)
    assert base.last_assemble_units == 0  # unchanged: nothing copied


def _param(model, layer):
    """The parameter name of ``layer``'s weight (``lm.0.self_attn.q_proj``) in ``model``."""
    lin = units.unit_linears(model)[units.block_unit(layer)][layer]
    return next(n for n, p in model.named_parameters() if p is lin.weight)


def _linears(model):
    return [lin for lins in units.unit_linears(model).values() for lin in lins.values()]


def test_matrix_tables_add_up_to_their_block_tables(db):
    model_dir, _, out = db
    model, _ = load_model(model_dir)
    base = leveldb.LevelDB(out)
    base.assemble(model, Policy({u: 0.0 for u in units.list_units(model)}, base.grid))  # the dense snapshot
    for block in units.list_units(model):
        matrices = sorted(units.unit_matrices(block))  # the build sums in name order
        for table in ("weight_sq", "frobenius_sq"):
            whole = getattr(base, table)(block)
            parts = [getattr(base, table)(m) for m in matrices]
            assert all(p.keys() == whole.keys() for p in parts)
            for level, value in whole.items():
                got = [p[level] for p in parts]
                total = tuple(sum(v[k] for v in got) for k in range(2)) if table == "weight_sq" else sum(got)
                assert total == value, (block, table, level)
        # by hand for one matrix: ||W(s)||^2 and ||W(s) - W||^2 of the stored layer
        m = matrices[0]
        w, dense = base.weights(m, 0.5)[m].double(), base.dense_weights(m)[m].double()
        assert base.weight_sq(m)[0.5] == (float(w.pow(2).sum()), float((w - dense).pow(2).sum()))
        assert base.frobenius_sq(m)[0.5] == float((dense * (w != 0)).pow(2).sum())


# ------------------------------------------------------------------------------------------------ search

CFG = dict(target=0.6, gap="norm", loss_kind="kl", init=("uniform", "owl"), population=4, generations=3,
           offspring=5, screen_samples=4, survivors=2, seed=0, projector_every=0, units="matrix",
           guard="none")


def test_a_matrix_search_runs_end_to_end_within_the_budget(db, tmp_path):
    model_dir, batch, out = db
    model, _ = load_model(model_dir)
    cfg = SearchConfig.from_preset("default", **CFG)
    result = evolve.run_search(model, batch, leveldb.LevelDB(out), units.list_units(model, kind=cfg.units), cfg,
                               tmp_path, progress=False)
    assert list(result.policy.sparsities) == list(MICRO_MATRICES)  # one key per weight matrix
    weights = {u: float(n) for u, n in MICRO_MATRICES.items()}
    assert budget.budget_error(result.policy, weights, 0.6) <= budget.BUDGET_TOL
    hist = pd.read_csv(tmp_path / "history.csv")
    assert len(hist) > 0 and (hist["budget"] - 0.6).abs().max() <= budget.BUDGET_TOL
    # the search moves matrices of one block apart (a block search cannot make these policies)
    split = [m for m in result.population
             if any(len({m.policy.sparsities[x] for x in units.unit_matrices(b)}) > 1 for b in units.list_units(model))]
    assert split
    with pytest.raises(ValueError, match="the search's config has matrix units, the units given are block units"):
        evolve.run_search(model, batch, leveldb.LevelDB(out), units.list_units(model), cfg, tmp_path / "x",
                          progress=False)
    # the model is left assembled at the returned policy: each matrix holds its own level's weights
    base = leveldb.LevelDB(out)
    for m, lins in units.unit_linears(model, kind="matrix").items():
        assert torch.equal(lins[m].weight, base.weights(units.block_unit(m), result.policy.sparsities[m])[m])


def test_matrix_start_policies_are_the_block_ones_spread_over_their_matrices(db):
    model_dir, batch, _ = db
    model, _ = load_model(model_dir)
    blocks = {u: float(n) for u, n in units.list_units(model).items()}
    matrices = {u: float(n) for u, n in MICRO_MATRICES.items()}
    importance = {u: float(i + 1) ** 3 for i, u in enumerate(blocks)}
    cfg = SearchConfig.from_preset("default", **{**CFG, "target": 0.5, "init": ("uniform", "ecoflap")})
    by_block = evolve.start_policies(model, batch, blocks, cfg, importance)
    by_matrix = evolve.start_policies(model, batch, matrices, cfg, importance)
    assert len(by_block) == len(by_matrix) == 2 and by_matrix[0].sparsities == {u: 0.5 for u in MICRO_MATRICES}
    for b, m in zip(by_block, by_matrix):
        assert m.sparsities == {x: b.sparsities[units.block_unit(x)] for x in MICRO_MATRICES}
        assert budget.budget_error(m, matrices, 0.5) <= budget.MOVE_TOL + 1e-12


def test_the_units_field_is_digest_neutral_at_block(tmp_path):
    assert "units" not in SearchConfig().to_dict() and SearchConfig(units="block").digest() == SearchConfig().digest()
    matrix = SearchConfig(units="matrix")
    assert matrix.to_dict()["units"] == "matrix" and matrix.digest() != SearchConfig().digest()
    assert SearchConfig.from_json(matrix.to_json(tmp_path / "c.json")) == matrix
    assert SearchConfig.from_dict({k: v for k, v in SearchConfig().to_dict().items()}).units == "block"
    with pytest.raises(ValueError, match="units must be one of"):
        SearchConfig(units="row")
    # the command line and a profile's ``search:`` overrides reach the field
    args = cli.build_parser().parse_args(["search", "--sparsity", "0.6", "--out", "x", "--units", "matrix"])
    assert search_config(args).units == "matrix"
    assert search_config(cli.build_parser().parse_args(["search", "--sparsity", "0.6", "--out", "x"])).units == "block"
    spec = SweepSpec("tiny", search={"units": "matrix"})
    job = Job("ellava", 0.6, 0, 32)
    assert sweep.search_config(spec, job).units == "matrix"
    assert sweep.spec_digest(spec, job) != sweep.spec_digest(SweepSpec("tiny"), job)


# ------------------------------------------------------------------------------------------ exact re-prune


def test_the_exact_reprune_prunes_each_matrix_to_its_own_sparsity(micro_model_dir, calib):
    model, _ = load_model(micro_model_dir)
    rng = random.Random(0)
    policy = Policy({u: rng.choice((0.2, 0.4, 0.5, 0.7)) for u in MICRO_MATRICES})
    policy.sparsities["lm.0.self_attn.q_proj"], policy.sparsities["lm.0.self_attn.k_proj"] = 0.2, 0.7
    report = exact_reprune(model, policy, None, calib)
    assert list(report["layer"]) == list(MICRO_MATRICES) and list(report["unit"]) == list(MICRO_MATRICES)
    for m, lins in units.unit_linears(model, kind="matrix").items():
        w = lins[m].weight
        zeros, want = int((w == 0).sum()), policy.sparsities[m] * w.numel()
        bound = 0.5 * math.ceil(w.shape[1] / 128)  # SparseGPT: half a weight per column block
        assert abs(zeros - want) <= bound, (m, zeros, want)
    zeros = {m: int((lins[m].weight == 0).sum()) for m, lins in units.unit_linears(model, kind="matrix").items()}
    assert zeros["lm.0.self_attn.q_proj"] < 0.25 * 2304 < 0.65 * 2304 < zeros["lm.0.self_attn.k_proj"]
    # a matrix policy that mixes in a block unit, or misses a matrix, is refused
    with pytest.raises(ValueError, match="mix block units"):
        prune.check_policy(model, Policy({**policy.sparsities, "lm.1.mlp": 0.5}))
    with pytest.raises(ValueError, match="missing units"):
        prune.check_policy(model, Policy({u: s for u, s in policy.sparsities.items() if u != "lm.1.mlp.up_proj"}))


def test_search_units_matrix_from_the_command_line(micro_model_dir, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["search", "--model", str(micro_model_dir), "--sparsity", "0.6", "--out", str(out), "--units",
                     "matrix", "--gap", "none", "--no-projector", "--exact", "--calib", "8", "--generations", "1",
                     "--population", "3", "--offspring", "3", "--screen", "0", "--quiet"]) == 0
    policy = Policy.from_json(out / "policy.json")
    assert list(policy.sparsities) == list(MICRO_MATRICES)
    report = pd.read_csv(out / "sparsity.csv")
    assert list(report["unit"]) == list(MICRO_MATRICES)
    assert (report["target"] == report["unit"].map(policy.sparsities)).all()
    # ``ellava prune --policy`` prunes and exports a checkpoint under the matrix policy
    pruned = tmp_path / "pruned"
    assert cli.main(["prune", "--model", str(micro_model_dir), "--policy", str(out), "--calib", "8", "--out",
                     str(pruned), "--quiet"]) == 0
    exported = pd.read_csv(pruned / "sparsity.csv")
    assert (exported["target"] == exported["layer"].map(policy.sparsities)).all()
    model, _ = load_model(pruned)
    for m, lins in units.unit_linears(model, kind="matrix").items():
        w = lins[m].weight
        assert abs(int((w == 0).sum()) - policy.sparsities[m] * w.numel()) <= 0.5, m
