"""Image loading: decode lazily, once per image source, shared by every rollout of a group.

Public API:

- `load_image(sample)`: the full-resolution original as an RGB PIL image, EXIF orientation applied,
  transparency flattened onto white, 16-bit and float images rescaled to 8 bits (not clipped).
  Use it for crops (always crop the full-resolution original).
- `load_view_source(sample, target_size)`: a `ViewSource(image, box, original_size)` for showing
  the *whole* image at ``target_size``. For a JPEG much larger than the target it is decoded with
  libjpeg's DCT scaling (Pillow's ``draft``) at the largest reduction 1/s (s in 1, 2, 4, 8) whose
  result still has at least ``target_size`` pixels on both sides, so the view keeps every pixel it
  can show. ``box`` is the region of ``image`` that covers the original exactly (DCT scaling rounds
  the size up to whole blocks); resize with ``source.image.resize(target_size, resample,
  box=source.box)`` to get exactly the view a full decode would give, up to the decoder's filtering.
- `image_size(sample)`: the original's (width, height) after EXIF orientation, read from the
  header without decoding pixels.
- `ImageLoadError`: raised for a missing, unreadable, corrupt or truncated image; the message names
  the file (or "embedded bytes"; for an `ImageRef` the table file, row and column) and the sample id.

Sources: a path, encoded bytes, a PIL image, or an `ImageRef` (one cell of a parquet/TSV/jsonl
file, read by `envs.data.tables.read_image_ref` only when the image is needed).

Cache. Decoded images live in one process-wide, thread-safe LRU cache keyed by the image source:
a path by (resolved path, mtime, size), encoded bytes by a BLAKE2b digest, a PIL image by its
identity, an `ImageRef` by (table path, its mtime and size when loaded, row, column). The encoded
bytes read through an `ImageRef` are cached too (charged at their length), so the header read, the
draft view and the full decode of one sample read its cell once. Its capacity is a budget of decoded
bytes (width * height * 3 per RGB image), default
1 GiB (about ten 8K images, or a hundred 2940 x 2940 synthetic canvases), set by the environment
variable ``ZOOMGYM_IMAGE_CACHE_MB`` at import or by `set_image_cache_capacity(max_bytes)` at run time;
0 turns caching off (every call decodes). The most recently used image is always kept, even when it
alone exceeds the budget, so a group of rollouts over one huge image still shares one decode.
Concurrent requests for the same source wait for a single decode. Returned images are shared:
treat them as read-only (``crop``/``resize`` return new images).

Decompression-bomb limit. Pillow refuses images above ``2 * Image.MAX_IMAGE_PIXELS`` pixels and
warns above ``MAX_IMAGE_PIXELS``. Importing this module sets ``MAX_IMAGE_PIXELS`` to
`MAX_IMAGE_PIXELS` = 16384 * 16384 (268 MP), which admits 8K (7680 x 4320, 33 MP), 16K and
gigapixel-scale panoramas up to 536 MP, while still stopping a malicious header claiming billions.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import ExifTags, Image
from zoomgym.envs.data.sample import ImageRef, Sample
from zoomgym.envs.data.tables import read_image_ref

MAX_IMAGE_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

DEFAULT_CACHE_BYTES = 1 << 30

# EXIF orientations 5-8 swap width and height.
_SWAPS_AXES = {5, 6, 7, 8}
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_DRAFT_SCALES = (8, 4, 2)
_HIGH_BIT_DEPTH_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


class ImageLoadError(ValueError):
    """A sample's image is missing, unreadable, corrupt or truncated."""


class ViewSource(NamedTuple):
    """What to resize to show the whole image.

    Attributes:
        image: RGB image covering the whole original, possibly DCT-reduced by 1/s.
        box: ``(x1, y1, x2, y2)`` floats, the region of ``image`` that maps onto the whole original
            (``(0, 0, W/s, H/s)`` up to orientation); pass it as ``resize(..., box=box)``.
        original_size: ``(W, H)`` of the full-resolution original after EXIF orientation.
    """

    image: Image.Image
    box: tuple[float, float, float, float]
    original_size: tuple[int, int]


class CacheInfo(NamedTuple):
    """Counters of the image cache: ``decodes`` counts full and draft decodes (cache misses)."""

    hits: int
    decodes: int
    entries: int
    bytes: int
    max_bytes: int


