"""Benchmark loaders: each reads one on-disk format into ``list[Sample]``, offline, without decoding images.

| name            | loader                    | input                                                    |
|-----------------|---------------------------|----------------------------------------------------------|
| `vstar`         | `load_vstar(root)`        | V* Bench folder (``test_questions.jsonl`` + ``sa_*``)    |
| `mme_realworld` | `load_mme_realworld(path)`| lmms-eval MME-RealWorld(-Lite): parquet/jsonl file or dir|
| `hrbench`       | `load_hrbench(path)`      | HR-Bench 4K/8K TSV or parquet                            |
| `jsonl`         | `load_jsonl(path)`        | the generic schema below                                 |
| `synthetic`     | `synthetic(n, seed, ...)` | generated in memory (`envs.data.synthetic`)              |

Every malformed record raises ``ValueError`` naming the file, the line (jsonl, 1-based) or row
(tables, 0-based data row) and the key. Image paths are resolved relative to the data file; images
are decoded later, lazily, by `envs.data.images.load_image`.

Images embedded in tables (MME-RealWorld, HR-Bench) are not kept in memory: ``Sample.image`` is an
`ImageRef` to the cell (file, row, column), read when the image is first needed. Parquet loading
reads every column but the image column, so it costs time and memory for the questions only.
TSV and jsonl have no column index: they are read through once and each base64 image is checked
then (and dropped); parquet image cells are checked when read (`ImageLoadError` names the file,
row, column and sample). The files must stay in place and unchanged while the samples are used.

Generic jsonl schema (`load_jsonl`), one JSON object per line (blank lines skipped)::

    {"id": "cat-17",                      # str, unique in the file; default "<file stem>-<line>"
     "image": "images/cat-17.jpg",        # str, path relative to the jsonl file (or absolute)
     "question": "What colour is the cat's collar?",
     "options": ["red", "blue", "green", "black"],   # 2-10 texts, no letters
     "answer": "B",                       # letter of the correct option ("(B)" or its text also do)
     "category": "attribute",             # optional, default ""
     "boxes": [[412, 96, 455, 130]],      # optional, [x1, y1, x2, y2] in original pixels
     "meta": {"source": "mine"}}          # optional dict, kept in Sample.meta
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from zoomgym.envs.data.sample import LETTERS, ImageRef, Sample
from zoomgym.envs.data.synthetic import synthetic
from zoomgym.envs.data.tables import LARGE_ROW_GROUP_BYTES, decode_image_field
from zoomgym.envs.geometry import Box

_OPTION_LINE = re.compile(r"^\s*\(([A-J])\)\s*(.*?)\s*$")
_ANSWER_LETTER = re.compile(r"^\s*\(?([A-Ja-j])(?:\)|\.)?\s*$")
IMAGE_REFERENCE_MAX_CHARS = 64
"""A TSV ``image`` field this short is the ``index`` of the row holding the image (VLMEvalKit stores
each image once; rows that repeat it, such as HR-Bench's option rotations, refer to that row)."""


class _Where:
    """Names a record in error messages: ``file 'x.jsonl' line 3`` / ``row 12``."""

    def __init__(self, path: Path, unit: str, number: int) -> None:
        self.text = f"{str(path)!r} {unit} {number}"

    def error(self, key: str, expected: str, actual: Any) -> ValueError:
        shown = repr(actual)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        return ValueError(f"{self.text}, key {key!r}: expects {expected}, actual: {shown}")


def _require(record: dict, key: str, where: _Where, kind: type | tuple[type, ...], expected: str) -> Any:
    if key not in record:
        raise where.error(key, expected, "missing")
    value = record[key]
    if (
        not isinstance(value, kind)
        or isinstance(value, bool)
        or (isinstance(value, str) and not value.strip())
    ):
        raise where.error(key, expected, value)
    return value


def _letter(value: Any, options: Sequence[str], key: str, where: _Where) -> str:
    """The answer letter: ``"B"``, ``" b "``, ``"(B)"``, ``"B."`` or ``"B)"`` -> ``"B"``, or the letter
    of the option whose text ``value`` is (up to case and spacing)."""
    letters = LETTERS[: len(options)]
    match = _ANSWER_LETTER.match(value) if isinstance(value, str) else None
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    texts = [_norm(option) for option in options]
    if isinstance(value, str) and _norm(value) in texts:
        return letters[texts.index(_norm(value))]
    raise where.error(key, f"one letter in {letters!r} or an option's text", value)


def _options_from_lines(lines: list[str], key: str, where: _Where) -> tuple[str, ...]:
    """``["(A) red", "(B) blue"]`` -> ``("red", "blue")``; letters must run A, B, C, ..."""
    options = []
    for i, line in enumerate(lines):
        match = _OPTION_LINE.match(line) if isinstance(line, str) else None
        if match is None or match.group(1) != LETTERS[i] or not match.group(2):
            raise where.error(key, f'option {i} written "({LETTERS[i]}) text"', line)
        options.append(match.group(2))
    if len(options) < 2:
        raise where.error(key, "at least two options", lines)
    return tuple(options)


def _boxes(value: Any, where: _Where, *, xywh: bool = False) -> tuple[Box, ...]:
    layout = "[x, y, w, h]" if xywh else "[x1, y1, x2, y2]"
    if not isinstance(value, list):
        raise where.error("boxes" if not xywh else "bbox", f"a list of {layout}", value)
    boxes = []
    for item in value:
        ok = (
            isinstance(item, (list, tuple))
            and len(item) == 4
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in item
            )
        )
        try:
            if not ok:
                raise ValueError
            boxes.append(Box.from_xywh(*item) if xywh else Box(*item))
        except ValueError:
            raise where.error(
                "bbox" if xywh else "boxes", f"a list of {layout} with positive size", item
            ) from None
    return tuple(boxes)


