"""Real benchmark data: per-benchmark manifests and loaders that map upstream rows into :class:`Sample`.

A manifest (``ellava_lib/data/manifests/<name>.yaml``) names the upstream Hugging Face dataset (a primary repo and a
fallback), its config, split, revision and expected size, and maps upstream column names to
:class:`~ellava_lib.core.schema.Sample` fields. :func:`load_real_suite` loads the split with
``datasets.load_dataset`` (or local parquet files in the same column schema, for tests and offline
runs), decodes every image to RGB and reports each row it cannot use in ``LoadReport.skipped``: no row
is dropped silently. :func:`draw_calibration_ids` draws a deterministic id subset from the manifest's
calibration (training) split.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ellava_lib.core.schema import Sample, option_letter
from ellava_lib.data.manifest import Manifest, ManifestError, SplitSpec, load_manifest
from ellava_lib.data.real_image import ImageDecodeError, decode_image

log = logging.getLogger(__name__)

UNANSWERABLE = "unanswerable"
_SHA_RE = re.compile(r"(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])")

# A hub loader: (repo_id, config, split, revision, local_files_only, cache_dir) -> datasets.Dataset
HubLoader = Callable[[str, "str | None", str, "str | None", bool, "str | None"], Any]


class DataLoadError(RuntimeError):
    """The upstream split could not be loaded, or its columns do not match the manifest."""


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`load_real_suite` produced: samples, per-row skips, and provenance."""

    manifest: str
    split: str
    samples: list[Sample]
    skipped: list[tuple[str, str]]
    source: str
    revision: str | None
    rows_read: int
    warnings: list[str] = field(default_factory=list)

    @property
    def skip_counts(self) -> dict[str, int]:
        """Number of skipped rows per reason kind (the reason text before the first ':')."""
        return dict(Counter(reason.split(":", 1)[0] for _, reason in self.skipped))

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly provenance record for the run folder."""
        return {
            "manifest": self.manifest, "split": self.split, "source": self.source,
            "revision": self.revision, "rows_read": self.rows_read, "samples": len(self.samples),
            "skipped": len(self.skipped), "skip_counts": self.skip_counts,
            "skipped_items": [list(s) for s in self.skipped], "warnings": list(self.warnings),
        }


def benchmark_dir(data_dir: str | Path | None, name: str) -> Path | None:
    """``data_dir/<benchmark>``: where a tier's local copies of one benchmark live (``None``: the hub)."""
    return Path(data_dir) / name if data_dir else None


def load_real_suite(
    manifest: Manifest | str | Path,
    *,
    split: str | None = None,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    local_files_only: bool = False,
    cache_dir: str | Path | None = None,
    hub_loader: HubLoader | None = None,
    rows: Sequence[int] | None = None,
    unlabelled: bool = False,
) -> LoadReport:
    """Load a benchmark split and map every row into a :class:`Sample`.

    ``split`` defaults to the manifest's evaluation split; the manifest's calibration split name selects
    the calibration repos. ``limit`` keeps the first ``limit`` upstream rows (skips among them are still
    reported). ``data_dir`` (a folder holding ``<split>-*.parquet`` / ``<split>.parquet`` files, searched
    recursively, or a single parquet file) replaces the hub download, with the same mapping code.
    ``rows`` (upstream row indices, e.g. from :func:`draw_calibration_rows`) loads only those rows; their
    ids keep the upstream index, so they equal the ids :func:`draw_calibration_ids` returns.
    Otherwise the primary repo is tried, then the fallback; ``source`` says which one was used and
    ``revision`` the resolved commit. Memory: images are decoded eagerly (VizWiz val is ~2 GB of JPEGs).
    ``unlabelled`` (VizWiz only: its test-dev split, whose answers are withheld for EvalAI) keeps rows without
    annotator answers, as samples with ``answers == []`` and ``meta["unlabelled"] = True``; they cannot be scored.
    """
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    if unlabelled:
        if man.suite != "vizwiz":
            raise ValueError(f"{man.name}: unlabelled loading is only for VizWiz's test-dev split")
        label_columns = {c for c, dest in man.fields.items() if dest in ("answer", "answers")}
        man = replace(man, required=tuple(c for c in man.required if c not in label_columns))
    spec = _select_spec(man, split)
    ds, source, revision = _open_split(spec, data_dir, local_files_only, cache_dir, hub_loader)
    warnings = _check_columns(ds, man)
    total = len(ds)
    indices: list[int] | None = None
    if rows is not None:
        indices = sorted(set(int(i) for i in rows))
        bad = [i for i in indices if not 0 <= i < total]
        if bad:
            raise ValueError(f"{man.name}/{spec.split}: row indices {bad[:5]} outside 0..{total - 1}")
        ds = ds.select(indices)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        ds = ds.select(range(min(limit, len(ds))))
        indices = None if indices is None else indices[:limit]
    elif rows is None and data_dir is None and spec.expected_rows is not None and total != spec.expected_rows:
        warnings.append(f"{source} {spec.split}: {total} rows, manifest expects {spec.expected_rows}")
    ds = _raw_images(ds, man)
    samples, skipped = _map_rows(man, spec.split, ds, total, indices, unlabelled)
    for w in warnings:
        log.warning(w)
    if skipped:
        log.warning("%s/%s: skipped %d of %d rows: %s", man.name, spec.split, len(skipped), len(ds),
                    dict(Counter(r.split(":", 1)[0] for _, r in skipped)))
    log.info("%s/%s: %d samples from %s@%s", man.name, spec.split, len(samples), source, revision)
    return LoadReport(man.name, spec.split, samples, skipped, source, revision, len(ds), warnings)


