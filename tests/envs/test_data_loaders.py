"""Every loader on a fixture written to its benchmark's exact schema (tiny images made here)."""

from __future__ import annotations

import base64
import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from zoomgym.envs.data import (
    DATASETS,
    ImageLoadError,
    ImageRef,
    Sample,
    load_dataset,
    load_hrbench,
    load_image,
    load_jsonl,
    load_mme_realworld,
    load_vstar,
)
from zoomgym.envs.geometry import Box


def tiny_image(seed: int, size: tuple[int, int] = (24, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# ------------------------------------------------------------------------------------------ V*

VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def make_vstar(root, *, label: str = "C") -> None:
    (root / "direct_attributes").mkdir(parents=True)
    (root / "relative_position").mkdir()
    tiny_image(1, (40, 30)).save(root / "direct_attributes" / "sa_4690.jpg")
    tiny_image(2, (50, 20)).save(root / "relative_position" / "sa_10.jpg")
    (root / "direct_attributes" / "sa_4690.json").write_text(
        json.dumps(
            {
                "target_object": ["glove"],
                "bbox": [[5, 6, 10, 8]],
                "question": "What is the material of the glove?",
                "options": ["leather", "rubber", "cotton", "kevlar"],
            }
        )
    )
    (root / "relative_position" / "sa_10.json").write_text(
        json.dumps(
            {
                "target_object": ["cup", "plate"],
                "bbox": [[1, 2, 3, 4], [20, 5, 10, 10]],
                "question": "Is the cup on the left or right side of the plate?",
                "options": ["left", "right"],
            }
        )
    )
    write_jsonl(
        root / "test_questions.jsonl",
        [
            {
                "image": "direct_attributes/sa_4690.jpg",
                "text": "What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) leather\n(D) kevlar\n"
                + VSTAR_INSTRUCTION,
                "category": "direct_attributes",
                "question_id": 0,
                "label": label,
            },
            {
                "image": "relative_position/sa_10.jpg",
                "text": "Is the cup on the left or right side of the plate?\n(A) right\n(B) left\n"
                + VSTAR_INSTRUCTION,
                "category": "relative_position",
                "question_id": 1,
                "label": "B",
            },
        ],
    )


def test_vstar(tmp_path):
    make_vstar(tmp_path)
    attribute, relative = load_vstar(tmp_path)
    assert attribute.id == "direct_attributes/sa_4690"
    assert attribute.question == "What is the material of the glove?"
    assert attribute.options == ("rubber", "cotton", "leather", "kevlar")
    assert attribute.answer == "C" and attribute.answer_text() == "leather"
    assert attribute.category == "direct_attributes"
    assert attribute.boxes == (Box(5, 6, 15, 14),)  # [x, y, w, h] -> [x1, y1, x2, y2]
    assert attribute.meta["target_object"] == ["glove"] and attribute.meta["question_id"] == 0
    assert relative.category == "relative_position" and relative.answer_text() == "left"
    assert relative.boxes == (Box(1, 2, 4, 6), Box(20, 5, 30, 15))
    assert load_image(attribute).size == (40, 30)


def test_vstar_label_disagreeing_with_the_annotation_names_file_and_line(tmp_path):
    make_vstar(tmp_path, label="A")  # (A) rubber, but the json's options[0] is leather
    with pytest.raises(ValueError, match=r"test_questions\.jsonl' line 1.*sa_4690\.json"):
        load_vstar(tmp_path)


def test_vstar_missing_annotation_or_image(tmp_path):
    make_vstar(tmp_path)
    (tmp_path / "relative_position" / "sa_10.json").unlink()
    with pytest.raises(ValueError, match=r"sa_10\.json.*missing"):
        load_vstar(tmp_path)
    (tmp_path / "direct_attributes" / "sa_4690.jpg").unlink()
    with pytest.raises(ValueError, match=r"line 1, key 'image'.*sa_4690\.jpg"):
        load_vstar(tmp_path)


def test_vstar_bad_bbox_and_missing_root(tmp_path):
    make_vstar(tmp_path)
    (tmp_path / "direct_attributes" / "sa_4690.json").write_text(
        json.dumps({"bbox": [[5, 6, 0, 8]], "options": ["leather", "rubber", "cotton", "kevlar"]})
    )
    with pytest.raises(ValueError, match=r"sa_4690\.json.*key 'bbox'"):
        load_vstar(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_vstar(tmp_path / "absent")


def test_vstar_text_without_options(tmp_path):
    make_vstar(tmp_path)
    lines = (tmp_path / "test_questions.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["text"] = "Is the cup left or right?"
    (tmp_path / "test_questions.jsonl").write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"line 2, key 'text'"):
        load_vstar(tmp_path)


def rewrite_questions(root, edit) -> None:
    """Applies ``edit(record)`` to every line of ``test_questions.jsonl``."""
    path = root / "test_questions.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        edit(record)
    write_jsonl(path, records)


def test_vstar_label_forms_and_missing_label(tmp_path):
    make_vstar(tmp_path)
    rewrite_questions(tmp_path, lambda r: r.update(label=f"({r['label']})"))
    assert [s.answer for s in load_vstar(tmp_path)] == ["C", "B"]
    rewrite_questions(tmp_path, lambda r: r.pop("label"))  # derived from the json's options[0]
    assert [s.answer_text() for s in load_vstar(tmp_path)] == ["leather", "left"]


def test_vstar_json_worded_differently_from_text_keeps_text_and_label(tmp_path):
    make_vstar(tmp_path)
    (tmp_path / "relative_position" / "sa_10.json").write_text(
        json.dumps(
            {
                "target_object": ["cup", "plate"],
                "bbox": [[1, 2, 3, 4], [20, 5, 10, 10]],
                "question": "Is the cup on the left or right side of the plate?",
                "options": ["The cup is on the left side of the plate.", "The cup is on the right side of the plate."],
            }
        )
    )
    relative = load_vstar(tmp_path)[1]
    assert relative.options == ("right", "left") and relative.answer == "B"
    assert relative.question == "Is the cup on the left or right side of the plate?"
    rewrite_questions(tmp_path, lambda r: r.pop("label"))
    with pytest.raises(ValueError, match=r"line 2, key 'label'.*options differ.*missing"):
        load_vstar(tmp_path)


# ------------------------------------------------------------------------------- MME-RealWorld


def mme_records() -> list[dict]:
    return [
        {
            "index": 7,
            "question": "What is the license plate number?",
            "multi-choice options": ["(A) AB12", "(B) CD34", "(C) EF56", "(D) GH78", "(E) The image does not feature it"],
            "answer": "B",
            "category": "Perception/Autonomous_Driving",
            "l2-category": "license",
            "bytes": b64(tiny_image(3)),
        },
        {
            "index": 8,
            "question": "How many cars are parked?",
            "multi-choice options": ["(A) 1", "(B) 2", "(C) 3", "(D) 4", "(E) 5"],
            "answer": "E",
            "category": "Perception/Monitoring",
            "l2-category": "counting",
            "bytes": b64(tiny_image(4)),
        },
    ]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_mme_realworld(tmp_path, fmt):
    path = tmp_path / f"mme.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(mme_records()), path)
    else:
        write_jsonl(path, mme_records())
    first, second = load_mme_realworld(path)
    assert first.id == "7" and first.options[-1] == "The image does not feature it"
    assert first.options[:2] == ("AB12", "CD34") and first.answer == "B"
    assert first.category == "Perception/Autonomous_Driving" and first.meta["l2-category"] == "license"
    assert np.array_equal(np.asarray(load_image(first)), np.asarray(tiny_image(3)))
    assert second.answer_text() == "5"


def test_mme_realworld_letter_forms_and_loose_base64(tmp_path):
    records = mme_records()
    records[0]["answer"] = "(B)"
    records[1]["answer"] = "e."
    image = tiny_image(4, (24, 17))
    encoded = b64(image)
    assert encoded.endswith("==")
    encoded = encoded.rstrip("=")
    records[1]["bytes"] = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))  # wrapped, unpadded
    path = tmp_path / "mme.jsonl"
    write_jsonl(path, records)
    first, second = load_mme_realworld(path)
    assert (first.answer, second.answer) == ("B", "E")
    assert np.array_equal(np.asarray(load_image(second)), np.asarray(image))


def test_mme_realworld_folder_of_shards(tmp_path):
    # A Hugging Face snapshot: shards under data/, a README, and a hidden cache folder to skip.
    (tmp_path / "data").mkdir()
    (tmp_path / ".cache").mkdir()
    (tmp_path / "README.md").write_text("# MME-RealWorld-Lite")
    for i, record in enumerate(mme_records()):
        pq.write_table(pa.Table.from_pylist([record]), tmp_path / "data" / f"train-{i:05d}.parquet")
        pq.write_table(pa.Table.from_pylist([record]), tmp_path / ".cache" / f"stale-{i}.parquet")
    assert [s.id for s in load_mme_realworld(tmp_path)] == ["7", "8"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("multi-choice options", ["(A) x", "(C) y"], r"line 2, key 'multi-choice options'"),
        ("answer", "F", r"line 2, key 'answer'.*'ABCDE'"),
        ("bytes", "not base64!", r"line 2, key 'bytes'"),
        ("question", None, r"line 2, key 'question'"),
    ],
)
def test_mme_realworld_bad_records_name_file_line_and_key(tmp_path, key, value, message):
    records = mme_records()
    records[1][key] = value
    path = tmp_path / "mme.jsonl"
    write_jsonl(path, records)
    with pytest.raises(ValueError, match=r"mme\.jsonl' " + message):
        load_mme_realworld(path)


