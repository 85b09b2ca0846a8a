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
- `check_image(sample)`: the header checks that the loaders run on every sample at load.
- `ImageLoadError`: raised for a missing, unreadable, corrupt, truncated, too large or unconvertible
  image, at load or when decoding; the message names the file (or "embedded bytes"; for an
  `ImageRef` the table file, row and column) and the sample id, and so do its attributes.

Sources: a path (a regular file: a folder, FIFO or device is refused, so nothing blocks on it),
encoded bytes, a PIL image, an `ImageRef` (one cell of a parquet/TSV/jsonl file, read by
`envs.data.tables.read_image_ref` only when the image is needed), or a `RenderedImage` (drawn by
its ``render()`` when the image is needed; its size is known without drawing).

Checks (at load, through `check_image`, and again before any decode), from the header alone: the
image opens, has at least one pixel and at most `MAX_IMAGE_PIXELS`, and a pixel mode in
`SUPPORTED_MODES`.

Memory. Decoding is bounded by pixels, not by file size (a PNG of a few kilobytes may hold 256 MP):
the decoder's pixels (1 to 4 bytes each) are converted to RGB (4 bytes: Pillow pads RGB) one tile
of `DECODE_TILE_PIXELS` at a time, in place of whole-image float or RGBA copies, and freed before
the EXIF transpose. One decode therefore peaks at about `DECODE_BYTES_PER_PIXEL` = 8 bytes per pixel
plus a tile of scratch: at most 2 GiB at the `MAX_IMAGE_PIXELS` limit (measured in
``benchmarks/memory.py``). A decode that still runs out of memory raises `ImageLoadError`.

Cache. Decoded images live in the process-wide `envs.cache.IMAGE_CACHE`, keyed by the image
source: a path by (resolved path, mtime, size), encoded bytes by a BLAKE2b digest, a PIL image by
its identity, an `ImageRef` by (table path, its mtime and size when loaded, row, column), a
`RenderedImage` by itself (it is hashable and equal by value, so equal descriptions share one
render). The
encoded bytes read through an `ImageRef` are cached too, so the header read, the draft view and the
full decode of one sample read its cell once. The same cache holds the env's resized views
(`envs.views`), so one budget bounds every decoded pixel kept: default 1 GiB (about seven 8K
images, or thirty 2940 x 2940 synthetic canvases, at Pillow's 4 bytes per RGB pixel), set by the
environment variable ``ZOOMGYM_IMAGE_CACHE_MB`` at import or by `set_image_cache_capacity(max_bytes)`
at run time; 0 turns caching off (every call decodes). The most recently used value is always kept,
even when it alone exceeds the budget, so a group of rollouts over one huge image still shares one
decode. Concurrent requests for the same source wait for a single decode. Returned images are
shared: treat them as read-only (``crop``/``resize`` return new images).

Decompression-bomb limit. Images above `MAX_IMAGE_PIXELS` = 16384 * 16384 (268 MP) are refused,
which admits 8K (7680 x 4320, 33 MP) and 16K while stopping a malicious header claiming billions.
Importing this module also sets Pillow's ``Image.MAX_IMAGE_PIXELS`` to it (Pillow itself refuses
above twice that, in ``Image.open``, and warns above it).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
from PIL import ExifTags, Image
from zoomgym.envs.cache import IMAGE_CACHE, CacheInfo
from zoomgym.envs.data.sample import ImageRef, RenderedImage, Sample
from zoomgym.envs.data.tables import read_image_ref

T = TypeVar("T")
R = TypeVar("R")
MAX_IMAGE_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
DECODE_TILE_PIXELS = 1 << 20
"""Pixels converted to RGB per step of a decode: the scratch memory of a conversion (a few bytes each)."""
DECODE_BYTES_PER_PIXEL = 8
"""Peak bytes per pixel of one decode (the decoder's pixels, at most 4 bytes, plus the RGB result)."""
SUPPORTED_MODES = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F",
     "I;16", "I;16L", "I;16B", "I;16N"}
)
"""Pillow pixel modes converted to RGB (the others, such as ``"La"``, are refused at load)."""

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
_TRANSPARENT_MODES = {"RGBA", "LA", "P", "PA"}


