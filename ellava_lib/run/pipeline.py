"""Run the numbered notebooks in order with papermill under a named profile.

``python -m ellava_lib.run.pipeline --profile default`` executes ``notebooks/0*.ipynb`` into
``runs/<profile>/notebooks/``, passing each notebook the profile's values for the parameters it declares
(plus ``run_dir``), and prints the wall time.

The notebooks and profiles live in a project folder (a checkout of the kit), never looked up from the current
folder: ``--root DIR`` (or ``$ELLAVA_ROOT``) names it; without either, the checkout this package is imported
from is used (an editable install). A non-editable ``pip install`` therefore runs the pipeline with ``--root``.
Notebooks execute with that folder as their working directory.

A profile with a results ledger (``ledger: results/smol``, :mod:`ledger`) hands its sweep notebooks that tracked
folder when the run folders are the project's own (``ROOT/runs``): its rows are skipped, finished rows are written
there. Under any other ``--runs DIR`` the notebooks get a fresh ledger in the run folder instead
(``DIR/<profile>/ledger``): the tracked one is neither read nor written, so every row is recomputed
(:func:`ledger_folder`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import yaml

from ellava_lib.core import files
from ellava_lib.run import report

# Profile keys the pipeline itself consumes (not notebook parameters).
PIPELINE_KEYS = ("torch_threads", "overlap")
#: The overlap lane (profile ``overlap: true``): a notebook here runs in a second process beside the notebooks
#: that follow it, and must have finished before the notebook it maps to starts. ``02_dense_eval`` only reads
#: the model that 01 built and writes its own tables, so it runs on the second core beside 03 and 04 (one torch
#: thread each); 05 and 06 use both cores through their sweep workers.
OVERLAP: dict[str, str] = {"02_dense_eval": "05_main_table"}
ROOT_ENV = "ELLAVA_ROOT"


def _is_project(path: Path) -> bool:
    return (path / "notebooks").is_dir() and (path / "profiles").is_dir()


def project_root(root: str | Path | None = None) -> Path:
    """The project folder (``notebooks/`` + ``profiles/``): ``root``, else ``$ELLAVA_ROOT``, else the checkout
    holding this package; a ``ValueError`` saying what to pass when none of them is one."""
    given = root if root is not None else os.environ.get(ROOT_ENV) or None
    if given is not None:
        path = Path(given).expanduser().resolve()
        if not _is_project(path):
            raise ValueError(f"{path} is not an ellava project folder (it needs notebooks/ and profiles/)")
        return path
    checkout = Path(__file__).resolve().parents[2]
    if _is_project(checkout):
        return checkout
    raise ValueError(f"no project folder: ellava_lib is installed at {checkout}, outside a checkout; pass --root DIR "
                     f"(or set {ROOT_ENV}) naming a folder with the kit's notebooks/ and profiles/")


def notebooks_dir(root: str | Path | None = None) -> Path:
    return project_root(root) / "notebooks"


def profiles_dir(root: str | Path | None = None) -> Path:
    return project_root(root) / "profiles"


#: CPU vendors (``vendor_id`` of ``/proc/cpuinfo``) and the name of their nbval reference folder.
CPU_KINDS: dict[str, str] = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}


def cpu_kind(cpuinfo: str | None = None) -> str:
    """The CPU kind the nbval references of this machine are kept under: ``amd`` or ``intel`` by the first
    ``vendor_id`` of ``/proc/cpuinfo`` (or of the text ``cpuinfo``), another vendor's id lowercased, ``unknown``
    when there is none. The ``ci`` profile trains its model in fp32, and the BLAS and oneDNN kernels chosen for
    an AMD and an Intel CPU round differently, so the trained model and every checked number differ by kind; on
    one kind they replay exactly."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("vendor_id"):
            vendor = line.split(":", 1)[1].strip()
            return CPU_KINDS.get(vendor, vendor.lower() or "unknown")
    return "unknown"


def nbval_dir(root: str | Path | None = None, kind: str | None = None) -> Path:
    """Where the nbval reference notebooks of a CPU kind live: ``tests/nbval/<kind>`` (:func:`cpu_kind`, this
    machine's by default); ``tests/nbval/sanitize.cfg`` beside the kinds is shared (:func:`nbval_sanitize`)."""
    return project_root(root) / "tests" / "nbval" / (kind or cpu_kind())


