"""Boxes and coordinate frames.

One `Box` type crosses module boundaries: floats in **original-image pixels**, x to the right, y down,
with half-open pixel edges (the single pixel at column 0, row 0 is ``Box(0, 0, 1, 1)``).

A box the model writes is in a *frame* (`FRAMES`) relative to the image shown last. The conversion
happens at one boundary: frame -> shown pixels (``get_frame(name).to_shown``) -> original pixels
(`region_to_original` through the view's region). A `Box` may also hold shown-image pixels
(``info["box_shown"]``); the name of the variable says which.

A frame is one registration: its converters and the sentence that tells the model how to write a box
in it (the env's prompts use it; ``prompts={"frame_rules": {...}}`` may reword it per env)::

    register_frame(Frame("norm100", to_shown=..., from_shown=...,
                         prompt_rule="Write the box as [x1, y1, x2, y2] on a 0 to 100 scale ..."))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from zoomgym.registry import Registry


@dataclass(frozen=True, eq=False)
class Box:
    """An axis-aligned box ``(x1, y1, x2, y2)`` with ``x1 < x2`` and ``y1 < y2``.

    A box also reads as the 4-sequence ``[x1, y1, x2, y2]`` (the format of every benchmark and of
    Qwen's ``bbox_2d``), so ``list(box)``, ``np.asarray(box)`` and ``box == [x1, y1, x2, y2]`` work.

    >>> Box(10, 20, 30, 60).width, Box(10, 20, 30, 60).height
    (20.0, 40.0)
    >>> Box(10, 20, 30, 60) == [10, 20, 30, 60], list(Box(0, 0, 1, 2))
    (True, [0.0, 0.0, 1.0, 2.0])
    """

    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self) -> None:
        values = (self.x1, self.y1, self.x2, self.y2)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError(f"Expects four finite numbers, actual: {values!r}")
        if not (self.x1 < self.x2 and self.y1 < self.y2):
            raise ValueError(f"Expects box with x1 < x2 and y1 < y2, actual: {values!r}")
        for name, v in zip(("x1", "y1", "x2", "y2"), values):
            object.__setattr__(self, name, float(v))

    @classmethod
    def from_xywh(cls, x: float, y: float, w: float, h: float) -> Box:
        """Builds a box from a top-left corner and a size (the V* annotation format)."""
        return cls(x, y, x + w, y + h)

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return self.width * self.height

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    def __iter__(self) -> Iterator[float]:
        return iter(self.as_tuple())

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> float:
        return self.as_tuple()[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Box):
            return self.as_tuple() == other.as_tuple()
        if isinstance(other, (tuple, list)):
            return self.as_tuple() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.as_tuple())

    def intersection(self, other: Box) -> float:
        """Area shared with ``other`` (0 when disjoint)."""
        w = min(self.x2, other.x2) - max(self.x1, other.x1)
        h = min(self.y2, other.y2) - max(self.y1, other.y1)
        return max(w, 0.0) * max(h, 0.0)

    def iou(self, other: Box) -> float:
        """Intersection over union with ``other``, in [0, 1]."""
        inter = self.intersection(other)
        return inter / (self.area + other.area - inter)

    def union(self, other: Box) -> Box:
        """The smallest box holding both."""
        return Box(min(self.x1, other.x1), min(self.y1, other.y1), max(self.x2, other.x2), max(self.y2, other.y2))


# --------------------------------------------------------------------------------------------------
# Coordinate frames: how the model writes a box relative to the image it was shown.
# --------------------------------------------------------------------------------------------------

Coords = tuple[float, float, float, float]
"""``(x1, y1, x2, y2)`` as written in some frame; only used at the frame boundary."""

Size = tuple[int, int]
"""``(width, height)`` of an image in pixels."""


@dataclass(frozen=True)
class Frame:
    """A named coordinate convention, relative to the image shown to the model.

    Both converters are pure and linear in each coordinate:
    ``to_shown(coords, (w, h))`` gives shown-image pixels; ``from_shown`` is its inverse.
    ``prompt_rule`` tells the model how to write a box in this frame; it may use ``{width}`` and
    ``{height}`` of the image shown last (`envs.prompts.PromptTemplates.frame_rule`).
    """

    name: str
    to_shown: Callable[[Coords, Size], Coords]
    from_shown: Callable[[Coords, Size], Coords]
    prompt_rule: str


def _scale(coords: Coords, sx: float, sy: float) -> Coords:
    x1, y1, x2, y2 = coords
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def _identity(coords: Coords, size: Size) -> Coords:
    return tuple(float(v) for v in coords)  # type: ignore[return-value]


def _norm1000_to_shown(coords: Coords, size: Size) -> Coords:
    return _scale(coords, size[0] / 1000.0, size[1] / 1000.0)


def _shown_to_norm1000(coords: Coords, size: Size) -> Coords:
    return _scale(coords, 1000.0 / size[0], 1000.0 / size[1])


def _relative_to_shown(coords: Coords, size: Size) -> Coords:
    return _scale(coords, float(size[0]), float(size[1]))


def _shown_to_relative(coords: Coords, size: Size) -> Coords:
    return _scale(coords, 1.0 / size[0], 1.0 / size[1])


FRAMES: Registry[Frame] = Registry("coordinate frame")
"""Registered frames by name: ``"qwen25"`` (absolute pixels of the smart-resized image shown, the
Qwen2.5-VL convention), ``"norm1000"`` (0..1000 of the image shown, Qwen2-VL/Qwen3-VL) and
``"relative"`` (0..1 of the image shown)."""


def register_frame(frame: Frame) -> Frame:
    """Adds ``frame`` to `FRAMES` under its name; a name may be registered once."""
    return FRAMES.register(frame.name, frame)


register_frame(Frame(
    "qwen25", to_shown=_identity, from_shown=_identity,
    prompt_rule="Write the box as [x1, y1, x2, y2] in pixels of the most recent image, which is {width} pixels "
                "wide and {height} pixels high; x counts from its left edge and y from its top edge.",
))
register_frame(Frame(
    "norm1000", to_shown=_norm1000_to_shown, from_shown=_shown_to_norm1000,
    prompt_rule="Write the box as [x1, y1, x2, y2] on a 0 to 1000 scale of the most recent image: 0 is its left "
                "or top edge and 1000 its right or bottom edge, whatever its size in pixels.",
))
register_frame(Frame(
    "relative", to_shown=_relative_to_shown, from_shown=_shown_to_relative,
    prompt_rule="Write the box as [x1, y1, x2, y2] in fractions from 0 to 1 of the most recent image: 0 is its "
                "left or top edge and 1 its right or bottom edge.",
))


def get_frame(name: str) -> Frame:
    """The registered frame called ``name``; unknown names raise ``ValueError`` with a suggestion."""
    return FRAMES.lookup(name)


def region_to_original(box_shown: Box, region: Box, shown_size: Size) -> Box:
    """Maps a box in the pixels of a view back to original pixels.

    A view shows ``region`` (original pixels) resized to ``shown_size = (W, H)``, so
    ``x_orig = region.x1 + x * region.width / W`` and likewise for y. Applying this once per view
    chains crops of crops back to the original.
    """
    sx, sy = region.width / shown_size[0], region.height / shown_size[1]
    return Box(
        region.x1 + box_shown.x1 * sx,
        region.y1 + box_shown.y1 * sy,
        region.x1 + box_shown.x2 * sx,
        region.y1 + box_shown.y2 * sy,
    )


def original_to_region(box: Box, region: Box, shown_size: Size) -> Box:
    """The inverse of `region_to_original`: original pixels -> pixels of the view of ``region``."""
    sx, sy = shown_size[0] / region.width, shown_size[1] / region.height
    return Box(
        (box.x1 - region.x1) * sx,
        (box.y1 - region.y1) * sy,
        (box.x2 - region.x1) * sx,
        (box.y2 - region.y1) * sy,
    )


def safe_box(coords: Sequence[float]) -> Box | None:
    """``Box(*coords)``, or None when the numbers do not form a box (non-finite, empty, reversed)."""
    try:
        return Box(*coords)
    except (ValueError, TypeError):
        return None


def clamp_box(box: Box, width: float, height: float) -> Box | None:
    """``box`` intersected with ``[0, width] x [0, height]``; None when nothing is left."""
    return safe_box((max(box.x1, 0.0), max(box.y1, 0.0), min(box.x2, width), min(box.y2, height)))


def grow_box(box: Box, min_side: float, width: float, height: float) -> Box:
    """Grows ``box`` about its centre to sides of at least ``min_side``, shifted to stay inside
    ``[0, width] x [0, height]`` (sides are capped at the image's)."""

    def grow(lo: float, hi: float, limit: float) -> tuple[float, float]:
        side = min(max(hi - lo, min_side), limit)
        centre = (lo + hi) / 2.0
        start = min(max(centre - side / 2.0, 0.0), limit - side)
        return start, start + side

    x1, x2 = grow(box.x1, box.x2, width)
    y1, y2 = grow(box.y1, box.y2, height)
    return Box(x1, y1, x2, y2)
