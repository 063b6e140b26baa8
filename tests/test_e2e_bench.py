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


RECORD_7B = {"tier": "llava-1.5-7b", "weights": "random bfloat16", "dtype": "bfloat16", "layers": 32, "hidden": 4096,
             "sparsity": 0.5, "pattern": "unstructured", "measured_sparsity": 0.5012, "backend": "auto",
             "swapped": "224/224", "prompt_tokens": 617, "image_tokens": 576, "new_tokens": 32,
             "dense_ms_per_token": 800.0, "pruned_ms_per_token": 400.0, "dense_tokens_per_s": 1.25,
             "pruned_tokens_per_s": 2.5, "measured_ratio": 2.0, "ratio_q1": 1.9, "ratio_q3": 2.1,
             "dense_ttft_s": 30.0, "pruned_ttft_s": 31.0, "ttft_ratio": 30 / 31, "flop_ratio": 1.9,
             "dense_bytes": 13_000_000_000, "bytes_read": 7_000_000_000, "bw_limit_ratio": 1.86,
             "bw_limit_ms_dense": 379.0, "bw_limit_ms_pruned": 204.0, "bw_fraction": 0.51, "dense_bw_fraction": 0.47,
             "peak_rss_gib": 21.04, "pruned_peak_rss_gib": 8.46, "attn_share_dense": 0.031, "attn_share_pruned": 0.062,
             "lm_head_share_dense": 0.02, "lm_head_share_pruned": 0.04, "row_loadavg_start": 2.1,
             "row_loadavg_end": 2.4, "loadavg_start": 2.0, "loadavg_end": 2.5, "cpus": 2, "device": "cpu",
             "threads": 2, "torch": "2.13.0", "repeats": 3, "warmup": 1, "read_gbs": 34.3, "dense_budget_gib": 0.0,
             "dense_file_gib": 13.16, "sparse_file_gib": 7.88}


