from __future__ import annotations

import pytest
from zoomgym.envs.rewards import answer_reward, match_answer, normalize_answer

OPTIONS = ("red and cyan", "green and magenta", "blue and yellow", "black and white")


@pytest.mark.parametrize(
    ("raw", "letter"),
    [
        ("A", "A"),
        ("c", "C"),
        (" (B) ", "B"),
        ("[d]", "D"),
        ("B.", "B"),
        ("Option C", "C"),
        ("answer: d", "D"),
        (r"\text{B}", "B"),
        (r"\textbf{(A)}", "A"),
        ("Blue and Yellow", "C"),
        ("  black   and white. ", "D"),
        ("B. green and magenta", "B"),
        ("B) green and magenta", "B"),
    ],
)
def test_letters_and_option_texts_both_count(raw: str, letter: str) -> None:
    assert match_answer(raw, OPTIONS) == letter


@pytest.mark.parametrize(
    "raw",
    [None, "", "E", "AB", "purple", "B. red and cyan", "the answer is probably B", "x" * 5000, "Z)"],
)
def test_unmatched_answers(raw: str | None) -> None:
    assert match_answer(raw, OPTIONS) is None


def test_option_text_wins_over_a_letter_reading() -> None:
    assert match_answer("b", ("a", "b")) == "B"
    assert match_answer("a", ("b", "a")) == "B"


def test_normalize_and_reward() -> None:
    assert normalize_answer("  \\text{Hello}  World!! ") == "hello world"
    assert answer_reward("A", "A") == 1.0
    assert answer_reward("B", "A") == 0.0
    assert answer_reward(None, "A") == 0.0