def _read_json_lines(path: Path) -> Iterator[tuple[int, dict, tuple[int, int]]]:
    """Yields ``(line number, object, (byte offset, byte length) of the line)`` per non-blank line."""
    if not path.is_file():
        raise ValueError(f"Expects a jsonl file, actual: {str(path)!r} does not exist")
    offset = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            span = (offset, len(raw))
            offset += len(raw)
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{str(path)!r} line {number}: expects a JSON object, actual: {error}"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{str(path)!r} line {number}: expects a JSON object, actual: {record!r:.80}"
                )
            yield number, record, span


def _check_unique(samples: list[Sample], path: Path) -> list[Sample]:
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise ValueError(f"{str(path)!r}: expects unique sample ids, actual: {sample.id!r} repeated")
        seen.add(sample.id)
    return samples


# --------------------------------------------------------------------------------------------- V*


def load_vstar(root: str | Path) -> list[Sample]:
    """Loads V* Bench from its release folder.

    Layout::

        root/test_questions.jsonl          one line per question: image, text, category, question_id, label
        root/direct_attributes/sa_*.jpg    + sa_*.json {target_object, bbox: [[x, y, w, h], ...],
        root/relative_position/sa_*.jpg                 question, options (options[0] is correct)}

    The options and their order come from the ``(A) ...`` lines of ``text`` (the question is the
    text before them; the trailing instruction line is dropped) and the answer from ``label``
    (``"B"`` or ``"(B)"``). When the per-image json lists the same options, its ``options[0]`` (the
    correct one) must be at the labelled letter, and a missing ``label`` is derived from it; a json
    worded differently from ``text`` is not an error (``text`` and ``label`` are what models are
    asked and scored on). ``category`` is the folder name; ``boxes`` are the json's bboxes.
    Sample ids are the image paths without extension (``direct_attributes/sa_4690``).
    """
    root = Path(root)
    questions = root / "test_questions.jsonl"
    samples = []
    for number, record, _ in _read_json_lines(questions):
        where = _Where(questions, "line", number)
        image_rel = _require(record, "image", where, str, "an image path like 'direct_attributes/sa_1.jpg'")
        text = _require(record, "text", where, str, "the question followed by '(A) ...' lines")
        lines = [line for line in text.splitlines() if line.strip()]
        option_lines = [line for line in lines if _OPTION_LINE.match(line)]
        if not lines or _OPTION_LINE.match(lines[0]) or not option_lines:
            raise where.error("text", "a question line, then '(A) ...' option lines", text)
        options = _options_from_lines(option_lines, "text", where)
        image_path = root / image_rel
        if not image_path.is_file():
            raise where.error("image", "an existing image file", str(image_path))
        category = Path(image_rel).parent.name
        if not category:
            raise where.error("image", "a path inside a category folder", image_rel)
        annotation_path = image_path.with_suffix(".json")
        annotation = _vstar_annotation(annotation_path)
        ann_where = _Where(annotation_path, "object", 1)
        boxes = _boxes(
            _require(annotation, "bbox", ann_where, list, "a list of [x, y, w, h]"), ann_where, xywh=True
        )
        json_options = _require(annotation, "options", ann_where, list, "a list of option texts")
        answer = _vstar_answer(record, options, json_options, where, annotation_path)
        question = " ".join(lines[: lines.index(option_lines[0])]).strip()
        samples.append(
            Sample(
                id=str(Path(image_rel).with_suffix("")),
                image=image_path,
                question=question,
                options=options,
                answer=answer,
                category=category,
                boxes=boxes,
                meta={
                    "question_id": record.get("question_id"),
                    "target_object": annotation.get("target_object"),
                },
            )
        )
    return _check_unique(samples, questions)


