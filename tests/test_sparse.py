"""Sparse execution: CSR linears equal the dense masked ones; sparsify_model never changes the logits and
swaps only measured winners; the 2:4 semi-structured backend refuses what it cannot run exactly."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from ellava_lib.core import units
from ellava_lib.core.policy import Policy
from ellava_lib.prune.masks import magnitude_mask
from ellava_lib.prune.prune import magnitude_prune
from ellava_lib.speed import sparse


def _masked_linear(d_in: int, d_out: int, sparsity: float, bias: bool = True, nm: tuple[int, int] = (0, 0),
                   seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        lin.weight[magnitude_mask(lin.weight, sparsity, *nm)] = 0
    return lin


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 5), (3, 1, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_csr_linear_equals_dense_masked(sparsity, lead, bias):
    lin = _masked_linear(48, 40, sparsity, bias)
    sp = sparse.SparseLinear.from_linear(lin)
    assert sp.nnz == int(torch.count_nonzero(lin.weight))
    assert sp.density == pytest.approx(1 - sparsity, abs=0.01)
    x = torch.randn(*lead, 48)
    with torch.no_grad():
        y, y_ref = sp(x), lin(x)
    assert y.shape == y_ref.shape == (*lead, 40)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    assert torch.equal(sp.to_linear().weight, lin.weight)


def test_csr_linear_survives_deepcopy_and_dtype_guard():
    lin = _masked_linear(16, 8, 0.7)
    sp = sparse.SparseLinear.from_linear(lin)
    x = torch.randn(3, 16)
    twin = copy.deepcopy(sp)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), lin(x), rtol=0, atol=1e-5)
    assert sp.col_indices.dtype == torch.int32 and set(sp.state_dict()) == {"crow_indices", "col_indices",
                                                                               "values", "bias"}
    with pytest.raises(ValueError, match="float32"):
        sparse.SparseLinear(lin.weight.detach().bfloat16())


def test_is_2_4():
    assert sparse.is_2_4(_masked_linear(16, 8, 0.5, nm=(2, 4)).weight)
    assert not sparse.is_2_4(_masked_linear(16, 8, 0.5).weight)  # unstructured 50%: some group keeps 3 or 4
    assert not sparse.is_2_4(torch.zeros(4, 6))                   # d_in not divisible by 4


def test_semi_refuses_cpu_with_a_clear_message():
    lin = _masked_linear(64, 32, 0.5, nm=(2, 4))
    with pytest.raises(sparse.SemiStructuredUnsupported, match="CUDA"):
        sparse.SemiStructuredLinear.from_linear(lin)


def test_semi_refuses_a_non_2_4_mask():
    lin = _masked_linear(64, 32, 0.7)
    with pytest.raises(sparse.SemiStructuredUnsupported, match="not 2:4"):
        sparse.SemiStructuredLinear.from_linear(lin)
    assert "not 2:4" in sparse.semi_structured_problem(lin.weight)


def test_sparsify_semi_on_cpu_warns_and_stays_dense():
    seq = nn.Sequential(_masked_linear(64, 32, 0.5, nm=(2, 4)), nn.ReLU(), _masked_linear(32, 64, 0.5, nm=(2, 4)))
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = seq(x)
    with pytest.warns(UserWarning, match="CUDA"):
        table = sparse.sparsify_model(seq, backend="semi", example_inputs=[1, 8])
    assert list(table["backend_chosen"]) == ["dense", "dense"]
    assert table["note"].str.contains("CUDA").all()
    assert all(type(m) is nn.Linear for m in (seq[0], seq[2]))
    with torch.no_grad():
        assert torch.equal(seq(x), ref)


def test_sparsify_dense_backend_changes_nothing():
    seq = nn.Sequential(_masked_linear(32, 16, 0.7), nn.Linear(16, 4))
    table = sparse.sparsify_model(seq, backend="dense")
    assert list(table["layer"]) == ["0"] and table["density"].iloc[0] == pytest.approx(0.3, abs=0.01)
    assert (table["backend_chosen"] == "dense").all() and type(seq[0]) is nn.Linear


def test_sparsify_swaps_only_winners_and_caches(tmp_path):
    seq = nn.Sequential(_masked_linear(32, 16, 0.9), nn.ReLU(), _masked_linear(16, 32, 0.9))
    x = torch.randn(4, 32)
    with torch.no_grad():
        ref = seq(x)
    cache_file = tmp_path / "timings.json"
    never = sparse.sparsify_model(copy.deepcopy(seq), backend="csr", example_inputs=[1, 4], min_speedup=1e9,
                                  cache=cache_file, min_time_s=0.0)
    assert (never["backend_chosen"] == "dense").all() and never["note"].str.contains("not").all()
    keys = json.loads(cache_file.read_text())
    assert len(keys) == 2 and all("|csr|" in k and "threads=" in k for k in keys)
    always = sparse.sparsify_model(seq, backend="csr", example_inputs=[1, 4], min_speedup=0.0, cache=cache_file)
    assert (always["backend_chosen"] == "csr").all()
    assert json.loads(cache_file.read_text()) == keys  # same shapes, densities, rows: timings reused
    assert isinstance(seq[0], sparse.SparseLinear) and isinstance(seq[2], sparse.SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), ref, rtol=1e-5, atol=1e-5)
    assert sparse.densify_model(seq) == 2 and type(seq[0]) is nn.Linear


def test_sparsify_micro_model_keeps_logits(micro_model_dir, micro_model, calib):
    from ellava_lib.model.specs import load_model

    model = load_model(micro_model_dir)[0]
    policy = Policy.uniform(units.list_units(model), 0.7)
    magnitude_prune(model, policy)
    inputs = {k: calib[k][:4] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        ref = model(**inputs).logits
    forced = copy.deepcopy(model)
    table = sparse.sparsify_model(forced, policy, backend="csr", example_inputs=inputs, min_speedup=0.0,
                                  min_time_s=0.0)
    assert len(table) == 7 * len(units.lm_layers(model)) and (table["backend_chosen"] == "csr").all()
    assert (table["density"] - 0.3).abs().max() < 0.01
    assert set(table["rows"]) == {f"4,{inputs['input_ids'].numel()}"}  # decode batch + the prefill rows
    with torch.no_grad():
        torch.testing.assert_close(forced(**inputs).logits, ref, rtol=1e-4, atol=1e-4)
    auto = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never tries semi on a CPU, so it does not warn
        table = sparse.sparsify_model(auto, policy, backend="auto", example_inputs=[1, 64], min_time_s=0.0)
    assert set(table["backend_chosen"]) <= {"dense", "csr", "bitmask"} and table["dense_ms"].notna().all()
    with torch.no_grad():
        torch.testing.assert_close(auto(**inputs).logits, ref, rtol=1e-4, atol=1e-4)


def test_decision_weighs_row_counts_with_cached_timings():
    lin = _masked_linear(32, 16, 0.9)
    density = float(torch.count_nonzero(lin.weight)) / lin.weight.numel()
    key = sparse._cache_key(lin, density, (1, 600), "csr")
    cache = {key: {"dense_ms": [1.0, 10.0], "sparse_ms": [2.0, 5.0]}}  # slower at 1 row, faster at 600
    swapped = nn.Sequential(copy.deepcopy(lin))
    table = sparse.sparsify_model(swapped, backend="csr", example_inputs=[1, 600], cache=cache)
    assert table.loc[0, "backend_chosen"] == "csr" and table.loc[0, "speedup"] == pytest.approx(11 / 7)
    assert table.loc[0, "per_rows"] == "1:1/2,600:10/5"
    decode_heavy = nn.Sequential(copy.deepcopy(lin))  # 10 decode steps per prefill: 20 ms dense vs 25 ms
    table = sparse.sparsify_model(decode_heavy, backend="csr", example_inputs=[1, 600], cache=cache,
                                  row_weights={1: 10})
    assert table.loc[0, "backend_chosen"] == "dense" and table.loc[0, "dense_ms"] == pytest.approx(20.0)
    assert type(decode_heavy[0]) is nn.Linear and len(cache) == 1  # nothing was re-timed


ROWS = (1, 64, 600)


def _t(dense: list[float], sparse_: list[float]) -> dict[str, list[float]]:
    return {"dense_ms": dense, "sparse_ms": sparse_}


def test_decide_per_row_never_slower_than_dense():
    """``auto``'s rule on made-up timings (no clock): bitmask must win at decode, runs its dense copy from the first
    row count where it does not win by the margin; CSR must win everywhere; nothing kept means dense."""
    d = [10.0, 20.0, 100.0]
    split = sparse.decide(ROWS, {"bitmask": _t(d, [5.0, 19.5, 130.0]), "csr": _t(d, [4.0, 15.0, 300.0])})
    assert split.backend == "bitmask" and split.dense_from == 64  # 19.5 ms at 64 rows: < 5% faster, so dense
    assert split.sparse_ms == pytest.approx(5.0 + 20.0 + 100.0) and split.dense_ms == pytest.approx(130.0)
    assert "(dense from 64 rows)" in split.per_rows
    everywhere = sparse.decide(ROWS, {"bitmask": _t(d, [5.0, 19.5, 130.0]), "csr": _t(d, [4.0, 15.0, 90.0])})
    assert everywhere.backend == "csr" and everywhere.dense_from is None  # 109 ms < 125 ms, faster at every row
    nowhere = sparse.decide(ROWS, {"bitmask": _t(d, [9.8, 19.0, 96.0]), "csr": _t(d, [11.0, 15.0, 90.0])})
    assert nowhere.backend == "dense" and nowhere.dense_from is None  # bitmask 2% faster at decode: a tie
    assert any("bitmask not 1.05x faster at 1 rows" in n for n in nowhere.notes)
    assert any("csr not 1.05x faster at 1 rows" in n for n in nowhere.notes)
    assert sparse.decide(ROWS, {"bitmask": _t(d, [9.8, 19.0, 96.0])}, min_speedup=1.0).dense_from is None
    assert sparse.decide(ROWS, {}).backend == "dense"


def test_decide_weighted_rule_for_explicit_backends():
    d = [10.0, 100.0]
    slow_prefill = {"bitmask": _t(d, [5.0, 130.0])}
    assert sparse.decide((1, 600), slow_prefill, per_row=False).backend == "dense"  # 110 vs 135 ms
    decode_heavy = sparse.decide((1, 600), slow_prefill, per_row=False, row_weights={1: 32})  # 420 vs 290 ms
    assert decode_heavy.backend == "bitmask" and decode_heavy.dense_from is None
    assert decode_heavy.sparse_ms == pytest.approx(290.0)
    tie = {"csr": _t(d, [9.7, 97.0])}  # 3% faster on the weighted sum: within the margin
    assert sparse.decide((1, 600), tie, per_row=False).backend == "dense"
    assert sparse.decide((1, 600), tie, per_row=False, min_speedup=0.0).backend == "csr"  # forced


def test_stream_copies_exceed_the_cache_and_are_timed_round_robin(monkeypatch):
    assert sparse.stream_copies(3 * 2**20, 32 * 2**20) == 22  # ceil(64 MiB / 3 MiB)
    assert sparse.stream_copies(100 * 2**20, 32 * 2**20) == 1 and sparse.stream_copies(10, 2**30, cap=8) == 8
    assert sparse.llc_bytes() >= 2**16
    monkeypatch.setattr(sparse, "llc_bytes", lambda: 4096)  # a 32x16 float32 weight (2 KiB): 4 copies
    lin = _masked_linear(32, 16, 0.9)
    cache: dict = {}
    streamed = nn.Sequential(copy.deepcopy(lin))
    sparse.sparsify_model(streamed, backend="csr", example_inputs=[1], min_speedup=0.0, cache=cache,
                          min_time_s=0.0, stream=True)
    assert [k.endswith("|copies=4") for k in cache] == [True]
    sparse.sparsify_model(nn.Sequential(copy.deepcopy(lin)), backend="csr", example_inputs=[1], cache=cache,
                          min_time_s=0.0)  # 2 KiB of weights fit in 4 KiB: not streamed, a second key
    assert len(cache) == 2 and sum("copies" in k for k in cache) == 1
    seen = []
    module = sparse.SparseLinear.from_linear(lin)
    module.register_forward_pre_hook(lambda m, a: seen.append(id(m)))
    sparse._measure(lin, module, [1], 0.0, copies=3)
    counts = sorted(seen.count(i) for i in set(seen))  # the copies carry the hook: 1 + 5 calls spread over 3
    assert counts == [2, 2, 2]


def test_sparsify_releases_each_dense_weight_before_the_next_layer(monkeypatch):
    """Peak memory of a swap is the model plus one layer: the first layer's dense weight is gone (no reference
    left in sparsify_model) by the time the second layer is built."""
    import gc
    import weakref

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(32, 24), nn.Linear(24, 16))
    with torch.no_grad():
        for m in seq:
            m.weight[:, ::2] = 0
    first = weakref.ref(seq[0].weight)
    alive = []
    real_try = sparse._try

    def spy(cand, lin, *args, **kwargs):
        gc.collect()
        alive.append(first() is not None)
        return real_try(cand, lin, *args, **kwargs)

    monkeypatch.setattr(sparse, "_try", spy)
    table = sparse.sparsify_model(seq, backend="csr", example_inputs=[1], min_speedup=0.0, min_time_s=0.0)
    assert list(table["backend_chosen"]) == ["csr", "csr"] and alive == [True, False]
