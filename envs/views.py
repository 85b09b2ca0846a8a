"""Views: every image the model sees is a region of the original resized to a visual-token budget.

A view is made by cropping the **full-resolution original** at a `Box` region (float edges, no
rounding) and resizing it to ``ViewBudget.shown_size`` in one resampling pass, so small regions are
enlarged and a crop never inherits the blur of an earlier downscaled view.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image
from zoomgym.envs.geometry import Box, Size, original_to_region, region_to_original

RESAMPLING: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
"""Resampling filters by name: ``"bicubic"`` (default, what Qwen's processor uses), ``"lanczos"``
(sharpest), ``"nearest"`` (parity with the MGPO reference code)."""

VIEW_CACHE_SIZE = 32
"""Resized views kept (about 3 MB each at the default budget): the rollouts of a group share the
whole-image view and any crop of the same region instead of resampling the original again."""

MAX_ASPECT_RATIO = 200.0
"""Qwen's smart resize rejects images whose long side exceeds 200x the short side."""


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
        """Qwen's smart resize: the ``(w, h)`` an image of ``width x height`` pixels is shown at.

        Sides are multiples of ``factor`` nearest to the input; if the area exceeds ``max_pixels`` both
        sides shrink by ``beta = sqrt(w*h / max_pixels)`` (rounded down to the factor); if it is below
        ``min_pixels`` both grow by ``beta = sqrt(min_pixels / (w*h))`` (rounded up). The rounding is the
        same as the processor's, so an image already at its shown size is left alone by the processor.

        With a tight budget (``min_pixels`` close to ``max_pixels``) that rounding can land outside the
        budget, and the processor would then resize the shown image again (e.g. ``min = max = 112*112``:
        112x84 -> 140x112 -> 112x84 ...). Then the size is the in-budget one whose aspect ratio is
        closest to the image's, which the processor leaves alone: every result is a fixed point.
        """
        if not (width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)):
            raise ValueError(f"Expects a positive finite image size, actual: {width!r} x {height!r}")
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            raise ValueError(
                f"Expects an aspect ratio <= {MAX_ASPECT_RATIO:g}, actual: {width!r} x {height!r}"
            )
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
        if not self.min_pixels <= w_bar * h_bar <= self.max_pixels:
            return self._closest_in_budget(width / height, w_bar * h_bar) or (int(w_bar), int(h_bar))
        return int(w_bar), int(h_bar)

    def _closest_in_budget(self, aspect: float, area: float) -> Size | None:
        """The in-budget ``(w, h)`` (multiples of ``factor``, aspect <= 200) closest in aspect ratio,
        then in area; None if the budget holds no such size."""
        f = self.factor
        best: tuple[float, float, Size] | None = None
        for h in range(f, self.max_pixels // f + 1, f):
            w_low = max(f, -(-self.min_pixels // h))
            w_low = -(-w_low // f) * f
            w_high = self.max_pixels // h // f * f
            if w_low > w_high:
                continue
            w = min(max(round(aspect * h / f) * f, w_low), w_high)
            if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
                continue
            key = (abs(math.log(w / h / aspect)), abs(w * h - area), (w, h))
            if best is None or key[:2] < best[:2]:
                best = key
        return None if best is None else best[2]

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


_view_cache: OrderedDict[tuple, tuple[Image.Image, Image.Image]] = OrderedDict()
_view_cache_lock = threading.Lock()


def _resized(original: Image.Image, box: tuple[float, ...], shown: Size, resample: str) -> Image.Image:
    """``original.resize(shown, filter, box=box)`` as RGB, through a small LRU cache.

    The key holds ``id(original)`` and the value holds ``original`` itself, so the id cannot be reused
    by another image while the entry lives. Returned images are shared: treat them as read-only.
    """
    key = (id(original), tuple(box), shown, resample)
    with _view_cache_lock:
        if key in _view_cache:
            _view_cache.move_to_end(key)
            return _view_cache[key][1]
    image = original.resize(shown, RESAMPLING[resample], box=box)
    if image.mode != "RGB":
        image = image.convert("RGB")
    with _view_cache_lock:
        _view_cache[key] = (original, image)
        while len(_view_cache) > VIEW_CACHE_SIZE:
            _view_cache.popitem(last=False)
    return image
