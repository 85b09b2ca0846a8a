"""The toy base's supervised tasks: general grounding and reading chats on synthetic canvases.

``zoomgym toy-base`` fine-tunes a random tiny model on these two single-turn tasks, so that RL starts
from a model that can write a box and read a close-up, but has never seen the two-turn zoom protocol:

- ``toy_grounding``: the whole canvas (the view) and "Where are the checks inside the red frame? Box
  as JSON." (a few wordings) -> ``[x1, y1, x2, y2]`` in pixels of the image shown: the visual token's
  cell that holds the centre of the named frame's checks, grown by 2 px (so a box of one token is
  valid for the env, whose boxes must exceed one token a side).
- ``toy_reading``: a close-up of the checks, cut from the full-resolution canvas around that cell
  (the crop an accurate box gives, jittered by a few pixels), the question and the options ->
  ``\\boxed{L}``. Half the chats show the overview first; some begin with an unrelated earlier exchange
  and a short intro before the close-up, so reading does not depend on the close-up being the only
  image, as it is not in turn 2 of the zoom protocol.

Both attach the training-only token targets of `ChatExample`: per visual token the frame colour it shows
(0: none), the colour pair of checks it shows (0: none), its row and its column; and, as ``attend``,
the tokens of the answer's cell (grounding) or of the checks in the close-up (reading).

Items come from ``synthetic(preset="cpu", categories=("attribute",), option_order="fixed")``
under the model's view budget (`TOY_SYNTHETIC`); a task's seed picks disjoint canvases, so the toy
base never sees the images RL trains or validates on (seeds 0 and 1 by convention; the toy base
uses seeds from 1000).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from zoomgym.envs.data.chats import ChatExample, register_chat_task
from zoomgym.envs.data.images import load_image, map_in_threads
from zoomgym.envs.data.sample import LETTERS, Sample
from zoomgym.envs.data.synthetic import COLOUR_PAIRS, FRAME_COLOURS, synthetic
from zoomgym.envs.geometry import Box
from zoomgym.envs.views import ViewBudget, make_view

TOY_SYNTHETIC: dict[str, Any] = {"preset": "cpu", "categories": ("attribute",), "option_order": "fixed",
                                 "distractors": 0}
"""`synthetic` settings of the toy tasks and of the toy RL runs: one frame with one checked patch among
the clutter (with distractor frames the 1M model did not learn, in 600 SFT steps, to tie a colour name
to a frame: it wrote valid boxes on a few favourite cells, hit rate 0.04), and one fixed option order,
so a 1M model can answer from what the crop shows without reading the options."""

TOKEN_CLASSES = {"frame": 1 + len(FRAME_COLOURS), "texture": 1 + len(COLOUR_PAIRS), "row": 8, "col": 8}
"""Classes of each token label (0 is "none" for frame and texture; rows and columns past 7 share 7)."""

GROUNDING_WORDINGS = (
    "Where are the checks inside the {colour} frame? Box as JSON.",
    "Box the checks inside the {colour} frame as JSON.",
    "Find the checks in the {colour} frame. Box as JSON.",
    "Which area shows the checks of the {colour} frame? Box as JSON.",
    "Give the box of the checked patch inside the {colour} frame as JSON.",
)
"""Wordings of the grounding request, drawn per chat."""

READING_PROMPT = "{question}\n{choices}\nAnswer in \\boxed{{}}."
"""The reading request (and the toy RL runs' answer turn): question, one ``(L) option`` line each."""

INTROS = ("", "", "Enlarged:", "Close-up:", "Here is the area, enlarged:", "Zoomed in:", "A closer look:")
"""Text before the close-up, drawn per chat ("" puts the close-up first)."""

CELL_MARGIN = 2
"""Shown pixels added around a token's cell in a target box."""

SYSTEM = "You are a helpful assistant."


def choices_text(options: Sequence[str]) -> str:
    """``(A) first`` lines, one per option."""
    return "\n".join(f"({LETTERS[i]}) {option}" for i, option in enumerate(options))


def cell_box(target: Box, scale: float, shown: tuple[int, int], factor: int) -> tuple[int, int, int, int]:
    """The token cell (shown px) holding ``target``'s centre, grown by `CELL_MARGIN` and kept inside
    the image; ``scale`` is original px per shown px."""
    cx, cy = (target.x1 + target.x2) / 2 / scale, (target.y1 + target.y2) / 2 / scale
    column, row = int(cx // factor), int(cy // factor)
    x1, x2 = _grown(column * factor, factor, shown[0])
    y1, y2 = _grown(row * factor, factor, shown[1])
    return x1, y1, x2, y2


def _grown(start: int, factor: int, side: int) -> tuple[int, int]:
    lo, hi = max(0, start - CELL_MARGIN), min(side, start + factor + CELL_MARGIN)
    if hi - lo < factor + CELL_MARGIN:  # at an edge: grow inwards, so the box still exceeds one token
        lo, hi = (0, factor + CELL_MARGIN) if lo == 0 else (side - factor - CELL_MARGIN, side)
    return lo, hi


def _token_cells(region: Box, shown: tuple[int, int], factor: int) -> np.ndarray:
    """``(T, 4)`` boxes in original px of the visual tokens of ``region`` shown at ``shown`` (row-major)."""
    columns, rows = shown[0] // factor, shown[1] // factor
    sx, sy = region.width / shown[0] * factor, region.height / shown[1] * factor
    c, r = np.meshgrid(np.arange(columns), np.arange(rows))
    c, r = c.reshape(-1), r.reshape(-1)
    return np.stack([region.x1 + c * sx, region.y1 + r * sy, region.x1 + (c + 1) * sx, region.y1 + (r + 1) * sy], 1)


def _intersection(cells: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """Per cell, the area it shares with ``box``."""
    w = np.clip(np.minimum(cells[:, 2], box[2]) - np.maximum(cells[:, 0], box[0]), 0, None)
    h = np.clip(np.minimum(cells[:, 3], box[3]) - np.maximum(cells[:, 1], box[1]), 0, None)
    return w * h


def _cell_area(cells: np.ndarray) -> np.ndarray:
    return (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])


def _overlap(cells: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """Per cell, the area it shares with ``box`` over the cell's area."""
    return _intersection(cells, box) / _cell_area(cells)


def token_labels(sample: Sample, region: Box, shown: tuple[int, int], factor: int) -> dict[str, np.ndarray]:
    """Per visual token of ``region`` shown at ``shown``: the frame colour and the checks it mostly
    shows, its row and its column (see `TOKEN_CLASSES`)."""
    cells = _token_cells(region, shown, factor)
    frame = np.zeros(len(cells), np.int64)
    texture = np.zeros(len(cells), np.int64)
    best = np.full(len(cells), 0.15)  # a token shows a frame when it covers more than 15% of it
    colours, pairs = list(FRAME_COLOURS), list(COLOUR_PAIRS)
    for entry in sample.meta["frames"]:
        share = _overlap(cells, entry["box"])
        frame = np.where(share > best, 1 + colours.index(entry["colour"]), frame)
        best = np.maximum(best, share)
        for patch in entry["checks"]:
            texture = np.where(_overlap(cells, patch["box"]) > 0.3, 1 + pairs.index(patch["pair"]), texture)
    columns = shown[0] // factor
    index = np.arange(len(cells))
    return {"frame": frame, "texture": texture, "row": np.minimum(index // columns, 7),
            "col": np.minimum(index % columns, 7)}


def tokens_covering(region: Box, shown: tuple[int, int], factor: int, box: Box, share: float) -> np.ndarray:
    """Per visual token, whether ``box`` covers more than ``share`` of the token (or of the box)."""
    cells = _token_cells(region, shown, factor)
    return _intersection(cells, box.as_tuple()) / np.minimum(_cell_area(cells), box.area) > share


class _Item:
    """One synthetic canvas, its view under the budget and the answer cell."""

    def __init__(self, sample: Sample, budget: ViewBudget) -> None:
        self.sample = sample
        self.budget = budget
        self.image = load_image(sample)
        self.full = Box(0, 0, *self.image.size)
        self.view, _ = make_view(self.image, self.full, budget, sample_id=sample.id, kind="original")
        self.scale = self.image.size[0] / self.view.size[0]
        self.cell = cell_box(sample.boxes[0], self.scale, self.view.size, budget.factor)

    def crop(self, rng: np.random.Generator) -> tuple[Box, Image.Image]:
        """A close-up of the answer cell like one an accurate box gives: half the time shifted or grown
        by up to 3 shown px per side."""
        x1, y1, x2, y2 = self.cell
        if rng.random() < 0.5:
            d = rng.integers(-3, 4, size=4)
            w, h = self.view.size
            x1, y1, x2, y2 = max(0, x1 + d[0]), max(0, y1 + d[1]), min(w, x2 + d[2]), min(h, y2 + d[3])
            f = self.budget.factor
            if x2 - x1 <= f:
                x1, x2 = _grown(x1 + CELL_MARGIN, f, w)
            if y2 - y1 <= f:
                y1, y2 = _grown(y1 + CELL_MARGIN, f, h)
        region = Box(x1 * self.scale, y1 * self.scale, x2 * self.scale, y2 * self.scale)
        crop, _ = make_view(self.image, region, self.budget, sample_id=self.sample.id, kind="crop")
        return region, crop

    def labels(self, region: Box, shown: tuple[int, int]) -> dict[str, np.ndarray]:
        return token_labels(self.sample, region, shown, self.budget.factor)


def _user(*parts: Any) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p}
                                        for p in parts]}


def _box_text(box: Sequence[int]) -> str:
    return f"[{box[0]}, {box[1]}, {box[2]}, {box[3]}]"


Turn = tuple[list[dict[str, Any]], str, list[dict[str, np.ndarray]], list[np.ndarray]]
"""A user message, the reply, and the token labels and attention targets of the message's images."""


def _grounding_turn(item: _Item, rng: np.random.Generator) -> Turn:
    wording = GROUNDING_WORDINGS[int(rng.integers(len(GROUNDING_WORDINGS)))]
    user = _user(item.view, wording.format(colour=item.sample.meta["target_frame"]))
    cell = Box(*(v * item.scale for v in item.cell))
    attend = tokens_covering(item.full, item.view.size, item.budget.factor, cell, 0.5)
    return [user], _box_text(item.cell), [item.labels(item.full, item.view.size)], [attend]


def _reading_turn(item: _Item, rng: np.random.Generator, overview: bool) -> Turn:
    sample = item.sample
    region, crop = item.crop(rng)
    intro = INTROS[int(rng.integers(len(INTROS)))]
    text = READING_PROMPT.format(question=sample.question, choices=choices_text(sample.options))
    parts: list[Any] = ([item.view] if overview else []) + ([intro] if intro else []) + [crop, text]
    labels = ([item.labels(item.full, item.view.size)] if overview else []) + [item.labels(region, crop.size)]
    f = item.budget.factor
    attend = ([np.zeros((item.view.size[0] // f) * (item.view.size[1] // f), bool)] if overview else []) + [
        tokens_covering(region, crop.size, f, sample.boxes[0], 0.2)]
    return [_user(*parts)], f"\\boxed{{{sample.answer}}}", labels, attend


def _items(n: int, seed: int, budget: ViewBudget, start: int = 0) -> list[_Item]:
    samples = synthetic(n, seed, start=start, images="pil", patch_size=budget.patch_size, merge_size=budget.merge_size,
                        view_min_pixels=budget.min_pixels, view_max_pixels=budget.max_pixels, **TOY_SYNTHETIC)
    return map_in_threads(lambda sample: _Item(sample, budget), samples)  # the render and view resizes


def _chat(sample_id: str, category: str, turns: list[Turn]) -> ChatExample:
    """A chat of ``turns``; only the last reply's attention is supervised (an earlier exchange is about
    another canvas, and the loss pulls every reply position toward all of the chat's targets)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    labels: list[dict[str, np.ndarray]] = []
    attend: list[np.ndarray] = []
    for i, (users, reply, turn_labels, turn_attend) in enumerate(turns):
        messages += [*users, {"role": "assistant", "content": reply}]
        labels += turn_labels
        attend += turn_attend if i == len(turns) - 1 else [np.zeros_like(a) for a in turn_attend]
    return ChatExample(f"{category}-{sample_id}", tuple(messages), category, tuple(labels), tuple(attend))


@register_chat_task("toy_grounding", TOKEN_CLASSES)
def toy_grounding(n: int, seed: int, view_budget: ViewBudget) -> list[ChatExample]:
    """``n`` grounding chats (module docstring)."""
    rng = np.random.default_rng([seed, 11])
    return [_chat(item.sample.id, "grounding", [_grounding_turn(item, rng)])
            for item in _items(n, seed, view_budget)]


@register_chat_task("toy_reading", TOKEN_CLASSES)
def toy_reading(n: int, seed: int, view_budget: ViewBudget, *, overview_ratio: float = 0.5,
                history_ratio: float = 0.5) -> list[ChatExample]:
    """``n`` reading chats (module docstring): ``overview_ratio`` of them show the overview before the
    close-up, ``history_ratio`` begin with an unrelated grounding or reading exchange on another canvas."""
    rng = np.random.default_rng([seed, 12])
    items = _items(n, seed, view_budget)
    chats = []
    for i, item in enumerate(items):
        turns: list[Turn] = []
        if rng.random() < history_ratio and n > 1:
            other = items[(i + 1 + int(rng.integers(n - 1))) % n]
            earlier = _grounding_turn(other, rng) if rng.random() < 0.5 else _reading_turn(other, rng, False)
            turns.append(earlier)
        turns.append(_reading_turn(item, rng, bool(rng.random() < overview_ratio)))
        chats.append(_chat(item.sample.id, "reading", turns))
    return chats


@register_chat_task("toy_view_answer")
def toy_view_answer(n: int, seed: int, view_budget: ViewBudget) -> list[ChatExample]:
    """``n`` chats that ask for the answer from the view alone (no close-up): the supervised control of
    ``make reproduce``. The view hides the answer, so no model should beat chance on held-out ones."""
    chats = []
    for item in _items(n, seed, view_budget):
        text = READING_PROMPT.format(question=item.sample.question, choices=choices_text(item.sample.options))
        chats.append(_chat(item.sample.id, "view_answer", [([_user(item.view, text)], f"\\boxed{{{item.sample.answer}}}", [], [])]))
    return chats
