"""Tests for ellava_lib.prune.obs — the SparseGPT / OBS solver (CPU, small layers, seeded)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from ellava_lib.prune.masks import magnitude_mask, measured_sparsity
from ellava_lib.prune.obs import SparseGPT, _tf32_disabled, reconstruction_error
from ellava_lib.prune.obs_reference import obs_prune_reference


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """``(n, d)`` inputs with a low-rank shared component, noise and per-feature scales."""
    g = torch.Generator().manual_seed(seed)
    rank = max(2, d // 4)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g) / math.sqrt(rank)
    x = x + 0.3 * torch.randn(n, d, generator=g)
    scale = torch.exp(0.5 * torch.randn(d, generator=g))
    return x * scale + 0.1 * torch.randn(d, generator=g)


def make_layer(d_out: int, d_in: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        layer.weight.normal_(generator=torch.Generator().manual_seed(seed + 1000))
    return layer.to(dtype)


def calibrated(layer: torch.nn.Linear, x: torch.Tensor, batches: int = 2) -> SparseGPT:
    solver = SparseGPT(layer)
    for chunk in x.chunk(batches):
        solver.add_batch(chunk.to(layer.weight.dtype))
    return solver


# ------------------------------------------------------------------ Hessian & error definitions


def test_add_batch_running_mean_over_rows() -> None:
    x = correlated_inputs(60, 8, seed=0)
    solver = SparseGPT(make_layer(4, 8, seed=0))
    solver.add_batch(x[:12].reshape(3, 4, 8))  # leading dims flattened: 12 rows
    solver.add_batch(x[12:], out=None)  # 48 rows
    assert solver.nsamples == 60
    expected = 2.0 / 60 * x.T @ x
    torch.testing.assert_close(solver.H, expected, rtol=1e-5, atol=1e-5)


def test_reconstruction_error_matches_outputs() -> None:
    x = correlated_inputs(50, 16, seed=1)
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    w_hat = w * (torch.rand(8, 16, generator=torch.Generator().manual_seed(3)) > 0.5)
    H = 2.0 / x.shape[0] * x.T @ x
    direct = float(((x @ w.T - x @ w_hat.T) ** 2).sum()) / x.shape[0]
    assert reconstruction_error(w, w_hat, H) == pytest.approx(direct, rel=1e-5)


def test_prune_error_equals_damped_quadratic_form() -> None:
    layer = make_layer(32, 64, seed=4)
    w0 = layer.weight.detach().clone()
    solver = calibrated(layer, correlated_inputs(256, 64, seed=4))
    stats = solver.prune(0.5, blocksize=16)
    H_damped = solver.H + stats.damp_used * torch.eye(64)
    assert stats.method == "sparsegpt"
    assert stats.error == pytest.approx(reconstruction_error(w0, layer.weight, H_damped), rel=1e-3)


# ------------------------------------------------------------------ against brute-force OBS


def brute_force_obs_row(w: torch.Tensor, H: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    """Explicit OBS on one row in column order: prune the masked weights one at a time with
    ``delta = -w_q / [H^-1]_qq * H^-1[:, q]`` on the free weights, then freeze ``q`` (remove its
    row/col from ``H^-1``), exactly like SparseGPT's left-to-right sweep.  float64."""
    w = w.double().clone()
    Hinv = torch.linalg.inv(H.double())
    free = list(range(w.numel()))
    for q in range(w.numel()):
        p = free.index(q)
        if prune[q]:
            w[free] += -w[q] / Hinv[p, p] * Hinv[:, p]
        Hinv = Hinv - torch.outer(Hinv[:, p], Hinv[p, :]) / Hinv[p, p]
        keep = [i for i in range(len(free)) if i != p]
        Hinv = Hinv[keep][:, keep]
        free.remove(q)
        if free:  # the closed-form removal equals inverting the reduced Hessian
            torch.testing.assert_close(Hinv, torch.linalg.inv(H.double()[free][:, free]))
    return w


