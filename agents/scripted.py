"""Scripted agents: an oracle that reads the ground truth, a random agent and a replay agent.

They write text exactly as a model would (grounding JSON, ``\\boxed{}``), so they exercise the env's
parser, coordinate frames and crops end to end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from zoomgym.envs.data.sample import LETTERS, Sample
from zoomgym.envs.geometry import Box, Coords, clamp_box, get_frame, grow_box
from zoomgym.envs.spaces import Chat, count_crops, last_view
from zoomgym.envs.views import ViewInfo


def view_factor(view: ViewInfo) -> float:
    """Shown pixels per visual token side, ``sqrt(w * h / visual_tokens)`` (28 for Qwen2.5-VL)."""
    w, h = view.shown_size
    return math.sqrt(w * h / view.visual_tokens)


def format_box(box_shown: Box, frame: str, shown_size: tuple[int, int], label: str = "key area") -> str:
    """A box in shown pixels as Qwen2.5-VL grounding JSON in ``frame``, rounded *outwards*.

    Frames whose full image spans at least 100 units (``qwen25`` pixels, ``norm1000``) get integers;
    finer frames (``relative``) get four decimals. Rounding outwards keeps the target inside the box.

    >>> format_box(Box(10.2, 20.7, 30.1, 40.0), "norm1000", (100, 100))
    '```json\\n[{"bbox_2d": [102, 207, 301, 400], "label": "key area"}]\\n```'
    """
    converter = get_frame(frame)
    coords = converter.from_shown(box_shown.as_tuple(), shown_size)
    full = converter.from_shown((0.0, 0.0, float(shown_size[0]), float(shown_size[1])), shown_size)
    decimals = 0 if min(full[2], full[3]) >= 100 else 4
    values = _round_outwards(coords, decimals)
    payload = [{"bbox_2d": values, "label": label}]
    return "```json\n" + json.dumps(payload) + "\n```"


def _round_outwards(coords: Coords, decimals: int) -> list[float] | list[int]:
    scale = 10**decimals
    x1, y1, x2, y2 = coords
    # A tiny epsilon keeps exact grid values (e.g. 30.0 from 29.999999999) from moving a whole step.
    eps = 1e-9
    lows = [math.floor(v * scale + eps) / scale for v in (x1, y1)]
    highs = [math.ceil(v * scale - eps) / scale for v in (x2, y2)]
    values = [lows[0], lows[1], highs[0], highs[1]]
    return [int(v) for v in values] if decimals == 0 else values


def answer_text(letter: str) -> str:
    """An answer turn naming ``letter``."""
    return f"The answer is \\boxed{{{letter}}}."


class OracleAgent:
    """Boxes the ground truth and answers right.

    The box is the union of ``info["sample"].boxes`` mapped into the frame of the image shown last,
    grown about its centre to at least ``min_side`` shown pixels (default two visual-token sides) and
    kept inside the image; a sample without boxes gets the whole image. It zooms ``zooms`` times
    when the env allows (``"ground_or_answer"`` turns), then answers ``sample.answer``; on DirectVQA
    it answers straight away.

    >>> OracleAgent().act([[]], [{"next_turn": "answer", "sample": None}])
    Traceback (most recent call last):
    ...
    ValueError: Expects info['sample'] to be a Sample, actual: NoneType
    """

    def __init__(self, zooms: int = 1, min_side: float | None = None) -> None:
        if zooms < 1:
            raise ValueError(f"Expects zooms >= 1, actual: {zooms!r}")
        self.zooms = zooms
        self.min_side = min_side

    def act(self, observations: Sequence[Chat], infos: Sequence[Mapping[str, Any]]) -> list[str]:
        return [self._act_one(chat, info) for chat, info in zip(observations, infos, strict=True)]

    def _act_one(self, chat: Chat, info: Mapping[str, Any]) -> str:
        sample = _sample_of(info)
        kind = info["next_turn"]
        if kind == "answer" or (kind == "ground_or_answer" and count_crops(chat) >= self.zooms):
            return answer_text(sample.answer)
        view = last_view(chat)
        return "The key area is here.\n" + format_box(self.target_in_view(sample, view), info["frame"], view.shown_size)

    def target_in_view(self, sample: Sample, view: ViewInfo) -> Box:
        """The box to write for ``sample`` on ``view``, in its shown pixels."""
        w, h = view.shown_size
        whole = Box(0, 0, w, h)
        if not sample.boxes:
            return whole
        union = sample.boxes[0]
        for box in sample.boxes[1:]:
            union = union.union(box)
        shown = clamp_box(view.from_original(union), w, h) or whole
        min_side = 2 * view_factor(view) if self.min_side is None else self.min_side
        return grow_box(shown, min_side, w, h)


class RandomAgent:
    """Random boxes (uniform corners over the image shown last, so some are invalid) and random
    option letters; in ``"ground_or_answer"`` turns it answers with probability ``p_answer``.

    Accuracy is near chance, ``1 / len(options)``.
    """

    def __init__(self, seed: int | None = None, p_answer: float = 0.5) -> None:
        self.rng = np.random.default_rng(seed)
        self.p_answer = p_answer

    def act(self, observations: Sequence[Chat], infos: Sequence[Mapping[str, Any]]) -> list[str]:
        return [self._act_one(chat, info) for chat, info in zip(observations, infos, strict=True)]

    def _act_one(self, chat: Chat, info: Mapping[str, Any]) -> str:
        sample = _sample_of(info)
        kind = info["next_turn"]
        if kind == "answer" or (kind == "ground_or_answer" and self.rng.random() < self.p_answer):
            return answer_text(LETTERS[int(self.rng.integers(len(sample.options)))])
        view = last_view(chat)
        w, h = view.shown_size
        xs, ys = np.sort(self.rng.uniform(0, w, 2)), np.sort(self.rng.uniform(0, h, 2))
        if xs[0] == xs[1] or ys[0] == ys[1]:
            return "I cannot tell where to look."
        return format_box(Box(xs[0], ys[0], xs[1], ys[1]), info["frame"], view.shown_size, label="somewhere")


class ReplayAgent:
    """Replays fixed texts: action number ``info["turn"]`` of an episode is ``texts[turn]``.

    ``texts`` is one script for every env of the batch, or one script per env (a sequence of
    sequences, indexed by the env's position in the batch).

    >>> ReplayAgent(["[0, 0, 50, 50]", "\\\\boxed{A}"]).act([[]], [{"turn": 1}])
    ['\\\\boxed{A}']
    """

    def __init__(self, texts: Sequence[str] | Sequence[Sequence[str]]) -> None:
        if isinstance(texts, str) or not texts:
            raise ValueError(f"Expects a non-empty sequence of texts, actual: {texts!r}")
        self.per_env = not isinstance(texts[0], str)
        self.texts = [list(t) for t in texts] if self.per_env else [list(texts)]

    def act(self, observations: Sequence[Chat], infos: Sequence[Mapping[str, Any]]) -> list[str]:
        actions = []
        for i, info in enumerate(infos):
            script = self.texts[i] if self.per_env else self.texts[0]
            turn = int(info["turn"])
            if turn >= len(script):
                raise ValueError(f"Expects a script of more than {turn} texts for env {i}, actual: {len(script)}")
            actions.append(script[turn])
        return actions


def _sample_of(info: Mapping[str, Any]) -> Sample:
    sample = info.get("sample")
    if not isinstance(sample, Sample):
        raise ValueError(f"Expects info['sample'] to be a Sample, actual: {type(sample).__name__}")
    return sample
