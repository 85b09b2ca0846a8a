"""Synthetic high-resolution questions whose answers are invisible in the view and plain in a zoom.

Each image is a cluttered canvas holding a few thick coloured frames. Inside each frame sit one
(`attribute`) or four (`relative_position`) square patches of two-colour checks. The question names
one frame by its colour, which is easy to find at view scale; the answer is in the checks, which
the view cannot show:

- `attribute`: "What colours are the checks inside the red frame?" -> red and cyan / green and
  magenta / blue and yellow / black and white.
- `relative_position`: the frame holds a 2 x 2 grid of patches, one per colour pair; "Where is the
  red-and-cyan square relative to the blue-and-yellow square?" -> left of it / right of it /
  above it / below it. The two named patches share a row or a column.

Why the view carries no answer, by construction. The canvas side ``C`` is chosen so that the view
(Qwen's smart resize under the view budget) shrinks it by an integer factor ``k = C / shown``.
Each patch is ``grey + d * a(x) * a(y)`` where ``d = c - grey`` for a colour ``c`` whose complement
is ``255 - c`` (so ``grey - d`` is the complement), and ``a`` is ``k``-periodic and antisymmetric
about the middle of its period: ``a = (+1, .., +1, [0], -1, .., -1)`` (the 0 only for odd ``k``).
Patches start on multiples of ``k`` and their sides are multiples of ``k``, so every view pixel is
centred on the same phase of the pattern, and any symmetric resampling filter (box, bilinear,
bicubic, Lanczos; Pillow's nearest too when ``k`` is odd, since it samples the middle phase) weighs
``+1`` and ``-1`` phases equally: the view of a patch is the same grey for every colour pair.
Along a patch edge the other axis still cancels (the pattern is a product), so only the four
corner pixels of a patch can differ, by a few grey levels. A tight crop, enlarged to the view
budget, shows the checks in full colour. Outlines, glyphs or coloured text would leak, so the
answer is never drawn any other way.

The guarantee holds for the view budget the canvas was made for: train with the same
``min_pixels``/``max_pixels``/patch geometry (stored in ``Sample.meta``) or regenerate.

Presets (`SYNTHETIC_PRESETS`; keyword arguments override them):

| preset    | canvas     | view budget (min..max pixels)   | shown | k | target | frames |
|-----------|------------|---------------------------------|-------|---|--------|--------|
| `default` | 2940x2940  | 256*28*28 .. 1280*28*28 (Qwen2.5-VL) | 980 | 3 | 96 px  | 4      |
| `cpu`     | 672x672    | 168*168 .. 224*224              | 224   | 3 | 96 px  | 2      |

The ground-truth box is tight around what must be seen (the patch; for `relative_position` the two
named patches) and each side exceeds one merged patch in the view, so an oracle's zoom is valid.
Images are stored as PNG bytes (about 0.1-1 MB each), decoded on demand by `load_image`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from zoomgym.envs.data.sample import LETTERS, Sample
from zoomgym.envs.geometry import Box
from zoomgym.envs.views import ViewBudget

CATEGORIES = ("attribute", "relative_position")

SYNTHETIC_PRESETS: dict[str, dict[str, int]] = {
    "default": {
        "canvas_size": 2940,
        "view_min_pixels": 256 * 28 * 28,
        "view_max_pixels": 1280 * 28 * 28,
        "target_size": 96,
        "distractors": 3,
        "clutter": 80,
    },
    "cpu": {
        "canvas_size": 672,
        "view_min_pixels": 168 * 168,
        "view_max_pixels": 224 * 224,
        "target_size": 96,
        "distractors": 1,
        "clutter": 12,
    },
}
"""Named settings for `synthetic`; see the module docstring's table."""

