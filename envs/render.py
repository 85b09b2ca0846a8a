"""Drawing an episode: the original with every predicted box, and the crops beside it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from zoomgym.envs.geometry import Box
from zoomgym.envs.views import ViewInfo

VALID_COLOUR = (0, 200, 0)
INVALID_COLOUR = (230, 0, 0)
TRUTH_COLOUR = (0, 120, 255)


def render_episode(
    original: Image.Image,
    original_view: ViewInfo,
    predicted: Sequence[tuple[Box, bool]],
    crops: Sequence[Image.Image],
    truth: Sequence[Box] = (),
    gap: int = 8,
) -> np.ndarray:
    """One RGB frame of an episode.

    Args:
        original: the whole image as shown in turn 1 (its view ``original_view``).
        original_view: provenance of ``original``, to map original-pixel boxes onto it.
        predicted: ``(box in original pixels, valid)`` per grounding turn, in order; valid boxes are
            green, invalid ones red, each numbered by turn.
        crops: the crops shown, stacked top to bottom in a column to the right.
        truth: ground-truth boxes (original pixels), drawn in blue.
        gap: white pixels between panels.

    Returns:
        ``(H, W, 3)`` uint8 array.
    """
    panel = original.convert("RGB")  # a copy: the shown image stays untouched
    draw = ImageDraw.Draw(panel)
    line = max(2, round(max(panel.size) / 300))
    for box in truth:
        draw.rectangle(_on_view(box, original_view), outline=TRUTH_COLOUR, width=line)
    for number, (box, valid) in enumerate(predicted, start=1):
        x1, y1, x2, y2 = _on_view(box, original_view)
        colour = VALID_COLOUR if valid else INVALID_COLOUR
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        draw.text((x1 + line + 1, y1 + line + 1), str(number), fill=colour)

    height = panel.height
    column: list[Image.Image] = []
    if crops:
        slot = max(1, (height - gap * (len(crops) - 1)) // len(crops))
        for crop in crops:
            scale = slot / crop.height
            column.append(crop.resize((max(1, round(crop.width * scale)), slot), Image.Resampling.BILINEAR))
    column_width = max((c.width for c in column), default=0)
    canvas = Image.new("RGB", (panel.width + (gap + column_width if column else 0), height), "white")
    canvas.paste(panel, (0, 0))
    top = 0
    for crop in column:
        canvas.paste(crop, (panel.width + gap, top))
        top += crop.height + gap
    return np.asarray(canvas, dtype=np.uint8).copy()


def _on_view(box: Box, view: ViewInfo) -> tuple[float, float, float, float]:
    """``box`` (original pixels) in the pixels of ``view``, clipped to it so PIL can draw it."""
    shown = view.from_original(box)
    w, h = view.shown_size
    return (
        min(max(shown.x1, 0.0), w - 1.0),
        min(max(shown.y1, 0.0), h - 1.0),
        min(max(shown.x2, 0.0), w - 1.0),
        min(max(shown.y2, 0.0), h - 1.0),
    )
