from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ellava_lib.run import pipeline, report, runs


def test_profiles_exist_and_unknown_profile_is_named():
    assert {"ci", "default"} <= set(pipeline.available_profiles())
    with pytest.raises(ValueError, match="unknown profile 'nope'; known profiles: .*default"):
        pipeline.load_profile("nope")


def test_notebook_parameters_are_filtered_to_what_each_notebook_declares(tmp_path):
    nb = pipeline.notebooks_dir() / "01_tiny_model.ipynb"
    params = pipeline.notebook_parameters(nb, {"train_preset": "ci", "eval_limit": 3}, tmp_path)
    assert params == {"train_preset": "ci", "run_dir": str(tmp_path)}


def test_every_profile_value_reaches_a_notebook():
    """papermill must parse every parameters cell (a comment it cannot parse silently drops a parameter)."""
    import papermill as pm

    declared = set().union(*(pm.inspect_notebook(str(nb)) for nb in pipeline.notebooks_dir().glob("*.ipynb")))
    for name in pipeline.available_profiles():
        missing = set(pipeline.load_profile(name)) - declared - set(pipeline.PIPELINE_KEYS)
        assert not missing, f"profile {name}: no notebook declares {sorted(missing)}"


def test_notebooks_are_stored_without_outputs_and_have_one_parameters_cell():
    for nb in sorted(pipeline.notebooks_dir().glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), nb.name
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, nb.name
        src = "".join("".join(c["source"]) for c in code)
        assert "\ndef " not in "\n" + src and "\nclass " not in "\n" + src, nb.name


def test_searching_notebooks_take_a_preset_and_overrides():
    """04-06 declare the search settings as a preset name plus override dicts (restating no value) and hand all
    three to the sweep spec; every profile names a preset."""
    import papermill as pm

    from ellava_lib.search.config import PRESETS

    for name in ("04_search", "05_main_table", "06_ablations"):
        nb = pipeline.notebooks_dir() / f"{name}.ipynb"
        declared = pm.inspect_notebook(str(nb))
        got = {k: (declared[k]["inferred_type_name"], declared[k]["default"])
               for k in ("search_preset", "search", "ellava")}
        assert got == {"search_preset": ("str", '"default"'), "search": ("dict", "{}"), "ellava": ("dict", "{}")}, name
        assert "search_preset=search_preset, search=search, ellava=ellava" in nb.read_text(), name
    for profile in pipeline.available_profiles():
        assert pipeline.load_profile(profile).get("search_preset") in PRESETS, profile


def test_a_bad_search_preset_or_override_is_named_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown search preset 'huge'; choose from ci, default, smol, paper"):
        pipeline.run_pipeline("ci", runs_root=tmp_path, overrides={"search_preset": "huge"})
    with pytest.raises(ValueError, match=r"unknown search config keys \['generation'\]"):
        pipeline.run_pipeline("ci", runs_root=tmp_path, overrides={"search": {"generation": 4}})
    with pytest.raises(ValueError, match="need population >= 1"):
        pipeline.run_pipeline("ci", runs_root=tmp_path, overrides={"ellava": {"population": 0}})
    assert not (tmp_path / "ci").exists()


def test_missing_artifact_names_the_notebook_that_makes_it(tmp_path):
    run = runs.Run(tmp_path)
    with pytest.raises(runs.MissingArtifact, match="model.json is missing: run notebooks/01_tiny_model.ipynb first"):
        run.read_json("model.json")


def test_readme_splice():
    text = "a\n<!-- results:start -->\nold\n<!-- results:end -->\nb\n"
    assert report.splice(text, "results", "| x |") == "a\n<!-- results:start -->\n| x |\n<!-- results:end -->\nb\n"
    with pytest.raises(ValueError, match="markers"):
        report.splice("no markers", "results", "x")


