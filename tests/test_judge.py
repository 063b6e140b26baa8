"""Hand-computed cases for ellava_lib.eval.judge.LocalJudge."""

from __future__ import annotations

import pytest

from ellava_lib.eval.judge import Judge, LocalJudge, token_f1


@pytest.fixture
def judge() -> LocalJudge:
    return LocalJudge()


def test_interface() -> None:
    j = LocalJudge()
    assert isinstance(j, Judge)
    assert j.name == "local-v1"
    with pytest.raises(TypeError):
        Judge()  # type: ignore[abstract]


# ---------------------------------------------------------------- MM-Vet


@pytest.mark.parametrize(
    ("gt", "pred", "expected"),
    [
        # plain: equal after normalization
        ("Paris", "paris.", 1.0),
        ("2", "Two", 1.0),
        # plain: whole-word phrase, pred at most 3 words longer ("it is red bus": 4 vs 2 words)
        ("red bus", "It is a red bus.", 1.0),
        # plain: phrase present but pred 9 words longer -> F1 on content tokens
        #   pred content {bus, parked, side, road}, gt {bus}: P=1/4, R=1, F1=0.4 -> 0.0
        ("bus", "It is a bus that is parked by the side of the road", 0.0),
        # plain: F1 = 2*(1*3/4)/(1+3/4) = 6/7 >= 0.5 -> 0.5
        ("red double decker bus", "a red decker bus", 0.5),
        # plain: F1 exactly 0.5 (P = R = 1/2) -> 0.5
        ("red car", "blue car", 0.5),
        # plain: pred {picture, shows, red, bus, parked, near, curb}, gt 4 words, overlap 2:
        #   F1 = 2*(2/7)(1/2)/(2/7+1/2) = 4/11 < 0.5 -> 0.0
        ("red double decker bus", "The picture shows a red bus parked near the curb", 0.0),
        # plain: sub-word is not a whole-word match
        ("cat", "category", 0.0),
        # OR: max over alternatives
        ("2<OR>two", "There are two.", 1.0),
        ("cat<OR>kitten", "kitten", 1.0),
        ("cat<OR>kitten", "dog", 0.0),
        # AND: fraction of parts present as whole words / phrases
        ("apple<AND>banana<AND>cherry", "I see an apple and a banana.", 2 / 3),
        ("apple<AND>banana", "banana, apple", 1.0),
        ("cat<AND>dog", "category of hotdogs", 0.0),
        ("ice cream<AND>cone", "an ice cream", 0.5),
        ("ice cream<AND>cone", "ice and cream", 0.0),
        # OR binds loosest: (cat AND dog) OR pets
        ("cat<AND>dog<OR>pets", "two pets", 1.0),
        ("cat<AND>dog<OR>pets", "a cat", 0.5),
    ],
)
def test_score_mmvet(judge: LocalJudge, gt: str, pred: str, expected: float) -> None:
    assert judge.score_mmvet("q", gt, pred) == pytest.approx(expected)


def test_score_mmvet_range_and_determinism(judge: LocalJudge) -> None:
    cases = [("a<AND>b<AND>c", "a b"), ("yes", "no"), ("x<OR>y", "y")]
    for gt, pred in cases:
        s = judge.score_mmvet("q", gt, pred)
        assert 0.0 <= s <= 1.0
        assert s == LocalJudge().score_mmvet("q", gt, pred)


# ---------------------------------------------------------------- LLaVA-Bench


def test_score_llavabench_hand_case(judge: LocalJudge) -> None:
    # reference -> "cat is sitting on red mat" -> content {cat, sitting, red, mat}
    # answer    -> "cat sits on mat"          -> content {cat, sits, mat}
    # overlap 2: P = 2/3, R = 2/4, F1 = 4/7; 1 + 9*4/7 = 6.142... -> 6.1
    assert judge.score_llavabench("q", "The cat is sitting on the red mat.", "A cat sits on a mat.", "detail") == (
        10.0,
        6.1,
    )


def test_score_llavabench_second_case(judge: LocalJudge) -> None:
    # reference content {2, dogs, play, ball, park}; answer content {2, dogs, playing, park}
    # overlap 3: P = 3/4, R = 3/5, F1 = 2/3; 1 + 9*2/3 = 7.0
    ref = "Two dogs play with a ball in the park."
    ans = "Two dogs are playing in a park."
    assert judge.score_llavabench("q", ref, ans, "conv") == (10.0, 7.0)


def test_score_llavabench_extremes(judge: LocalJudge) -> None:
    text = "A man rides a horse on the beach."
    assert judge.score_llavabench("q", text, text, "conv") == (10.0, 10.0)
    assert judge.score_llavabench("q", text, "Blue sky.", "conv") == (10.0, 1.0)


def test_score_llavabench_multiset(judge: LocalJudge) -> None:
    # ref content [cat, cat, dog], answer [cat]: overlap 1, P = 1, R = 1/3, F1 = 1/2 -> 5.5
    assert judge.score_llavabench("q", "cat cat dog", "cat", "complex") == (10.0, 5.5)


def test_token_f1() -> None:
    assert token_f1([], []) == 1.0
    assert token_f1(["a"], []) == 0.0
    assert token_f1(["x", "y"], ["y", "z"]) == pytest.approx(0.5)
    assert token_f1(["x", "x"], ["x"]) == pytest.approx(2 / 3)  # P = 1/2, R = 1
