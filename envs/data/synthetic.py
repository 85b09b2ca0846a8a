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

The guarantee holds for the view the canvas was made for: the budget in ``Sample.meta`` shows it at
``view_size`` pixels. A budget that shows it at another size may show the answer (the `cpu`
preset's 672 px canvas shown at 448 px instead of 224: its target patches differ from grey by 42
levels on average instead of 0.5), so a ZoomEnv refuses such a sample at reset
(`check_view_budget`); regenerate for that budget instead.

Presets (`SYNTHETIC_PRESETS`; keyword arguments override them):

| preset    | canvas     | view budget (min..max pixels)   | shown | k | target | frames |
|-----------|------------|---------------------------------|-------|---|--------|--------|
| `default` | 2940x2940  | 256*28*28 .. 1280*28*28 (Qwen2.5-VL) | 980 | 3 | 96 px  | 4      |
| `cpu`     | 672x672    | 168*168 .. 224*224              | 224   | 3 | 96 px  | 2      |

The ground-truth box is tight around what must be seen (the patch; for `relative_position` the two
named patches) and each side exceeds one merged patch in the view, so an oracle's zoom is valid.

Images. ``Sample.image`` is a `SyntheticCanvas`: the list of what to draw (a few KB), which
`load_image` renders on first use (about 10 ms for a 672 px canvas) and caches in the shared image
cache, so a set of any size costs next to nothing until its images are shown. ``images="pil"``
renders each image at once instead, for a caller that uses every image once (nothing cached), on a
thread per CPU (`envs.data.images.map_in_threads`: Pillow's bicubic upsampling of the background, about
95% of a render, releases the GIL). Either way an image's bytes depend on its seed and index alone.

``Sample.meta`` holds the generation settings (``generator`` = ``"zoomgym.synthetic"``, ``seed``,
``preset``, ``canvas_size``, ``view_min_pixels``, ``view_max_pixels``, ``patch_size``,
``merge_size``, ``view_factor`` k, ``view_size`` (the shown side), ``target_size``,
``distractors``, ``clutter``, ``option_order``) and what was drawn, in canvas pixels, boxes as
``(x1, y1, x2, y2)`` ints with exclusive ends:

- ``index``: the sample's index ``i``;
- ``target_frame``, ``target_frame_box``: the colour name and box of the frame the question names;
- ``frames``: every frame drawn, the target first: ``{"colour": name (a key of FRAME_COLOURS),
  "box": frame box (outer edge of the ring), "checks": (patch, ...)}`` with one patch per checked
  square, ``{"cell": (column, row), "box": patch box, "pair": a key of COLOUR_PAIRS}``:
  ``attribute`` frames hold one patch, cell ``(0, 0)``; ``relative_position`` frames hold four,
  cells ``(0, 0) (1, 0) (0, 1) (1, 1)`` of their 2 x 2 grid (column 0 left, row 0 top).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from zoomgym.envs.data.images import map_in_threads
from zoomgym.envs.data.sample import LETTERS, RenderedImage, Sample
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
IMAGE_KINDS = ("lazy", "pil")
"""`synthetic(images=...)`: a `SyntheticCanvas` rendered on first use, or the rendered PIL image."""
GREY = 128  # the pattern's zero phase and the frames' inner margin
GENERATOR = "zoomgym.synthetic"
"""``Sample.meta["generator"]`` of every synthetic sample."""

# Cells of the 2 x 2 grid as (column, row); for each relation, (cell of P, cell of Q) choices.
_RELATION_CELLS = {
    "left of it": [((0, r), (1, r)) for r in (0, 1)],
    "right of it": [((1, r), (0, r)) for r in (0, 1)],
    "above it": [((c, 0), (c, 1)) for c in (0, 1)],
    "below it": [((c, 1), (c, 0)) for c in (0, 1)],
}


