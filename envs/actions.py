"""Reading the model's text: grounding boxes and ``\\boxed{}`` answers.

Everything here is total: any string (malformed JSON, NaN, huge numbers, unicode, 100 KB of junk) gives
a defined result and never raises. The patterns are linear-time (no nested quantifiers), JSON is never
evaluated, and numbers go through ``float()``, which saturates to ``inf`` instead of failing.

Grammar accepted for a box, in priority order (the first *valid* box wins, in order of appearance
within a tier):

1. a list after a ``"bbox_2d"`` key, as in Qwen2.5-VL's grounding JSON
   ``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]`` (fenced in ```json or not, extra keys ignored);
2. any bare ``[x1, y1, x2, y2]`` list of four numbers (ints or floats, signs and exponents allowed).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from zoomgym.envs.geometry import Box, Coords, Size, clamp_box, get_frame, safe_box

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_LIST4 = rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]"
_KEYED_BOX = re.compile(r"[\"']bbox_2d[\"']\s*:\s*" + _LIST4)
_BARE_BOX = re.compile(_LIST4)
_BOXED = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"[{}]")

EDGE_TOLERANCE = 1e-6
"""Relative slack at the image edges for float rounding in frame conversions."""

MAX_CANDIDATES = 64
"""Candidate boxes examined per action; bounds the work on text full of lists."""


@dataclass(frozen=True)
class BoxRules:
    """When a box the model wrote is valid; checked in the pixels of the image shown last.

    Attributes:
        min_side: each side must be strictly longer than this many shown pixels; None means one
            merged patch (``ViewBudget.factor``, 28 for Qwen2.5-VL), the reference's rule.
        max_aspect: ``max(w / h, h / w)`` must be strictly below this.
        clamp: clip a box that leaves the image to the image (then check the rest) instead of
            rejecting it (the reference rejects).
        min_region_side: each side must cover at least this many *original* pixels, so crops of
            crops stop before the region is smaller than a pixel.
    """

    min_side: float | None = None
    max_aspect: float = 100.0
    clamp: bool = False
    min_region_side: float = 1.0


def iter_box_candidates(text: str) -> Iterator[Coords]:
    """Four-number lists in ``text``, keyed ``"bbox_2d"`` lists first, each tier in order; at most
    `MAX_CANDIDATES`. Values are floats, possibly ``inf`` (``float()`` saturates) but never NaN."""
    seen = 0
    keyed_spans = set()
    for match in _KEYED_BOX.finditer(text):
        keyed_spans.add(match.start(1))
        yield tuple(float(g) for g in match.groups())  # type: ignore[misc]
        seen += 1
        if seen >= MAX_CANDIDATES:
            return
    for match in _BARE_BOX.finditer(text):
        if match.start(1) in keyed_spans:
            continue
        yield tuple(float(g) for g in match.groups())  # type: ignore[misc]
        seen += 1
        if seen >= MAX_CANDIDATES:
            return


def check_box(box_shown: Box, shown_size: Size, region_scale: tuple[float, float], rules: BoxRules,
              factor: int) -> Box | None:
    """The box to crop (in shown pixels) if ``box_shown`` is valid under ``rules``, else None.

    Args:
        box_shown: the candidate in pixels of the image shown last.
        shown_size: ``(W, H)`` of that image.
        region_scale: original pixels per shown pixel of that image, ``(sx, sy)``.
        rules: the validity rules.
        factor: pixels of one merged patch; the default minimum side.
    """
    width, height = shown_size
    # A box on the edge written in another frame (e.g. 1000 in norm1000) may land a rounding error
    # outside; that is still inside.
    tol = EDGE_TOLERANCE * max(width, height)
    inside = (
        box_shown.x1 >= -tol and box_shown.y1 >= -tol and box_shown.x2 <= width + tol and box_shown.y2 <= height + tol
    )
    if not (inside or rules.clamp):
        return None
    clamped = clamp_box(box_shown, width, height)
    if clamped is None:
        return None
    box_shown = clamped
    min_side = factor if rules.min_side is None else rules.min_side
    w, h = box_shown.width, box_shown.height
    if not (w > min_side and h > min_side):
        return None
    if max(w / h, h / w) >= rules.max_aspect:
        return None
    if min(w * region_scale[0], h * region_scale[1]) < rules.min_region_side:
        return None
    return box_shown


@dataclass(frozen=True)
class BoxReading:
    """What the env learnt from the boxes in one action.

    Attributes:
        box_shown: the box used (the first valid one, clamped if allowed) or, when none is valid, the
            first well-formed candidate for diagnostics; shown pixels; None when there is none.
        valid: whether ``box_shown`` passed the rules.
    """

    box_shown: Box | None
    valid: bool


def read_box(text: str, frame: str, shown_size: Size, region_scale: tuple[float, float],
             rules: BoxRules, factor: int) -> BoxReading:
    """Finds the first valid box in ``text`` written in ``frame`` relative to an image of ``shown_size``.

    >>> read_box('```json\\n[{"bbox_2d": [10, 20, 110, 220], "label": "cat"}]\\n```', "qwen25",
    ...          (448, 448), (1.0, 1.0), BoxRules(), 28)
    BoxReading(box_shown=Box(x1=10.0, y1=20.0, x2=110.0, y2=220.0), valid=True)
    """
    to_shown = get_frame(frame).to_shown
    first_formed: Box | None = None
    for coords in iter_box_candidates(text):
        candidate = safe_box(to_shown(coords, shown_size))
        if candidate is None:
            continue
        first_formed = first_formed or candidate
        accepted = check_box(candidate, shown_size, region_scale, rules, factor)
        if accepted is not None:
            return BoxReading(accepted, True)
    return BoxReading(first_formed, False)


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` whose braces balance, or None.

    One pass pairs every brace (a stack), so unbalanced input stays linear-time.

    >>> extract_boxed(r"so \\boxed{A} ... final: \\boxed{\\text{B}}")
    '\\\\text{B}'
    """
    closing: dict[int, int] = {}
    stack: list[int] = []
    for match in _BRACE.finditer(text):
        if match.group() == "{":
            stack.append(match.start())
        elif stack:
            closing[stack.pop()] = match.start()
    for match in reversed(list(_BOXED.finditer(text))):
        start = match.end() - 1
        if start in closing:
            return text[start + 1 : closing[start]]
    return None