def _select_spec(man: Manifest, split: str | None) -> SplitSpec:
    """The evaluation spec, the calibration spec, or the evaluation repos with another split."""
    if split is None or split == man.split:
        return man.eval_spec
    if man.calibration is not None and split == man.calibration.split:
        return man.calibration
    return SplitSpec(man.repos, man.config, split, man.revision, None)


def _open_split(
    spec: SplitSpec,
    data_dir: str | Path | None,
    local_files_only: bool,
    cache_dir: str | Path | None,
    hub_loader: HubLoader | None,
) -> tuple[Any, str, str | None]:
    """(dataset, source, revision): local parquet files if ``data_dir``, else primary then fallback repo."""
    cache = str(cache_dir) if cache_dir is not None else None
    if data_dir is not None:
        files = _local_files(Path(data_dir), spec)
        import datasets

        ds = datasets.load_dataset("parquet", data_files={spec.split: [str(f) for f in files]},
                                   split=spec.split, cache_dir=cache)
        return ds, f"local:{Path(data_dir)}", f"local-sha256:{_files_digest(files)}"
    loader = hub_loader or _hub_load
    errors: list[str] = []
    for repo in spec.repos:
        try:
            ds = loader(repo, spec.config, spec.split, spec.revision, local_files_only, cache)
        except Exception as exc:  # noqa: BLE001 - any failure moves on to the fallback repo
            log.warning("could not load %s (%s/%s): %s: %s", repo, spec.config, spec.split,
                        type(exc).__name__, exc)
            errors.append(f"{repo}: {type(exc).__name__}: {exc}")
            continue
        return ds, repo, _resolved_revision(ds, spec.revision)
    raise DataLoadError(f"could not load split {spec.split!r} from any of {list(spec.repos)}: " + "; ".join(errors))


def _hub_load(repo: str, config: str | None, split: str, revision: str | None,
              local_files_only: bool, cache_dir: str | None) -> Any:
    """``datasets.load_dataset`` for one hub repo (no streaming)."""
    import datasets

    download_config = datasets.DownloadConfig(local_files_only=local_files_only)
    return datasets.load_dataset(repo, config, split=split, revision=revision, cache_dir=cache_dir,
                                 download_config=download_config)


def _resolved_revision(ds: Any, requested: str | None) -> str | None:
    """The commit the data came from: the pinned sha, else the sha in the dataset cache path."""
    if requested and _SHA_RE.fullmatch(requested):
        return requested
    for cache_file in getattr(ds, "cache_files", None) or []:
        found = _SHA_RE.findall(str(cache_file.get("filename", "")))
        if found:
            return found[-1]
    return requested


def _local_files(data_dir: Path, spec: SplitSpec) -> list[Path]:
    """Parquet files for ``spec.split`` under ``data_dir`` (or ``data_dir`` itself if it is a file)."""
    if data_dir.is_file():
        return [data_dir]
    if not data_dir.is_dir():
        raise DataLoadError(f"data_dir not found: {data_dir}")
    roots = [data_dir / spec.config, data_dir] if spec.config and (data_dir / spec.config).is_dir() else [data_dir]
    for root in roots:
        files = sorted({*root.rglob(f"{spec.split}-*.parquet"), *root.rglob(f"{spec.split}.parquet")})
        if files:
            return files
    present = sorted(p.name for p in data_dir.rglob("*.parquet"))
    raise DataLoadError(f"no parquet files for split {spec.split!r} under {data_dir} (found: {present})")


