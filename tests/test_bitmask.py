"""Bitmask sparse linears (C++ kernel): equal to the dense matmul on awkward shapes, sparsities, dtypes, thread
counts and row counts, on the AVX-512 and the scalar path; the registry falls back when the kernel cannot build.

Tolerance against a float64 reference ``ref = x W^T + b`` (inputs already rounded to the dtype), elementwise:
``|y - ref| <= rel * |ref| + abs_ * (|x| |W|^T + |b|)``: float32 ``rel = 1e-6, abs_ = 1e-5`` (a reordered float32
sum); bfloat16 ``rel = 2^-8`` (the output rounded to bfloat16) and ``abs_ = 1e-5`` (float32 accumulation).
The extension compiles once per machine (cached under ~/.cache/ellava/torch_extensions; about a minute the
first time on 2 busy cores, a second afterwards).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from ellava_lib.prune.masks import magnitude_mask
from ellava_lib.speed import bitmask, sparse

TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (2.0 ** -8, 1e-5)}


@pytest.fixture(scope="module")
def ext():
    mod = bitmask.extension()
    if mod is None:
        pytest.skip(f"bitmask extension not built here: {bitmask.extension_info()['error']}")
    return mod


def _weight(d_out: int, d_in: int, sparsity: float, seed: int, nm: tuple[int, int] = (0, 0)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen)
    w[magnitude_mask(w, sparsity, *nm)] = 0
    if d_out > 4 and d_in > 4:
        w[2] = 0       # an all-zero output row
        w[:, 3] = 0    # an all-zero input column
    return w


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    rel, abs_ = TOL[w.dtype]
    xd, wd = x.double(), w.double()
    bd = b.double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    ref = xd @ wd.t() + bd
    bound = rel * ref.abs() + abs_ * (xd.abs() @ wd.abs().t() + bd.abs())
    err = (y.double() - ref).abs()
    assert y.dtype == w.dtype and y.shape == ref.shape
    worst = int(err.argmax())
    assert bool((err <= bound).all()), f"error {float(err.max()):.3g} > bound {float(bound.flatten()[worst]):.3g}"


CASES = [  # (d_out, d_in, sparsity, N:M)
    (37, 45, 0.5, (0, 0)), (19, 100, 0.0, (0, 0)), (64, 257, 0.99, (0, 0)), (48, 64, 0.5, (2, 4)),
    (40, 1003, 0.7, (0, 0)), (5, 7, 1.0, (0, 0)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", [0, 1], ids=["scalar", "simd"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_dense_matmul(ext, dtype, path, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, (d_out, d_in, s, nm) in enumerate(CASES):
            w = _weight(d_out, d_in, s, seed=i, nm=nm).to(dtype)
            b = torch.randn(d_out).to(dtype) if i % 2 else None
            mod = bitmask.BitmaskLinear(w, b, path=path)
            assert mod.nnz == int(torch.count_nonzero(w))
            for rows in (1, 3, 6, bitmask.MAX_KERNEL_ROWS + 1, 40):  # kernel (1..8 rows, chunks of 4) and tiles
                x = torch.randn(rows, d_in, generator=torch.Generator().manual_seed(rows)).to(dtype)
                with torch.no_grad():
                    _check(mod(x), x, w, b)
            assert torch.equal(mod.weight_dense(), w)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_cover_rows_past_one_tile(ext, monkeypatch, dtype):
    size = torch.empty(0, dtype=dtype).element_size()
    monkeypatch.setattr(bitmask, "TILE_BYTES", 16 * 45 * size + 7)  # 37 output rows: tiles of 16, 16, 5
    assert bitmask.tile_rows(45, size, 37) == 16 and bitmask.tile_rows(45, size, 8) == 8
    w = _weight(37, 45, 0.6, seed=3).to(dtype)
    for bias in (torch.randn(37).to(dtype), None):
        mod = bitmask.BitmaskLinear(w, bias)
        x = torch.randn(2, 12, 45).to(dtype)
        with torch.no_grad():
            y = mod(x)
        assert y.shape == (2, 12, 37) and mod.dense_weight is None
        _check(y.reshape(-1, 37), x.reshape(-1, 45), w, mod.bias)


def test_tile_height_follows_the_byte_budget(monkeypatch):
    monkeypatch.setattr(bitmask, "TILE_BYTES", 4 * 2**20)
    assert bitmask.tile_rows(4096, 4, 11008) == 256 and bitmask.tile_rows(4096, 2, 11008) == 512
    assert bitmask.tile_rows(11008, 2, 4096) == 176  # 190 rows rounded down to a multiple of 16
    assert bitmask.tile_rows(2**22, 4, 100) == 16  # never below one aligned block
    assert bitmask.tile_rows(64, 2, 40) == 40  # a small weight is one tile


def test_from_packed_takes_the_tensors_as_they_are(ext):
    w = _weight(40, 70, 0.7, seed=4).to(torch.bfloat16)
    p = bitmask.pack(w)
    mod = bitmask.BitmaskLinear.from_packed(p["values"], p["mask"], 70, None)
    assert mod.values.data_ptr() == p["values"].data_ptr() and torch.equal(mod.offsets, p["offsets"])
    assert mod.nbytes() == p["values"].numel() * 2 + p["mask"].numel() + 41 * 8 and mod.dense_weight is None
    x = torch.randn(3, 70).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(mod(x), bitmask.BitmaskLinear(w)(x))
    mod.keep_dense_from(2)
    assert mod.nbytes() == p["values"].numel() * 2 + p["mask"].numel() + 41 * 8 + 40 * 70 * 2
    mod.drop_dense()
    assert mod.dense_weight is None and mod.dense_from_rows is None
    with pytest.raises(ValueError, match="offsets end"):
        bitmask.BitmaskLinear.from_packed(p["values"][:-1], p["mask"], 70)
    with pytest.raises(ValueError, match="mask must be"):
        bitmask.BitmaskLinear.from_packed(p["values"], p["mask"], 200)


def test_bitmask_imports_nothing_from_the_registry():
    """bitmask.py owns the format and the kernel; sparse.py (registry, decision) imports it, never the reverse,
    not even inside a function."""
    import ast
    import inspect

    names = set()
    for node in ast.walk(ast.parse(inspect.getsource(bitmask))):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    assert not [n for n in names if "ellava_lib" in n], sorted(names)


def test_simd_and_scalar_paths_agree_and_the_env_forces_scalar(ext, monkeypatch):
    w = _weight(300, 513, 0.7, seed=5)
    x = torch.randn(1, 513)
    simd, scalar = bitmask.BitmaskLinear(w, path=1), bitmask.BitmaskLinear(w, path=0)
    with torch.no_grad():
        torch.testing.assert_close(simd(x), scalar(x), rtol=1e-5, atol=1e-5)
    assert bitmask._path() == 1
    monkeypatch.setenv(bitmask.SCALAR_ENV, "1")
    assert bitmask._path() == 0


def test_pack_layout_and_round_trip():
    w = torch.zeros(3, 40)
    w[0, 33], w[1, 0], w[1, 39], w[2, 7] = 1.5, -2.0, 3.0, 4.0
    p = bitmask.pack(w)
    assert p["mask"].shape == (3, 8) and p["mask"].dtype == torch.uint8  # 40 columns -> 2 words of 32 bits
    assert p["mask"][0, 4] == 2 and p["mask"][1, 0] == 1 and p["mask"][1, 4] == 128 and p["mask"][2, 0] == 128
    assert p["values"].tolist() == [1.5, -2.0, 3.0, 4.0] and p["offsets"].tolist() == [0, 1, 3, 4]
    v = _weight(33, 70, 0.8, seed=1)
    q = bitmask.pack(v)
    assert torch.equal(bitmask.unpack(q["values"], q["mask"], 70), v)
    assert torch.equal(bitmask.offsets_of(q["mask"]), q["offsets"])
    with pytest.raises(ValueError, match="set bits"):
        bitmask.unpack(q["values"][:-1], q["mask"], 70)


def test_sparsify_model_bitmask_backend_keeps_outputs(ext):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(45, 70), nn.ReLU(), nn.Linear(70, 33))
    with torch.no_grad():
        for m in (seq[0], seq[2]):
            m.weight[magnitude_mask(m.weight, 0.7)] = 0
    x = torch.randn(5, 45)
    with torch.no_grad():
        ref = seq(x)
    table = sparse.sparsify_model(seq, backend="bitmask", example_inputs=[1, 5], min_speedup=0.0, min_time_s=0.0)
    assert (table["backend_chosen"] == "bitmask").all()
    assert isinstance(seq[0], bitmask.BitmaskLinear) and isinstance(seq[2], bitmask.BitmaskLinear)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), ref, rtol=1e-5, atol=1e-5)
    assert sparse.densify_model(seq) == 2 and type(seq[0]) is nn.Linear
    auto = sparse.sparsify_model(copy.deepcopy(seq), backend="auto", example_inputs=[1, 5], min_time_s=0.0)
    assert set(auto["backend_chosen"]) <= {"dense", "csr", "bitmask"} and auto["dense_ms"].notna().all()


def test_refuses_what_it_cannot_run(ext):
    with pytest.raises(bitmask.BitmaskUnavailable, match="float32/bfloat16"):
        bitmask.BitmaskLinear(torch.ones(4, 4, dtype=torch.float16))
    assert not bitmask.supported(torch.ones(4, 4, dtype=torch.float64))


def test_fallback_when_the_extension_cannot_build(monkeypatch):
    def broken():
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(bitmask, "_EXT", {})
    monkeypatch.setattr(bitmask, "_build", broken)
    with pytest.warns(RuntimeWarning, match="unavailable.*no C\\+\\+ compiler"):
        assert bitmask.extension() is None
    assert bitmask.extension_info()["available"] is False and not bitmask.supported(torch.ones(2, 2))
    with pytest.raises(bitmask.BitmaskUnavailable, match="compiler"):
        bitmask.BitmaskLinear(torch.ones(2, 2))
    seq = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        seq[0].weight[:, ::2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto skips bitmask quietly once the build warning was given
        table = sparse.sparsify_model(copy.deepcopy(seq), backend="auto", example_inputs=[1], min_time_s=0.0)
    assert set(table["backend_chosen"]) <= {"dense", "csr"}
    with pytest.warns(UserWarning, match="bitmask backend; the layers stay dense"):
        table = sparse.sparsify_model(seq, backend="bitmask", example_inputs=[1], min_time_s=0.0)
    assert list(table["backend_chosen"]) == ["dense"] and type(seq[0]) is nn.Linear


def test_auto_keeps_a_dense_copy_where_only_prefill_is_slower(ext):
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    with torch.no_grad():
        lin.weight[magnitude_mask(lin.weight, 0.7)] = 0
    density = float(torch.count_nonzero(lin.weight)) / lin.weight.numel()
    cache = {sparse._cache_key(lin, density, (1, 600), "bitmask"): {"dense_ms": [1.0, 10.0], "sparse_ms": [0.5, 12.0]},
             sparse._cache_key(lin, density, (1, 600), "csr"): {"dense_ms": [1.0, 10.0], "sparse_ms": [2.0, 20.0]}}
    seq = nn.Sequential(copy.deepcopy(lin))
    table = sparse.sparsify_model(seq, backend="auto", example_inputs=[1, 600], cache=cache)
    mod = seq[0]
    assert table.loc[0, "backend_chosen"] == "bitmask" and table.loc[0, "sparse_ms"] == pytest.approx(10.5)
    assert mod.dense_from_rows == 600 and "dense from 600 rows" in table.loc[0, "per_rows"]
    x = torch.randn(600, 48)
    with torch.no_grad():
        assert torch.equal(mod(x), torch.nn.functional.linear(x, lin.weight, lin.bias))  # the dense path, exactly
        _check(mod(x[:1]), x[:1], lin.weight, lin.bias)
    tie = {k: {"dense_ms": [1.0, 10.0], "sparse_ms": [0.5, 9.8] if "|bitmask|" in k else [2.0, 20.0]}
           for k in cache}  # bitmask 2% faster at 600 rows: within noise, the dense copy is kept
    near = nn.Sequential(copy.deepcopy(lin))
    sparse.sparsify_model(near, backend="auto", example_inputs=[1, 600], cache=tie)
    assert near[0].dense_from_rows == 600
    plain = nn.Sequential(copy.deepcopy(lin))
    sparse.sparsify_model(plain, backend="auto", example_inputs=[1, 600], cache=cache, keep_dense=False,
                          row_weights={1: 10})  # 10 decode steps per prefill: 17 ms bitmask vs 20 ms dense
    assert isinstance(plain[0], bitmask.BitmaskLinear) and plain[0].dense_weight is None


def test_dense_budget_limits_the_dense_copies(ext):
    """Two equal layers whose bitmask wins at decode and loses at prefill: a budget of one copy gives the first
    its dense copy; the second is decided dense-free (weighted rule); budget 0 keeps no copy at all."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 40, bias=False)
    with torch.no_grad():
        lin.weight[magnitude_mask(lin.weight, 0.7)] = 0
    density = float(torch.count_nonzero(lin.weight)) / lin.weight.numel()
    key = sparse._cache_key(lin, density, (1, 600), "bitmask")
    cache = {key: {"dense_ms": [1.0, 10.0], "sparse_ms": [0.5, 10.2]},
             sparse._cache_key(lin, density, (1, 600), "csr"): {"dense_ms": [1.0, 10.0], "sparse_ms": [9.0, 90.0]}}
    copy_bytes = 48 * 40 * 4
    seq = nn.Sequential(copy.deepcopy(lin), copy.deepcopy(lin))
    table = sparse.sparsify_model(seq, backend="auto", example_inputs=[1, 600], cache=cache,
                                  dense_budget=copy_bytes + 1, row_weights={1: 32})
    assert seq[0].dense_from_rows == 600 and seq[0].dense_weight is not None
    assert isinstance(seq[1], bitmask.BitmaskLinear) and seq[1].dense_weight is None  # 26.2 ms vs 42 ms dense
    assert "over dense_budget" in table.loc[1, "note"] and table.loc[0, "note"] == ""
    assert table.loc[1, "sparse_ms"] == pytest.approx(32 * 0.5 + 10.2)
    free = nn.Sequential(copy.deepcopy(lin), copy.deepcopy(lin))
    sparse.sparsify_model(free, backend="auto", example_inputs=[1, 600], cache=cache, dense_budget=0,
                          row_weights={1: 32})
    assert all(isinstance(m, bitmask.BitmaskLinear) and m.dense_weight is None for m in free)
    x = torch.randn(600, 48)
    with torch.no_grad():  # dense-free prefill (tile decode) still equals the masked dense layer
        _check(free[0](x), x, lin.weight, None)