def test_pipeline_runs_the_notebooks_end_to_end(tmp_path, monkeypatch):
    """papermill executes every notebook on a micro model; the run folder gets the tables and figures."""
    import pandas as pd

    monkeypatch.setenv("ELLAVA_CACHE", str(tmp_path / "cache"))
    run = pipeline.run_pipeline("ci", runs_root=tmp_path / "runs",
                                overrides={"train_preset": "micro", "eval_limit": 3, "n_show": 2, "sweep_eval_limit": 2,
                                           "sparsities": [0.5], "sparsity": 0.5, "calib_n": 8, "calib_ns": [8, 12],
                                           "table_methods": ["dense", "owl", "search", "ellava"], "gaps": ["none"],
                                           "interactive": False, "overlap": True})
    assert run == tmp_path / "runs" / "ci"
    timing = (run / "tables" / "pipeline_timing.md").read_text()  # 02 ran in the overlap lane, beside 03 and 04
    assert "| 02_dense_eval |" in timing and "02_dense_eval ran in a second process" in timing
    executed = sorted(p.name for p in (run / "notebooks").glob("*.ipynb"))
    assert executed == sorted(p.name for p in pipeline.notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    table = pd.read_csv(run / "tables" / "dense.csv")
    assert list(table["method"]) == ["dense", "magnitude 50%", "magnitude 70%"]
    assert {"sqa", "vizwiz", "mmvet", "llavabench", "mean"} <= set(table.columns)
    assert (run / "tables" / "dense.md").read_text().startswith("| method |")
    main = pd.read_csv(run / "tables" / "main.csv")
    assert list(main["method"]) == ["dense", "OWL", "search (no gap)", "EfficientLLaVA"]
    assert {"mean (test)", "calib", "gap", "seeds"} <= set(main.columns)
    assert (run / "tables" / "main.tex").read_text().startswith("\\begin{table}")
    assert (run / "sweep" / "results.csv").exists() and (run / "tables" / "leveldb_cost.csv").exists()
    ablations = pd.read_csv(run / "tables" / "ablations.csv")
    variants = list(ablations["variant"])
    assert any("no projector" in v for v in variants) and any("assembled" in v for v in variants)
    for fig in ("examples.png", "train_curves.png", "dense_vs_magnitude.png", "search_convergence.png",
                "policy_profile.png", "pareto.png", "gap_vs_calibration_size.png"):
        assert (run / "figures" / fig).stat().st_size > 1000
    assert json.loads((run / "model.json").read_text())["preset"] == "micro"


def test_a_parameter_of_the_wrong_type_is_named_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"02_dense_eval.ipynb: parameter 'eval_limit' must be int, got str 'many'"):
        pipeline.run_pipeline("ci", runs_root=tmp_path, overrides={"eval_limit": "many"})
    with pytest.raises(ValueError, match=r"parameter 'update_readme' must be bool, got int 1"):
        pipeline.run_pipeline("ci", runs_root=tmp_path, overrides={"update_readme": 1})
    with pytest.raises(ValueError, match=r"parameter 'sparsity' must be float, got bool"):
        pipeline.run_pipeline("ci", runs_root=tmp_path, overrides={"sparsity": True})
    assert not any((tmp_path / "ci" / "notebooks").glob("*.ipynb"))
    for name in pipeline.available_profiles():  # the shipped profiles type-check
        for nb in pipeline.notebooks_dir().glob("[0-9][0-9]_*.ipynb"):
            pipeline.notebook_parameters(nb, pipeline.load_profile(name), tmp_path)
    # ints are fine where a float is declared
    params = pipeline.notebook_parameters(pipeline.notebooks_dir() / "04_search.ipynb", {"sparsity": 1}, tmp_path)
    assert params["sparsity"] == 1


def test_timing_report_lists_each_notebook_the_total_and_the_recorded_build(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"train_seconds": 536.4}))
    body = pipeline.timing_report({"01_tiny_model": 12.4, "05_main_table": 300.2}, tmp_path, threads=1)
    lines = body.splitlines()
    assert lines[2:5] == ["| 01_tiny_model | 12 |", "| 05_main_table | 300 |", "| total | 313 |"]
    assert "recorded when it was built: 536 s" in body and "1 torch thread(s)" in body
    assert f"{os.cpu_count()} logical CPUs" in pipeline.machine_line()
    assert "recorded" not in pipeline.timing_report({"a": 1.0}, tmp_path / "nowhere")
    (tmp_path / "model.json").write_text(json.dumps({"train_seconds": 715.2, "shipped": "tiny"}))
    shipped = pipeline.timing_report({"01_tiny_model": 3.0}, tmp_path)
    assert "loaded from its shipped weights (weights/tiny/), not trained; building it took 715 s" in shipped
    assert "recorded when it was built" not in shipped
    overlapped = pipeline.timing_report({"01_tiny_model": 10.0, "02_dense_eval": 50.0, "03_search_space": 60.0},
                                        tmp_path, wall=71.0)
    assert "| total | 71 |" in overlapped and "02_dense_eval ran in a second process" in overlapped
    assert "read back" not in overlapped
    warm = pipeline.timing_report({"05_main_table": 8.0}, tmp_path, reused=(27, 29))
    assert "27 of 29 sweep jobs were read back from an earlier run in this folder, not computed" in warm


def test_reused_jobs_are_the_rows_written_before_the_run(tmp_path):
    jobs = tmp_path / "sweep" / "jobs"
    for name, mtime in (("a", 100.0), ("b", 200.0), ("c", 300.0)):
        (jobs / name).mkdir(parents=True)
        (jobs / name / "row.json").write_text("{}")
        os.utime(jobs / name / "row.json", (mtime, mtime))
    (jobs / "d").mkdir()  # a job without a finished row
    assert pipeline.reused_jobs(tmp_path, since=250.0) == (2, 3)
    assert pipeline.reused_jobs(tmp_path, since=50.0) == (0, 3)
    assert pipeline.reused_jobs(tmp_path / "empty", since=50.0) == (0, 0)