@pytest.mark.parametrize("blocksize", [8, 16])
def test_matches_brute_force_obs_with_its_own_mask(blocksize: int) -> None:
    layer = make_layer(4, 8, seed=5)
    w0 = layer.weight.detach().clone()
    solver = calibrated(layer, correlated_inputs(64, 8, seed=5))
    stats = solver.prune(0.5, blocksize=blocksize)  # blocksize >= d_in: one block, one mask
    mask = layer.weight == 0
    H_damped = solver.H + stats.damp_used * torch.eye(8)
    for r in range(4):
        expected = brute_force_obs_row(w0[r], H_damped, mask[r])
        torch.testing.assert_close(layer.weight[r].double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("blocksize", [2, 4, 8])
def test_matches_brute_force_obs_with_fixed_mask(blocksize: int) -> None:
    layer = make_layer(4, 8, seed=6)
    w0 = layer.weight.detach().clone()
    solver = calibrated(layer, correlated_inputs(64, 8, seed=6))
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(7)) < 0.5
    stats = solver.prune(0.5, blocksize=blocksize, mask=mask)
    assert torch.equal(layer.weight == 0, mask)
    H_damped = solver.H + stats.damp_used * torch.eye(8)
    for r in range(4):
        expected = brute_force_obs_row(w0[r], H_damped, mask[r])
        torch.testing.assert_close(layer.weight[r].double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("shape", "blocksize", "n", "m"),
    [((16, 32), 128, 0, 0), ((64, 128), 32, 0, 0), ((64, 128), 32, 2, 4), ((16, 32), 8, 4, 8)],
)
def test_agrees_with_dense_reference(shape: tuple[int, int], blocksize: int, n: int, m: int) -> None:
    layer = make_layer(*shape, seed=8)
    w0 = layer.weight.detach().clone()
    solver = calibrated(layer, correlated_inputs(4 * shape[1], shape[1], seed=8))
    stats = solver.prune(0.5, prune_n=n, prune_m=m, blocksize=blocksize)
    w_ref, loss_ref = obs_prune_reference(w0, solver.H, 0.5, n, m, blocksize=blocksize)
    err = reconstruction_error(w0, layer.weight, solver.H)
    err_ref = reconstruction_error(w0, w_ref, solver.H)
    assert err == pytest.approx(err_ref, rel=1e-3)
    assert stats.error == pytest.approx(loss_ref, rel=1e-3)
    assert (layer.weight == 0).eq(w_ref == 0).float().mean() > 0.99


