"""benchmarks/latency.py: the README table is generated from the benchmark's JSON records."""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def latency():
    return load_benchmark("latency")


RECORD = {"model": "tiny", "component": "model", "phase": "prefill", "sparsity": 0.7, "pattern": "unstructured",
          "backend": "csr", "swapped": "3/42", "dense_ms": 2.0, "pruned_ms": 1.6, "flop_ratio": 3.0,
          "measured_ratio": 1.25, "device": "cpu", "dtype": "float32", "threads": 2, "torch": "2.13.0",
          "repeats": 3, "warmup": 1, "quick": True, "shape": "tiny"}


def test_results_are_spliced_into_the_readme(latency, tmp_path):
    results = tmp_path / "lat.json"
    results.write_text(json.dumps([RECORD]))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- latency:start -->\nold\n<!-- latency:end -->\ntail\n")
    assert latency.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| tiny | model | prefill | 70% | unstructured | csr | 3/42 | 2.000 | 1.600 | 3.00x | 1.25x | 42% |" in text
    assert "2 torch thread(s)" in text and "(--quick)" in text and "old" not in text and text.endswith("tail\n")


def test_results_without_an_output_is_a_usage_error(latency, tmp_path):
    results = tmp_path / "lat.json"
    results.write_text(json.dumps([RECORD]))
    with pytest.raises(SystemExit):
        latency.main(["--results", str(results)])
