"""Plain helper functions shared by several test modules (fixtures live in ``conftest.py``).

Importable as ``from helpers import ...``: with pytest's default ``prepend`` import mode this folder (it has
no ``__init__.py``) is put on ``sys.path`` when its conftest and test modules are collected.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ellava_lib.core.policy import search_grid
from ellava_lib.data import calibration
from ellava_lib.model.specs import load_model
from ellava_lib.prune import leveldb

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` imported as a module (benchmarks are scripts, not a package), registered
    in ``sys.modules`` under ``bench_<name>`` as an import would be (a ``@dataclass`` in it looks its module up)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def exit_code(fn) -> int:
    """``main``'s return value, or the status of argparse's ``SystemExit``."""
    try:
        return fn()
    except SystemExit as e:
        return int(e.code)


def build_micro_level_db(model_dir, tmp_path_factory, n_calib: int):
    """Load the model in ``model_dir``, encode ``n_calib`` calibration samples (seed 0) with its processor and
    build a level database of it in a fresh temporary folder, holding the search grids of targets 0.5 and 0.6
    (:func:`policy.search_grid`). Returns ``(model, batch, folder)``."""
    model, proc = load_model(model_dir)
    batch = calibration.encode_calibration(calibration.draw_calibration(n_calib, 0), proc)
    out = tmp_path_factory.mktemp("db")
    leveldb.build_level_db(model, batch, out, search_grid([0.5, 0.6]), progress=False)
    return model, batch, out
