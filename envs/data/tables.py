"""Reading one image cell of a parquet, TSV or jsonl file on demand (the other half of `ImageRef`).

- `decode_image_field(value)`: encoded image bytes from base64 text (``data:`` URIs, line-wrapped
  or unpadded base64 included), raw bytes, or a Hugging Face ``{"bytes": ...}`` struct.
- `read_image_ref(ref)`: the cell ``ref`` points at, decoded by `decode_image_field`.

Cost of one read. Parquet: the column chunk of the cell's row group for that one column (pyarrow
cannot read part of a row group), so files meant for random access should have small row groups;
`load_mme_realworld`/`load_hrbench` warn when a row group's image chunk exceeds
`LARGE_ROW_GROUP_BYTES`. TSV/jsonl: the record's bytes, found by its offset.

Open parquet files (their parsed footers) and TSV headers are kept in a small LRU per process
(`OPEN_TABLES_MAX` files); reads of one file are serialised by a lock, reads of different files
run in parallel. A forked child starts with its own, empty set of handles.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
import sys
import threading
from collections import OrderedDict
from typing import Any

from zoomgym.envs.data.sample import ImageRef

OPEN_TABLES_MAX = 16
LARGE_ROW_GROUP_BYTES = 64 << 20
"""Above this many (compressed) bytes in one row group's image column, every image read is slow."""


def decode_image_field(value: Any) -> bytes:
    """Encoded image bytes from a table cell.

    Args:
        value: base64 text (optionally a ``data:...;base64,`` URI, line-wrapped or without ``=``
            padding, as released files have them), raw bytes, or a ``{"bytes": ...}`` struct.

    Returns:
        The encoded image file's bytes (not checked to be an image: decoding does that).

    Raises:
        ValueError: ``value`` is empty, null, or text that is not base64.
    """
    if isinstance(value, dict) and "bytes" in value:
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if isinstance(value, str) and value:
        payload = value.split(",", 1)[1] if value.startswith("data:") else value
        payload = "".join(payload.split())
        payload += "=" * (-len(payload) % 4)
        try:
            decoded = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        if decoded:
            return decoded
    shown = repr(value)
    raise ValueError(f"holds no base64-encoded image ({shown[:77] + '...' if len(shown) > 80 else shown})")


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


_LOCK = threading.Lock()
_READERS: OrderedDict[tuple[str, int, int], _ParquetReader | _TextReader] = OrderedDict()
_READERS_PID = os.getpid()


def _reader(ref: ImageRef) -> _ParquetReader | _TextReader:
    global _READERS_PID
    key = (ref.path, ref.mtime_ns, ref.size)
    with _LOCK:
        if _READERS_PID != os.getpid():
            # A forked child must not share the parent's file positions or locks.
            _READERS.clear()
            _READERS_PID = os.getpid()
        reader = _READERS.get(key)
        if reader is not None:
            _READERS.move_to_end(key)
            return reader
    opened = _ParquetReader(ref.path) if ref.path.lower().endswith(".parquet") else _TextReader(ref.path)
    with _LOCK:
        reader = _READERS.setdefault(key, opened)
        _READERS.move_to_end(key)
        while len(_READERS) > OPEN_TABLES_MAX:
            _READERS.popitem(last=False)
    return reader
