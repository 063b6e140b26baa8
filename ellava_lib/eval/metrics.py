"""Benchmark metrics for the four suites (ScienceQA-IMG, VizWiz-VQA, MM-Vet, LLaVA-Bench).

Rule-based metrics (``sqa``: option-letter accuracy, ``vizwiz``: VQA accuracy) are computed here;
judge-scored suites (``mmvet``, ``llavabench``) take per-item scores from a :class:`~ellava_lib.eval.judge.Judge`
and are aggregated here. Every headline score is on a 0-100 scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from ellava_lib.core.schema import SUITES, Sample
from ellava_lib.eval.text import extract_option_letter, normalize_vqa_answer

if TYPE_CHECKING:  # pragma: no cover - import for type hints only (judge.py imports this module)
    import pandas as pd

    from ellava_lib.eval.judge import Judge


def sqa_score(pred: str, answer_letter: str, n_choices: int) -> float:
    """ScienceQA item score: 1.0 if ``extract_option_letter(pred) == answer_letter`` (case-insensitive) else 0.0."""
    letter = extract_option_letter(pred, n_choices)
    return 1.0 if letter is not None and letter == answer_letter.strip().upper() else 0.0


def vqa_accuracy(pred: str, gt_answers: list[str]) -> float:
    """VQA accuracy of one prediction against k >= 1 annotator answers (all normalized).

    ``acc = (1/k) * sum_i min(1, #{j != i : gt_j == pred} / 3)``: the mean over the k leave-one-out
    subsets. With 10 answers of which m equal the prediction: m=1 -> 0.3, m=2 -> 0.6, m=3 -> 0.9,
    m>=4 -> 1.0. Computed with exact fractions. Raises ValueError on an empty list.
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    target = normalize_vqa_answer(pred)
    hits = [normalize_vqa_answer(gt) == target for gt in gt_answers]
    total_hits = sum(hits)
    per_subset = [min(Fraction(1), Fraction(total_hits - int(hit), 3)) for hit in hits]
    return float(sum(per_subset) / len(per_subset))


# --------------------------------------------------------------------------------------------------
# MM-Vet and LLaVA-Bench aggregation
# --------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    """Arithmetic mean ``sum(values) / len(values)`` (ValueError when empty)."""
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)


def mmvet_aggregate(scores: list[float], capabilities: list[list[str]]) -> dict[str, float]:
    """MM-Vet report: ``overall = 100 * mean(scores)`` and, for every capability c,
    ``c = 100 * mean(scores[i] for items i tagged with c)``.

    Keys: ``overall`` first, then the capabilities in sorted order. Raises ValueError on empty input or
    mismatched lengths.
    """
    if len(scores) != len(capabilities):
        raise ValueError(f"{len(scores)} scores but {len(capabilities)} capability lists")
    result = {"overall": 100.0 * _mean(scores)}
    for cap in sorted({c for caps in capabilities for c in caps}):
        result[cap] = 100.0 * _mean([s for s, caps in zip(scores, capabilities) if cap in caps])
    return result


def _relative(ref: list[float], ans: list[float]) -> float:
    """``100 * mean(ans) / mean(ref)`` (ValueError when the reference mean is 0)."""
    ref_mean = _mean(ref)
    if ref_mean == 0:
        raise ValueError("mean reference score is 0; relative score undefined")
    return 100.0 * _mean(ans) / ref_mean


def llavabench_relative(
    ref_scores: list[float], ans_scores: list[float], categories: list[str]
) -> dict[str, float]:
    """LLaVA-Bench relative score: ``100 * mean(answer scores) / mean(reference scores)``.

    Keys: ``overall`` (all items) first, then one per category (sorted), each over that category's
    items. Raises ValueError on empty input or mismatched lengths.
    """
    if not len(ref_scores) == len(ans_scores) == len(categories):
        raise ValueError("ref_scores, ans_scores and categories must have the same length")
    result = {"overall": _relative(ref_scores, ans_scores)}
    for cat in sorted(set(categories)):
        idx = [i for i, c in enumerate(categories) if c == cat]
        result[cat] = _relative([ref_scores[i] for i in idx], [ans_scores[i] for i in idx])
    return result


# --------------------------------------------------------------------------------------------------
# Per-suite metric rows
# --------------------------------------------------------------------------------------------------

RULE_JUDGE = "exact"  # judge column value for rule-based suites (sqa, vizwiz)


@dataclass
class MetricRow:
    """One reported number: ``score`` (0-100) of ``metric`` on ``suite`` over ``n`` items, scored by ``judge``."""

    suite: str
    metric: str
    score: float
    n: int
    judge: str


