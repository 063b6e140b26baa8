"""Hand-computed cases for ellava_lib.eval.metrics."""

from __future__ import annotations

import pytest

from ellava_lib.core.schema import Sample
from ellava_lib.eval.judge import Judge, LocalJudge
from ellava_lib.eval.metrics import (
    MetricRow,
    llavabench_relative,
    mmvet_aggregate,
    rows_to_frame,
    sqa_score,
    suite_metrics,
    vqa_accuracy,
)
from ellava_lib.eval.text import extract_option_letter, normalize_vqa_answer

# ---------------------------------------------------------------- option letters


@pytest.mark.parametrize(
    "pred",
    ["B", "B.", "B)", "(B)", "b", "b.", "B:", "  B  ", "\tB.\n", "The answer is B.", "The answer is B",
     "the answer is b.", "Answer: B", "Answer: (B)", "The correct option is (B).", "B. a blue square",
     "(B) a blue square", "B) a blue square", "I think the answer is B, because it is blue."],
)
def test_extract_option_letter_accepts(pred: str) -> None:
    assert extract_option_letter(pred, 4) == "B"


@pytest.mark.parametrize(
    "pred",
    ["A red circle", "a red circle", "the answer is a red circle", "Blue", "B red", "answer is Blue",
     "", "   ", "E", "(E)", "The answer is E.", "AB", "I don't know"],
)
def test_extract_option_letter_rejects(pred: str) -> None:
    assert extract_option_letter(pred, 4) is None


def test_extract_option_letter_article_vs_label() -> None:
    assert extract_option_letter("A", 3) == "A"
    assert extract_option_letter("A.", 3) == "A"
    assert extract_option_letter("(A) a red circle", 3) == "A"
    assert extract_option_letter("A red circle", 3) is None
    assert extract_option_letter("A red circle. The answer is C.", 3) == "C"


def test_extract_option_letter_respects_n_choices() -> None:
    assert extract_option_letter("C", 2) is None
    assert extract_option_letter("C", 3) == "C"
    assert extract_option_letter("E", 5) == "E"
    with pytest.raises(ValueError):
        extract_option_letter("A", 0)
    with pytest.raises(ValueError):
        extract_option_letter("A", 6)


def test_sqa_score() -> None:
    assert sqa_score("(C)", "C", 4) == 1.0
    assert sqa_score("c", "C", 4) == 1.0
    assert sqa_score("The answer is C.", "c", 4) == 1.0
    assert sqa_score("B", "C", 4) == 0.0
    assert sqa_score("no idea", "C", 4) == 0.0


