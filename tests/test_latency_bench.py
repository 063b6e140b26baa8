"""benchmarks/latency.py: the README tables are generated from the benchmark's JSON records; bytes and
bandwidth fractions follow from the modules."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_benchmark


@pytest.fixture(scope="module")
def latency():
    return load_benchmark("latency")


RECORD = {"model": "tiny", "component": "model", "phase": "prefill", "sparsity": 0.7, "pattern": "unstructured",
          "backend": "csr", "swapped": "3/42", "dense_ms": 2.0, "pruned_ms": 1.6, "flop_ratio": 3.0,
          "measured_ratio": 1.25, "device": "cpu", "dtype": "float32", "threads": 2, "torch": "2.13.0",
          "repeats": 3, "warmup": 1, "quick": True, "shape": "tiny"}
DECODE_7B = {**RECORD, "model": "llava-1.5-7b", "component": "mlp", "phase": "decode", "sparsity": 0.5,
             "backend": "bitmask", "swapped": "3/3", "dense_ms": 30.0, "pruned_ms": 18.0, "flop_ratio": 2.0,
             "measured_ratio": 30 / 18, "bytes_read": 287_000_000, "bw_limit_ratio": 1.88, "bw_fraction": 0.8,
             "read_gbs": 20.0, "copy_gbs": 15.0, "bitmask_paths": "avx512/avx512", "bitmask_load_s": 0.5}


def test_results_are_spliced_into_the_readme(latency, tmp_path):
    results = tmp_path / "lat.json"
    results.write_text(json.dumps([DECODE_7B, RECORD]))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- latency:start -->\nold\n<!-- latency:end -->\ntail\n")
    assert latency.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    row = "| tiny | model | float32 | prefill | 70% | unstructured | csr | 3/42 | 2.000 | 1.600 | 3.00x | 1.25x | 42% |"
    assert row in text
    assert ("| paper (LLaVA-1.5-7B shapes) | MLP layers | float32 | decode | 50% unstructured | bitmask (3/3) | "
            "2.00x | **1.67x** |  | x1.8 | 1.88x | 80% |") in text
    assert "| smol (SmolLM2-135M LLaVA) | not measured" in text
    assert "| GPU 2:4 (semi-structured) | not measured: no GPU" in text
    assert "20.0 GB/s read" in text and "avx512/avx512 path" in text
    assert "2 torch thread(s)" in text and "(--quick)" in text and "old" not in text and text.endswith("tail\n")


def test_weight_bytes_follow_the_storage(latency):
    import torch
    from torch import nn

    from ellava_lib.speed import bitmask, sparse

    lin = nn.Linear(64, 40, bias=False)
    with torch.no_grad():
        lin.weight[:, ::2] = 0  # 50%: 1280 nonzeros
    assert latency.weight_bytes(nn.Sequential(lin)) == 64 * 40 * 4
    csr = sparse.SparseLinear.from_linear(lin)
    assert latency.weight_bytes(nn.Sequential(csr)) == 1280 * 8 + 41 * 4
    if bitmask.extension() is not None:
        bm = bitmask.BitmaskLinear.from_linear(lin)
        assert latency.weight_bytes(nn.Sequential(bm)) == 1280 * 4 + 40 * 8 + 41 * 8
    fields = latency._bytes_fields("decode", 4000, 2000, 10.0, 6.0, 1.0)
    assert fields["bw_limit_ratio"] == 2.0 and abs(fields["bw_fraction"] - 2000 / 6e-3 / 1e9) < 1e-12
    assert latency._bytes_fields("prefill", 4000, 2000, 10.0, 6.0, 1.0) == {}


def test_results_without_an_output_is_a_usage_error(latency, tmp_path):
    results = tmp_path / "lat.json"
    results.write_text(json.dumps([RECORD]))
    with pytest.raises(SystemExit):
        latency.main(["--results", str(results)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kth_smallest_abs_equals_kthvalue(latency, dtype):
    w = (torch.randn(301, 77, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    w[0, :5] = 0
    w[1, :7] = -w[2, :7]  # ties of opposite sign
    for k in (1, 5, 6, 100, 11589, 23177):
        assert torch.equal(latency.kth_smallest_abs(w, k), w.abs().flatten().kthvalue(k).values), k
    lin = torch.nn.Linear(77, 301, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w.float())
    lin.to(dtype)
    latency.mask_linears(lin, 0.5, "unstructured")
    assert (lin.weight == 0).float().mean().item() == pytest.approx(0.5, abs=2e-3)
