"""Benchmark manifests (``ellava_lib/data/manifests/<name>.yaml``): where a real benchmark lives upstream (primary and
fallback Hugging Face repos, config, split, revision, expected size), how its columns map to
:class:`~ellava_lib.core.schema.Sample` fields, its prompt template, metric and judge. Parsing validates every
key and raises :class:`ManifestError` with the file and key named.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ellava_lib.core.schema import SUITES, Sample, option_letter

MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"
BENCHMARKS: dict[str, str] = {"scienceqa": "sqa", "vizwiz": "vizwiz", "mmvet": "mmvet", "llavabench": "llavabench"}
#: The benchmark (manifest name) behind each suite.
SUITE_BENCHMARKS: dict[str, str] = {suite: name for name, suite in BENCHMARKS.items()}
SAMPLE_FIELDS: frozenset[str] = frozenset(
    {"id", "question", "answer", "image", "choices", "context", "answers", "capabilities", "category"}
)
EVAL_ONLY_SPLITS: frozenset[str] = frozenset({"test"})

class ManifestError(ValueError):
    """An unknown benchmark name or a malformed manifest file."""





@dataclass(frozen=True)
class SplitSpec:
    """Where one split lives upstream: repo ids (primary first), config, split, revision, row count."""

    repos: tuple[str, ...]
    config: str | None
    split: str
    revision: str | None = None
    expected_rows: int | None = None


@dataclass(frozen=True)
class Manifest:
    """One benchmark's data manifest (see ``ellava_lib/data/manifests/*.yaml``)."""

    name: str
    suite: str
    repos: tuple[str, ...]
    config: str | None
    split: str
    revision: str | None
    expected_rows: int | None
    fields: dict[str, str]
    required: tuple[str, ...]
    prompt: dict[str, str]
    metric: dict[str, Any]
    judge: dict[str, Any] | None
    labels: tuple[str, ...] = ()
    calibration: SplitSpec | None = None
    path: Path | None = None

    @property
    def eval_spec(self) -> SplitSpec:
        """The evaluation split as a :class:`SplitSpec`."""
        return SplitSpec(self.repos, self.config, self.split, self.revision, self.expected_rows)

    def column_for(self, target: str) -> str | None:
        """The upstream column mapped to Sample field (or ``meta.<key>``) ``target``, if any."""
        for column, dest in self.fields.items():
            if dest == target:
                return column
        return None


def load_manifest(name_or_path: str | Path) -> Manifest:
    """Load and validate a manifest by benchmark name (``scienceqa``, ``vizwiz``, ``mmvet``,
    ``llavabench``) or by path to a YAML file. Raises :class:`ManifestError` on any problem."""
    path = _manifest_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: a manifest must be a YAML mapping, got {type(raw).__name__}")
    return _parse_manifest(raw, path)