# ---------------------------------------------------------------- VQA normalization


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("TEN", "10"),
        ("none", "0"),  # official manualMap maps "none" too
        ("the cat.", "cat"),
        ("A dog", "dog"),
        ("an apple", "apple"),
        ("3.5", "3.5"),  # period followed by a digit survives
        ("3.", "3"),
        ("1,000", "1000"),  # digit-comma-digit: every punctuation mark is deleted
        ("Paris, France", "paris france"),  # ", " -> mark deleted
        ("red,blue", "red blue"),  # no space next to it -> mark becomes a space
        ("t-shirt", "t shirt"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("Whats", "what's"),
        ("don't", "don't"),  # apostrophe is not punctuation here
        ("yes!", "yes"),
        ("yes !", "yes"),
        ("Yes?", "yes"),
        ("(red)", "red"),
        ("  left\tside\n", "left side"),
        ("a.b", "ab"),  # period not followed by a digit is deleted, not spaced
        ("12:30", "12:30"),  # colon is not in the punctuation list
        ("", ""),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


# ---------------------------------------------------------------- VQA accuracy


def _answers(n_match: int, total: int = 10) -> list[str]:
    return ["red"] * n_match + ["blue"] * (total - n_match)


@pytest.mark.parametrize(
    ("n_match", "expected"),
    # m matches of 10: (m*min(1,(m-1)/3) + (10-m)*min(1,m/3)) / 10
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_ten_answers(n_match: int, expected: float) -> None:
    assert vqa_accuracy("red", _answers(n_match)) == expected  # exact: computed with fractions


def test_vqa_accuracy_normalizes_both_sides() -> None:
    gts = ["Two", "2", "two.", "three", "3", "3", "3", "3", "3", "3"]
    # pred "2 " normalizes to "2"; 3 of 10 gts normalize to "2" -> 0.9
    assert vqa_accuracy("2 ", gts) == 0.9
    assert vqa_accuracy("The cat.", ["cat"] * 10) == 1.0


def test_vqa_accuracy_other_k() -> None:
    # k=1: the only leave-one-out subset is empty -> 0
    assert vqa_accuracy("yes", ["yes"]) == 0.0
    # k=3, all match: each subset has 2 matches -> 2/3
    assert vqa_accuracy("yes", ["yes", "yes", "yes"]) == pytest.approx(2 / 3)
    # k=5, 4 match: dropping a match leaves 3 -> 1; dropping the other leaves 4 -> 1
    assert vqa_accuracy("yes", ["yes"] * 4 + ["no"]) == 1.0


def test_vqa_accuracy_empty_raises() -> None:
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


# ---------------------------------------------------------------- aggregation


def test_mmvet_aggregate() -> None:
    out = mmvet_aggregate([1.0, 0.5, 0.0, 0.25], [["rec"], ["rec", "ocr"], ["ocr"], ["math"]])
    assert list(out) == ["overall", "math", "ocr", "rec"]
    assert out["overall"] == pytest.approx(43.75)  # 1.75 / 4
    assert out["rec"] == pytest.approx(75.0)
    assert out["ocr"] == pytest.approx(25.0)
    assert out["math"] == pytest.approx(25.0)


def test_mmvet_aggregate_errors() -> None:
    with pytest.raises(ValueError):
        mmvet_aggregate([], [])
    with pytest.raises(ValueError):
        mmvet_aggregate([1.0], [])


def test_llavabench_relative() -> None:
    ref = [8.0, 9.0, 10.0, 7.0]
    ans = [6.0, 9.0, 5.0, 7.0]
    cats = ["conv", "detail", "conv", "complex"]
    out = llavabench_relative(ref, ans, cats)
    assert list(out) == ["overall", "complex", "conv", "detail"]
    assert out["overall"] == pytest.approx(100 * 6.75 / 8.5)  # ratio of means, not mean of ratios
    assert out["conv"] == pytest.approx(100 * 5.5 / 9.0)
    assert out["detail"] == pytest.approx(100.0)
    assert out["complex"] == pytest.approx(100.0)


def test_llavabench_relative_errors() -> None:
    with pytest.raises(ValueError):
        llavabench_relative([1.0], [1.0, 2.0], ["conv"])
    with pytest.raises(ValueError):
        llavabench_relative([0.0], [1.0], ["conv"])


# ---------------------------------------------------------------- suite_metrics


def _rows(rows: list[MetricRow]) -> dict[str, tuple[float, int, str]]:
    return {r.metric: (r.score, r.n, r.judge) for r in rows}


def test_suite_metrics_sqa() -> None:
    mk = lambda i, cat, ans, n: Sample(  # noqa: E731
        id=f"s{i}", suite="sqa", split="test", question="q", answer=ans, image=None,
        choices=[f"opt{k}" for k in range(n)], category=cat,
    )
    samples = [mk(1, "natural", "B", 3), mk(2, "natural", "A", 2), mk(3, "social", "C", 4), mk(4, "social", "D", 4)]
    preds = ["B", "The answer is A.", "A red circle", "(D)"]  # 1, 1, 0, 1
    rows = suite_metrics("sqa", samples, preds, None)
    assert rows[0].metric == "overall"
    assert _rows(rows) == {
        "overall": (75.0, 4, "exact"),
        "natural": (100.0, 2, "exact"),
        "social": (50.0, 2, "exact"),
    }


def test_suite_metrics_vizwiz() -> None:
    samples = [
        Sample(id="v1", suite="vizwiz", split="val", question="q", answer="blue", category="color",
               answers=["red"] * 2 + ["blue"] * 8),
        Sample(id="v2", suite="vizwiz", split="val", question="q", answer="gray", category="color",
               answers=["white"] * 3 + ["gray"] * 7),
        Sample(id="v3", suite="vizwiz", split="val", question="q", answer="unanswerable", category="other",
               answers=["unanswerable"] * 10, answerable=False),
    ]
    preds = ["Red.", "white", "unanswerable"]  # 0.6, 0.9, 1.0
    rows = _rows(suite_metrics("vizwiz", samples, preds, None))
    assert list(rows) == ["overall", "color", "other", "answerable", "unanswerable"]
    assert rows["overall"][0] == pytest.approx(250 / 3)
    assert rows["color"][:2] == (pytest.approx(75.0), 2)
    assert rows["other"][:2] == (100.0, 1)
    assert rows["answerable"][:2] == (pytest.approx(75.0), 2)
    assert rows["unanswerable"] == (100.0, 1, "exact")


def test_suite_metrics_vizwiz_missing_answers_raises() -> None:
    s = Sample(id="v", suite="vizwiz", split="val", question="q", answer="red")
    with pytest.raises(ValueError):
        suite_metrics("vizwiz", [s], ["red"], None)


def test_suite_metrics_mmvet_local_judge() -> None:
    samples = [
        Sample(id="m1", suite="mmvet", split="test", question="q", answer="cat", capabilities=["rec"]),
        Sample(id="m2", suite="mmvet", split="test", question="q", answer="apple<AND>banana",
               capabilities=["ocr", "rec"]),
        Sample(id="m3", suite="mmvet", split="test", question="q", answer="stop", capabilities=["ocr"]),
    ]
    preds = ["a cat", "an apple", "go"]  # 1.0, 0.5, 0.0
    rows = suite_metrics("mmvet", samples, preds, LocalJudge())
    assert [r.metric for r in rows] == ["overall", "ocr", "rec"]
    assert _rows(rows) == {
        "overall": (50.0, 3, "local-v1"),
        "ocr": (25.0, 2, "local-v1"),
        "rec": (75.0, 2, "local-v1"),
    }


class _StubJudge(Judge):
    """Reference score 8; answer score = float(answer)."""

    name = "stub"

    def score_mmvet(self, question: str, gt: str, pred: str) -> float:
        return 1.0

    def score_llavabench(self, question: str, reference: str, answer: str, category: str, *,
                         context: str = "") -> tuple[float, float]:
        return 8.0, float(answer)


def test_suite_metrics_llavabench() -> None:
    cats = ["conv", "conv", "detail"]
    samples = [
        Sample(id=f"l{i}", suite="llavabench", split="test", question="q", answer="ref", category=c)
        for i, c in enumerate(cats)
    ]
    rows = suite_metrics("llavabench", samples, ["4", "6", "8"], _StubJudge())
    assert _rows(rows) == {
        "overall": (75.0, 3, "stub"),  # mean(4,6,8)/8
        "conv": (62.5, 2, "stub"),  # mean(4,6)/8
        "detail": (100.0, 1, "stub"),
    }


def test_suite_metrics_llavabench_local_judge() -> None:
    s = Sample(id="l", suite="llavabench", split="test", question="q",
               answer="The cat is sitting on the red mat.", category="detail")
    rows = _rows(suite_metrics("llavabench", [s], ["A cat sits on a mat."], LocalJudge()))
    assert rows["overall"] == (pytest.approx(61.0), 1, "local-v1")  # 6.1 / 10


def test_suite_metrics_errors() -> None:
    s = Sample(id="x", suite="sqa", split="test", question="q", answer="A", choices=["a", "b"])
    with pytest.raises(ValueError):
        suite_metrics("nope", [s], ["A"], None)
    with pytest.raises(ValueError):
        suite_metrics("sqa", [s], [], None)
    with pytest.raises(ValueError):
        suite_metrics("sqa", [], [], None)
    with pytest.raises(ValueError):
        suite_metrics("vizwiz", [s], ["A"], None)  # sample of another suite
    m = Sample(id="m", suite="mmvet", split="test", question="q", answer="a", capabilities=["rec"])
    with pytest.raises(ValueError):
        suite_metrics("mmvet", [m], ["a"], None)  # judge required


def test_rows_to_frame() -> None:
    rows = [MetricRow("sqa", "overall", 75.0, 4, "exact"), MetricRow("sqa", "social", 50.0, 2, "exact")]
    frame = rows_to_frame(rows)
    assert list(frame.columns) == ["suite", "metric", "score", "n", "judge", "judge_model", "split"]
    assert frame.shape == (2, 7)
    assert frame.loc[1, "metric"] == "social"
    assert frame.loc[0, "score"] == 75.0