def _splice_many(readme: str, marker: str, n: int) -> None:
    for i in range(n):
        report.update_readme(Path(readme), marker, f"{marker} {i}")


def test_readme_splices_from_two_processes_lose_nothing(tmp_path):
    """The overlap lane splices the README from two processes at once: the lock keeps both blocks' last bodies."""
    import multiprocessing as mp

    readme = tmp_path / "README.md"
    readme.write_text("<!-- a:start -->\n<!-- a:end -->\nmiddle\n<!-- b:start -->\n<!-- b:end -->\n")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_splice_many, args=(str(readme), m, 60)) for m in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    text = readme.read_text()
    assert "<!-- a:start -->\na 59\n<!-- a:end -->" in text and "<!-- b:start -->\nb 59\n<!-- b:end -->" in text


def test_the_smol_profile_runs_end_to_end_on_the_micro_llama(tmp_path, monkeypatch):
    """profiles/smol.yaml with its model swapped for the micro Llama shaped like SmolLM2 (smol-micro): every
    notebook runs the smol code path (pretrained-decoder build, bf16 level database, sweeps, tables)."""
    import pandas as pd

    monkeypatch.setenv("ELLAVA_CACHE", str(tmp_path / "cache"))
    run = pipeline.run_pipeline("smol", runs_root=tmp_path / "runs", overrides={
        "train_preset": "smol-micro", "eval_limit": 4, "sweep_eval_limit": 2, "seeds": [0], "sparsities": [0.5],
        "sparsity": 0.5, "calib_n": 12, "calib_ns": [12], "gaps": ["none"], "search_preset": "ci",
        "table_methods": ["dense", "sparsegpt", "search", "ellava"], "torch_threads": 1, "update_readme": False,
        "figures_dir": ""})
    record = json.loads((run / "model.json").read_text())
    assert record["kind"] == "smol" and record["preset"] == "smol-micro" and record["tier"]["db_dtype"] == "bfloat16"
    dbs = list((run / "sweep" / "leveldb").glob("*/config.json"))
    assert dbs and all(json.loads(p.read_text())["store_dtype"] == "bfloat16" for p in dbs)
    main = pd.read_csv(run / "tables" / "main.csv")
    assert list(main["method"]) == ["dense", "SparseGPT", "search (no gap)", "EfficientLLaVA"]
    results = pd.read_csv(run / "sweep" / "results.csv")
    searched = results[results["method"].isin(["search", "ellava"])]
    assert len(searched) >= 1 and (abs(searched["measured"] - 0.5) <= 0.002).all()


def test_every_readme_marker_the_pipeline_writes_exists_for_each_profile_prefix():
    """The notebooks and the pipeline splice into ``<readme_prefix><name>``: the README or one page of docs/ has
    each block for every profile that updates it (the embedded default: no prefix; smol: ``smol-``)."""
    import re

    names = set()
    for nb in pipeline.notebooks_dir().glob("[0-9][0-9]_*.ipynb"):
        text = nb.read_text()
        if "report.update_readme(" in text:
            assert 'readme_prefix: str = \\"\\"' in text, nb.name
            names |= set(re.findall(r'readme_prefix \+ \\"(\w+)\\"', text))
    names.add("timing")  # pipeline.run_pipeline
    assert names == {"results", "leveldb", "main", "convergence", "ablations", "timing"}
    root = pipeline.project_root()
    for profile in pipeline.available_profiles():
        params = pipeline.load_profile(profile)
        if params.get("update_readme"):
            prefix = params.get("readme_prefix") or ""
            for name in names:
                report.doc_with(root, prefix + name)  # exactly one document holds it, else a ValueError


def test_every_declared_parameter_is_one_papermill_reads():
    """papermill silently drops a parameters-cell line it cannot parse (a comment holding ``=``, say), and the
    pipeline then drops the profile's value for it: every ``name: type = value`` line must come back from
    ``inspect_notebook`` (``force_rebuild`` is what ``make reproduce REBUILD=1`` sets)."""
    import re

    import nbformat
    import papermill as pm

    for nb_path in sorted(pipeline.notebooks_dir().glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        declared = [m.group(1) for m in re.finditer(r"^(\w+)\s*:\s*[\w\[\], |]+=", cell.source, re.M)]
        assert declared and set(declared) <= set(pm.inspect_notebook(str(nb_path))), nb_path.name
    assert "force_rebuild" in pm.inspect_notebook(str(pipeline.notebooks_dir() / "01_tiny_model.ipynb"))