def _vstar_answer(
    record: dict, options: tuple[str, ...], json_options: list, where: _Where, annotation_path: Path
) -> str:
    """The answer letter: ``label`` when given, else where the json's ``options[0]`` sits in ``text``.

    When the json lists the same options as ``text`` (up to case and spacing), its ``options[0]``
    (the correct one) must sit at the label's letter; a json worded differently cannot be checked.
    """
    same_options = sorted(_norm(o) for o in json_options) == sorted(_norm(o) for o in options)
    correct = _norm(json_options[0]) if json_options else None
    if "label" not in record:
        if not same_options:
            raise where.error("label", f"a letter (the options differ from {str(annotation_path)!r})", "missing")
        return LETTERS[[_norm(o) for o in options].index(correct)]
    answer = _letter(record["label"], options, "label", where)
    if same_options and correct != _norm(options[LETTERS.index(answer)]):
        raise ValueError(
            f"{where.text}: expects the label to name options[0] of {str(annotation_path)!r} (the "
            f"correct one), actual: text options {list(options)!r}, label {answer!r}, json options "
            f"{json_options!r}"
        )
    return answer


def _norm(text: Any) -> str:
    return " ".join(str(text).split()).casefold()


def _vstar_annotation(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"Expects the V* annotation file {str(path)!r}, actual: missing")
    try:
        annotation = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r}: expects a JSON object, actual: {error}") from None
    if not isinstance(annotation, dict):
        raise ValueError(f"{str(path)!r}: expects a JSON object, actual: {annotation!r:.80}")
    return annotation


# ------------------------------------------------------------------------------ tables (parquet/tsv)


def _table_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """A file, or the sorted files with one of ``suffixes`` anywhere under a directory (sharded
    releases, e.g. a Hugging Face snapshot with ``data/*.parquet``); hidden folders are skipped."""
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix.lower() in suffixes
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ValueError(f"Expects {'/'.join(suffixes)} files in {str(path)!r}, actual: none")
        return files
    if not path.is_file():
        raise ValueError(f"Expects a data file or folder, actual: {str(path)!r} does not exist")
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"Expects a {'/'.join(suffixes)} file, actual: {str(path)!r}")
    return [path]