def _files_digest(files: Iterable[Path]) -> str:
    """sha256 over the bytes of the given files (first 16 hex digits), to pin local data."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _check_columns(ds: Any, man: Manifest) -> list[str]:
    """Columns mapped to Sample fields must exist upstream (else the schema changed: fail loudly);
    a missing ``meta.*`` column is only a warning (returned)."""
    missing = [c for c in man.fields if c not in ds.column_names]
    fatal = [c for c in missing if c in man.required or not man.fields[c].startswith("meta.")]
    if fatal:
        raise DataLoadError(
            f"{man.name}: upstream columns {fatal} are missing (have {ds.column_names}); "
            f"the upstream schema changed or the manifest is wrong"
        )
    return [f"{man.name}: optional column {c!r} ({man.fields[c]}) is missing upstream" for c in missing]


def _raw_images(ds: Any, man: Manifest) -> Any:
    """Turn off ``datasets`` image decoding so that a bad image is a per-row skip, not a crash."""
    import datasets

    column = man.column_for("image")
    if column is not None and isinstance(ds.features.get(column), datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _map_rows(
    man: Manifest, split: str, rows: Iterable[dict[str, Any]], total: int, indices: Sequence[int] | None = None,
    unlabelled: bool = False,
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Map upstream rows to samples; collect (id, reason) for rows that cannot be used. ``indices``: the
    upstream row index of each row (default: their position)."""
    width = max(5, len(str(total)))
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    for pos, row in enumerate(rows):
        index = indices[pos] if indices is not None else pos
        sid = _row_id(man, split, index, row, width)
        try:
            samples.append(_build_sample(man, split, sid, index, row, unlabelled))
        except _SkipRow as skip:
            skipped.append((sid, str(skip)))
    return samples, skipped


class _SkipRow(Exception):
    """A row that cannot become a sample; the message is the reason recorded in ``skipped``."""


def _row_id(man: Manifest, split: str, index: int, row: Mapping[str, Any], width: int) -> str:
    """The upstream id column as a string, else ``<suite>-<split>-<row index>``."""
    column = man.column_for("id")
    value = row.get(column) if column else None
    if value is None or str(value) == "":
        return f"{man.suite}-{split}-{index:0{width}d}"
    return str(value)


def _build_sample(man: Manifest, split: str, sid: str, index: int, row: Mapping[str, Any],
                  unlabelled: bool = False) -> Sample:
    """Generic column mapping, then the suite-specific conversions."""
    for column in man.required:
        value = row.get(column)
        if value is None or (isinstance(value, (str, list)) and len(value) == 0):
            raise _SkipRow(f"missing field: {column}")
    values: dict[str, Any] = {}
    meta: dict[str, Any] = {"row_index": index, **({"unlabelled": True} if unlabelled else {})}
    for column, dest in man.fields.items():
        value = row.get(column)
        if dest.startswith("meta."):
            if value is not None:
                meta[dest[5:]] = value
        else:
            values[dest] = value
    try:
        values["image"] = decode_image(values.get("image"))
    except ImageDecodeError as bad:
        raise _SkipRow(str(bad)) from None
    kwargs = _SUITE_BUILDERS[man.suite](man, values, meta)
    return Sample(id=sid, suite=man.suite, split=split, question=str(values["question"]), image=values["image"],
                  meta=meta, **kwargs)


