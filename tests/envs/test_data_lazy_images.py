"""Images embedded in tables stay on disk: loaders return `ImageRef`s, read one cell on demand."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zoomgym.envs.data.images as images_module
import zoomgym.envs.data.loaders as loaders_module
from PIL import Image
from zoomgym.envs.data import (
    ImageLoadError,
    ImageRef,
    clear_image_cache,
    image_cache_info,
    image_size,
    load_hrbench,
    load_image,
    load_mme_realworld,
    load_view_source,
)

ROWS = 200
SIDE = 256  # a 256 x 256 RGB BMP is 196 KB: ~200 KB images, encoded at no cost


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_image_cache()
    yield
    clear_image_cache()


def noise_bmp(seed: int, side: int = SIDE) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="BMP")
    return buffer.getvalue()


def mme_row(i: int, image: bytes) -> dict:
    return {
        "index": i,
        "question": f"Question {i}?",
        "multi-choice options": ["(A) yes", "(B) no", "(C) maybe", "(D) never", "(E) always"],
        "answer": "ABCDE"[i % 5],
        "category": "Perception/Monitoring",
        "l2-category": "counting",
        "bytes": base64.b64encode(image).decode("ascii"),
    }


@pytest.fixture(scope="module")
def mme_parquet(tmp_path_factory):
    """200 rows of distinct ~200 KB images (52 MB of base64) in row groups of 16."""
    path = tmp_path_factory.mktemp("mme") / "mme_train.parquet"
    encoded = [noise_bmp(i) for i in range(ROWS)]
    rows = [mme_row(i, b) for i, b in enumerate(encoded)]
    columns = {key: [row[key] for row in rows] for key in rows[0]}  # faster than from_pylist
    # Images do not compress: store them plain, as image datasets usually are.
    pq.write_table(pa.table(columns), path, row_group_size=16, compression="none", use_dictionary=False)
    return path, encoded


def held_image_bytes(samples) -> int:
    return sum(len(s.image) for s in samples if isinstance(s.image, (bytes, bytearray)))


def test_parquet_samples_hold_no_image_bytes_and_loading_reads_no_image_column(mme_parquet, monkeypatch):
    path, encoded = mme_parquet
    read_columns = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        read_columns.append(columns)
        return original(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    samples = load_mme_realworld(path)
    assert len(samples) == ROWS and len(read_columns) == ROWS // 16 + 1
    assert all(columns is not None and "bytes" not in columns for columns in read_columns)
    assert all(isinstance(s.image, ImageRef) for s in samples)
    assert held_image_bytes(samples) == 0  # eager loading held sum(len(encoded)) = 39 MB
    assert sum(len(b) for b in encoded) > 39e6
    assert len(pickle.dumps(samples)) < 300 * ROWS  # what crosses a process queue


def test_lazy_images_decode_exactly_like_the_eager_bytes(mme_parquet):
    path, encoded = mme_parquet
    samples = load_mme_realworld(path)
    for i in (0, 15, 16, 101, ROWS - 1):  # first/last of a row group, the last row group
        sample = samples[i]
        assert sample.image.span == (i // 16, i % 16) and sample.image.row == i
        expected = np.asarray(Image.open(io.BytesIO(encoded[i])).convert("RGB"))
        assert np.array_equal(np.asarray(load_image(sample)), expected)
        assert image_size(sample) == (SIDE, SIDE)


def test_header_view_and_full_decode_read_the_cell_once(mme_parquet, monkeypatch):
    path, _ = mme_parquet
    reads = []
    original = images_module.read_image_ref
    monkeypatch.setattr(images_module, "read_image_ref", lambda ref: reads.append(ref) or original(ref))
    sample = load_mme_realworld(path)[42]
    image_size(sample)
    load_view_source(sample, (64, 64))
    load_image(sample)
    assert reads == [sample.image]


def test_references_from_two_loads_share_one_cache_entry_and_survive_pickling(mme_parquet):
    path, _ = mme_parquet
    first, again = load_mme_realworld(path)[7], pickle.loads(pickle.dumps(load_mme_realworld(path)[7]))
    assert first.image == again.image and hash(first.image) == hash(again.image)
    assert load_image(first) is load_image(again)
    assert image_cache_info().decodes == 1


def test_corrupt_cell_names_file_row_column_and_sample(tmp_path):
    rows = [mme_row(0, noise_bmp(0, 8)), mme_row(1, b"not an image"), mme_row(2, noise_bmp(2, 8))]
    rows[2]["bytes"] = None
    path = tmp_path / "mme.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    samples = load_mme_realworld(path)  # parquet cells are checked when read
    assert load_image(samples[0]).size == (8, 8)
    with pytest.raises(ImageLoadError, match=r"sample '1'.*mme\.parquet' row 1 column 'bytes' is not a decodable"):
        load_image(samples[1])
    with pytest.raises(ImageLoadError, match=r"sample '2'.*row 2 column 'bytes' holds no base64-encoded image \(None\)"):
        load_image(samples[2])


def test_changed_or_deleted_file_is_refused_not_read_at_stale_positions(tmp_path):
    path = tmp_path / "mme.jsonl"
    rows = [mme_row(i, noise_bmp(i, 8)) for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second, third = load_mme_realworld(path)
    assert isinstance(second.image, ImageRef) and second.image.row == 2  # jsonl: 1-based line
    assert np.array_equal(np.asarray(load_image(second)), np.asarray(Image.open(io.BytesIO(noise_bmp(1, 8)))))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))  # rows shift up one line
    with pytest.raises(ImageLoadError, match=r"sample '2'.*mme\.jsonl' line 3 key 'bytes' is in a file changed since"):
        load_image(third)
    assert load_image(second).size == (8, 8)  # decoded before the change: still served from the cache
    path.unlink()
    with pytest.raises(ImageLoadError, match=r"sample '0'.*mme\.jsonl' line 1 key 'bytes' does not exist"):
        load_image(first)


def test_tsv_records_are_found_by_byte_offset_even_with_quoted_newlines(tmp_path):
    header = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]
    images = [noise_bmp(i, 8 + i) for i in range(3)]
    lines = ["\t".join(header)]
    for i, image in enumerate(images):
        question = f'"Which colour?\nLine two of question {i}"'  # a quoted field spanning two lines
        fields = [str(10 + i), question, "A", "single", "ä", "b", "c", "d", f"single_{i}"]
        lines.append("\t".join([*fields, base64.b64encode(image).decode()]))
    path = tmp_path / "hr.tsv"
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    samples = load_hrbench(path)
    assert samples[1].question == "Which colour?\nLine two of question 1" and samples[1].options[0] == "ä"
    for sample, image in zip(samples, images, strict=True):
        assert isinstance(sample.image, ImageRef)
        assert np.array_equal(np.asarray(load_image(sample)), np.asarray(Image.open(io.BytesIO(image))))


def test_hrbench_parquet_references_share_the_holders_ref(tmp_path):
    image = base64.b64encode(noise_bmp(5, 12)).decode()
    rows = [
        {"index": 100 + r, "question": "q?", "answer": "A", "category": "single", "A": "a", "B": "b",
         "C": "c", "D": "d", "cycle_category": f"single_{r}", "image": image if r == 0 else "100"}
        for r in range(4)
    ]  # fmt: skip
    path = tmp_path / "hr.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # the holder in another row group
    samples = load_hrbench(path)
    assert all(s.image is samples[0].image for s in samples) and samples[0].image.span == (0, 0)
    assert load_image(samples[3]).size == (12, 12) and image_cache_info().decodes == 1


def test_parquet_without_the_image_column_and_large_row_groups(tmp_path, monkeypatch):
    path = tmp_path / "mme.parquet"
    row = mme_row(0, noise_bmp(0, 8))
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in row.items() if k != "bytes"}]), path)
    with pytest.raises(ValueError, match=r"mme\.parquet': expects a column 'bytes', actual columns"):
        load_mme_realworld(path)
    pq.write_table(pa.Table.from_pylist([row]), path)
    monkeypatch.setattr(loaders_module, "LARGE_ROW_GROUP_BYTES", 100)
    with pytest.warns(UserWarning, match=r"mme\.parquet': a row group holds .* of column 'bytes'.*small row groups"):
        load_mme_realworld(path)


def test_forked_child_opens_its_own_handles(mme_parquet):
    path, encoded = mme_parquet
    samples = load_mme_realworld(path)
    load_image(samples[3])  # the parent has the file open
    clear_image_cache()
    pid = os.fork()
    if pid == 0:  # child: must read through its own handle and exit without running pytest's teardown
        ok = np.array_equal(np.asarray(load_image(samples[20])), np.asarray(Image.open(io.BytesIO(encoded[20]))))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_hugging_face_image_struct_cells_and_raw_binary_cells(tmp_path):
    rows = [mme_row(i, noise_bmp(i, 8)) for i in range(2)]
    rows[0]["bytes"] = {"bytes": noise_bmp(0, 8), "path": None}  # the `datasets` Image feature
    rows[1]["bytes"] = {"bytes": noise_bmp(1, 8), "path": "b.bmp"}
    path = tmp_path / "mme.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    for i, sample in enumerate(load_mme_realworld(path)):
        assert np.array_equal(np.asarray(load_image(sample)), np.asarray(Image.open(io.BytesIO(noise_bmp(i, 8)))))
    raw = pa.table({k: [r[k]["bytes"] if k == "bytes" else r[k] for r in rows] for k in rows[0]})
    pq.write_table(raw, path)  # a plain binary column
    clear_image_cache()
    assert [load_image(s).size for s in load_mme_realworld(path)] == [(8, 8), (8, 8)]