_NOT_READ = object()
"""The value of an image cell that a parquet read skipped (only its `ImageRef` was made)."""


def _read_rows(
    path: Path, image_key: str, *, peek_short_images: bool = False
) -> Iterator[tuple[_Where, dict, ImageRef]]:
    """Rows of a parquet, TSV or jsonl file: ``(where, record, ImageRef to its image_key cell)``.

    TSV and jsonl records hold every field, the image too (the caller checks and drops it). Parquet
    records hold every column but ``image_key`` (no image bytes are read); with ``peek_short_images``
    they also hold the image cells that are null or at most `IMAGE_REFERENCE_MAX_CHARS` long
    (HR-Bench references), found by reading the image column one row group at a time.
    """
    stat = path.stat()
    resolved = str(path.resolve())

    def ref(row: int, span: tuple[int, int]) -> ImageRef:
        return ImageRef(resolved, row, image_key, stat.st_mtime_ns, stat.st_size, span)

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet_rows(path, image_key, ref, peek_short_images)
    elif suffix == ".tsv":
        # Base64 images make fields far longer than csv's 128 KiB default limit.
        csv.field_size_limit(sys.maxsize)
        with path.open("rb") as handle:
            lines = _CountedLines(handle)
            reader = csv.reader(lines, delimiter="\t")
            header = next(reader, [])
            row = 0
            while True:
                start = lines.offset
                fields = next(reader, None)
                if fields is None:
                    break
                if not fields:
                    continue  # a blank line, as csv.DictReader skips it
                record = dict(zip(header, fields))
                yield _Where(path, "row", row), record, ref(row, (start, lines.offset - start))
                row += 1
    else:
        for number, record, span in _read_json_lines(path):
            yield _Where(path, "line", number), record, ref(number, span)


class _CountedLines:
    """Decoded lines of a binary file for `csv.reader`, counting the bytes handed out so far.

    csv.reader pulls exactly the lines of one record per ``next``, so the count before and after
    a record is its byte span.
    """

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.offset = 0

    def __iter__(self) -> _CountedLines:
        return self

    def __next__(self) -> str:
        line = self.handle.readline()
        if not line:
            raise StopIteration
        self.offset += len(line)
        return line.decode("utf-8")


def _read_parquet_rows(
    path: Path, image_key: str, ref: Callable[[int, tuple[int, int]], ImageRef], peek_short_images: bool
) -> Iterator[tuple[_Where, dict, ImageRef]]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    if image_key not in names:
        raise ValueError(f"{str(path)!r}: expects a column {image_key!r}, actual columns: {names}")
    _warn_if_row_groups_are_large(file, path, image_key)
    others = [name for name in names if name != image_key]
    image_type = file.schema_arrow.field(image_key).type
    peek = peek_short_images and (pa.types.is_string(image_type) or pa.types.is_large_string(image_type))
    row = 0
    for group in range(file.num_row_groups):
        records = file.read_row_group(group, columns=others).to_pylist()
        short: dict[int, Any] = {}
        if peek:
            column = file.read_row_group(group, columns=[image_key]).column(0)
            is_short = pc.fill_null(pc.less_equal(pc.binary_length(column), IMAGE_REFERENCE_MAX_CHARS), True)
            short = {i: column[i].as_py() for i in pc.indices_nonzero(is_short).to_pylist()}
            del column  # one row group's images at a time
        for i, record in enumerate(records):
            if i in short:
                record[image_key] = short[i]
            yield _Where(path, "row", row), record, ref(row, (group, i))
            row += 1