# Complementary pairs: each channel of the two colours sums to 255, so their mean is grey 127.5.
COLOUR_PAIRS: dict[str, tuple[int, int, int]] = {
    "red and cyan": (255, 0, 0),
    "green and magenta": (0, 255, 0),
    "blue and yellow": (0, 0, 255),
    "black and white": (0, 0, 0),
}
FRAME_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "blue": (25, 70, 225),
    "green": (20, 160, 60),
    "yellow": (240, 205, 20),
    "orange": (250, 120, 10),
    "purple": (135, 45, 185),
}
RELATIONS = ("left of it", "right of it", "above it", "below it")
OPTION_ORDERS = ("shuffled", "fixed")
"""`synthetic(option_order=...)`: random option order per question, or one fixed order per category."""
GREY = 128  # the pattern's zero phase and the frames' inner margin

# Cells of the 2 x 2 grid as (column, row); for each relation, (cell of P, cell of Q) choices.
_RELATION_CELLS = {
    "left of it": [((0, r), (1, r)) for r in (0, 1)],
    "right of it": [((1, r), (0, r)) for r in (0, 1)],
    "above it": [((c, 0), (c, 1)) for c in (0, 1)],
    "below it": [((c, 1), (c, 0)) for c in (0, 1)],
}


@dataclass(frozen=True)
class _Geometry:
    """Sizes in canvas pixels, all multiples of the view factor ``k``."""

    canvas: int
    k: int
    shown: int
    target: int
    gap: int  # between the patches of a relative_position grid
    margin: int  # grey between a frame and its patches: >= the widest filter radius (Lanczos, 3k)
    thickness: int  # of a frame: 3 view pixels

    def frame_size(self, category: str) -> int:
        inner = self.target if category == "attribute" else 2 * self.target + self.gap
        return inner + 2 * (self.margin + self.thickness)


def _view_factor(canvas: int, budget: ViewBudget) -> tuple[int, int]:
    """``(k, shown)`` when the view shrinks ``canvas`` by an integer ``k >= 2``, else ValueError."""
    shown = budget.shown_size(canvas, canvas)[0]
    if canvas % shown == 0 and canvas // shown >= 2:
        return canvas // shown, shown
    valid = [c for c in range(max(2, canvas - 1500), canvas + 1500) if _is_exact(c, budget)]
    nearest = sorted(valid, key=lambda c: abs(c - canvas))[:3]
    raise ValueError(
        f"Expects canvas_size shrunk by an integer factor >= 2 in the view (so checks average out "
        f"exactly), actual: {canvas} -> {shown} px (factor {canvas / shown:.3f}); nearest valid "
        f"sizes for this budget: {sorted(nearest)}"
    )


def _is_exact(canvas: int, budget: ViewBudget) -> bool:
    shown = budget.shown_size(canvas, canvas)[0]
    return canvas % shown == 0 and canvas // shown >= 2


def _phase_signs(k: int) -> np.ndarray:
    """``a``: k-periodic, antisymmetric about the period's middle: (+1, .., [0], .., -1)."""
    j = np.arange(k)
    return np.sign((k - 1) / 2 - j).astype(np.float32)