def test_mme_realworld_corrupt_image_is_reported_when_loaded(tmp_path):
    records = mme_records()
    records[0]["bytes"] = base64.b64encode(b"not an image").decode()
    path = tmp_path / "mme.jsonl"
    write_jsonl(path, records)
    sample = load_mme_realworld(path)[0]
    with pytest.raises(ImageLoadError, match=r"sample '7'.*mme\.jsonl' line 1 key 'bytes'"):
        load_image(sample)


# ------------------------------------------------------------------------------------- HR-Bench

HR_COLUMNS = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]


def hr_rows() -> list[dict]:
    rows = []
    for rotation in range(4):
        options = ["red", "green", "blue", "white"]
        options = options[rotation:] + options[:rotation]
        rows.append(
            {
                "index": 100 + rotation,
                "question": "What colour is the flag on the roof?",
                "answer": "ABCD"[(4 - rotation) % 4],  # "red" moves one letter up per rotation
                "category": "single",
                **dict(zip("ABCD", options)),
                "cycle_category": f"single_{rotation}",
                "image": b64(tiny_image(5)),
            }
        )
    return rows


def write_tsv(path, rows) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HR_COLUMNS, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("fmt", ["tsv", "parquet"])
def test_hrbench(tmp_path, fmt):
    path = tmp_path / f"hr_bench_4k.{fmt}"
    if fmt == "tsv":
        write_tsv(path, hr_rows())
    else:
        pq.write_table(pa.Table.from_pylist(hr_rows()), path)
    samples = load_hrbench(path)
    assert len(samples) == 4
    assert all(s.answer_text() == "red" for s in samples)  # the rotations agree
    assert samples[1].options == ("green", "blue", "white", "red") and samples[1].answer == "D"
    assert samples[2].meta["cycle_category"] == "single_2" and str(samples[2].meta["index"]) == "102"
    assert samples[0].category == "single" and samples[0].id == "100"
    assert load_image(samples[0]).size == (24, 16)