def _warn_if_row_groups_are_large(file: Any, path: Path, image_key: str) -> None:
    """Warns when reading one image means reading more than `LARGE_ROW_GROUP_BYTES` of its row group."""
    metadata = file.metadata
    largest = 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        chunks = (row_group.column(j) for j in range(row_group.num_columns))
        size = sum(
            chunk.total_compressed_size
            for chunk in chunks
            if chunk.path_in_schema == image_key or chunk.path_in_schema.startswith(image_key + ".")
        )
        largest = max(largest, size)
    if largest > LARGE_ROW_GROUP_BYTES:
        warnings.warn(
            f"{str(path)!r}: a row group holds {largest / 2**20:.0f} MiB of column {image_key!r}, all of "
            "which is read for each image in it (pyarrow reads whole row groups). For random access "
            "rewrite it with small row groups: f = pyarrow.parquet.ParquetFile(src); with pyarrow.parquet."
            "ParquetWriter(dst, f.schema_arrow) as w: [w.write_batch(b) for b in f.iter_batches(batch_size=16)]",
            stacklevel=5,  # the caller of load_mme_realworld/load_hrbench
        )


def _image_bytes(value: Any, key: str, where: _Where) -> bytes:
    """Encoded image bytes of a cell; a bad cell raises the loaders' error naming file, row and key."""
    try:
        return decode_image_field(value)
    except ValueError:
        raise where.error(key, "a base64-encoded image", value) from None


def load_mme_realworld(path: str | Path) -> list[Sample]:
    """Loads MME-RealWorld or MME-RealWorld-Lite in the lmms-eval layout.

    Input: a ``.parquet`` or ``.jsonl`` file, or a folder of them (shards, read in name order). Fields:
    ``index``, ``question``, ``multi-choice options`` (``["(A) ...", "(B) ...", ...]``), ``answer``
    (letter), ``category`` (e.g. ``"Perception/Monitoring"``), ``l2-category``, ``bytes`` (base64
    image). Options lose their ``(A)`` prefixes; ``l2-category`` and ``question_id`` (when present)
    go to ``meta``. ``Sample.image`` is an `ImageRef` to the ``bytes`` cell (see the module docstring).
    """
    path = Path(path)
    samples = []
    for file in _table_files(path, (".parquet", ".jsonl")):
        for where, record, image in _read_rows(file, "bytes"):
            if "bytes" in record:  # jsonl hands the cell over: check it now, keep only the reference
                _image_bytes(record.pop("bytes"), "bytes", where)
            index = _require(record, "index", where, (int, str), "an int or str index")
            options_field = _require(record, "multi-choice options", where, list, 'a list of "(A) ..."')
            options = _options_from_lines(options_field, "multi-choice options", where)
            samples.append(
                Sample(
                    id=str(index),
                    image=image,
                    question=_require(record, "question", where, str, "the question text").strip(),
                    options=options,
                    answer=_letter(record.get("answer"), options, "answer", where),
                    category=str(record.get("category") or ""),
                    meta={k: record[k] for k in ("l2-category", "question_id") if record.get(k) is not None},
                )
            )
    return _check_unique(samples, path)


