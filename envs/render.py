"""Drawing an episode: the original with every predicted box, the crops beside it, the episode in words.

`episode_text` is an episode told in words (the question, the model's text per turn and what the env
made of it, the parsed answer, the truth, the reward); `render_episode` draws it under the images with
a legend of the box colours. The trainer writes the same text to TensorBoard and ``samples.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from zoomgym.envs.data.sample import LETTERS, Sample
from zoomgym.envs.geometry import Box
from zoomgym.envs.views import ViewInfo

VALID_COLOUR = (0, 200, 0)
INVALID_COLOUR = (230, 0, 0)
TRUTH_COLOUR = (0, 120, 255)
LEGEND = ((TRUTH_COLOUR, "ground truth"), (VALID_COLOUR, "model box (n = turn)"), (INVALID_COLOUR, "invalid box"))
TEXT_COLOUR = (0, 0, 0)
MAX_ACTION_CHARS = 300
"""A turn's text is cut after this many characters in `episode_text` (the rest is counted)."""


def episode_text(sample: Sample, actions: Sequence[str], infos: Sequence[Mapping[str, Any]], reward: float) -> str:
    """What happened in an episode, one line each: the sample and its question, its choices, per turn
    the model's text (JSON-quoted, cut after `MAX_ACTION_CHARS`) and what the env made of it, then the
    parsed answer, the truth and the reward.

    Args:
        sample: the episode's sample.
        actions: the model's text of each turn.
        infos: the env's infos, ``infos[0]`` from ``reset`` and ``infos[k]`` after turn ``k``.
        reward: the episode's reward.
    """
    lines = [f"sample {sample.id}: {sample.question}"]
    if sample.options:
        lines.append("choices: " + "  ".join(f"({LETTERS[i]}) {text}" for i, text in enumerate(sample.options)))
    for turn, (action, info) in enumerate(zip(actions, infos[1:]), start=1):
        quoted = json.dumps(action, ensure_ascii=False)
        if len(quoted) > MAX_ACTION_CHARS:
            quoted = f"{quoted[:MAX_ACTION_CHARS]}... ({len(quoted) - MAX_ACTION_CHARS} more characters)"
        lines.append(f"turn {turn} model: {quoted}")
        lines.append(f"turn {turn} env: {_outcome(info)}")
    last = infos[-1] if infos else {}
    if last.get("context_truncated"):
        lines.append("ended: the context budget ran out")
    answer = last.get("answer")
    lines.append(f"parsed answer: {answer or 'none'}   truth: {sample.answer}   reward: {reward:g}")
    return "\n".join(lines)


def _outcome(info: Mapping[str, Any]) -> str:
    action = info.get("action")
    if action == "zoom":
        box = info["box_original"]
        return f"zoomed into [{box.x1:.0f}, {box.y1:.0f}, {box.x2:.0f}, {box.y2:.0f}] (original pixels)"
    if action == "answer":
        return f"answer {info['answer']}" if info.get("answer") else "a \\boxed{} answer that is none of the choices"
    if info.get("fallback"):
        return "no valid box: the same image again" + (" (turn limit reached)" if info.get("turn_limit_reached") else "")
    return "no \\boxed{} answer"


def render_episode(
    original: Image.Image,
    original_view: ViewInfo,
    predicted: Sequence[tuple[Box, bool]],
    crops: Sequence[Image.Image],
    truth: Sequence[Box] = (),
    gap: int = 8,
    caption: str = "",
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
        caption: text drawn below the images, under a legend of the colours (e.g. `episode_text`).

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
    width = panel.width + (gap + column_width if column else 0)
    text = _text_block(caption, width, gap) if caption else None
    canvas = Image.new("RGB", (width, height + (text.height if text else 0)), "white")
    canvas.paste(panel, (0, 0))
    top = 0
    for crop in column:
        canvas.paste(crop, (panel.width + gap, top))
        top += crop.height + gap
    if text is not None:
        canvas.paste(text, (0, height))
    return np.asarray(canvas, dtype=np.uint8).copy()


def _text_block(caption: str, width: int, gap: int) -> Image.Image:
    """The legend, then `caption` wrapped to `width` pixels, black on white."""
    font = ImageFont.load_default(size=12)
    line_height = 16
    legend, x, row = [], gap, 0  # a swatch of each box colour and what it means, on as many rows as it needs
    for colour, label in LEGEND:
        item = 14 + int(font.getlength(label))
        if x > gap and x + item > width - gap:
            x, row = gap, row + 1
        legend.append((colour, label, x, row))
        x += item + 12
    wrapped = [piece for text in caption.splitlines() for piece in _wrap(text, font, width - 2 * gap)]
    legend_rows = row + 1
    block = Image.new("RGB", (width, gap + line_height * (legend_rows + len(wrapped)) + gap), "white")
    draw = ImageDraw.Draw(block)
    for colour, label, x, row in legend:
        top = gap + row * line_height
        draw.rectangle((x, top + 3, x + 10, top + 13), outline=colour, width=2)
        draw.text((x + 14, top), label, fill=TEXT_COLOUR, font=font)
    for row, text in enumerate(wrapped, start=legend_rows):
        draw.text((gap, gap + row * line_height), text, fill=TEXT_COLOUR, font=font)
    return block


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """`text` cut into pieces at most `width` pixels wide (at spaces where it can, else anywhere)."""
    pieces, current = [], ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            pieces.append(current)
        while font.getlength(word) > width and len(word) > 1:  # a word wider than the line
            cut = max(1, int(len(word) * width / font.getlength(word)))
            pieces.append(word[:cut])
            word = word[cut:]
        current = word
    return [*pieces, current]


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