def test_hrbench_answer_given_as_the_option_text(tmp_path):
    rows = hr_rows()
    rows[1]["answer"] = "Red"
    path = tmp_path / "hr.tsv"
    write_tsv(path, rows)
    assert load_hrbench(path)[1].answer == "D"


@pytest.mark.parametrize("fmt", ["tsv", "parquet"])
def test_hrbench_rows_referring_to_another_rows_image(tmp_path, fmt):
    rows = hr_rows()
    for row in rows[1:]:
        row["image"] = "100"  # VLMEvalKit stores the image once; the rotations name its row's index
    path = tmp_path / f"hr.{fmt}"
    if fmt == "tsv":
        write_tsv(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    samples = load_hrbench(path)
    assert all(s.image is samples[0].image for s in samples)  # one ImageRef (row 0), decoded once
    assert isinstance(samples[0].image, ImageRef) and samples[0].image.row == 0
    assert load_image(samples[3]).size == (24, 16)
    rows[1]["image"] = "999"  # names no row: read as (broken) base64, reported when decoded
    write_tsv(path := tmp_path / "bad.tsv", rows)
    with pytest.raises(ImageLoadError, match=r"sample '101'.*bad\.tsv' row 1 column 'image'"):
        load_image(load_hrbench(path)[1])


def test_hrbench_large_base64_fields_in_tsv(tmp_path):
    rows = hr_rows()[:1]
    rows[0]["image"] = b64(tiny_image(6, (400, 300)))  # > 128 KiB: csv's default field limit
    path = tmp_path / "hr.tsv"
    write_tsv(path, rows)
    assert load_image(load_hrbench(path)[0]).size == (400, 300)


def test_hrbench_bad_rows_name_file_row_and_key(tmp_path):
    rows = hr_rows()
    rows[2]["D"] = ""
    path = tmp_path / "hr.tsv"
    write_tsv(path, rows)
    with pytest.raises(ValueError, match=r"hr\.tsv' row 2, key 'D'"):
        load_hrbench(path)
    rows = hr_rows()
    rows[3]["index"] = 100
    write_tsv(path, rows)
    with pytest.raises(ValueError, match=r"unique sample ids.*'100'"):
        load_hrbench(path)
    (tmp_path / "hr.csv").write_text("")
    with pytest.raises(ValueError, match=r"Expects a \.tsv/\.parquet file"):
        load_hrbench(tmp_path / "hr.csv")


# ---------------------------------------------------------------------------------------- jsonl


def generic_records() -> list[dict]:
    return [
        {
            "id": "cat-17",
            "image": "images/cat.png",
            "question": "What colour is the collar?",
            "options": ["red", "blue", "green", "black"],
            "answer": "B",
            "category": "attribute",
            "boxes": [[4, 2, 12, 9.5]],
            "meta": {"source": "mine"},
        },
        {"image": "images/cat.png", "question": "Is it a cat?", "options": ["yes", "no"], "answer": "a"},
    ]


def test_jsonl_generic_schema(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    tiny_image(7).save(tmp_path / "data" / "images" / "cat.png")
    path = tmp_path / "data" / "train.jsonl"
    write_jsonl(path, generic_records())
    first, second = load_jsonl(path)
    assert isinstance(first, Sample)
    assert first.id == "cat-17" and first.answer_text() == "blue" and first.category == "attribute"
    assert first.boxes == (Box(4, 2, 12, 9.5),) and first.meta == {"source": "mine"}
    assert first.image == tmp_path / "data" / "images" / "cat.png"  # relative to the jsonl, not the cwd
    assert second.id == "train-2" and second.answer == "A" and second.boxes == () and second.category == ""
    assert load_image(second).size == (24, 16)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("image", "images/absent.png", r"line 1, key 'image'.*absent\.png"),
        ("answer", "E", r"line 1, key 'answer'.*'ABCD'"),
        ("options", ["only one"], r"line 1, key 'options'"),
        ("boxes", [[10, 10, 5, 20]], r"line 1, key 'boxes'"),
        ("boxes", [[1, 2, 3]], r"line 1, key 'boxes'"),
        ("question", "", r"line 1, key 'question'"),
        ("meta", [1], r"line 1, key 'meta'"),
    ],
)
def test_jsonl_bad_records_name_file_line_and_key(tmp_path, key, value, message):
    (tmp_path / "images").mkdir()
    tiny_image(7).save(tmp_path / "images" / "cat.png")
    records = generic_records()
    records[0][key] = value
    path = tmp_path / "train.jsonl"
    write_jsonl(path, records)
    with pytest.raises(ValueError, match=r"train\.jsonl' " + message):
        load_jsonl(path)