def load_hrbench(path: str | Path) -> list[Sample]:
    """Loads HR-Bench 4K or 8K.

    Input: a ``.tsv`` (tab-separated, header row) or ``.parquet`` file with columns ``index``,
    ``question``, ``answer`` (letter), ``category``, ``A``, ``B``, ``C``, ``D``, ``cycle_category``,
    ``image`` (base64). Each question appears four times with rotated options; report the mean
    over rotations. ``meta`` keeps ``index`` and ``cycle_category``. ``Sample.image`` is an
    `ImageRef` to the ``image`` cell (see the module docstring). An ``image`` field of at most
    `IMAGE_REFERENCE_MAX_CHARS` characters that names another row's ``index`` refers to that row's
    image (VLMEvalKit's TSVs store each image once); such rows share that row's `ImageRef`, so
    the image is read and decoded once.
    """
    path = Path(path)
    samples = []
    for file in _table_files(path, (".tsv", ".parquet")):
        rows = []  # (where, record without its image, ImageRef, the short image field or None)
        for where, record, image in _read_rows(file, "image", peek_short_images=True):
            cell = record.pop("image", _NOT_READ)
            short = _short_field(cell)
            if short is None and cell is not _NOT_READ:
                _image_bytes(cell, "image", where)  # an image in hand (TSV): check it now, then drop it
            rows.append((where, record, image, short))
        holders = {str(record.get("index")).strip(): image for _, record, image, short in rows if short is None}
        for where, record, image, short in rows:
            index = _require(record, "index", where, (int, str), "an int or str index")
            if short is not None:
                # A reference when it names a row holding an image; else read as (tiny) base64 itself.
                image = holders.get(short, image)
            options = []
            for letter in "ABCD":
                value = record.get(letter)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    value = str(value)  # numeric answers (counts) come back as numbers from parquet
                if not isinstance(value, str) or not value.strip():
                    raise where.error(letter, "a non-empty option text", value)
                options.append(value.strip())
            samples.append(
                Sample(
                    id=str(index),
                    image=image,
                    question=_require(record, "question", where, str, "the question text").strip(),
                    options=tuple(options),
                    answer=_letter(record.get("answer"), options, "answer", where),
                    category=str(record.get("category") or ""),
                    meta={"index": index, "cycle_category": record.get("cycle_category")},
                )
            )
    return _check_unique(samples, path)


def _short_field(value: Any) -> str | None:
    """A str/int ``image`` field of at most `IMAGE_REFERENCE_MAX_CHARS` characters (stripped), else None."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip()
    return text if text and len(text) <= IMAGE_REFERENCE_MAX_CHARS else None


# -------------------------------------------------------------------------------------------- jsonl


def load_jsonl(path: str | Path) -> list[Sample]:
    """Loads the generic jsonl schema (see the module docstring); image paths relative to the file."""
    path = Path(path)
    samples = []
    for number, record, _ in _read_json_lines(path):
        where = _Where(path, "line", number)
        sample_id = record.get("id", f"{path.stem}-{number}")
        if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool):
            raise where.error("id", "a str", sample_id)
        image = path.parent / _require(record, "image", where, str, "an image path relative to the file")
        if not image.is_file():
            raise where.error("image", "an existing image file", str(image))
        options = _require(record, "options", where, list, "a list of 2-10 option texts")
        if not 2 <= len(options) <= len(LETTERS) or not all(
            isinstance(o, str) and o.strip() for o in options
        ):
            raise where.error("options", "a list of 2-10 non-empty option texts", options)
        category = record.get("category", "")
        if not isinstance(category, str):
            raise where.error("category", "a str", category)
        meta = record.get("meta", {})
        if not isinstance(meta, dict):
            raise where.error("meta", "a JSON object", meta)
        samples.append(
            Sample(
                id=str(sample_id),
                image=image,
                question=_require(record, "question", where, str, "the question text").strip(),
                options=tuple(o.strip() for o in options),
                answer=_letter(record.get("answer"), options, "answer", where),
                category=category,
                boxes=_boxes(record.get("boxes", []), where),
                meta=meta,
            )
        )
    return _check_unique(samples, path)


# ----------------------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., list[Sample]]] = {
    "vstar": load_vstar,
    "mme_realworld": load_mme_realworld,
    "hrbench": load_hrbench,
    "jsonl": load_jsonl,
    "synthetic": synthetic,
}
"""Dataset name -> loader, for configs: ``dataset: {name: vstar, root: /data/vstar}``."""


def load_dataset(name: str, **kwargs: Any) -> list[Sample]:
    """Calls the loader registered under ``name`` with ``kwargs`` (e.g. ``root=``, ``path=``, ``n=``).

    >>> len(load_dataset("synthetic", n=4, preset="cpu"))
    4
    """
    if name not in DATASETS:
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Expects a dataset name in {sorted(DATASETS)}, actual: {name!r}.{hint}")
    return DATASETS[name](**kwargs)
