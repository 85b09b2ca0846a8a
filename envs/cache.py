"""One bounded cache for every decoded pixel the env keeps: decoded images, JPEG drafts, encoded
table cells, header facts and resized views (`IMAGE_CACHE`).

Its capacity is one budget of bytes, charged at what each value really holds (`nbytes`: Pillow
stores a pixel of a multi-band image in 4 bytes, of ``"L"``/``"P"``/``"1"`` in 1, of ``"I;16"`` in
2), default 1 GiB, set by the environment variable ``ZOOMGYM_IMAGE_CACHE_MB`` at import or by
`BoundedCache.resize` (``envs.data.set_image_cache_capacity``) at run time; 0 turns caching off.
The most recently used value is always kept, even when it alone exceeds the budget, so a group of
rollouts over one huge image still shares one decode. Concurrent requests for one key wait for a
single computation (single flight); a failed computation is not cached.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, NamedTuple, TypeVar

from PIL import Image

DEFAULT_CACHE_BYTES = 1 << 30
ENTRY_BYTES = 512
"""Charge of a value holding no pixels or bytes (header facts), so that those too stay bounded."""

T = TypeVar("T")


class CacheInfo(NamedTuple):
    """Counters of the cache: ``decodes`` counts the computations that were decodes (full and draft),
    ``hits`` every request served from the cache."""

    hits: int
    decodes: int
    entries: int
    bytes: int
    max_bytes: int


def pixel_bytes(mode: str) -> int:
    """Bytes Pillow stores per pixel of an image of ``mode``."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def nbytes(value: Any) -> int:
    """Pixel and byte storage held by a cached value (images, bytes, and tuples of them)."""
    if isinstance(value, Image.Image):
        return value.width * value.height * pixel_bytes(value.mode)
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, tuple):
        return sum(nbytes(item) for item in value)
    return 0


class BoundedCache:
    """Thread-safe LRU under a byte budget, with single-flight computation."""

    def __init__(self, max_bytes: int) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._pending: dict[Hashable, Future] = {}
        self._bytes = 0
        self.max_bytes = max_bytes
        self.hits = 0
        self.decodes = 0

    def get_or_compute(self, key: Hashable, compute: Callable[[], T], *, counts_as_decode: bool = False) -> T:
        """The cached value for ``key``, else ``compute()``, run once however many threads ask."""
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
            else:
                self.hits += 1
        if pending is not None:
            return pending.result()  # another thread computes it: share its result (or its error)
        try:
            value = compute()
        except BaseException as error:
            self._finish(key, error=error)
            raise
        self._finish(key, value=value)
        return value

    def peek(self, key: Hashable) -> Any | None:
        """The cached value for ``key`` or None; never computes."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key][0]
        return None

    def discard(self, key: Hashable) -> None:
        """Forgets ``key`` (no error when absent)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1]

    def _finish(self, key: Hashable, value: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            future = self._pending.pop(key, None)
            if error is None and self.max_bytes > 0:
                size = max(nbytes(value), ENTRY_BYTES)
                previous = self._entries.pop(key, None)
                if previous is not None:
                    self._bytes -= previous[1]
                self._entries[key] = (value, size)
                self._bytes += size
                self._evict()
        if future is not None:
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, (_, size) = self._entries.popitem(last=False)
            self._bytes -= size

    def resize(self, max_bytes: int) -> None:
        """Sets the budget (0 disables caching) and evicts down to it now."""
        with self._lock:
            self.max_bytes = max_bytes
            if max_bytes <= 0:
                self._entries.clear()
                self._bytes = 0
            else:
                self._evict()

    def clear(self) -> None:
        """Drops every entry and resets the counters."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.hits = 0
            self.decodes = 0

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self.hits, self.decodes, len(self._entries), self._bytes, self.max_bytes)


def _capacity_from_env() -> int:
    raw = os.environ.get("ZOOMGYM_IMAGE_CACHE_MB")
    if raw is None:
        return DEFAULT_CACHE_BYTES
    try:
        megabytes = float(raw)
    except ValueError:
        raise ValueError(f"Expects ZOOMGYM_IMAGE_CACHE_MB to be a number of MiB, actual: {raw!r}") from None
    if not (math.isfinite(megabytes) and megabytes >= 0):
        raise ValueError(f"Expects ZOOMGYM_IMAGE_CACHE_MB to be a finite number >= 0, actual: {raw!r}")
    return int(megabytes * (1 << 20))


IMAGE_CACHE = BoundedCache(_capacity_from_env())
"""The process-wide cache shared by `envs.data.images` and `envs.views`."""