def _manifest_path(name_or_path: str | Path) -> Path:
    """Resolve a benchmark name or a file path to an existing manifest file."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(name_or_path)
        if not path.is_file():
            raise ManifestError(f"manifest file not found: {path}")
        return path
    if text not in BENCHMARKS:
        raise ManifestError(f"unknown benchmark {text!r}; expected one of {', '.join(sorted(BENCHMARKS))}")
    path = MANIFEST_DIR / f"{text}.yaml"
    if not path.is_file():
        raise ManifestError(f"manifest for {text!r} is missing: {path}")
    return path


def _parse_manifest(raw: dict[str, Any], path: Path) -> Manifest:
    """Validate the raw YAML mapping and build a :class:`Manifest`."""
    where = str(path)
    for key in ("name", "suite", "repos", "split", "fields", "required", "prompt", "metric"):
        if key not in raw:
            raise ManifestError(f"{where}: missing required key {key!r}")
    name = _str(raw["name"], "name", where)
    suite = _str(raw["suite"], "suite", where)
    if suite not in SUITES:
        raise ManifestError(f"{where}: suite {suite!r} is not one of {', '.join(SUITES)}")
    if name in BENCHMARKS and BENCHMARKS[name] != suite:
        raise ManifestError(f"{where}: benchmark {name!r} must use suite {BENCHMARKS[name]!r}, not {suite!r}")
    spec = _parse_split_spec(raw, where)
    fields = raw["fields"]
    if not isinstance(fields, dict) or not fields:
        raise ManifestError(f"{where}: 'fields' must be a non-empty mapping of upstream column -> Sample field")
    for column, dest in fields.items():
        if not isinstance(column, str) or not isinstance(dest, str):
            raise ManifestError(f"{where}: fields entry {column!r}: {dest!r} must map a string to a string")
        if dest not in SAMPLE_FIELDS and not (dest.startswith("meta.") and len(dest) > 5):
            raise ManifestError(
                f"{where}: fields[{column!r}] -> {dest!r} is not a Sample field "
                f"({', '.join(sorted(SAMPLE_FIELDS))}) or 'meta.<key>'"
            )
    targets = Counter(d for d in fields.values() if not d.startswith("meta."))
    dupes = [d for d, n in targets.items() if n > 1]
    if dupes:
        raise ManifestError(f"{where}: Sample field(s) {dupes} are mapped from more than one column")
    for needed in ("image", "question", "answer" if suite != "vizwiz" else "answers"):
        if needed not in targets:
            raise ManifestError(f"{where}: no upstream column is mapped to Sample field {needed!r}")
    required = raw["required"]
    if not isinstance(required, list) or not all(isinstance(c, str) for c in required):
        raise ManifestError(f"{where}: 'required' must be a list of upstream column names")
    unknown = [c for c in required if c not in fields]
    if unknown:
        raise ManifestError(f"{where}: required column(s) {unknown} are not in 'fields'")
    prompt = raw["prompt"]
    if not isinstance(prompt, dict) or not isinstance(prompt.get("template"), str):
        raise ManifestError(f"{where}: 'prompt' must be a mapping with a string 'template'")
    metric = raw["metric"]
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise ManifestError(f"{where}: 'metric' must be a mapping with a string 'name'")
    judge = raw.get("judge")
    if judge is not None and (not isinstance(judge, dict) or not isinstance(judge.get("model"), str)):
        raise ManifestError(f"{where}: 'judge' must be null or a mapping with a string 'model'")
    labels = raw.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ManifestError(f"{where}: 'labels' must be a list of strings")
    calibration = None
    if raw.get("calibration_split") is not None:
        cal_raw = raw["calibration_split"]
        if not isinstance(cal_raw, dict):
            raise ManifestError(f"{where}: 'calibration_split' must be a mapping")
        calibration = _parse_split_spec(cal_raw, f"{where} calibration_split")
        if calibration.split in EVAL_ONLY_SPLITS or (
            calibration.split == spec.split and set(calibration.repos) & set(spec.repos)
        ):
            raise ManifestError(
                f"{where}: calibration_split must be a training split, not the evaluation split "
                f"{calibration.split!r}"
            )
    return Manifest(
        name=name, suite=suite, repos=spec.repos, config=spec.config, split=spec.split,
        revision=spec.revision, expected_rows=spec.expected_rows, fields=dict(fields),
        required=tuple(required), prompt=dict(prompt), metric=dict(metric),
        judge=dict(judge) if judge else None, labels=tuple(labels), calibration=calibration, path=path,
    )


def _parse_split_spec(raw: Mapping[str, Any], where: str) -> SplitSpec:
    """Validate ``repos`` / ``config`` / ``split`` / ``revision`` / ``expected_rows``."""
    repos = raw.get("repos")
    if not isinstance(repos, list) or not repos or not all(isinstance(r, str) and "/" in r for r in repos):
        raise ManifestError(f"{where}: 'repos' must be a non-empty list of 'owner/name' repo ids")
    split = _str(raw.get("split"), "split", where)
    config = raw.get("config")
    if config is not None and not isinstance(config, str):
        raise ManifestError(f"{where}: 'config' must be a string or null")
    revision = raw.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise ManifestError(f"{where}: 'revision' must be a string or null")
    expected = raw.get("expected_rows")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int) or expected <= 0):
        raise ManifestError(f"{where}: 'expected_rows' must be a positive integer or null")
    return SplitSpec(tuple(repos), config, split, revision, expected)


def _str(value: Any, key: str, where: str) -> str:
    """``value`` if it is a non-empty string, else a :class:`ManifestError`."""
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}: {key!r} must be a non-empty string")
    return value


def render_prompt(manifest: Manifest, sample: Sample) -> str:
    """The manifest's prompt template filled in for ``sample`` (no chat wrapper)."""
    p = manifest.prompt
    context = p.get("context_format", "{context}").format(context=sample.context) if sample.context else ""
    option_format = p.get("option_format", "{letter}. {text}")
    options = "\n".join(option_format.format(letter=option_letter(i), text=c) for i, c in enumerate(sample.choices))
    return p["template"].format(context=context, question=sample.question, options=options)
