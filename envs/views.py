"""Views: every image the model sees is a region of the original resized to a visual-token budget.

A view is made by cropping the **full-resolution original** at a `Box` region (float edges, no
rounding) and resizing it to ``ViewBudget.shown_size`` in one resampling pass, so small regions are
enlarged and a crop never inherits the blur of an earlier downscaled view.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

from PIL import Image
from zoomgym.envs.cache import IMAGE_CACHE
from zoomgym.envs.geometry import Box, Size, original_to_region, region_to_original

RESAMPLING: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
"""Resampling filters by name: ``"bicubic"`` (default, what Qwen's processor uses), ``"lanczos"``
(sharpest), ``"nearest"`` (parity with the MGPO reference code)."""

MAX_ASPECT_RATIO = 200.0
"""Qwen's smart resize rejects images whose long side exceeds 200x the short side; no shown size does."""


def _has_grid(tokens: int) -> bool:
    """Whether ``tokens = a * b`` for some grid with ``max(a, b) / min(a, b) <= MAX_ASPECT_RATIO``."""
    return any(tokens % a == 0 and tokens // a / a <= MAX_ASPECT_RATIO for a in range(1, math.isqrt(tokens) + 1))


@dataclass(frozen=True)
class ViewBudget:
    """How many pixels (hence visual tokens) an image may cost, and its patch geometry.

    ``factor = patch_size * merge_size`` (28 for Qwen2.5-VL, 14 for a model with merge size 1):
    one visual token per ``factor x factor`` shown pixels.

    >>> budget = ViewBudget()
    >>> budget.factor, budget.shown_size(4000, 3000), budget.visual_tokens(1148, 840)
    (28, (1148, 840), 1230)
    """

    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 1280 * 28 * 28
    patch_size: int = 14
    merge_size: int = 2

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "patch_size", "merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Expects ViewBudget.{name} to be a positive int, actual: {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"Expects ViewBudget.min_pixels <= max_pixels, actual: {self.min_pixels} > {self.max_pixels}"
            )
        if self.max_pixels < self.factor**2:
            raise ValueError(
                f"Expects ViewBudget.max_pixels >= factor**2 = {self.factor**2}, actual: {self.max_pixels}"
            )
        # A shown image is a grid of a x b tokens (aspect <= 200): one such grid must fit the budget.
        tokens = self.factor**2
        counts = range(-(-self.min_pixels // tokens), self.max_pixels // tokens + 1)
        if not any(_has_grid(k) for k in counts):
            raise ValueError(
                f"Expects [min_pixels, max_pixels] to hold a grid of a x b tokens of {self.factor}x{self.factor} "
                f"pixels (a whole number of visual tokens, aspect <= {MAX_ASPECT_RATIO:g}), "
                f"actual: [{self.min_pixels}, {self.max_pixels}]"
            )

    @property
    def factor(self) -> int:
        """Side in shown pixels of one visual token: ``patch_size * merge_size``."""
        return self.patch_size * self.merge_size

    def shown_size(self, width: float, height: float) -> Size:
        """Qwen's smart resize: the ``(w, h)`` an image (or region) of ``width x height`` pixels is shown at.

        Sides are multiples of ``factor`` nearest to the input; if the area exceeds ``max_pixels`` both
        sides shrink by ``beta = sqrt(w*h / max_pixels)`` (rounded down to the factor); if it is below
        ``min_pixels`` both grow by ``beta = sqrt(min_pixels / (w*h))`` (rounded up). The rounding is the
        same as the processor's, so an image already at its shown size is left alone by the processor.

        Every result is a size the processor accepts and leaves alone (a fixed point of its smart
        resize): sides multiples of ``factor``, area in ``[min_pixels, max_pixels]``, aspect at most
        `MAX_ASPECT_RATIO`. Where Qwen's rounding gives anything else, the size is the in-budget one
        whose aspect is closest to the input's (then closest in area). That happens with a tight
        budget (``min = max = 112*112``: 112x84 -> 140x112 -> 112x84 ...; a 201-token budget can only
        hold a 67 x 3 grid of aspect 22), with an extreme aspect that the rounding pushes past 200
        (387x63306, aspect 164, rounds to 56x12796, aspect 228), and with an input of aspect above
        200, which is shown squeezed to aspect 200. So any region of any image can be shown.
        """
        if not (width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)):
            raise ValueError(f"Expects a positive finite image size, actual: {width!r} x {height!r}")
        if max(width, height) / min(width, height) <= MAX_ASPECT_RATIO:
            f = self.factor
            w_bar, h_bar = round(width / f) * f, round(height / f) * f
            if w_bar * h_bar > self.max_pixels:
                beta = math.sqrt(width * height / self.max_pixels)
                w_bar = max(f, math.floor(width / beta / f) * f)
                h_bar = max(f, math.floor(height / beta / f) * f)
            elif w_bar * h_bar < self.min_pixels:
                beta = math.sqrt(self.min_pixels / (width * height))
                w_bar = math.ceil(width * beta / f) * f
                h_bar = math.ceil(height * beta / f) * f
            if self._accepted(w_bar, h_bar):
                return int(w_bar), int(h_bar)
        return self._closest_in_budget(width, height)

    def _accepted(self, width: int, height: int) -> bool:
        """Whether the processor leaves a ``width x height`` image of factor-multiple sides alone."""
        return (
            width > 0 and height > 0 and self.min_pixels <= width * height <= self.max_pixels
            and max(width, height) / min(width, height) <= MAX_ASPECT_RATIO
        )

    def _closest_in_budget(self, width: float, height: float) -> Size:
        """The accepted ``(w, h)`` closest in aspect ratio to ``width x height`` (an aspect beyond
        `MAX_ASPECT_RATIO` counts as that limit), then in area. ``__post_init__`` made sure one exists."""
        f = self.factor
        aspect = min(max(width / height, 1 / MAX_ASPECT_RATIO), MAX_ASPECT_RATIO)
        area = width * height
        best: tuple[tuple[float, float], Size] | None = None
        for h in range(f, self.max_pixels // f + 1, f):
            # Widths that keep the area in budget and the aspect within the limit both ways.
            w_low = max(f, -(-self.min_pixels // h), math.ceil(h / MAX_ASPECT_RATIO))
            w_low = -(-w_low // f) * f
            w_high = min(self.max_pixels // h, math.floor(h * MAX_ASPECT_RATIO)) // f * f
            if w_low > w_high:
                continue
            w = min(max(round(aspect * h / f) * f, w_low), w_high)
            key = (abs(math.log(w / h / aspect)), abs(w * h - area))
            if best is None or key < best[0]:
                best = (key, (w, h))
        assert best is not None, "ViewBudget.__post_init__ checks that an accepted size exists"
        return best[1]

    def grid_thw(self, width: int, height: int) -> tuple[int, int, int]:
        """The processor's ``image_grid_thw`` for a shown image: ``(1, h / patch, w / patch)``."""
        return (1, height // self.patch_size, width // self.patch_size)

    def visual_tokens(self, width: int, height: int) -> int:
        """Tokens a shown image costs in the LLM: ``(w / factor) * (h / factor)``."""
        return (width // self.factor) * (height // self.factor)


@dataclass(frozen=True)
class ViewInfo:
    """Provenance of one image in an observation.

    Attributes:
        sample_id: the `Sample` the image comes from.
        region: the part of the original shown, in original pixels.
        shown_size: ``(w, h)`` of the image as shown (already resized; processors must not resize).
        visual_tokens: tokens it costs, ``(w / factor) * (h / factor)``.
        grid_thw: the processor's ``(t, h, w)`` patch grid.
        kind: ``"original"`` (the whole image) or ``"crop"``.
    """

    sample_id: str
    region: Box
    shown_size: Size
    visual_tokens: int
    grid_thw: tuple[int, int, int]
    kind: str

    def to_original(self, box_shown: Box) -> Box:
        """A box in this view's shown pixels -> original pixels (see `region_to_original`)."""
        return region_to_original(box_shown, self.region, self.shown_size)

    def from_original(self, box: Box) -> Box:
        """A box in original pixels -> this view's shown pixels."""
        return original_to_region(box, self.region, self.shown_size)


def make_view(
    original: Image.Image,
    region: Box,
    budget: ViewBudget,
    *,
    sample_id: str,
    kind: str,
    resample: str = "bicubic",
    source_box: tuple[float, float, float, float] | None = None,
) -> tuple[Image.Image, ViewInfo]:
    """Crops ``region`` from the full-resolution ``original`` and resizes it to the budget.

    One ``Image.resize(size, filter, box=region)`` call does both, with sub-pixel region edges, so the
    mapping ``ViewInfo.to_original`` is exact for the image returned.

    Args:
        original: the image to cut from; normally the full-resolution original.
        region: the part of the original to show, in original pixels.
        budget: the view budget that sets the shown size.
        sample_id: names the sample in provenance and errors.
        kind: ``"original"`` or ``"crop"``.
        resample: a name from `RESAMPLING`.
        source_box: where ``region`` lies in ``original`` when ``original`` is a reduced decode
            (JPEG draft) rather than the full-resolution image; defaults to ``region`` itself.

    Returns:
        ``(image, info)``: the RGB image at ``info.shown_size`` and its provenance.
    """
    if resample not in RESAMPLING:
        raise ValueError(f"Expects resample in {sorted(RESAMPLING)}, actual: {resample!r}")
    box = region.as_tuple() if source_box is None else source_box
    width, height = original.size
    if not (0 <= box[0] and 0 <= box[1] and box[2] <= width and box[3] <= height):
        raise ValueError(
            f"sample {sample_id!r}: expects a region inside the {width}x{height} image, actual: {box}"
        )
    shown = budget.shown_size(region.width, region.height)
    image = _resized(original, box, shown, resample)
    info = ViewInfo(
        sample_id=sample_id,
        region=region,
        shown_size=shown,
        visual_tokens=budget.visual_tokens(*shown),
        grid_thw=budget.grid_thw(*shown),
        kind=kind,
    )
    return image, info


def _resized(original: Image.Image, box: tuple[float, ...], shown: Size, resample: str) -> Image.Image:
    """``original.resize(shown, filter, box=box)`` as RGB, shared through `envs.cache.IMAGE_CACHE`.

    The rollouts of a group share the whole-image view and any crop of the same region instead of
    resampling the original again. A view is charged to the one image budget at its own bytes, and
    its entry holds only a weak reference to ``original``, so a cached view never keeps a decoded
    original alive outside that budget. The key holds ``id(original)``; the weak reference tells the
    live original from a dead one whose id was reused. Returned images are shared: treat them as
    read-only.
    """
    key = ("view", id(original), tuple(box), shown, resample)

    def resize() -> tuple[weakref.ref, Image.Image]:
        image = original.resize(shown, RESAMPLING[resample], box=box)
        return weakref.ref(original), image if image.mode == "RGB" else image.convert("RGB")

    source, image = IMAGE_CACHE.get_or_compute(key, resize)
    if source() is not original:
        IMAGE_CACHE.discard(key)
        source, image = IMAGE_CACHE.get_or_compute(key, resize)
    return image