def _sqa_fields(man: Manifest, v: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """ScienceQA: choices list, answer index -> letter, hint -> context."""
    choices = [str(c) for c in v.get("choices") or []]
    answer = v.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise _SkipRow(f"invalid field: answer index {answer!r} for {len(choices)} choices")
    meta["answer_index"] = answer
    return {"answer": option_letter(answer), "choices": choices, "context": str(v.get("context") or "")}


def _vizwiz_fields(man: Manifest, v: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """VizWiz: the annotator answers, their majority answer, and answerability."""
    answers = [str(a) for a in v.get("answers") or []]
    if not answers and meta.get("unlabelled"):  # test-dev: answers withheld, the item is predicted, not scored
        return {"answers": [], "answer": "", "answerable": True}
    if not answers:
        raise _SkipRow("missing field: answers")
    majority = majority_answer(answers)
    meta["n_answers"] = len(answers)
    return {"answers": answers, "answer": majority, "answerable": majority != UNANSWERABLE}


def majority_answer(answers: list[str]) -> str:
    """Most frequent answer after strip/lower-casing; ties go to the answer seen first."""
    norm = [a.strip().lower() for a in answers]
    counts = Counter(norm)
    best = max(counts.values())
    return next(a for a in norm if counts[a] == best)


def _mmvet_fields(man: Manifest, v: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """MM-Vet: ground truth and the capability list (upstream: "ocr,math" string or a list)."""
    caps_raw = v.get("capabilities")
    caps = caps_raw.split(",") if isinstance(caps_raw, str) else list(caps_raw or [])
    caps = [str(c).strip() for c in caps if str(c).strip()]
    if not caps:
        raise _SkipRow("missing field: capability")
    unknown = [c for c in caps if man.labels and c not in man.labels]
    if unknown:
        raise _SkipRow(f"invalid field: capability {unknown} not in {list(man.labels)}")
    return {"answer": str(v["answer"]), "capabilities": caps}


def _llavabench_fields(man: Manifest, v: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """LLaVA-Bench: GPT-4 reference answer and category (conv / detail / complex). The caption (the reviewer's
    ``[Context]``, never shown to the evaluated model) is kept in ``meta["caption"]`` as one string: a list of
    captions is joined with newlines, as LLaVA's ``eval_gpt_review_bench.py`` and lmms-eval join them."""
    category = str(v.get("category") or "")
    if man.labels and category not in man.labels:
        raise _SkipRow(f"invalid field: category {category!r} not in {list(man.labels)}")
    caption = meta.get("caption")
    if isinstance(caption, (list, tuple)):
        meta["caption"] = "\n".join(str(c) for c in caption)
    elif caption is not None:
        meta["caption"] = str(caption)
    return {"answer": str(v["answer"]), "category": category}


_SUITE_BUILDERS: dict[str, Callable[[Manifest, dict[str, Any], dict[str, Any]], dict[str, Any]]] = {
    "sqa": _sqa_fields, "vizwiz": _vizwiz_fields, "mmvet": _mmvet_fields, "llavabench": _llavabench_fields,
}


# --------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------


def rank_rows(num_rows: int, seed: int) -> list[int]:
    """Every row index of a split, ordered by ``sha256(f"{seed}:{row index}")`` (Python-version independent)."""
    return sorted(range(num_rows), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())


def draw_calibration_rows(num_rows: int, n: int, seed: int, split: str = "train") -> list[int]:
    """The first ``n`` rows of :func:`rank_rows`, sorted (a smaller ``n`` gives a subset of a larger one)."""
    if not 0 < n <= num_rows:
        raise ValueError(f"n must be in 1..{num_rows} (rows in {split!r}), got {n}")
    return sorted(rank_rows(num_rows, seed)[:n])


def calibration_num_rows(
    manifest: Manifest | str | Path,
    *,
    data_dir: str | Path | None = None,
    local_files_only: bool = False,
    cache_dir: str | Path | None = None,
    hub_loader: HubLoader | None = None,
) -> int:
    """Number of rows of the manifest's calibration (training) split (read from ``data_dir`` or the hub)."""
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    if man.calibration is None:
        raise ManifestError(f"{man.name}: the manifest has no calibration_split")
    ds, _, _ = _open_split(man.calibration, data_dir, local_files_only, cache_dir, hub_loader)
    return len(ds)


def draw_calibration_ids(
    manifest: Manifest | str | Path,
    n: int,
    seed: int,
    *,
    num_rows: int | None = None,
    data_dir: str | Path | None = None,
    local_files_only: bool = False,
    cache_dir: str | Path | None = None,
    hub_loader: HubLoader | None = None,
) -> list[str]:
    """``n`` ids drawn from the manifest's calibration (training) split, sorted; same inputs, same ids.

    Rows are chosen by :func:`draw_calibration_rows`. The split size is ``num_rows`` if given, else it is
    read from the split itself (``data_dir`` or the hub). Ids use the id column if the manifest maps one,
    else ``<suite>-<split>-<row index>`` as :func:`load_real_suite` does.
    """
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    if man.calibration is None:
        raise ManifestError(f"{man.name}: the manifest has no calibration_split")
    spec = man.calibration
    id_column = man.column_for("id")
    ds = None
    if num_rows is None or id_column is not None:
        ds, _, _ = _open_split(spec, data_dir, local_files_only, cache_dir, hub_loader)
        num_rows = len(ds) if num_rows is None else num_rows
    chosen = draw_calibration_rows(num_rows, n, seed, spec.split)
    width = max(5, len(str(num_rows)))
    if id_column is not None and ds is not None:
        column = ds.select_columns([id_column])
        return sorted(_row_id(man, spec.split, i, column[i], width) for i in chosen)
    return sorted(f"{man.suite}-{spec.split}-{i:0{width}d}" for i in chosen)