def nbval_sanitize(root: str | Path | None = None) -> Path:
    """nbval's output sanitizers, shared by every CPU kind's references."""
    return project_root(root) / "tests" / "nbval" / "sanitize.cfg"


def available_profiles(root: str | Path | None = None) -> list[str]:
    return sorted(p.stem for p in profiles_dir(root).glob("*.yaml"))


def load_profile(name: str, root: str | Path | None = None) -> dict:
    """The parameters of a profile; a clear error naming the known profiles for an unknown one."""
    path = profiles_dir(root) / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown profile {name!r}; known profiles: {', '.join(available_profiles(root))}")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ValueError(f"profile {path} must be a mapping of parameter names to values")
    return params


def notebook_defaults(notebook: str | Path) -> dict:
    """The values a notebook's ``parameters`` cell assigns (``name: type = value``, literals only), read without
    running it: what the notebook uses for a parameter its profile leaves out."""
    import ast

    nb = json.loads(Path(notebook).read_text())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            return {node.target.id: ast.literal_eval(node.value) for node in ast.parse(source).body
                    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None}
    return {}


def preflight(params: dict) -> None:
    """Checks that need no notebook, before anything runs: the tier's keys and values, that its device
    exists here (the paper profile on a machine without CUDA stops now), the cost model's GPU name, the search
    preset and its overrides (``search_preset``, ``search``, ``ellava``: :meth:`config.SearchConfig.from_preset`)."""
    from ellava_lib.run.tier import Tier, check_device
    from ellava_lib.search.config import SearchConfig
    from ellava_lib.speed.costmodel import get_profile

    check_device(Tier.from_dict(params.get("tier")))
    overrides = [params.get(k) or {} for k in ("search", "ellava")]
    if isinstance(params.get("search_preset", ""), str) and all(isinstance(o, dict) for o in overrides):
        SearchConfig.from_preset(params.get("search_preset", "default"), **{**overrides[0], **overrides[1]})
    if "gpu" in params:
        try:
            get_profile(str(params["gpu"]))
        except KeyError as e:
            raise ValueError(str(e.args[0])) from None


#: Python types accepted for each annotation papermill reports (``inferred_type_name``).
_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                                       "list": (list,), "dict": (dict,)}


def notebook_parameters(notebook: Path, profile: dict, run_dir: Path) -> dict:
    """The subset of the profile a notebook declares in its ``parameters`` cell, plus ``run_dir``.

    Each value must have the type its declaration states (``name: type = default``); otherwise a
    ``ValueError`` naming the notebook, the parameter, the expected and the given type, before anything runs.
    """
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    params = {k: v for k, v in profile.items() if k in declared}
    for name, value in params.items():
        want = _TYPES.get(declared[name].get("inferred_type_name") or "")
        wrong_bool = isinstance(value, bool) and bool not in (want or ())
        if want is not None and (not isinstance(value, want) or wrong_bool):
            raise ValueError(f"{notebook.name}: parameter {name!r} must be {declared[name]['inferred_type_name']}, "
                             f"got {type(value).__name__} {value!r}")
    if "run_dir" in declared:
        params["run_dir"] = str(run_dir)
    return params


def ledger_folder(ledger: str, root: Path, runs_root: Path, run_dir: Path) -> Path:
    """The results ledger a run's sweeps read and write: the profile's tracked folder ``root/<ledger>`` when the
    run folders are the project's own (``runs_root`` is ``root/runs``), else a fresh one in the run folder
    (``run_dir/ledger``), so a run elsewhere recomputes every row and leaves the tracked ledger alone."""
    if Path(runs_root).resolve() == (Path(root) / "runs").resolve():
        return Path(root) / ledger
    return Path(run_dir) / "ledger"


