"""Answer matching and the binary reward (plain functions, no state).

The model's answer is the content of its last ``\\boxed{}`` (`envs.actions.extract_boxed`). It counts
as option ``X`` when, after normalisation (case, whitespace, LaTeX ``\\text{}`` wrappers, brackets and
trailing punctuation), it is the letter ``X`` (``"B"``, ``"(b)"``, ``"Option B"``, ``"B. red"``) or the
text of option ``X`` (``"red"``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from zoomgym.envs.data.sample import LETTERS

_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_SPACES = re.compile(r"\s+")
_STRIP = " \t\n.,;:!?'\"`*$"
_LETTER_LEAD = re.compile(r"^(?:(?:option|choice|answer)\s*:?\s*)?[(\[]?([a-z])[)\]]?(?:[.:)]\s*(.*))?$")

MAX_ANSWER_CHARS = 1000
"""Longer boxed contents are not answers; capping keeps matching cheap on adversarial text."""


def normalize_answer(text: str) -> str:
    """Lower case, LaTeX text wrappers removed, whitespace collapsed, outer punctuation stripped.

    >>> normalize_answer("  \\\\text{(B)}. ")
    '(b)'
    """
    text = _LATEX_WRAPPER.sub(r"\1", text)
    text = _SPACES.sub(" ", text).strip(_STRIP).lower()
    return text


def match_answer(raw: str | None, options: Sequence[str]) -> str | None:
    """The letter that the answer ``raw`` names among ``options``, or None.

    >>> match_answer("(c)", ["red", "green", "blue", "white"]), match_answer("Blue", ["red", "blue"])
    ('C', 'B')
    """
    if raw is None or len(raw) > MAX_ANSWER_CHARS:
        return None
    answer = normalize_answer(raw)
    letters = LETTERS[: len(options)].lower()
    texts = [normalize_answer(option) for option in options]
    # The option's own text wins over a letter reading: an option may literally be "a".
    if answer in texts:
        return LETTERS[texts.index(answer)]
    lead = _LETTER_LEAD.match(answer)
    if lead and lead.group(1) in letters:
        index = letters.index(lead.group(1))
        rest = normalize_answer(lead.group(2) or "")
        if not rest or rest == texts[index]:
            return LETTERS[index]
    return None


def answer_reward(answer: str | None, correct: str) -> float:
    """Binary reward: ``1.0`` iff the parsed letter ``answer`` equals the ``correct`` letter."""
    return 1.0 if answer is not None and answer == correct else 0.0
