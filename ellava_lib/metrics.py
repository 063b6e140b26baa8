"""Benchmark metrics for the four suites (ScienceQA-IMG, VizWiz-VQA, MM-Vet, LLaVA-Bench).

Rule-based metrics (``sqa``: option-letter accuracy, ``vizwiz``: VQA accuracy) are computed here;
judge-scored suites (``mmvet``, ``llavabench``) take per-item scores from a :class:`~ellava_lib.judge.Judge`
and are aggregated here. Every headline score is on a 0-100 scale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Callable

from ellava_lib.schema import SUITES, Sample

if TYPE_CHECKING:  # pragma: no cover - import for type hints only (judge.py imports this module)
    import pandas as pd

    from ellava_lib.judge import Judge

# --------------------------------------------------------------------------------------------------
# ScienceQA: option-letter extraction
# --------------------------------------------------------------------------------------------------

_MAX_CHOICES = 5  # ScienceQA items have 2..5 options (A..E)

# The whole (stripped) prediction is a bare label: "B", "b", "B.", "B)", "B:", "(B)".
_BARE_LABEL = re.compile(r"\(([A-Za-z])\)|([A-Za-z])[.:)]?")
# The prediction opens with an upper-case label that carries a delimiter: "B. ...", "B) ...", "(B) ...".
_LEADING_LABEL = re.compile(r"(?:\(([A-Z])\)|([A-Z])[.:)])(?=\s|$)")
# "... answer is B", "Answer: (B)", "the correct option is C." (keyword case-insensitive).
_ANSWER_IS = re.compile(r"(?i:\b(?:answer|option|choice)\s*(?:is|:))\s*\(?([A-Za-z])\)?")


def _valid_letters(n_choices: int) -> str:
    """The option letters of an item with ``n_choices`` options: ``"ABCDE"[:n_choices]``."""
    if not 1 <= n_choices <= _MAX_CHOICES:
        raise ValueError(f"n_choices must be in 1..{_MAX_CHOICES}, got {n_choices}")
    return "ABCDE"[:n_choices]


def _answer_is_letter(text: str) -> str | None:
    """The letter after an "answer is" phrase, or None.

    An upper-case letter counts when no letter/digit follows it ("The answer is B, because ...");
    a lower-case one only when nothing but punctuation/whitespace follows ("the answer is b."), so
    "the answer is a red circle" is not read as option A.
    """
    for match in _ANSWER_IS.finditer(text):
        letter = match.group(1)
        rest = text[match.end():]
        if letter.isupper() and not re.match(r"[A-Za-z0-9]", rest):
            return letter
        if letter.islower() and re.fullmatch(r"[\s.,;:!?)]*", rest):
            return letter.upper()
    return None


def extract_option_letter(pred: str, n_choices: int) -> str | None:
    """The option letter (upper case) a prediction names, or None.

    Rules, tried in order on the stripped prediction; the first one that yields a letter among the
    first ``n_choices`` letters (A..E) wins:

    1. the whole prediction is a label, any case: ``B``, ``b``, ``B.``, ``B)``, ``B:``, ``(B)``;
    2. the prediction opens with an upper-case label that carries a delimiter and is followed by
       whitespace or the end: ``B. red circle``, ``(B) red circle``, ``B) ...``, ``B: ...``;
    3. an "answer is X" / "answer: X" / "option is X" / "choice is X" phrase (see
       :func:`_answer_is_letter` for the case rule).

    A bare leading word is never read as a label, so "A red circle" gives None, while "A", "A."
    and "(A) red circle" give "A". Raises ValueError unless ``1 <= n_choices <= 5``.
    """
    valid = _valid_letters(n_choices)
    text = pred.strip()
    candidates: list[Callable[[str], str | None]] = [
        lambda t: _first_group(_BARE_LABEL.fullmatch(t)),
        lambda t: _first_group(_LEADING_LABEL.match(t)),
        _answer_is_letter,
    ]
    for rule in candidates:
        letter = rule(text)
        if letter is not None and letter.upper() in valid:
            return letter.upper()
    return None


def _first_group(match: re.Match[str] | None) -> str | None:
    """The first non-empty capture group of ``match`` (None when there is no match)."""
    if match is None:
        return None
    return next((g for g in match.groups() if g), None)


def sqa_score(pred: str, answer_letter: str, n_choices: int) -> float:
    """ScienceQA item score: 1.0 if ``extract_option_letter(pred) == answer_letter`` (case-insensitive) else 0.0."""
    letter = extract_option_letter(pred, n_choices)
    return 1.0 if letter is not None and letter == answer_letter.strip().upper() else 0.0


# --------------------------------------------------------------------------------------------------
# VizWiz / VQA: official answer normalization and accuracy
# --------------------------------------------------------------------------------------------------

# Constants of the official VQA / VizWiz evaluation (vqaEval.py). The contractions map uses straight
# apostrophes (as in the VQA-Challenge / EvalAI release); some older copies carry typographic ones.
# Keys with a capital "I" are kept for fidelity although the lookup runs on lower-cased words.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
# Official manualMap: note that "none" also maps to "0".
_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# VizWiz / VQA v2 punctuation list (no period, apostrophe or colon: those are kept or handled apart).
_PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)
# Official regexes, verbatim in behaviour. ``(?!<=\d)`` is a (buggy) lookahead, not a lookbehind, so
# in effect a period is dropped unless a digit follows it: "3.5" keeps it, "3." and "cat." lose it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    """Official ``processPunctuation``.

    For each mark p in the punctuation list: if ``p + " "`` or ``" " + p`` occurs in the *input*, or the
    input contains a digit-comma-digit group, every p is deleted; otherwise every p becomes a space.
    Then periods not followed by a digit are deleted.
    """
    out = text
    strip_all = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, split on whitespace, number words -> digits, drop
    articles, expand contractions, join with single spaces."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(ans: str) -> str:
    """Official VQA/VizWiz answer normalization.

    ``processDigitArticle(processPunctuation(ans.replace("\\n", " ").replace("\\t", " ").strip()))``.
    Examples: "Two" -> "2", "the cat." -> "cat", "3.5" -> "3.5", "1,000" -> "1000", "dont" -> "don't",
    "yes!" -> "yes".
    """
    text = ans.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


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