# ------------------------------------------------------------------ quality & masks


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("sparsity", "n", "m"), [(0.5, 0, 0), (0.7, 0, 0), (0.5, 2, 4)])
def test_beats_magnitude_pruning(seed: int, sparsity: float, n: int, m: int) -> None:
    shape = [(32, 64), (64, 128), (48, 96)][seed]
    layer = make_layer(*shape, seed=seed)
    w0 = layer.weight.detach().clone()
    solver = calibrated(layer, correlated_inputs(512, shape[1], seed=seed + 10))
    solver.prune(sparsity, prune_n=n, prune_m=m, blocksize=32)
    w_mag = w0.masked_fill(magnitude_mask(w0, sparsity, n, m), 0.0)
    assert reconstruction_error(w0, layer.weight, solver.H) <= reconstruction_error(w0, w_mag, solver.H)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_masks_exact(n: int, m: int) -> None:
    layer = make_layer(32, 64, seed=11)
    solver = calibrated(layer, correlated_inputs(256, 64, seed=11))
    stats = solver.prune(0.0, prune_n=n, prune_m=m, blocksize=16)
    zeros_per_group = (layer.weight == 0).reshape(32, 64 // m, m).sum(-1)
    assert bool((zeros_per_group >= n).all())
    assert stats.sparsity_target == n / m
    mag = magnitude_mask(layer.weight.detach() + 1.0, 0.0, n, m).reshape(32, 64 // m, m)
    assert bool((mag.sum(-1) == n).all())


@pytest.mark.parametrize("sparsity", [0.123, 0.3, 0.5, 0.7])
@pytest.mark.parametrize(("shape", "blocksize"), [((16, 32), 128), ((64, 128), 32), ((33, 100), 16)])
def test_measured_sparsity_within_documented_bound(
    sparsity: float, shape: tuple[int, int], blocksize: int
) -> None:
    d_out, d_in = shape
    layer = make_layer(d_out, d_in, seed=12)
    solver = calibrated(layer, correlated_inputs(2 * d_in, d_in, seed=12))
    stats = solver.prune(sparsity, blocksize=blocksize)
    blocks = math.ceil(d_in / blocksize)
    zeros = int((layer.weight == 0).sum())
    numel = d_out * d_in
    assert stats.sparsity_measured == measured_sparsity(layer.weight) == zeros / numel
    # documented bound: one weight per row per block
    assert abs(zeros - sparsity * numel) <= d_out * blocks
    assert abs(stats.sparsity_measured - sparsity) <= d_out * blocks / numel
    # what the implementation actually achieves: per-block rounding, <= 0.5 weight per block
    assert abs(zeros - sparsity * numel) <= 0.5 * blocks + 1e-9


def test_magnitude_mask_exact_count() -> None:
    w = torch.randn(37, 53, generator=torch.Generator().manual_seed(13))
    for s in (0.0, 0.25, 0.5, 0.61, 1.0):
        mask = magnitude_mask(w, s)
        assert int(mask.sum()) == round(s * w.numel())
        if 0 < s < 1:
            assert w.abs()[mask].max() <= w.abs()[~mask].min()


# ------------------------------------------------------------------ robustness


def test_deterministic() -> None:
    results = []
    for _ in range(2):
        layer = make_layer(64, 128, seed=14)
        solver = calibrated(layer, correlated_inputs(256, 128, seed=14))
        solver.prune(0.6, blocksize=32)
        results.append(layer.weight.detach().clone())
    assert torch.equal(results[0], results[1])


def test_singular_hessian_duplicate_and_dead_columns() -> None:
    x = correlated_inputs(128, 32, seed=15)
    x[:, 5] = x[:, 3]  # duplicate input column -> singular H
    x[:, 20] = x[:, 3]
    x[:, 7] = 0.0  # dead input
    layer = make_layer(16, 32, seed=15)
    solver = calibrated(layer, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # default damping must suffice: no retry warning
        stats = solver.prune(0.5, blocksize=16)
    assert stats.method == "sparsegpt"
    assert bool(torch.isfinite(layer.weight).all())
    assert bool((layer.weight[:, 7] == 0).all())


def test_singular_hessian_without_damping_stays_finite() -> None:
    x = correlated_inputs(16, 32, seed=16)  # N < d_in: rank-deficient H
    x[:, 9] = 0.0
    layer = make_layer(16, 32, seed=16)
    solver = calibrated(layer, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solver.prune(0.5, blocksize=16, percdamp=0.0)
    assert bool(torch.isfinite(layer.weight).all())
    assert bool((layer.weight[:, 9] == 0).all())


def test_indefinite_hessian_retries_with_more_damping() -> None:
    d = 16
    v = torch.randn(d, generator=torch.Generator().manual_seed(17))
    v = v / v.norm()
    layer = make_layer(8, d, seed=17)
    solver = SparseGPT(layer)
    solver.H = torch.eye(d) - 1.05 * torch.outer(v, v)  # eigenvalue -0.05: 1% damping fails
    with pytest.warns(RuntimeWarning, match="retrying with 10x damping") as record:
        stats = solver.prune(0.5, blocksize=8)
    assert len(record) == 1
    mean_diag = float(torch.diag(solver.H).mean())
    assert stats.damp_used == pytest.approx(0.1 * mean_diag)
    assert stats.method == "sparsegpt"
    assert bool(torch.isfinite(layer.weight).all())


def test_hopeless_hessian_falls_back_to_magnitude() -> None:
    layer = make_layer(8, 16, seed=18)
    w0 = layer.weight.detach().clone()
    solver = SparseGPT(layer)
    solver.H = torch.full((16, 16), float("nan"))
    with pytest.warns(RuntimeWarning) as record:
        stats = solver.prune(0.5, blocksize=8)
    assert any("falling back to magnitude" in str(r.message) for r in record)
    assert stats.method == "magnitude"
    assert bool(torch.isfinite(layer.weight).all())
    assert torch.equal(layer.weight, w0.masked_fill(magnitude_mask(w0, 0.5), 0.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer(dtype: torch.dtype) -> None:
    layer = make_layer(16, 32, seed=19, dtype=dtype)
    solver = calibrated(layer, correlated_inputs(128, 32, seed=19))
    assert solver.H.dtype == torch.float32
    param = layer.weight
    stats = solver.prune(0.5, blocksize=16)
    assert layer.weight is param and layer.weight.dtype == dtype
    assert bool(torch.isfinite(layer.weight).all())
    assert stats.sparsity_measured == pytest.approx(0.5, abs=16 * 2 / 512)


def test_invalid_arguments() -> None:
    solver = calibrated(make_layer(8, 12, seed=20), correlated_inputs(32, 12, seed=20))
    with pytest.raises(ValueError):
        solver.prune(1.5)
    with pytest.raises(ValueError):
        solver.prune(0.5, prune_n=2)
    with pytest.raises(ValueError):
        solver.prune(0.5, prune_n=2, prune_m=8)  # 12 % 8 != 0
    with pytest.raises(ValueError):
        solver.prune(0.5, prune_n=2, prune_m=4, blocksize=6)
    with pytest.raises(TypeError):
        SparseGPT(torch.nn.Conv1d(2, 2, 1))  # type: ignore[arg-type]
    solver.free()
    assert solver.H is None
    with pytest.raises(RuntimeError):
        solver.prune(0.5)


def test_tf32_flags_off_inside_and_restored() -> None:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = True, True
        with _tf32_disabled(torch.device("cuda")):
            assert not matmul.allow_tf32 and not cudnn.allow_tf32
        assert matmul.allow_tf32 and cudnn.allow_tf32
        with _tf32_disabled(torch.device("cpu")):  # CPU: flags untouched
            assert matmul.allow_tf32 and cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