def checks(size: int, k: int, colour: tuple[int, int, int]) -> np.ndarray:
    """A ``size x size x 3`` uint8 patch of ``colour`` and its complement (see the module docstring).

    ``pixel(x, y) = 127.5 + a(x) a(y) (colour - 127.5)``, with the zero phase (odd ``k``) at `GREY`.
    """
    a = np.tile(_phase_signs(k), size // k)
    sign = np.outer(a, a)[..., None]  # (size, size, 1)
    delta = np.asarray(colour, np.float32) - 127.5
    patch = np.where(sign == 0, GREY, 127.5 + sign * delta)
    return np.clip(np.rint(patch), 0, 255).astype(np.uint8)


def synthetic(
    n: int,
    seed: int = 0,
    *,
    preset: str = "default",
    canvas_size: int | None = None,
    view_min_pixels: int | None = None,
    view_max_pixels: int | None = None,
    patch_size: int = 14,
    merge_size: int = 2,
    target_size: int | None = None,
    distractors: int | None = None,
    clutter: int | None = None,
    categories: Sequence[str] = CATEGORIES,
    option_order: str = "shuffled",
) -> list[Sample]:
    """Generates ``n`` questions; sample ``i`` depends only on ``(seed, i)`` and the settings.

    Args:
        n: number of samples; categories alternate, and within a category every 4 consecutive
            samples use each answer letter once.
        seed: the same seed gives identical pixels, questions and boxes.
        preset: a key of `SYNTHETIC_PRESETS` supplying the defaults of the arguments below.
        canvas_size: side of the square canvas in pixels; its view must shrink it by an integer
            factor ``k >= 2`` (the error lists valid sizes).
        view_min_pixels, view_max_pixels, patch_size, merge_size: the `ViewBudget` the views are
            made with (must match the env's).
        target_size: side of each checked patch in canvas pixels; a multiple of ``k`` with
            ``target_size / k`` above one merged patch (``patch_size * merge_size``).
        distractors: frames besides the target's, each with its own colour and patches.
        clutter: number of filled shapes and lines scattered around the frames.
        categories: any of ``"attribute"``, ``"relative_position"``.
        option_order: ``"shuffled"``: the wrong options in random order, the correct one at the
            sample's letter; ``"fixed"``: every question of a category lists the same options in the
            same order (``COLOUR_PAIRS`` or ``RELATIONS``), so each answer has one letter and the
            target's colour pair (or relation) is the one at the sample's letter. A fixed order lets
            a tiny model learn "what the crop shows -> letter" without reading the options (the CPU
            quickstart); the view still carries no answer.

    Returns:
        ``list[Sample]`` with PNG-bytes images, 4 options, one ground-truth box each, and ``meta``
        holding the generation settings (``view_factor``, ``view_min_pixels``, ...).
    """
    if preset not in SYNTHETIC_PRESETS:
        raise ValueError(f"Expects preset in {sorted(SYNTHETIC_PRESETS)}, actual: {preset!r}")
    if option_order not in OPTION_ORDERS:
        raise ValueError(f"Expects option_order in {OPTION_ORDERS}, actual: {option_order!r}")
    given = {
        "canvas_size": canvas_size,
        "view_min_pixels": view_min_pixels,
        "view_max_pixels": view_max_pixels,
        "target_size": target_size,
        "distractors": distractors,
        "clutter": clutter,
    }
    settings = {k: SYNTHETIC_PRESETS[preset][k] if v is None else v for k, v in given.items()}
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"Expects n to be an int >= 0, actual: {n!r}")
    categories = tuple(categories)
    unknown = [c for c in categories if c not in CATEGORIES]
    if not categories or unknown:
        raise ValueError(f"Expects categories from {CATEGORIES}, actual: {categories!r}")
    budget = ViewBudget(settings["view_min_pixels"], settings["view_max_pixels"], patch_size, merge_size)
    geometry = _geometry(settings["canvas_size"], settings["target_size"], budget)
    frames = 1 + settings["distractors"]
    room = min(_frame_cells(geometry.frame_size(c), geometry) ** 2 for c in categories)
    if not 1 <= frames <= min(len(FRAME_COLOURS), room):
        raise ValueError(
            f"Expects 0 <= distractors < {min(len(FRAME_COLOURS), room)} (distinct frame colours and "
            f"frames that fit the {geometry.canvas} px canvas), actual: {settings['distractors']!r}"
        )
    meta = {
        "generator": "zoomgym.synthetic",
        "seed": seed,
        "preset": preset,
        **settings,
        "patch_size": patch_size,
        "merge_size": merge_size,
        "view_factor": geometry.k,
        "view_size": geometry.shown,
        "option_order": option_order,
    }
    samples = []
    for i in range(n):
        category = categories[i % len(categories)]
        rank = i // len(categories)  # index among this category's samples
        letter_order = np.random.default_rng([seed, rank // 4, len(categories), 7]).permutation(4)
        answer_index = int(letter_order[rank % 4])
        rng = np.random.default_rng([seed, i])
        samples.append(
            _make_sample(i, seed, category, answer_index, rng, geometry, settings, meta, option_order == "fixed")
        )
    return samples


def _geometry(canvas: int, target: int, budget: ViewBudget) -> _Geometry:
    for name, value in (("canvas_size", canvas), ("target_size", target)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"Expects {name} to be a positive int, actual: {value!r}")
    k, shown = _view_factor(canvas, budget)
    if target % k or target // k <= budget.factor:
        smallest = (budget.factor + 1) * k
        raise ValueError(
            f"Expects target_size to be a multiple of the view factor {k} and above one merged patch "
            f"({budget.factor} px) in the view, i.e. >= {smallest}, actual: {target}"
        )
    gap = max(k, (target // 4) // k * k)
    geometry = _Geometry(canvas, k, shown, target, gap, margin=3 * k, thickness=3 * k)
    if geometry.frame_size("relative_position") + 2 * k > canvas:
        raise ValueError(
            f"Expects canvas_size to hold a frame of {geometry.frame_size('relative_position')} px, "
            f"actual: {canvas}"
        )
    return geometry


def _make_sample(
    index: int,
    seed: int,
    category: str,
    answer_index: int,
    rng: np.random.Generator,
    geometry: _Geometry,
    settings: dict[str, int],
    meta: dict[str, Any],
    fixed_options: bool = False,
) -> Sample:
    frame_names = [str(name) for name in rng.permutation(list(FRAME_COLOURS))][: 1 + settings["distractors"]]
    size = geometry.frame_size(category)
    corners = _place_frames(len(frame_names), size, geometry, rng)
    canvas = _background(geometry.canvas, rng)
    _draw_clutter(canvas, settings["clutter"], corners, size, geometry, rng)
    pairs = list(COLOUR_PAIRS)
    target_boxes: list[Box] = []
    question = ""
    correct = ""
    for frame_index, (name, (fx, fy)) in enumerate(zip(frame_names, corners)):
        _draw_frame(canvas, fx, fy, size, FRAME_COLOURS[name], geometry)
        inner = fx + geometry.thickness + geometry.margin, fy + geometry.thickness + geometry.margin
        is_target = frame_index == 0
        if category == "attribute":
            pair = pairs[int(rng.integers(len(pairs)))]
            if is_target and fixed_options:
                pair = pairs[answer_index]  # drawn above all the same: the other frames stay as shuffled
            _paste(canvas, inner, checks(geometry.target, geometry.k, COLOUR_PAIRS[pair]))
            if is_target:
                correct = pair
                question = f"What colours are the checks inside the {name} frame?"
                target_boxes.append(_box(inner, geometry.target, geometry.target))
        else:
            relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
            if is_target and fixed_options:
                relation = RELATIONS[answer_index]
            cell_p, cell_q = _RELATION_CELLS[relation][int(rng.integers(2))]
            order = rng.permutation(len(pairs))
            cells = [(c, r) for r in (0, 1) for c in (0, 1)]
            for (col, row), pair_index in zip(cells, order):
                step = geometry.target + geometry.gap
                origin = (inner[0] + col * step, inner[1] + row * step)
                _paste(canvas, origin, checks(geometry.target, geometry.k, COLOUR_PAIRS[pairs[pair_index]]))
            if is_target:
                pair_of = {cell: pairs[p] for cell, p in zip(cells, order)}
                correct = relation
                question = (
                    f"Inside the {name} frame there are four checked squares. Where is the "
                    f"{pair_of[cell_p]} checked square relative to the {pair_of[cell_q]} checked square?"
                )
                step = geometry.target + geometry.gap
                p_box = _box(
                    (inner[0] + cell_p[0] * step, inner[1] + cell_p[1] * step),
                    geometry.target,
                    geometry.target,
                )
                q_box = _box(
                    (inner[0] + cell_q[0] * step, inner[1] + cell_q[1] * step),
                    geometry.target,
                    geometry.target,
                )
                target_boxes.append(p_box.union(q_box))
    choices = list(COLOUR_PAIRS) if category == "attribute" else list(RELATIONS)
    others = [choices[j] for j in rng.permutation(len(choices)) if choices[j] != correct]
    options = choices if fixed_options else others[:answer_index] + [correct] + others[answer_index:]
    return Sample(
        id=f"synthetic-{seed}-{index:05d}",
        image=_png(canvas),
        question=question,
        options=tuple(options),
        answer=LETTERS[answer_index],
        category=category,
        boxes=tuple(target_boxes),
        meta={
            **meta,
            "index": index,
            "target_frame": frame_names[0],
            "target_frame_box": (corners[0][0], corners[0][1], corners[0][0] + size, corners[0][1] + size),
        },
    )


def _box(origin: tuple[int, int], width: int, height: int) -> Box:
    return Box(origin[0], origin[1], origin[0] + width, origin[1] + height)


def _frame_cells(size: int, geometry: _Geometry) -> int:
    """Cells per canvas side of the placement grid: each holds one frame plus spacing."""
    return (geometry.canvas - 2 * geometry.k) // (size + 4 * geometry.k)


def _place_frames(
    count: int, size: int, geometry: _Geometry, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Top-left corners (multiples of k) of ``count`` frames in distinct cells of a grid, jittered.

    Cells are ``size + 4k`` wide, so frames never touch; jitter spreads the slack of the canvas.
    """
    k = geometry.k
    cells = _frame_cells(size, geometry)
    cell = (geometry.canvas - 2 * k) // cells // k * k
    slack = (cell - size - 4 * k) // k  # jitter positions, in units of k
    chosen = rng.choice(cells * cells, size=count, replace=False)
    corners = []
    for index in chosen:
        row, col = divmod(int(index), cells)
        jx, jy = (int(v) * k for v in rng.integers(0, slack + 1, size=2))
        corners.append((k + col * cell + 2 * k + jx, k + row * cell + 2 * k + jy))
    return corners


def _background(side: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour field: 6 x 6 random colours upsampled bicubically (compresses well)."""
    coarse = rng.integers(90, 236, size=(6, 6, 3), dtype=np.uint8)
    smooth = Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
    return np.array(smooth)


def _draw_clutter(
    canvas: np.ndarray,
    count: int,
    corners: list[tuple[int, int]],
    size: int,
    geometry: _Geometry,
    rng: np.random.Generator,
) -> None:
    """Filled ellipses, rectangles and lines, kept clear of the frames (hollow shapes would look like frames)."""
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    side = geometry.canvas
    clear = 6 * geometry.k
    placed = 0
    for _ in range(count * 20):
        if placed == count:
            break
        w, h = (int(v) for v in rng.integers(side // 60 + 4, side // 10 + 8, size=2))
        x, y = int(rng.integers(0, side - w)), int(rng.integers(0, side - h))
        if any(
            x < cx + size + clear and cx - clear < x + w and y < cy + size + clear and cy - clear < y + h
            for cx, cy in corners
        ):
            continue
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        elif kind == 1:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        else:
            width = max(1, int(rng.integers(1, max(2, side // 400) + 1)))
            draw.line((x, y, x + w, y + h), fill=colour, width=width)
        placed += 1
    canvas[...] = np.asarray(image)


def _draw_frame(
    canvas: np.ndarray, x: int, y: int, size: int, colour: tuple[int, int, int], geometry: _Geometry
) -> None:
    """A square ring of ``geometry.thickness`` around a grey interior."""
    canvas[y : y + size, x : x + size] = colour
    t = geometry.thickness
    canvas[y + t : y + size - t, x + t : x + size - t] = GREY


def _paste(canvas: np.ndarray, origin: tuple[int, int], patch: np.ndarray) -> None:
    x, y = origin
    canvas[y : y + patch.shape[0], x : x + patch.shape[1]] = patch


def _png(canvas: np.ndarray) -> bytes:
    # Lossless (the checks must survive); level 1 keeps generation fast at a ~10% size cost.
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
