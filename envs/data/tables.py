"""Reading one image cell of a parquet, TSV or jsonl file on demand (the other half of `ImageRef`).

- `decode_image_field(value)`: encoded image bytes from base64 text (``data:`` URIs, line-wrapped
  or unpadded base64 included), raw bytes, or a Hugging Face ``{"bytes": ...}`` struct.
- `read_image_ref(ref)`: the cell ``ref`` points at, decoded by `decode_image_field`.

Cost of one read. Parquet: the column chunk of the cell's row group for that one column (pyarrow
cannot read part of a row group), so files meant for random access should have small row groups;
`load_mme_realworld`/`load_hrbench` warn when a row group's image chunk exceeds
`LARGE_ROW_GROUP_BYTES`. TSV/jsonl: the record's bytes, found by its offset.

Open parquet files (their parsed footers) and TSV headers are kept in a ``functools.lru_cache``
of `OPEN_TABLES_MAX` files, keyed by the process id too, so a forked child opens its own handles;
reads of one file are serialised by a lock, reads of different files run in parallel.
"""

from __future__ import annotations

import base64
import binascii
import csv
import functools
import io
import json
import os
import sys
import threading
from typing import Any

from zoomgym.envs.data.sample import ImageRef

OPEN_TABLES_MAX = 16
LARGE_ROW_GROUP_BYTES = 64 << 20
"""Above this many (compressed) bytes in one row group's image column, every image read is slow."""


def decode_image_field(value: Any, max_bytes: int | None = None) -> bytes:
    """Encoded image bytes from a table cell.

    Args:
        value: base64 text (optionally a ``data:...;base64,`` URI, line-wrapped or without ``=``
            padding, as released files have them), raw bytes, or a ``{"bytes": ...}`` struct.
        max_bytes: decode only the first ``max_bytes`` bytes (up to 2 more from base64 text) when the
            image is longer: enough to read a header without decoding a large image's base64.

    Returns:
        The encoded image file's bytes, or their first part (not checked to be an image: decoding
        does that).

    Raises:
        ValueError: ``value`` is empty, null, or text that is not base64.
    """
    if isinstance(value, dict) and "bytes" in value:
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value if max_bytes is None else value[:max_bytes])
    if isinstance(value, str) and value:
        payload = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            decoded = base64.b64decode(_base64_characters(payload, max_bytes), validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        if decoded:
            return decoded
    shown = repr(value)
    raise ValueError(f"holds no base64-encoded image ({shown[:77] + '...' if len(shown) > 80 else shown})")


def _base64_characters(payload: str, max_bytes: int | None) -> str:
    """``payload`` without whitespace and padded; with ``max_bytes``, only the whole quads that hold
    the first ``max_bytes`` bytes when the payload is longer (read without stripping all of it)."""
    if max_bytes is None:
        characters = "".join(payload.split())
    else:
        needed = -(-max_bytes // 3) * 4
        end = needed
        characters = "".join(payload[:end].split())
        while len(characters) < needed and end < len(payload):  # line breaks took some of the room
            end *= 2
            characters = "".join(payload[:end].split())
        if len(characters) >= needed:
            return characters[:needed]
    return characters + "=" * (-len(characters) % 4)


def read_image_ref(ref: ImageRef) -> bytes:
    """The encoded image that ``ref`` points at.

    Raises:
        FileNotFoundError: the file is gone.
        ValueError: the file changed since ``ref`` was made, or the cell is missing, empty or not
            an encoded image field (the message says which; callers add the file and sample).
    """
    stat = os.stat(ref.path)
    if (stat.st_mtime_ns, stat.st_size) != (ref.mtime_ns, ref.size):
        raise ValueError("is in a file changed since the dataset was loaded (reload the dataset)")
    reader = _reader(ref)
    with reader.lock:
        value = reader.read(ref)
    return decode_image_field(value)


class _ParquetReader:
    def __init__(self, path: str) -> None:
        import pyarrow.parquet as pq

        self.lock = threading.Lock()
        self.file = pq.ParquetFile(path)

    def read(self, ref: ImageRef) -> Any:
        row_group, index = ref.span
        if not 0 <= row_group < self.file.num_row_groups or ref.column not in self.file.schema_arrow.names:
            raise ValueError(f"has no row group {row_group} with column {ref.column!r}")
        column = self.file.read_row_group(row_group, columns=[ref.column]).column(0)
        if not 0 <= index < len(column):
            raise ValueError(f"has no row {index} in row group {row_group}")
        return column[index].as_py()


class _TextReader:
    """TSV (``header`` = the column names) or jsonl (``header`` None) records by byte span."""

    def __init__(self, path: str) -> None:
        self.lock = threading.Lock()
        self.path = path
        self.header: list[str] | None = None
        if path.lower().endswith(".tsv"):
            with open(path, encoding="utf-8", newline="") as handle:
                self.header = next(csv.reader(handle, delimiter="\t"), [])

    def read(self, ref: ImageRef) -> Any:
        offset, length = ref.span
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            text = handle.read(length).decode("utf-8")
        if self.header is None:
            record = json.loads(text)
            if not isinstance(record, dict) or ref.column not in record:
                raise ValueError(f"has no key {ref.column!r} in the record at byte {offset}")
            return record[ref.column]
        # Base64 images make fields far longer than csv's 128 KiB default limit.
        csv.field_size_limit(sys.maxsize)
        fields = next(csv.reader(io.StringIO(text, newline=""), delimiter="\t"), [])
        if ref.column not in self.header or len(fields) != len(self.header):
            raise ValueError(f"has no column {ref.column!r} in the record at byte {offset}")
        return fields[self.header.index(ref.column)]


def _reader(ref: ImageRef) -> _ParquetReader | _TextReader:
    # The pid in the key: a forked child must not share the parent's file positions or locks.
    return _open_table(ref.path, ref.mtime_ns, ref.size, os.getpid())


@functools.lru_cache(maxsize=OPEN_TABLES_MAX)
def _open_table(path: str, mtime_ns: int, size: int, pid: int) -> _ParquetReader | _TextReader:
    """An open reader of the table file as it was at ``(mtime_ns, size)``, one per process."""
    return _ParquetReader(path) if path.lower().endswith(".parquet") else _TextReader(path)