def _group_rows(
    suite: str, item_scores: list[float], groups: list[tuple[str, list[bool]]], judge: str
) -> list[MetricRow]:
    """``overall`` row plus one row per (name, mask) group: ``100 * mean(item scores in group)``.

    Empty groups are skipped.
    """
    rows = [MetricRow(suite, "overall", 100.0 * _mean(item_scores), len(item_scores), judge)]
    for name, mask in groups:
        picked = [s for s, keep in zip(item_scores, mask) if keep]
        if picked:
            rows.append(MetricRow(suite, name, 100.0 * _mean(picked), len(picked), judge))
    return rows


def _category_groups(samples: list[Sample]) -> list[tuple[str, list[bool]]]:
    """One (category, mask) group per non-empty ``sample.category``, sorted by name."""
    cats = sorted({s.category for s in samples if s.category})
    return [(c, [s.category == c for s in samples]) for c in cats]


def _sqa_rows(samples: list[Sample], preds: list[str]) -> list[MetricRow]:
    """sqa: accuracy (%) overall and per category."""
    scores = [sqa_score(p, s.answer, len(s.choices)) for s, p in zip(samples, preds)]
    return _group_rows("sqa", scores, _category_groups(samples), RULE_JUDGE)


def _vizwiz_rows(samples: list[Sample], preds: list[str]) -> list[MetricRow]:
    """vizwiz: VQA accuracy (%) overall, per category, answerable and unanswerable.

    Raises ValueError for an item without annotator answers (``sample.answers``): a single reference
    would score 0 under the leave-one-out rule, so there is no silent fallback.
    """
    missing = [s.id for s in samples if not s.answers]
    if missing:
        raise ValueError(f"vizwiz items without annotator answers: {missing[:5]}")
    scores = [vqa_accuracy(p, s.answers) for s, p in zip(samples, preds)]
    groups = _category_groups(samples) + [
        ("answerable", [s.answerable for s in samples]),
        ("unanswerable", [not s.answerable for s in samples]),
    ]
    return _group_rows("vizwiz", scores, groups, RULE_JUDGE)


def _mmvet_rows(samples: list[Sample], preds: list[str], judge: Judge) -> list[MetricRow]:
    """mmvet: judge score per item, :func:`mmvet_aggregate` overall and per capability."""
    scores = [judge.score_mmvet(s.question, s.answer, p) for s, p in zip(samples, preds)]
    caps = [list(s.capabilities) for s in samples]
    agg = mmvet_aggregate(scores, caps)
    counts = {k: sum(k in c for c in caps) for k in agg if k != "overall"}
    counts["overall"] = len(samples)
    return [MetricRow("mmvet", k, v, counts[k], judge.name) for k, v in agg.items()]


def _llavabench_rows(samples: list[Sample], preds: list[str], judge: Judge) -> list[MetricRow]:
    """llavabench: judge (reference, answer) scores per item, :func:`llavabench_relative` by category."""
    pairs = [judge.score_llavabench(s.question, s.answer, p, s.category) for s, p in zip(samples, preds)]
    cats = [s.category for s in samples]
    rel = llavabench_relative([r for r, _ in pairs], [a for _, a in pairs], cats)
    counts = {k: cats.count(k) for k in rel if k != "overall"}
    counts["overall"] = len(samples)
    return [MetricRow("llavabench", k, v, counts[k], judge.name) for k, v in rel.items()]


def suite_metrics(
    suite: str, samples: list[Sample], preds: list[str], judge: Judge | None = None
) -> list[MetricRow]:
    """Headline (``metric == "overall"``, 0-100) and breakdown rows for one suite.

    sqa: option accuracy overall + per category; vizwiz: VQA accuracy overall + per category +
    answerable/unanswerable; mmvet: judge scores aggregated with :func:`mmvet_aggregate` (metric names are
    capabilities); llavabench: judge scores, :func:`llavabench_relative` per category. The ``judge``
    column is ``"exact"`` for sqa/vizwiz and ``judge.name`` otherwise (a judge is required there).
    Raises ValueError on an unknown suite, empty or mismatched inputs, or a sample of another suite.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    if not samples:
        raise ValueError("no samples")
    if len(samples) != len(preds):
        raise ValueError(f"{len(samples)} samples but {len(preds)} predictions")
    wrong = [s.id for s in samples if s.suite != suite]
    if wrong:
        raise ValueError(f"samples of another suite passed for {suite!r}: {wrong[:5]}")
    if suite == "sqa":
        return _sqa_rows(samples, preds)
    if suite == "vizwiz":
        return _vizwiz_rows(samples, preds)
    if judge is None:
        raise ValueError(f"suite {suite!r} is judge-scored; pass a Judge")
    if suite == "mmvet":
        return _mmvet_rows(samples, preds, judge)
    return _llavabench_rows(samples, preds, judge)


def rows_to_frame(rows: list[MetricRow]) -> pd.DataFrame:
    """A pandas DataFrame with columns ``suite, metric, score, n, judge``, one line per row."""
    import pandas as pd  # local import: pandas is only needed for reporting

    columns = ["suite", "metric", "score", "n", "judge"]
    return pd.DataFrame([[getattr(r, c) for c in columns] for r in rows], columns=columns)