def run_pipeline(profile: str, runs_root: Path | None = None, notebooks: list[Path] | None = None,
                 kernel: str = "python3", overrides: dict | None = None, root: str | Path | None = None) -> Path:
    """Execute the notebooks of the project folder ``root`` (:func:`project_root`) in order, with ``root`` as
    their working directory (``overrides`` replace profile values); returns the run folder
    (``runs_root/<profile>``, ``runs_root`` defaulting to ``root/runs``)."""
    root = project_root(root)
    runs_root = Path(runs_root) if runs_root is not None else root / "runs"
    params = {**load_profile(profile, root), **(overrides or {})}
    preflight(params)
    threads = params.pop("torch_threads", None)
    overlap = bool(params.pop("overlap", False))
    if threads:  # the kernels inherit the environment; one thread is fastest for the tiny tier
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))
    run_dir = Path(runs_root) / profile
    if params.get("ledger"):
        params["ledger"] = str(ledger_folder(str(params["ledger"]), root, runs_root, run_dir))
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = notebooks or sorted(notebooks_dir(root).glob("[0-9][0-9]_*.ipynb"))
    per_notebook = {nb: notebook_parameters(nb, params, run_dir) for nb in notebooks}  # type errors before any run
    t0 = time.time()
    seconds: dict[str, float] = {}
    side: dict[str, tuple[str, Future]] = {}  # join-before notebook -> (side notebook, its future)
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as lane:
        for nb in notebooks:
            if nb.stem in side:
                _join(profile, *side.pop(nb.stem), seconds)
            args = (str(nb), str(out_dir / nb.name), per_notebook[nb], kernel, str(root))
            if overlap and nb.stem in OVERLAP:
                print(f"[{profile}] {nb.name} ... (beside the next notebooks)", flush=True)
                side[OVERLAP[nb.stem]] = (nb.stem, lane.submit(execute, *args))
                continue
            print(f"[{profile}] {nb.name} ...", flush=True)
            seconds[nb.stem] = execute(*args)
            print(f"[{profile}] {nb.name} done in {seconds[nb.stem]:.0f} s", flush=True)
        for name, future in side.values():
            _join(profile, name, future, seconds)
    wall = time.time() - t0
    print(f"[{profile}] pipeline finished in {wall:.0f} s; outputs in {run_dir}", flush=True)
    reused = reused_jobs(run_dir, t0)
    body = timing_report(seconds, run_dir, threads, wall if overlap else None, reused)
    files.write_text(run_dir / "tables" / "pipeline_timing.md", body + "\n")
    if params.get("update_readme") and report.documents(root):  # README.md or docs/*.md: whichever holds the block
        if reused[0]:  # its times would not be what the pipeline costs
            print(f"[{profile}] timing block left as it is: {reused[0]} of {reused[1]} sweep jobs were read back "
                  f"from an earlier run in {run_dir} (an empty RUNS folder times the whole pipeline)", flush=True)
        else:
            report.update_doc(root, str(params.get("readme_prefix") or "") + "timing", body)
    return run_dir


def reused_jobs(run_dir: Path, since: float) -> tuple[int, int]:
    """``(reused, total)``: of the sweep jobs with a finished row in the run folder (``sweep/jobs/*/row.json``), how
    many rows were written before ``since`` (the pipeline's start): read back from an earlier run, not computed in
    this one. Rows read from a results ledger are not in the run folder and count in neither."""
    rows = list((Path(run_dir) / "sweep" / "jobs").glob("*/row.json"))
    return sum(p.stat().st_mtime < since for p in rows), len(rows)


def execute(notebook: str, out: str, parameters: dict, kernel: str, cwd: str) -> float:
    """Execute one notebook with papermill into ``out``; returns its wall seconds (runs in the overlap lane's
    process too, so it takes only picklable arguments)."""
    import papermill as pm

    t = time.time()
    pm.execute_notebook(notebook, out, parameters=parameters, kernel_name=kernel, cwd=cwd, progress_bar=False,
                        log_output=False)
    return time.time() - t


def _join(profile: str, name: str, future: Future, seconds: dict[str, float]) -> None:
    """Wait for a notebook of the overlap lane (its error, if any, is raised here) and record its seconds."""
    seconds[name] = future.result()
    print(f"[{profile}] {name}.ipynb done in {seconds[name]:.0f} s (beside the others)", flush=True)