def test_7b_results_splice_into_their_own_block_and_pending_is_tolerated(e2e, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- e2e_decode:start -->\nsmall\n<!-- e2e_decode:end -->\n"
                      "<!-- e2e_decode_7b:start -->\nold\n<!-- e2e_decode_7b:end -->\n")
    absent = tmp_path / "e2e_decode_7b.json"
    assert e2e.main(["--results", str(absent), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "Not measured yet" in text and "absent" in text and e2e.COMMAND_7B in text and "small" in text
    absent.write_text(json.dumps({"pending": "to be run on a quiet machine", "command": e2e.COMMAND_7B}))
    assert e2e.main(["--results", str(absent), "--readme", str(readme)]) == 0
    assert "Not measured yet (to be run on a quiet machine)" in readme.read_text()
    absent.write_text(json.dumps([RECORD_7B]))
    assert e2e.main(["--results", str(absent), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert ("| 32 | 50% unstructured (50.1%) | auto (224/224) | 1.90x | **2.00x** [1.90-2.10] | 1.25 -> 2.50 | "
            "30.00 -> 31.00 (0.97x) | 379 -> 204 | 51% (47%) | 21.0 / 8.5 | 3% / 2% -> 6% / 4% | 13.2 -> 7.9 |") in text
    assert "Not measured" not in text and "small" in text  # the small tiers' block is left as it was
    assert "Load average 2.0 -> 2.5 over the run (rows 2.1-2.4) on 2 CPUs." in text
    budgeted = tmp_path / "e2e_decode_7b_budget.json"  # a second file: auto with a dense budget, named in its row
    budgeted.write_text(json.dumps([{**RECORD_7B, "dense_budget_gib": 9.0, "pruned_ttft_s": 30.5,
                                     "ttft_ratio": 30 / 30.5, "cpu": "Xeon X", "read_gbs": 26.9}]))
    assert e2e.main(["--results", str(absent), str(budgeted), "--readme", str(readme)]) == 0
    text = readme.read_text()  # two CPUs among the rows: each row names its own
    assert "| 32 (CPU not recorded) | 50% unstructured (50.1%) | auto (224/224) |" in text
    assert "| 32 (Xeon X) | 50% unstructured (50.1%) | auto, 9 GiB dense budget (224/224) |" in text
    assert "device cpu (rows on CPUs: Xeon X, not recorded; the layers column says which)" in text
    assert "Memory bandwidth 26.9 GB/s read (Xeon X), 34.3 GB/s read (not recorded). Load" in text
    assert "30.00 -> 30.50 (0.98x)" in text and "unless its row names a budget" in text


def test_7b_small_mode_runs_and_writes_every_field(e2e, tmp_path, capsys):
    """The 7B tier's code on the scaled-down config (seconds): one pattern, bitmask and auto; per row a writer
    process, then the dense and the pruned model each timed in its own process, alternating; temp files removed."""
    if e2e.bitmask.extension() is None:
        pytest.skip("bitmask extension not built here")
    out, work = tmp_path / "e2e_7b.json", tmp_path / "work"
    assert e2e.main(["--tiers", "llava-1.5-7b", "--small", "--patterns", "0.5:unstructured", "--repeats", "2",
                     "--warmup", "0", "--new-tokens", "2", "--threads", "1", "--workdir", str(work),
                     "--out", str(out)]) == 0
    assert "a row writes dense" in capsys.readouterr().err
    assert list(work.iterdir()) == []  # each row's models were removed
    records = json.loads(out.read_text())
    assert [r["backend"] for r in records] == ["bitmask", "auto"]
    for r in records:
        assert r["tier"] == "llava-1.5-7b" and r["layers"] == 2 and r["hidden"] == 256
        assert r["prompt_tokens"] == 1 + 576 + 40 and r["image_tokens"] == 576
        assert abs(r["measured_sparsity"] - 0.5) < 0.01 and r["flop_ratio"] > 1
        for key in ("dense_tokens_per_s", "pruned_tokens_per_s", "dense_ttft_s", "pruned_ttft_s",
                    "bw_limit_ms_dense", "bw_limit_ms_pruned", "read_gbs", "peak_rss_gib", "ru_maxrss_gib",
                    "dense_peak_rss_gib", "pruned_peak_rss_gib", "writer_peak_rss_gib", "dense_load_s",
                    "pruned_load_s", "write_s", "dense_file_gib", "sparse_file_gib"):
            assert r[key] > 0, key
        assert r["bytes_read"] <= r["dense_bytes"] and r["pruned_model_gib"] <= r["dense_model_gib"]
        assert r["peak_rss_gib"] == max(r["dense_peak_rss_gib"], r["pruned_peak_rss_gib"], r["writer_peak_rss_gib"])
        # the dense and the pruned model never shared a process: one process per run, sides alternating
        runs = r["runs"]
        assert [x["side"] for x in runs] == ["dense", "pruned"] * 2
        assert len({x["pid"] for x in runs}) == 4 and all(x["load_s"] > 0 for x in runs)
        assert all(x["packed_linears"] == 0 for x in runs if x["side"] == "dense")
        assert r["dense_peak_rss_gib"] == max(x["peak_rss_gib"] for x in runs if x["side"] == "dense")
        for who in ("dense", "pruned"):
            assert 0 < r[f"attn_share_{who}"] < r[f"attn_block_share_{who}"] < 1
            assert 0 < r[f"lm_head_share_{who}"] < 1 - r[f"attn_block_share_{who}"]
        assert "loadavg_start" in r and "row_loadavg_end" in r
    bm = records[0]  # every decoder linear packed: fewer bytes read, held and stored (auto may keep small layers dense)
    assert bm["swapped"] == "14/14" and bm["bytes_read"] < bm["dense_bytes"]
    assert all(x["packed_linears"] == 14 for x in bm["runs"] if x["side"] == "pruned")
    assert bm["pruned_model_gib"] < bm["dense_model_gib"] and records[1]["dense_budget_gib"] == 0.0
    assert bm["sparse_file_gib"] < bm["dense_file_gib"]
    config = e2e.config_7b(small=True)
    dense_est, sparse_est = e2e.disk_estimate_7b(config, 0.5, "bitmask")
    assert dense_est == pytest.approx(bm["dense_file_gib"] * e2e.GIB, rel=0.02)
    assert sparse_est == pytest.approx(bm["sparse_file_gib"] * e2e.GIB, rel=0.02)
    with pytest.raises(SystemExit):
        e2e.main(["--tiers", "llava-1.5-7b,tiny", "--out", str(out)])  # the 7B tier runs alone
    with pytest.raises(SystemExit):
        e2e.main(["--tiers", "llava-1.5-7b", "--backends", "dense,bitmask", "--out", str(out)])


def test_7b_fails_in_one_line_without_disk(e2e, tmp_path, monkeypatch):
    monkeypatch.setattr(e2e.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(SystemExit, match=r"has 0\.0 GiB free, a llava-1\.5-7b row needs .* GiB") as err:
        e2e.main(["--tiers", "llava-1.5-7b", "--small", "--patterns", "0.5:unstructured", "--backends", "auto",
                  "--workdir", str(tmp_path), "--out", str(tmp_path / "x.json")])
    assert "\n" not in str(err.value) and not (tmp_path / "x.json").exists()


def test_prune_in_place_frees_each_dense_linear_before_the_next(e2e, monkeypatch):
    """The writer never holds a decoder linear dense and packed at once: when the k-th linear is masked, exactly
    the linears not yet converted (the k-th included) are alive."""
    import weakref

    from ellava_lib.model import loading

    if e2e.bitmask.extension() is None:
        pytest.skip("bitmask extension not built here")
    model = loading.random_weights(e2e.config_7b(small=True), "cpu", "bfloat16", seed=0)
    old = [weakref.ref(lin) for lins in e2e.units.unit_linears(model).values() for lin in lins.values()]
    lat, alive = e2e._latency(), []
    mask = lat.mask_linears
    monkeypatch.setattr(lat, "mask_linears", lambda *a: (alive.append(sum(r() is not None for r in old)), mask(*a)))
    swapped, n_lin, measured = e2e.prune_in_place(model, 0.5, "unstructured", "bitmask", [1, 8], {}, 2)
    assert (swapped, n_lin) == (14, 14) and abs(measured - 0.5) < 0.01
    assert alive == list(range(14, 0, -1)) and all(r() is None for r in old)


def test_prune_in_place_shares_one_dense_budget_among_all_the_linears(e2e, monkeypatch):
    """``auto`` with ``--dense-budget-gib``: the budget bounds the dense copies of the whole model, not of each
    linear. Timings fixed so that bitmask wins at decode (0.5 vs 1.0 ms) and loses at prefill (10.2 vs 10.0 ms): every
    linear asks for a dense copy. Budget: three 256 x 256 bfloat16 copies (3 x 131,072 bytes) + 1 byte. Taken in
    model order (a unit's linears last first): lm.0's o, v and k projections get copies (393,216 bytes), q_proj
    (131,072 > 1 byte left) and every MLP linear (704 x 256 x 2 = 360,448 bytes) run dense-free."""
    from ellava_lib.model import loading

    if e2e.bitmask.extension() is None:
        pytest.skip("bitmask extension not built here")

    def timing(lin, module, rows, min_time_s, copies=1):
        if isinstance(module, e2e.bitmask.BitmaskLinear):
            return {"dense_ms": [1.0, 10.0], "sparse_ms": [0.5, 10.2]}
        return {"dense_ms": [1.0, 10.0], "sparse_ms": [9.0, 90.0]}

    monkeypatch.setattr(e2e.sparse, "_measure", timing)
    model = loading.random_weights(e2e.config_7b(small=True), "cpu", "bfloat16", seed=0)
    swapped, n_lin, _ = e2e.prune_in_place(model, 0.5, "unstructured", "auto", [1, 8], {}, 32,
                                           dense_budget=3 * 131_072 + 1)
    assert (swapped, n_lin) == (14, 14)
    copies = {n.split("layers.")[1]: m.dense_weight.numel() * 2 for n, m in model.named_modules()
              if isinstance(m, e2e.bitmask.BitmaskLinear) and m.dense_weight is not None}
    assert copies == {"0.self_attn.o_proj": 131_072, "0.self_attn.v_proj": 131_072, "0.self_attn.k_proj": 131_072}
