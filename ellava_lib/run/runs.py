"""The run folder (``runs/<name>/``): what each notebook reads and writes, with clear errors for
artifacts that an earlier notebook has not made yet."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ellava_lib.core import files

# artifact -> the notebook that writes it (for "run X first" messages)
MADE_BY: dict[str, str] = {
    "model.json": "notebooks/01_tiny_model.ipynb",
    "tables/dense.csv": "notebooks/02_dense_eval.ipynb",
    "calibration.json": "notebooks/03_search_space.ipynb",
    "tables/search_showcase.csv": "notebooks/04_search.ipynb",
    "tables/main.csv": "notebooks/05_main_table.ipynb",
    "sweep/results.csv": "notebooks/05_main_table.ipynb",
}


class MissingArtifact(FileNotFoundError):
    """An input a notebook needs was not written by the notebook that makes it."""


@dataclass
class Run:
    """A run folder; every path is relative to it."""

    root: Path

    def __post_init__(self) -> None:
        self.root = files.ensure_dir(Path(self.root))

    def path(self, name: str) -> Path:
        return self.root / name

    def require(self, name: str) -> Path:
        """The path of an artifact that must exist; raises MissingArtifact naming the notebook to run."""
        p = self.path(name)
        if not p.exists():
            hint = f": run {MADE_BY[name]} first" if name in MADE_BY else ""
            raise MissingArtifact(f"{p} is missing{hint}")
        return p

    def read_json(self, name: str) -> Any:
        return json.loads(self.require(name).read_text())

    def write_json(self, name: str, obj: Any) -> Path:
        return files.write_json(self.path(name), obj)

    def save_figure(self, fig, name: str, also: str | Path = "") -> Path:
        """Save ``figures/<name>.png`` in the run folder (and in ``also``, e.g. the repo's ``figures/``)."""
        path = self.path(f"figures/{name}.png")
        for target in [path] + ([Path(also) / f"{name}.png"] if also else []):
            files.ensure_dir(target.parent)
            fig.savefig(target, dpi=120, bbox_inches="tight")
        return path

    def write_table(self, name: str, frame: pd.DataFrame, floatfmt: str = ".1f") -> Path:
        """Write ``tables/<name>.csv`` and ``tables/<name>.md`` (Markdown via pandas)."""
        files.write_csv(self.path(f"tables/{name}.csv"), frame)
        files.write_text(self.path(f"tables/{name}.md"), markdown_table(frame, floatfmt) + "\n")
        return self.path(f"tables/{name}.csv")


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".1f") -> str:
    """A GitHub Markdown table, without the optional ``tabulate`` dependency."""
    cols = list(frame.columns)
    fmt = lambda v: format(v, floatfmt) if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def latex_table(frame: pd.DataFrame, caption: str = "", label: str = "") -> str:
    """A booktabs LaTeX table (``&``, ``%``, ``_`` and ``±`` escaped/converted), without pandas' Styler."""
    def cell(v: Any) -> str:
        s = str(v).replace("\\", "\\textbackslash{}")
        for a, b in (("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"), ("±", "$\\pm$")):
            s = s.replace(a, b)
        return s

    cols = list(frame.columns)
    lines = ["\\begin{table}[t]", "\\centering", f"\\begin{{tabular}}{{{'l' * 2}{'r' * (len(cols) - 2)}}}",
             "\\toprule", " & ".join(cell(c) for c in cols) + " \\\\", "\\midrule"]
    lines += [" & ".join(cell(v) for v in row) + " \\\\" for row in frame.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}"]
    if caption:
        lines.append(f"\\caption{{{cell(caption)}}}")
    if label:
        lines.append(f"\\label{{{label}}}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"