def machine_line(threads: int | None = None) -> str:
    """``<CPU model>, <n> logical CPUs[, torch threads per kernel]`` (from ``/proc/cpuinfo`` where present)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    extra = f", {threads} torch thread(s) per notebook kernel" if threads else ""
    return f"{model}, {os.cpu_count()} logical CPUs{extra}"


def timing_report(seconds: dict[str, float], run_dir: Path, threads: int | None = None,
                  wall: float | None = None, reused: tuple[int, int] = (0, 0)) -> str:
    """A Markdown table of each notebook's wall time in this run and their total, with the machine, and the
    model build's own wall time as recorded when the cached model was built (``model.json``:
    ``train_seconds``; the first notebook includes it only on a cold cache, and not at all when the model came from
    its shipped weights, ``shipped``, which the note then says). With ``wall`` (an overlapped run)
    the total row is the pipeline's wall time, less than the notebooks' sum since the overlap lane's notebooks
    (:data:`OVERLAP`) ran beside the others. ``reused``: :func:`reused_jobs`; when some sweep jobs were read back
    from an earlier run, the note says how many (their compute is not in these times)."""
    from ellava_lib.run.runs import markdown_table

    total = round(wall if wall is not None else sum(seconds.values()))
    frame = pd.DataFrame([{"notebook": k, "seconds": round(v)} for k, v in sorted(seconds.items())]
                         + [{"notebook": "total", "seconds": total}])
    path = Path(run_dir) / "model.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    built, shipped = record.get("train_seconds"), record.get("shipped")
    lane = [k for k in OVERLAP if k in seconds]
    note = f"*Wall time of this run on {machine_line(threads)}."
    if wall is not None and lane:
        note += f" {', '.join(lane)} ran in a second process beside the notebooks after it; the total is wall time."
    if reused[0]:
        note += (f" {reused[0]} of {reused[1]} sweep jobs were read back from an earlier run in this folder, not "
                 "computed: their time is not in these numbers.")
    if built is not None and shipped:
        note += (f" The model was loaded from its shipped weights (weights/{shipped}/), not trained; building it took "
                 f"{float(built):.0f} s when it was shipped.*")
    elif built is not None:
        note += f" The model build, as recorded when it was built: {float(built):.0f} s.*"
    else:
        note += "*"
    return markdown_table(frame, ".0f") + "\n\n" + note


def write_nbval_references(run_dir: Path, root: str | Path | None = None) -> list[Path]:
    """Copy a run's executed notebooks into the project's ``tests/nbval/<kind>`` (:func:`nbval_dir`, this
    machine's CPU kind) as nbval reference
    notebooks (outputs kept on purpose): the injected ``run_dir`` parameter is rewritten relative to that folder
    (nbval starts the kernel there), pointing at ``ROOT/runs/nbval`` so replays never touch a real run."""
    import nbformat

    out_dir = nbval_dir(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(project_root(root) / "runs" / "nbval", out_dir)
    written = []
    for nb_path in sorted((Path(run_dir) / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        for cell in nb.cells:
            if "injected-parameters" in cell.metadata.get("tags", []):
                lines = [f'run_dir = "{target}"' if ln.startswith("run_dir = ") else ln
                         for ln in cell.source.splitlines()]
                cell.source = "\n".join(lines)
        nb.metadata.pop("papermill", None)
        for cell in nb.cells:
            cell.metadata.pop("papermill", None)
            cell.metadata.pop("execution", None)
        nbformat.write(nb, out_dir / nb_path.name)
        written.append(out_dir / nb_path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ellava_lib.run.pipeline")
    p.add_argument("--profile", default="default")
    p.add_argument("--root", default=None,
                   help=f"the project folder with notebooks/ and profiles/ (default: ${ROOT_ENV}, else this checkout)")
    p.add_argument("--runs", default=None, help="where run folders go (default: ROOT/runs); elsewhere, a profile's "
                                                "results ledger is a fresh one in the run folder, not the tracked one")
    p.add_argument("--nbval-refs", action="store_true",
                   help="after the run, store its executed notebooks as nbval references in "
                        "ROOT/tests/nbval/<cpu kind> (amd, intel: this machine's)")
    p.add_argument("--nbval-dir", action="store_true",
                   help="print the nbval reference folder of this machine's CPU kind and exit (make nbval); "
                        "exit 2 when it holds no references")
    p.add_argument("--rebuild", action="store_true",
                   help="retrain the profile's model (notebook 01's force_rebuild) instead of loading it from the "
                        "cache or its shipped weights")
    args = p.parse_args(argv)
    if args.nbval_dir:
        refs = nbval_dir(args.root)
        if not any(refs.glob("*.ipynb")):
            print(f"pipeline: error: no nbval references for this CPU kind ({cpu_kind()}) in {refs}: run make "
                  "nbval-refs on such a machine", file=sys.stderr)
            return 2
        print(refs)
        return 0
    try:
        overrides = {"force_rebuild": True} if args.rebuild else None
        run_dir = run_pipeline(args.profile, None if args.runs is None else Path(args.runs), root=args.root,
                               overrides=overrides)
        if args.nbval_refs:
            for path in write_nbval_references(run_dir, args.root):
                print(f"nbval reference: {path}")
    except ValueError as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
