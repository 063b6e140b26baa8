"""Run the numbered notebooks in order with papermill under a named profile.

``python -m ellava_lib.run.pipeline --profile default`` executes ``notebooks/0*.ipynb`` into
``runs/<profile>/notebooks/``, passing each notebook the profile's values for the parameters it declares
(plus ``run_dir``), and prints the wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
# Profile keys the pipeline itself consumes (not notebook parameters).
PIPELINE_KEYS = ("torch_threads",)
PROFILES_DIR = REPO / "profiles"
NOTEBOOKS_DIR = REPO / "notebooks"


def available_profiles(profiles_dir: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in profiles_dir.glob("*.yaml"))


def load_profile(name: str, profiles_dir: Path = PROFILES_DIR) -> dict:
    """The parameters of a profile; a clear error naming the known profiles for an unknown one."""
    path = profiles_dir / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown profile {name!r}; known profiles: {', '.join(available_profiles(profiles_dir))}")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ValueError(f"profile {path} must be a mapping of parameter names to values")
    return params


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


def run_pipeline(profile: str, runs_root: Path = REPO / "runs", notebooks: list[Path] | None = None,
                 kernel: str = "python3", overrides: dict | None = None) -> Path:
    """Execute the notebooks in order (``overrides`` replace profile values); returns the run folder."""
    import papermill as pm

    params = {**load_profile(profile), **(overrides or {})}
    preflight(params)
    threads = params.pop("torch_threads", None)
    if threads:  # the kernels inherit the environment; one thread is fastest for the tiny tier
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))
    run_dir = Path(runs_root) / profile
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = notebooks or sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    per_notebook = {nb: notebook_parameters(nb, params, run_dir) for nb in notebooks}  # type errors before any run
    t0 = time.time()
    for nb in notebooks:
        t = time.time()
        print(f"[{profile}] {nb.name} ...", flush=True)
        pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters=per_notebook[nb],
                            kernel_name=kernel, cwd=str(REPO), progress_bar=False, log_output=False)
        print(f"[{profile}] {nb.name} done in {time.time() - t:.0f} s", flush=True)
    print(f"[{profile}] pipeline finished in {time.time() - t0:.0f} s; outputs in {run_dir}", flush=True)
    return run_dir


NBVAL_DIR = REPO / "tests" / "nbval"


def write_nbval_references(run_dir: Path, out_dir: Path = NBVAL_DIR) -> list[Path]:
    """Copy a run's executed notebooks into ``out_dir`` as nbval reference notebooks (outputs kept on
    purpose): the injected ``run_dir`` parameter is rewritten relative to ``out_dir`` (nbval starts the
    kernel there), pointing at ``runs/nbval`` so replays never touch a real run."""
    import nbformat

    out_dir.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(REPO / "runs" / "nbval", out_dir)
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
    p.add_argument("--runs", default=str(REPO / "runs"))
    p.add_argument("--nbval-refs", action="store_true",
                   help=f"after the run, store its executed notebooks as nbval references in {NBVAL_DIR}")
    args = p.parse_args(argv)
    try:
        run_dir = run_pipeline(args.profile, Path(args.runs))
        if args.nbval_refs:
            for path in write_nbval_references(run_dir):
                print(f"nbval reference: {path}")
    except ValueError as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