def test_jsonl_invalid_json_and_duplicate_ids(tmp_path):
    (tmp_path / "images").mkdir()
    tiny_image(7).save(tmp_path / "images" / "cat.png")
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(generic_records()[0]) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"train\.jsonl' line 3: expects a JSON object"):
        load_jsonl(path)
    write_jsonl(path, [generic_records()[0], generic_records()[0]])
    with pytest.raises(ValueError, match=r"unique sample ids.*'cat-17'"):
        load_jsonl(path)


# ------------------------------------------------------------------------------------- registry


def test_registry_names_and_did_you_mean(tmp_path):
    assert set(DATASETS) == {"vstar", "mme_realworld", "hrbench", "jsonl", "synthetic"}
    make_vstar(tmp_path)
    assert len(load_dataset("vstar", root=tmp_path)) == 2  # what `dataset: {name: vstar, root: ...}` does
    assert len(load_dataset("synthetic", n=2, preset="cpu")) == 2
    with pytest.raises(ValueError, match=r"'hrbench', 'jsonl'.*actual: 'vstr'\. Did you mean 'vstar'\?"):
        load_dataset("vstr", root=tmp_path)


def test_sample_takes_boxes_as_box_or_the_benchmarks_four_numbers():
    from zoomgym.envs.geometry import Box

    sample = Sample("s", b"", "q?", ("a", "b"), "A", boxes=[[1, 2, 30, 40], (5, 5, 9, 9.5), Box(0, 0, 1, 1)])
    assert sample.boxes == (Box(1, 2, 30, 40), Box(5, 5, 9, 9.5), Box(0, 0, 1, 1))
    assert all(isinstance(box, Box) for box in sample.boxes)
    with pytest.raises(TypeError, match="sample 's'"):
        Sample("s", b"", "q?", ("a", "b"), "A", boxes=[[1, 2, 3]])
    with pytest.raises(ValueError, match="sample 's'.*x1 < x2"):
        Sample("s", b"", "q?", ("a", "b"), "A", boxes=[[30, 2, 1, 40]])
