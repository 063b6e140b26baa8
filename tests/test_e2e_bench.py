"""benchmarks/e2e_decode.py: ratio statistics, decode bytes and the README table from records (no timing)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_benchmark
from torch import nn


@pytest.fixture(scope="module")
def e2e():
    return load_benchmark("e2e_decode")


RECORD = {"tier": "smol", "weights": "pretrained", "dtype": "float32", "sparsity": 0.5, "pattern": "unstructured",
          "backend": "bitmask", "swapped": "210/210", "prompt_tokens": 46, "new_tokens": 32,
          "dense_ms_per_token": 40.0, "pruned_ms_per_token": 25.0, "dense_tokens_per_s": 25.0,
          "pruned_tokens_per_s": 40.0, "measured_ratio": 1.6, "ratio_q1": 1.5, "ratio_q3": 1.7, "flop_ratio": 1.64,
          "dense_bytes": 540_000_000, "bytes_read": 340_000_000, "bw_limit_ratio": 1.59, "bw_fraction": 0.49,
          "dense_bw_fraction": 0.48, "device": "cpu", "threads": 2, "torch": "2.13.0", "repeats": 7, "warmup": 1,
          "read_gbs": 28.0}


def test_ratio_stats_are_medians_and_pair_quartiles(e2e):
    st = e2e.ratio_stats([10.0, 12.0, 11.0, 30.0], [5.0, 6.0, 5.5, 5.0])
    assert st["measured_ratio"] == pytest.approx(11.5 / 5.25)  # medians: one slow dense run does not move it
    assert st["ratio_q1"] == pytest.approx(2.0) and st["ratio_q3"] > st["ratio_q1"]
    one = e2e.ratio_stats([4.0], [2.0])
    assert one == {"measured_ratio": 2.0, "ratio_q1": 2.0, "ratio_q3": 2.0}


def test_decode_bytes_count_the_decoder_and_the_head(e2e, monkeypatch):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 4, bias=False)])
            self.lm_head = nn.Linear(4, 10, bias=False)

    model = Tiny()
    monkeypatch.setattr(e2e.units, "lm_layers", lambda m: m.layers)
    assert e2e.decode_bytes(model, e2e._latency().weight_bytes) == (8 * 4 + 4 * 10) * 4
    with torch.no_grad():
        model.layers[0].weight[:, ::2] = 0  # still dense storage: the same bytes
    assert e2e.decode_bytes(model, e2e._latency().weight_bytes) == (8 * 4 + 4 * 10) * 4


def test_results_are_spliced_into_the_readme(e2e, tmp_path):
    results = tmp_path / "e2e.json"
    loaded = {"loadavg_start": 3.5, "loadavg_end": 4.25, "cpus": 2}
    results.write_text(json.dumps([RECORD, {**RECORD, "dtype": "bfloat16", "measured_ratio": 2.0, **loaded}]))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- e2e_decode:start -->\nold\n<!-- e2e_decode:end -->\ntail\n")
    assert e2e.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert ("| smol | pretrained | float32 | 50% unstructured | bitmask (210/210) | 1.64x | **1.60x** [1.50-1.70] | "
            "25.0 -> 40.0 | x1.8 | 1.59x | 49% (48%) |") in text
    assert "| bfloat16 |" in text and "**2.00x**" in text and "old" not in text and text.endswith("tail\n")
    assert "2 torch thread(s)" in text and "28.0 GB/s read" in text
    assert "Load average during the bfloat16 run: 3.5 -> 4.2 on 2 CPUs." in text and "float32 run" not in text
    with pytest.raises(SystemExit):
        e2e.main(["--results", str(results)])  # no --readme: a usage error
