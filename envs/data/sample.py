"""The unit of every dataset: one image, one multiple-choice question."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from zoomgym.envs.geometry import Box

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class ImageRef:
    """Where one encoded image sits inside a table file; read (and base64-decoded) on demand.

    Loaders of parquet, TSV and jsonl benchmarks return these instead of the image's bytes, so a
    dataset costs a few hundred bytes per sample whatever its images weigh, and a sample pickles
    small. `envs.data.images` reads the one cell when the image is needed (parquet: the cell's row
    group, that column only; TSV/jsonl: the record's bytes) and caches it like any other source.

    Attributes:
        path: absolute path of the ``.parquet``, ``.tsv`` or ``.jsonl`` file (the suffix says which).
        row: the record as loader errors name it: 0-based data row (parquet, TSV), 1-based line (jsonl).
        column: the column (parquet, TSV) or key (jsonl) holding the image: base64 text, raw bytes
            or a Hugging Face ``{"bytes": ...}`` struct.
        mtime_ns: the file's modification time when the reference was made.
        size: the file's size in bytes then. A file whose mtime or size changed is refused rather
            than read at stale positions.
        span: where to read: parquet ``(row group, row within the group)``; TSV/jsonl
            ``(byte offset, byte length)`` of the record.
    """

    path: str
    row: int
    column: str
    mtime_ns: int
    size: int
    span: tuple[int, int]

    def describe(self) -> str:
        """``'data.parquet' row 12 column 'bytes'`` (jsonl: ``line 13 key 'bytes'``)."""
        if self.path.lower().endswith(".jsonl"):
            return f"{self.path!r} line {self.row} key {self.column!r}"
        return f"{self.path!r} row {self.row} column {self.column!r}"


ImageSource = str | Path | bytes | Image.Image | ImageRef


@dataclass(frozen=True, eq=False)
class Sample:
    """A visual multiple-choice question.

    Attributes:
        id: unique within its dataset; names the sample in every error message.
        image: a file path, the encoded file's bytes, a decoded PIL image, or an `ImageRef` to a
            cell of a table file (read on demand). Decoded lazily.
        question: the question without its choices.
        options: the option texts, without letters; option ``i`` has letter ``LETTERS[i]``.
        answer: the correct letter.
        category: e.g. ``"attribute"``, ``"relative_position"``, ``"Perception/Monitoring"``.
        boxes: ground-truth boxes in original pixels (may be empty); ``[x1, y1, x2, y2]`` sequences
            are accepted and stored as `Box`.
        meta: loader-specific extras (e.g. HR-Bench ``cycle_category``).
    """

    id: str
    image: ImageSource
    question: str
    options: tuple[str, ...]
    answer: str
    category: str = ""
    boxes: tuple[Box, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        object.__setattr__(self, "boxes", tuple(self._as_box(box) for box in self.boxes))
        letters = LETTERS[: len(self.options)]
        if not self.options:
            raise ValueError(f"sample {self.id!r}: expects at least one option, actual: none")
        if self.answer not in letters:
            raise ValueError(f"sample {self.id!r}: expects answer in {letters!r}, actual: {self.answer!r}")

    def _as_box(self, box: Box | Sequence[float]) -> Box:
        """A `Box`, or the benchmarks' ``[x1, y1, x2, y2]`` in original pixels, as a `Box`."""
        if isinstance(box, Box):
            return box
        if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
            raise TypeError(f"sample {self.id!r}: expects boxes as Box or [x1, y1, x2, y2], actual: {box!r}")
        try:
            return Box(*box)
        except ValueError as error:
            raise ValueError(f"sample {self.id!r}: {error}") from None

    @property
    def letters(self) -> str:
        """The option letters, e.g. ``"ABCD"``."""
        return LETTERS[: len(self.options)]

    def answer_text(self) -> str:
        """The text of the correct option."""
        return self.options[self.letters.index(self.answer)]