class _LRUCache:
    """Thread-safe LRU of decoded images under a byte budget, with single-flight decoding."""

    def __init__(self, max_bytes: int) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._pending: dict[tuple, Future] = {}
        self._bytes = 0
        self.max_bytes = max_bytes
        self.hits = 0
        self.decodes = 0

    def get_or_decode(self, key: tuple, decode: Any, counts_as_decode: bool = True) -> Any:
        """Returns the cached value for ``key``, else ``decode()`` (run once however many threads ask).

        ``counts_as_decode=False`` marks header reads, which `CacheInfo.decodes` does not count.
        """
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key][0]
            pending = self._pending.get(key)
            if pending is None:
                self.decodes += counts_as_decode
                if self.max_bytes > 0:
                    self._pending[key] = Future()
        if pending is not None:
            # Another thread is decoding this source: share its result (or its error).
            with self._lock:
                self.hits += 1
            return pending.result()
        try:
            value = decode()
        except BaseException as error:
            self._finish(key, error=error)
            raise
        self._finish(key, value=value)
        return value

    def peek(self, key: tuple) -> Any | None:
        """The cached value for ``key`` or None; never decodes."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key][0]
        return None

    def _finish(self, key: tuple, value: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            future = self._pending.pop(key, None)
            if error is None and self.max_bytes > 0:
                size = _nbytes(value)
                self._entries[key] = (value, size)
                self._bytes += size
                self._evict()
        if future is not None:
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)

    def _evict(self) -> None:
        # Keep the newest entry even when it alone is over budget.
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, (_, size) = self._entries.popitem(last=False)
            self._bytes -= size

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = max_bytes
            if max_bytes <= 0:
                self._entries.clear()
                self._bytes = 0
            else:
                self._evict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.hits = 0
            self.decodes = 0

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self.hits, self.decodes, len(self._entries), self._bytes, self.max_bytes)


def _nbytes(value: Any) -> int:
    """Decoded bytes held by a cache value (a ViewSource, an image, or a tuple of such)."""
    if isinstance(value, Image.Image):
        return value.width * value.height * len(value.getbands())
    if isinstance(value, ViewSource):
        return _nbytes(value.image)
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, tuple) and any(isinstance(v, Image.Image) for v in value):
        return sum(_nbytes(v) for v in value if isinstance(v, Image.Image))
    # Header facts (sizes, orientation): charge a nominal footprint so they too stay bounded.
    return 512


def _capacity_from_env() -> int:
    raw = os.environ.get("ZOOMGYM_IMAGE_CACHE_MB")
    if raw is None:
        return DEFAULT_CACHE_BYTES
    try:
        megabytes = float(raw)
    except ValueError:
        raise ValueError(f"Expects ZOOMGYM_IMAGE_CACHE_MB to be a number of MiB, actual: {raw!r}") from None
    return int(megabytes * (1 << 20))


_CACHE = _LRUCache(_capacity_from_env())


def set_image_cache_capacity(max_bytes: int) -> None:
    """Sets the cache budget in decoded bytes (0 disables caching); evicts down to it now."""
    if not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"Expects max_bytes to be an int >= 0, actual: {max_bytes!r}")
    _CACHE.resize(max_bytes)


def clear_image_cache() -> None:
    """Drops every cached image and resets the counters of `image_cache_info`."""
    _CACHE.clear()


def image_cache_info() -> CacheInfo:
    """Hits, decodes, entries, bytes held and the budget of the image cache."""
    return _CACHE.info()


def _describe(sample: Sample) -> str:
    if isinstance(sample.image, (str, Path)):
        return f"file {str(sample.image)!r}"
    if isinstance(sample.image, (bytes, bytearray, memoryview)):
        return "embedded bytes"
    if isinstance(sample.image, ImageRef):
        return sample.image.describe()
    return "in-memory PIL image"


def _fail(sample: Sample, reason: str) -> ImageLoadError:
    return ImageLoadError(
        f"Expects a readable image for sample {sample.id!r}, actual: {_describe(sample)} {reason}"
    )


def _source_key(sample: Sample) -> tuple:
    """The cache key of the sample's image source (see the module docstring)."""
    source = sample.image
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise _fail(sample, "does not exist") from None
        except OSError as error:
            raise _fail(sample, f"cannot be read ({error})") from error
        return ("path", str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return ("bytes", hashlib.blake2b(source, digest_size=16).digest())
    if isinstance(source, Image.Image):
        # The cached value holds the source itself (see `load_image`), so this id cannot be reused
        # by another image while the entry exists.
        return ("pil", id(source))
    if isinstance(source, ImageRef):
        # The table as it was when loaded: `read_image_ref` refuses a file that changed since.
        return ("table", source.path, source.mtime_ns, source.size, source.row, source.column)
    raise TypeError(
        f"Expects sample {sample.id!r} image to be a path, bytes, PIL image or ImageRef, actual: "
        f"{type(source).__name__}"
    )


def _read_ref(sample: Sample) -> bytes:
    """The encoded bytes behind an `ImageRef`, read once and shared through the cache."""

    def read() -> bytes:
        try:
            return read_image_ref(sample.image)
        except FileNotFoundError:
            raise _fail(sample, "does not exist") from None
        except (OSError, ValueError) as error:
            raise _fail(sample, str(error)) from error

    return _CACHE.get_or_decode(_source_key(sample) + ("encoded",), read, counts_as_decode=False)


def _open(sample: Sample) -> Image.Image:
    """Opens (does not decode) the sample's image; errors become `ImageLoadError`."""
    source = _read_ref(sample) if isinstance(sample.image, ImageRef) else sample.image
    try:
        if isinstance(source, (str, Path)):
            return Image.open(source)
        return Image.open(io.BytesIO(bytes(source)))
    except FileNotFoundError:
        raise _fail(sample, "does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _fail(sample, f"is not a decodable image ({error})") from error


def _orientation(image: Image.Image, *, header_only: bool = False) -> int:
    """The EXIF orientation (1-8) of an opened or decoded image.

    With ``header_only`` nothing is decoded: Pillow's PNG ``getexif`` would decode the whole image to
    look for an ``eXIf`` chunk after the pixel data, so only one before it (where the PNG spec puts
    it) is honoured. A decoded image (``load()`` done) sees every ``eXIf``.
    """
    if header_only and image.format == "PNG" and "exif" not in image.info:
        return 1
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return orientation if orientation in _TRANSPOSE_FOR_ORIENTATION else 1


def _finish_decode(sample: Sample, image: Image.Image) -> Image.Image:
    """Decodes pixels, applies EXIF orientation and converts to RGB."""
    try:
        image.load()
        orientation = _orientation(image)
        if orientation != 1:
            image = image.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
        if image.mode in _HIGH_BIT_DEPTH_MODES:
            image = _to_8bit(image)
        if image.mode != "RGB":
            # Flatten transparency onto white rather than black: the usual look of a transparent file.
            if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            image = image.convert("RGB")
        return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _fail(sample, f"is corrupt or truncated ({error})") from error


def _to_8bit(image: Image.Image) -> Image.Image:
    """A single-channel image of more than 8 bits (16-bit PNG/TIFF, 32-bit int or float) as 8-bit "L".

    Pillow's own conversion clips every value above 255 to white. Integer samples above 255 are
    taken as 16-bit and scaled by ``255 / 65535``; float samples within ``[0, 1]`` are scaled by 255;
    anything else is clipped to ``[0, 255]`` (NaN -> 0).
    """
    values = np.asarray(image, dtype=np.float64)
    peak = float(np.nanmax(values)) if values.size and not np.isnan(values).all() else 0.0
    if image.mode == "F":
        scale = 255.0 if peak <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0 if peak > 255 else 1.0
    pixels = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels, "L")


def _decode_full(sample: Sample) -> Image.Image:
    with _open(sample) as image:
        return _finish_decode(sample, image)


def load_image(sample: Sample) -> Image.Image:
    """The sample's image at full resolution: RGB, EXIF orientation applied, shared via the cache.

    Args:
        sample: its ``image`` is a path, encoded bytes, a PIL image or an `ImageRef`.

    Returns:
        A PIL image of mode ``"RGB"``; shared with other callers, so do not modify it in place.

    Raises:
        ImageLoadError: missing, unreadable, corrupt or truncated image (names file and sample id).
    """
    source = sample.image
    if isinstance(source, Image.Image):
        if source.mode == "RGB" and _orientation(source) == 1:
            return source  # already what we would produce: no copy, no cache entry
        # Cache (source, converted): holding the source keeps its id from being reused.
        pair = _CACHE.get_or_decode(_source_key(sample), lambda: (source, _finish_decode(sample, source)))
        return pair[1]
    return _CACHE.get_or_decode(_source_key(sample) + ("full",), lambda: _decode_full(sample))


def image_size(sample: Sample) -> tuple[int, int]:
    """``(width, height)`` of the original after EXIF orientation, from the header only."""
    source = sample.image
    if isinstance(source, Image.Image):
        w, h = source.size
        return (h, w) if _orientation(source) in _SWAPS_AXES else (w, h)
    key = _source_key(sample)
    full = _CACHE.peek(key + ("full",))
    if full is not None:
        return full.size

    def read_header() -> tuple[int, int]:
        with _open(sample) as image:
            w, h = image.size
            return (h, w) if _orientation(image, header_only=True) in _SWAPS_AXES else (w, h)

    return _CACHE.get_or_decode(key + ("size",), read_header, counts_as_decode=False)


def _draft_box(
    orientation: int, draft_size: tuple[int, int], covered: tuple[float, float]
) -> tuple[float, float, float, float]:
    """Where the region ``(0, 0, *covered)`` of a raw draft of ``draft_size`` lands after orientation.

    DCT scaling by 1/s gives ``ceil(W/s)`` columns of which ``W/s`` cover the original; the partial
    last block sits at the right/bottom of the raw image and moves with the EXIF transpose.
    """
    dw, dh = float(draft_size[0]), float(draft_size[1])
    bw, bh = covered
    return {
        1: (0.0, 0.0, bw, bh),
        2: (dw - bw, 0.0, dw, bh),
        3: (dw - bw, dh - bh, dw, dh),
        4: (0.0, dh - bh, bw, dh),
        5: (0.0, 0.0, bh, bw),
        6: (dh - bh, 0.0, dh, bw),
        7: (dh - bh, dw - bw, dh, dw),
        8: (0.0, dw - bw, bh, dw),
    }[orientation]


def _draft_scale(raw_size: tuple[int, int], raw_target: tuple[int, int]) -> int:
    """Largest DCT reduction s in (8, 4, 2) with ``raw_size // s >= raw_target``, else 1."""
    ratio = min(raw_size[0] // max(raw_target[0], 1), raw_size[1] // max(raw_target[1], 1))
    return next((s for s in _DRAFT_SCALES if ratio >= s), 1)


def _decode_draft(sample: Sample, target_size: tuple[int, int]) -> ViewSource:
    with _open(sample) as image:
        orientation = _orientation(image, header_only=True)
        raw_w, raw_h = image.size
        raw_target = target_size[::-1] if orientation in _SWAPS_AXES else target_size
        try:
            configured = image.draft("RGB", raw_target)
        except (OSError, ValueError) as error:
            raise _fail(sample, f"is not a decodable JPEG ({error})") from error
        if configured is None:
            raise _fail(sample, "could not be draft-decoded")
        _, (_, _, covered_w, covered_h) = configured  # (W/s, H/s): the part that covers the original
        draft_size = image.size
        decoded = _finish_decode(sample, image)
    box = _draft_box(orientation, draft_size, (covered_w, covered_h))
    original = (raw_h, raw_w) if orientation in _SWAPS_AXES else (raw_w, raw_h)
    return ViewSource(decoded, box, original)


def load_view_source(sample: Sample, target_size: tuple[int, int]) -> ViewSource:
    """An image to resize into a view of the *whole* original at ``target_size``.

    A JPEG at least twice the target on both sides is decoded with DCT scaling (1/2, 1/4 or 1/8,
    the strongest that keeps ``>= target_size``), which is several times faster than a full decode
    and loses nothing the view can show. Everything else returns the full-resolution image. The
    choice depends only on the source and ``target_size`` (never on the cache's state), so the view
    is the same for every rollout. Draft decodes are cached per (source, scale) and shared too.

    Args:
        sample: the sample whose image is shown.
        target_size: ``(width, height)`` of the view, in the orientation shown.

    Returns:
        ``ViewSource(image, box, original_size)``; ``image.resize(target_size, resample, box=box)``
        is the view.
    """
    tw, th = (int(v) for v in target_size)
    if tw <= 0 or th <= 0:
        raise ValueError(f"Expects a positive target size, actual: {target_size!r}")
    if not isinstance(sample.image, Image.Image):
        key = _source_key(sample)
        scale, is_jpeg = _plan_draft(sample, key, (tw, th))
        # The choice depends only on the file and the target, never on what is cached, so every
        # rollout of a group sees the same pixels (and resizing a small draft beats a cached original).
        if is_jpeg and scale > 1:
            return _CACHE.get_or_decode(key + ("draft", scale), lambda: _decode_draft(sample, (tw, th)))
    full = load_image(sample)
    return ViewSource(full, (0.0, 0.0, float(full.width), float(full.height)), full.size)


def _plan_draft(sample: Sample, key: tuple, target_size: tuple[int, int]) -> tuple[int, bool]:
    """(DCT scale, whether the source is a JPEG) from the header, cached per source."""

    def read_header() -> tuple[tuple[int, int], int, bool]:
        with _open(sample) as image:
            return image.size, _orientation(image, header_only=True), image.format == "JPEG"

    raw_size, orientation, is_jpeg = _CACHE.get_or_decode(
        key + ("header",), read_header, counts_as_decode=False
    )
    raw_target = target_size[::-1] if orientation in _SWAPS_AXES else target_size
    return _draft_scale(raw_size, raw_target), is_jpeg