class ImageLoadError(ValueError):
    """A sample's image is missing, unreadable, corrupt, truncated, too large or unconvertible.

    Attributes:
        sample_id: the sample whose image failed (a trainer can skip that sample and count it).
        source: the file, ``"embedded bytes"`` or the table cell, as the message names it.
    """

    def __init__(self, message: str, sample_id: str = "", source: str = "") -> None:
        super().__init__(message)
        self.sample_id = sample_id
        self.source = source

    def __reduce__(self) -> tuple:
        # Picklable with its attributes: errors cross process boundaries (AsyncVectorEnv, workers).
        return (type(self), (str(self), self.sample_id, self.source))


class _Header(NamedTuple):
    """What the header says: the stored size, the EXIF orientation, whether it is a JPEG."""

    raw_size: tuple[int, int]
    orientation: int
    is_jpeg: bool

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` after EXIF orientation."""
        w, h = self.raw_size
        return (h, w) if self.orientation in _SWAPS_AXES else (w, h)


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


def map_in_threads(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[function(item) for item in items]`` on a thread per CPU (at most one per item).

    Pillow releases the GIL while it resizes, draws and pastes, which is nearly all of rendering a
    synthetic canvas or making a view, so such work runs in parallel. The results are the loop's, in
    order, and an error raises as the loop's first one would (the items after it may have run).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(items), cpus)
    if workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


def set_image_cache_capacity(max_bytes: int) -> None:
    """Sets the cache budget in decoded bytes (0 disables caching); evicts down to it now."""
    if not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"Expects max_bytes to be an int >= 0, actual: {max_bytes!r}")
    IMAGE_CACHE.resize(max_bytes)


def clear_image_cache() -> None:
    """Drops every cached image and resets the counters of `image_cache_info`."""
    IMAGE_CACHE.clear()


def image_cache_info() -> CacheInfo:
    """Hits, decodes, entries, bytes held and the budget of the image cache."""
    return IMAGE_CACHE.info()


def _describe(sample: Sample) -> str:
    if isinstance(sample.image, (str, Path)):
        return f"file {str(sample.image)!r}"
    if isinstance(sample.image, (bytes, bytearray, memoryview)):
        return "embedded bytes"
    if isinstance(sample.image, (ImageRef, RenderedImage)):
        return sample.image.describe()
    return "in-memory PIL image"


def _fail(sample: Sample, reason: str) -> ImageLoadError:
    source = _describe(sample)
    return ImageLoadError(
        f"Expects a readable image for sample {sample.id!r}, actual: {source} {reason}", sample.id, source
    )


def _source_key(sample: Sample) -> tuple:
    """The cache key of the sample's image source (see the module docstring).

    Every read of a path goes through here first, so a path that is not a regular file is refused
    before anything opens it (opening a FIFO blocks until a writer comes).
    """
    source = sample.image
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            status = path.stat()
        except FileNotFoundError:
            raise _fail(sample, "does not exist") from None
        except OSError as error:
            raise _fail(sample, f"cannot be read ({error})") from error
        if not stat.S_ISREG(status.st_mode):
            kind = "a folder" if stat.S_ISDIR(status.st_mode) else "not a regular file (a FIFO, socket or device)"
            raise _fail(sample, f"is {kind}")
        return ("path", str(path.resolve()), status.st_mtime_ns, status.st_size)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return ("bytes", hashlib.blake2b(source, digest_size=16).digest())
    if isinstance(source, Image.Image):
        # The cached value holds the source itself (see `load_image`), so this id cannot be reused
        # by another image while the entry exists.
        return ("pil", id(source))
    if isinstance(source, ImageRef):
        # The table as it was when loaded: `read_image_ref` refuses a file that changed since.
        return ("table", source.path, source.mtime_ns, source.size, source.row, source.column)
    if isinstance(source, RenderedImage):
        return ("rendered", source)
    raise TypeError(
        f"Expects sample {sample.id!r} image to be a path, bytes, PIL image, ImageRef or RenderedImage, actual: "
        f"{type(source).__name__}"
    )


def _read_ref(sample: Sample) -> bytes:
    """The encoded bytes behind an `ImageRef`, read once and shared through the cache."""

    def read() -> bytes:
        try:
            return read_image_ref(sample.image)
        except FileNotFoundError:
            raise _fail(sample, "does not exist") from None
        except Exception as error:  # OSError, ValueError, MemoryError and pyarrow's errors alike
            raise _fail(sample, str(error)) from error

    return IMAGE_CACHE.get_or_compute(_source_key(sample) + ("encoded",), read)


def _open(sample: Sample, encoded: bytes | None = None) -> Image.Image:
    """Opens (does not decode) the sample's image, or ``encoded`` when given, and checks its header.

    Errors become `ImageLoadError`. Callers have computed `_source_key` first (regular files only).
    """
    if encoded is not None:
        source = encoded
    else:
        source = _read_ref(sample) if isinstance(sample.image, ImageRef) else sample.image
    try:
        image = Image.open(source) if isinstance(source, (str, Path)) else Image.open(io.BytesIO(bytes(source)))
    except FileNotFoundError:
        raise _fail(sample, "does not exist") from None
    except Exception as error:  # Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error ...
        raise _fail(sample, f"is not a decodable image ({error})") from error
    problem = _header_problem(image)
    if problem:
        image.close()
        raise _fail(sample, problem)
    return image


def _header_problem(image: Image.Image) -> str | None:
    """Why an opened image cannot be decoded within the limits, or None."""
    width, height = image.size
    if width < 1 or height < 1:
        return f"has no pixels ({width}x{height})"
    if width * height > MAX_IMAGE_PIXELS:
        return (
            f"has {width}x{height} = {width * height:,} pixels, which exceeds limit MAX_IMAGE_PIXELS = "
            f"{MAX_IMAGE_PIXELS:,} (a decode takes up to {DECODE_BYTES_PER_PIXEL} bytes per pixel)"
        )
    if image.mode not in SUPPORTED_MODES:
        return f"has pixel mode {image.mode!r}, which is not converted to RGB (supported: {sorted(SUPPORTED_MODES)})"
    return None


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


def _finish_decode(sample: Sample, image: Image.Image, *, owned: bool) -> Image.Image:
    """Decodes pixels, converts them to RGB and applies EXIF orientation.

    ``owned``: ``image`` was opened here, so its pixels are freed as soon as the RGB copy exists
    (before the transpose allocates). Any failure, running out of memory included, is an `ImageLoadError`.
    """
    try:
        image.load()
        orientation = _orientation(image)
        rgb = _to_rgb(image)
        if owned and rgb is not image:
            image.close()
        return rgb if orientation == 1 else rgb.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
    except Exception as error:  # MemoryError included; Pillow's decoders raise many kinds
        if owned:
            image.close()
        if isinstance(error, MemoryError):
            reason = f"needs more memory than is free to decode ({image.width}x{image.height} {image.mode})"
        else:
            reason = f"is corrupt or truncated ({error})"
        raise _fail(sample, reason) from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """A decoded image as RGB, converted `DECODE_TILE_PIXELS` at a time into one RGB image.

    Transparency is flattened onto white rather than black (the usual look of a transparent file).
    A single-channel image of more than 8 bits (16-bit PNG/TIFF, 32-bit int or float) is rescaled,
    not clipped as Pillow's own conversion does: integer samples above 255 are taken as 16-bit and
    scaled by ``255 / 65535``; float samples within ``[0, 1]`` by 255; anything else is clipped to
    ``[0, 255]`` (NaN -> 0). The scale comes from the whole image, the conversion from each tile.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        scale = _high_depth_scale(image)

        def convert(tile: Image.Image) -> Image.Image:
            return Image.fromarray(_to_8bit(tile, scale), "L").convert("RGB")

    elif image.mode in _TRANSPARENT_MODES or "transparency" in image.info:

        def convert(tile: Image.Image) -> Image.Image:
            white = Image.new("RGBA", tile.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, tile.convert("RGBA")).convert("RGB")

    else:

        def convert(tile: Image.Image) -> Image.Image:
            return tile.convert("RGB")

    rows = max(1, DECODE_TILE_PIXELS // image.width)
    if rows >= image.height:
        return convert(image)
    rgb = Image.new("RGB", image.size)
    for top, tile in _tiles(image, rows):
        rgb.paste(convert(tile), (0, top))
    return rgb


def _tiles(image: Image.Image, rows: int) -> Iterator[tuple[int, Image.Image]]:
    """``(top, band of rows)`` over the image, ``rows`` rows at a time."""
    for top in range(0, image.height, rows):
        yield top, image.crop((0, top, image.width, min(top + rows, image.height)))


def _high_depth_scale(image: Image.Image) -> float:
    """The factor that maps a high-bit-depth image's values to 8 bits (see `_to_rgb`)."""
    peak = 0.0
    for _, tile in _tiles(image, max(1, DECODE_TILE_PIXELS // image.width)):
        values = np.asarray(tile)
        if values.dtype.kind == "f":
            values = values[~np.isnan(values)]
        if values.size:
            peak = max(peak, float(values.max()))
    if image.mode == "F":
        return 255.0 if peak <= 1.0 else 1.0
    return 255.0 / 65535.0 if peak > 255 else 1.0


def _to_8bit(tile: Image.Image, scale: float) -> np.ndarray:
    """One tile's values times ``scale``, clipped to ``[0, 255]`` (NaN -> 0), as uint8."""
    values = np.asarray(tile, dtype=np.float64)
    values = values * scale
    np.nan_to_num(values, copy=False)
    np.clip(values, 0, 255, out=values)
    return np.round(values, out=values).astype(np.uint8)


def _decode_full(sample: Sample) -> Image.Image:
    if isinstance(sample.image, RenderedImage):
        return _render(sample, sample.image)
    return _finish_decode(sample, _open(sample), owned=True)


def _render(sample: Sample, source: RenderedImage) -> Image.Image:
    _check_size(sample, source.size)
    try:
        image = source.render()
    except MemoryError as error:
        raise _fail(sample, f"needs more memory than is free to render ({source.size[0]}x{source.size[1]})") from error
    if image.mode != "RGB" or image.size != source.size:
        raise _fail(sample, f"rendered as {image.mode} {image.size[0]}x{image.size[1]}, not RGB of its size {source.size}")
    return image


def load_image(sample: Sample) -> Image.Image:
    """The sample's image at full resolution: RGB, EXIF orientation applied, shared via the cache.

    Args:
        sample: its ``image`` is a path, encoded bytes, a PIL image, an `ImageRef` or a
            `RenderedImage` (drawn here on first use).

    Returns:
        A PIL image of mode ``"RGB"``; shared with other callers, so do not modify it in place.

    Raises:
        ImageLoadError: missing, unreadable, corrupt, truncated, too large or unconvertible image, or
            not enough memory to decode it (names the file and the sample id).
    """
    source = sample.image
    if isinstance(source, Image.Image):
        if source.mode == "RGB" and _orientation(source) == 1:
            return source  # already what we would produce: no copy, no cache entry
        _check_in_memory(sample, source)
        # Cache (source, converted): holding the source keeps its id from being reused.
        pair = IMAGE_CACHE.get_or_compute(
            _source_key(sample), lambda: (source, _finish_decode(sample, source, owned=False)), counts_as_decode=True
        )
        return pair[1]
    return IMAGE_CACHE.get_or_compute(_source_key(sample) + ("full",), lambda: _decode_full(sample), counts_as_decode=True)


def _header(sample: Sample, encoded: bytes | None = None) -> _Header:
    """The header facts of a path/bytes/`ImageRef` source, checked and cached per source."""

    def read() -> _Header:
        with _open(sample, encoded) as image:
            return _Header(image.size, _orientation(image, header_only=True), image.format == "JPEG")

    return IMAGE_CACHE.get_or_compute(_source_key(sample) + ("header",), read)


def image_size(sample: Sample) -> tuple[int, int]:
    """``(width, height)`` of the original after EXIF orientation, from the header only.

    Raises:
        ImageLoadError: as `check_image`.
    """
    source = sample.image
    if isinstance(source, Image.Image):
        w, h = source.size
        return (h, w) if _orientation(source) in _SWAPS_AXES else (w, h)
    if isinstance(source, RenderedImage):
        return source.size
    full = IMAGE_CACHE.peek(_source_key(sample) + ("full",))
    if full is not None:
        return full.size
    return _header(sample).size


def check_image(sample: Sample, encoded: bytes | None = None) -> tuple[int, int]:
    """Checks, from the header alone, that the sample's image can be decoded; returns its oriented size.

    The image must be readable (a regular file; a decodable format), have at least one and at most
    `MAX_IMAGE_PIXELS` pixels and a mode in `SUPPORTED_MODES`. Truncated pixel data only shows
    when decoding (`load_image` raises then).

    Args:
        sample: the sample to check.
        encoded: the image's encoded bytes when the caller holds them already (a loader reading a
            table cell), so the source is not read again.

    Raises:
        ImageLoadError: names the file (or table cell) and the sample id.
    """
    if isinstance(sample.image, Image.Image):
        _check_in_memory(sample, sample.image)
        return image_size(sample)
    if isinstance(sample.image, RenderedImage):
        _check_size(sample, sample.image.size)
        return sample.image.size
    return _header(sample, encoded).size


def _check_in_memory(sample: Sample, image: Image.Image) -> None:
    problem = _header_problem(image)
    if problem:
        raise _fail(sample, problem)


def _check_size(sample: Sample, size: tuple[int, int]) -> None:
    """The pixel limits of `_header_problem` for an image known by its size alone."""
    width, height = size
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
        raise _fail(sample, f"has {width}x{height} pixels; expects 1 to MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS:,}")


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
    image = _open(sample)
    orientation = _orientation(image, header_only=True)
    raw_w, raw_h = image.size
    raw_target = target_size[::-1] if orientation in _SWAPS_AXES else target_size
    try:
        configured = image.draft("RGB", raw_target)
    except Exception as error:
        image.close()
        raise _fail(sample, f"is not a decodable JPEG ({error})") from error
    if configured is None:
        image.close()
        raise _fail(sample, "could not be draft-decoded")
    _, (_, _, covered_w, covered_h) = configured  # (W/s, H/s): the part that covers the original
    draft_size = image.size
    decoded = _finish_decode(sample, image, owned=True)
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
    if not isinstance(sample.image, (Image.Image, RenderedImage)):
        key = _source_key(sample)
        scale, is_jpeg = _plan_draft(sample, key, (tw, th))
        # The choice depends only on the file and the target, never on what is cached, so every
        # rollout of a group sees the same pixels (and resizing a small draft beats a cached original).
        if is_jpeg and scale > 1:
            return IMAGE_CACHE.get_or_compute(
                key + ("draft", scale), lambda: _decode_draft(sample, (tw, th)), counts_as_decode=True
            )
    full = load_image(sample)
    return ViewSource(full, (0.0, 0.0, float(full.width), float(full.height)), full.size)


def _plan_draft(sample: Sample, key: tuple, target_size: tuple[int, int]) -> tuple[int, bool]:
    """(DCT scale, whether the source is a JPEG) from the cached header."""
    header = _header(sample)
    raw_target = target_size[::-1] if header.orientation in _SWAPS_AXES else target_size
    return _draft_scale(header.raw_size, raw_target), header.is_jpeg