@dataclasses.dataclass(frozen=True)
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
    start: int = 0,
    images: str = "lazy",
) -> list[Sample]:
    """Generates samples ``start .. start + n - 1``; sample ``i`` depends only on ``(seed, i)`` and the settings.

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
        start: the index of the first sample (ids and contents follow the index), so a stream is
            generated in chunks: ``synthetic(64, seed, start=64 * j, images="pil")``.
        images: ``"lazy"``: each ``Sample.image`` is a `SyntheticCanvas` (a few KB) that
            ``load_image`` renders on first use and caches in the shared image cache; ``"pil"``: the
            rendered RGB PIL image itself, for a caller that uses each image once (a supervised
            fine-tuning stream): nothing is cached, each sample holds ``4 * canvas_size**2`` bytes.
            Both give the same pixels.

    Returns:
        ``list[Sample]`` with 4 options, one ground-truth box each, and ``meta`` holding the
        generation settings and everything drawn (see the module docstring).
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
    for name, value in (("n", n), ("start", start)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"Expects {name} to be an int >= 0, actual: {value!r}")
    if images not in IMAGE_KINDS:
        raise ValueError(f"Expects images in {IMAGE_KINDS}, actual: {images!r}")
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
        "generator": GENERATOR,
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
    for i in range(start, start + n):
        category = categories[i % len(categories)]
        rank = i // len(categories)  # index among this category's samples
        letter_order = np.random.default_rng([seed, rank // 4, len(categories), 7]).permutation(4)
        answer_index = int(letter_order[rank % 4])
        rng = np.random.default_rng([seed, i])
        samples.append(_make_sample(i, seed, category, answer_index, rng, geometry, settings, meta,
                                    option_order == "fixed"))
    if images == "pil":  # the draws are done; each render depends on its canvas alone
        rendered = map_in_threads(lambda sample: sample.image.render(), samples)
        samples = [dataclasses.replace(sample, image=image) for sample, image in zip(samples, rendered)]
    return samples


def budget_made_for(sample: Sample) -> ViewBudget | None:
    """The view budget a synthetic sample was made for (from its ``meta``); None for any other sample."""
    meta = sample.meta
    if meta.get("generator") != GENERATOR:
        return None
    return ViewBudget(meta["view_min_pixels"], meta["view_max_pixels"], meta["patch_size"], meta["merge_size"])


def check_view_budget(sample: Sample, budget: ViewBudget) -> None:
    """Raises ValueError if ``budget`` shows a synthetic sample at another size than it was made for.

    Only the size matters: a budget that shows the canvas at the same size shows the same pixels
    (the patch geometry only sets the token grid), so it hides the answer as well. Any other
    sample passes.
    """
    made_for = budget_made_for(sample)
    if made_for is None:
        return
    side = sample.meta["canvas_size"]
    intended, shown = made_for.shown_size(side, side), budget.shown_size(side, side)
    if shown != intended:
        raise ValueError(
            f"sample {sample.id!r}: expects a view budget that shows its {side}x{side} synthetic canvas at "
            f"{intended[0]}x{intended[1]} px like the budget it was made for, {made_for}, where the checks "
            f"average to grey; actual: {budget} shows it at {shown[0]}x{shown[1]} px, where the view may show "
            f"the answer. Use that budget, regenerate the samples for this one (synthetic(..., "
            f"view_min_pixels={budget.min_pixels}, view_max_pixels={budget.max_pixels}, "
            f"patch_size={budget.patch_size}, merge_size={budget.merge_size}) with a canvas_size it "
            f"shrinks by an integer factor), or pass check_view_budget=False to the env to show it at this "
            f"budget on purpose"
        )


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


@dataclasses.dataclass(frozen=True)
class SyntheticCanvas(RenderedImage):
    """What one synthetic image shows, as a list of drawing steps; `render` paints them in order.

    A few KB per sample (the pixels cost ``4 * side**2`` bytes once rendered). ``load_image``
    renders it on first use and caches the result; equal canvases share one render. Every field
    is in canvas pixels.

    Attributes:
        side: the canvas is ``side x side``.
        background: 6 x 6 x 3 uint8 colours (row-major bytes), upsampled bicubically to the canvas.
        shapes: clutter, drawn over the background: ``("ellipse" | "rectangle", (x1, y1, x2, y2),
            rgb, 0)`` or ``("line", (x1, y1, x2, y2), rgb, width)``.
        frames: ``((x1, y1, x2, y2), rgb)``: a ring of ``thickness`` around a `GREY` interior.
        patches: ``((x, y), rgb)``: a ``target x target`` patch of `checks` of ``rgb`` at (x, y).
        target: side of a patch.
        k: the view factor, the period of the checks.
        thickness: of the frames' rings.
    """

    side: int
    background: bytes
    shapes: tuple[tuple[str, tuple[int, int, int, int], tuple[int, int, int], int], ...]
    frames: tuple[tuple[tuple[int, int, int, int], tuple[int, int, int]], ...]
    patches: tuple[tuple[tuple[int, int], tuple[int, int, int]], ...]
    target: int
    k: int
    thickness: int

    @property
    def size(self) -> tuple[int, int]:
        return (self.side, self.side)

    def describe(self) -> str:
        return f"synthetic {self.side}x{self.side} canvas"

    def render(self) -> Image.Image:
        coarse = np.frombuffer(self.background, np.uint8).reshape(6, 6, 3)
        image = Image.fromarray(coarse, "RGB").resize(self.size, Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for kind, box, colour, width in self.shapes:
            if kind == "ellipse":
                draw.ellipse(box, fill=colour)
            elif kind == "rectangle":
                draw.rectangle(box, fill=colour)
            else:
                draw.line(box, fill=colour, width=width)
        t = self.thickness
        for (x1, y1, x2, y2), colour in self.frames:
            image.paste(colour, (x1, y1, x2, y2))
            image.paste((GREY, GREY, GREY), (x1 + t, y1 + t, x2 - t, y2 - t))
        for origin, colour in self.patches:
            image.paste(_checks_image(self.target, self.k, colour), origin)
        return image


@functools.lru_cache(maxsize=64)
def _checks_image(size: int, k: int, colour: tuple[int, int, int]) -> Image.Image:
    return Image.fromarray(checks(size, k, colour), "RGB")


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
    # The order of the draws from rng is the data set's definition: changing it changes every sample.
    frame_names = [str(name) for name in rng.permutation(list(FRAME_COLOURS))][: 1 + settings["distractors"]]
    size = geometry.frame_size(category)
    corners = _place_frames(len(frame_names), size, geometry, rng)
    background = rng.integers(90, 236, size=(6, 6, 3), dtype=np.uint8).tobytes()
    shapes = _plan_clutter(settings["clutter"], corners, size, geometry, rng)
    frames = []
    question = correct = ""
    for frame_index, (name, (fx, fy)) in enumerate(zip(frame_names, corners)):
        inner = fx + geometry.thickness + geometry.margin, fy + geometry.thickness + geometry.margin
        target = answer_index if frame_index == 0 and fixed_options else None
        if category == "attribute":
            patches, answer_text, wording, asked = _attribute_frame(name, inner, target, geometry, rng)
        else:
            patches, answer_text, wording, asked = _relative_frame(name, inner, target, geometry, rng)
        frames.append({"colour": name, "box": (fx, fy, fx + size, fy + size), "checks": patches})
        if frame_index == 0:
            question, correct, target_box = wording, answer_text, asked
    choices = list(COLOUR_PAIRS) if category == "attribute" else list(RELATIONS)
    others = [choices[j] for j in rng.permutation(len(choices)) if choices[j] != correct]
    options = choices if fixed_options else others[:answer_index] + [correct] + others[answer_index:]
    canvas = SyntheticCanvas(
        side=geometry.canvas,
        background=background,
        shapes=shapes,
        frames=tuple((frame["box"], FRAME_COLOURS[frame["colour"]]) for frame in frames),
        patches=tuple((c["box"][:2], COLOUR_PAIRS[c["pair"]]) for frame in frames for c in frame["checks"]),
        target=geometry.target,
        k=geometry.k,
        thickness=geometry.thickness,
    )
    return Sample(
        id=f"synthetic-{seed}-{index:05d}",
        image=canvas,
        question=question,
        options=tuple(options),
        answer=LETTERS[answer_index],
        category=category,
        boxes=(target_box,),
        meta={
            **meta,
            "index": index,
            "target_frame": frame_names[0],
            "target_frame_box": frames[0]["box"],
            "frames": tuple(frames),
        },
    )


def _checks_entry(cell: tuple[int, int], origin: tuple[int, int], pair: str, geometry: _Geometry) -> dict[str, Any]:
    x, y = origin
    return {"cell": cell, "box": (x, y, x + geometry.target, y + geometry.target), "pair": pair}


def _attribute_frame(
    name: str, inner: tuple[int, int], answer: int | None, geometry: _Geometry, rng: np.random.Generator
) -> tuple[tuple[dict[str, Any], ...], str, str, Box]:
    """One patch: its checks entry, the pair, the question about it and its box.

    ``answer``: the index of the pair to draw (fixed options), else the pair drawn from ``rng``
    (drawn all the same, so the other frames stay as with shuffled options).
    """
    pairs = list(COLOUR_PAIRS)
    pair = pairs[int(rng.integers(len(pairs)))]
    if answer is not None:
        pair = pairs[answer]
    entry = _checks_entry((0, 0), inner, pair, geometry)
    question = f"What colours are the checks inside the {name} frame?"
    return (entry,), pair, question, Box(*entry["box"])


def _relative_frame(
    name: str, inner: tuple[int, int], answer: int | None, geometry: _Geometry, rng: np.random.Generator
) -> tuple[tuple[dict[str, Any], ...], str, str, Box]:
    """A 2 x 2 grid of patches: their checks entries, the relation asked, its question and box
    (the union of the two named patches). ``answer`` as in `_attribute_frame`."""
    pairs = list(COLOUR_PAIRS)
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    if answer is not None:
        relation = RELATIONS[answer]
    cell_p, cell_q = _RELATION_CELLS[relation][int(rng.integers(2))]
    order = rng.permutation(len(pairs))
    step = geometry.target + geometry.gap
    cells = [(c, r) for r in (0, 1) for c in (0, 1)]
    entries = tuple(
        _checks_entry((col, row), (inner[0] + col * step, inner[1] + row * step), pairs[p], geometry)
        for (col, row), p in zip(cells, order)
    )
    by_cell = {entry["cell"]: entry for entry in entries}
    p, q = by_cell[cell_p], by_cell[cell_q]
    question = (
        f"Inside the {name} frame there are four checked squares. Where is the "
        f"{p['pair']} checked square relative to the {q['pair']} checked square?"
    )
    return entries, relation, question, Box(*p["box"]).union(Box(*q["box"]))


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


def _plan_clutter(
    count: int,
    corners: list[tuple[int, int]],
    size: int,
    geometry: _Geometry,
    rng: np.random.Generator,
) -> tuple[tuple[str, tuple[int, int, int, int], tuple[int, int, int], int], ...]:
    """Filled ellipses, rectangles and lines, kept clear of the frames (hollow shapes would look like frames)."""
    side = geometry.canvas
    clear = 6 * geometry.k
    shapes = []
    for _ in range(count * 20):
        if len(shapes) == count:
            break
        w, h = (int(v) for v in rng.integers(side // 60 + 4, side // 10 + 8, size=2))
        x, y = int(rng.integers(0, side - w)), int(rng.integers(0, side - h))
        if any(
            x < cx + size + clear and cx - clear < x + w and y < cy + size + clear and cy - clear < y + h
            for cx, cy in corners
        ):
            continue
        red, green, blue = (int(v) for v in rng.integers(0, 256, size=3))
        kind = ("ellipse", "rectangle", "line")[int(rng.integers(3))]
        width = max(1, int(rng.integers(1, max(2, side // 400) + 1))) if kind == "line" else 0
        shapes.append((kind, (x, y, x + w, y + h), (red, green, blue), width))
    return tuple(shapes)
