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


def test_mme_realworld_corrupt_image_is_reported_when_the_dataset_loads(tmp_path):
    records = mme_records()
    records[0]["bytes"] = base64.b64encode(b"not an image").decode()
    path = tmp_path / "mme.jsonl"
    write_jsonl(path, records)
    with pytest.raises(ImageLoadError, match=r"sample '7'.*mme\.jsonl' line 1 key 'bytes'"):
        load_mme_realworld(path)


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
    rows[1]["image"] = "999"  # names no row: read as (broken) base64, reported when the dataset loads
    write_tsv(path := tmp_path / "bad.tsv", rows)
    with pytest.raises(ImageLoadError, match=r"sample '101'.*bad\.tsv' row 1 column 'image'"):
        load_hrbench(path)


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


# ------------------------------------------------------------------------ what a dataset may hold


def write_dataset(folder, image: str = "images/cat.png", **record) -> object:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    tiny_image(7).save(folder / "images" / "cat.png")
    path = folder / "train.jsonl"
    write_jsonl(path, [{**generic_records()[0], "image": image, **record}])
    return path


def test_image_paths_leaving_the_dataset_folder_are_refused_unless_allowed(tmp_path):
    data = tmp_path / "data"
    tiny_image(1).save(tmp_path / "secret.png")
    (data / "images").mkdir(parents=True)
    (data / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    for written in ("../secret.png", str(tmp_path / "secret.png"), "images/link.png", "images/../../secret.png"):
        path = write_dataset(data, image=written)
        with pytest.raises(ValueError, match=r"train\.jsonl' line 1, key 'image': expects a path inside the "
                           r"dataset folder .*sample 'cat-17'.*allow_outside_root=True.*secret\.png"):
            load_jsonl(path)
        (sample,) = load_jsonl(path, allow_outside_root=True)
        assert load_image(sample).size == (24, 16)
    inside = write_dataset(data, image=str(data / "images" / "cat.png"))  # absolute, but inside: fine
    assert load_jsonl(inside)[0].id == "cat-17"


def test_vstar_image_paths_follow_the_same_rule(tmp_path):
    make_vstar(tmp_path / "vstar")
    moved = tmp_path / "vstar" / "direct_attributes" / "sa_4690.jpg"
    moved.rename(tmp_path / "sa_4690.jpg")
    moved.symlink_to(tmp_path / "sa_4690.jpg")
    with pytest.raises(ValueError, match=r"line 1, key 'image': expects a path inside the dataset folder.*"
                       r"sample 'direct_attributes/sa_4690'"):
        load_vstar(tmp_path / "vstar")
    assert len(load_vstar(tmp_path / "vstar", allow_outside_root=True)) == 2


def test_bad_images_fail_at_load_naming_the_file_line_and_sample(tmp_path):
    path = write_dataset(tmp_path)
    (tmp_path / "images" / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageLoadError, match=r"train\.jsonl' line 1: .*sample 'cat-17'.*cat\.png.*not a decodable"):
        load_jsonl(path)
    make_vstar(tmp_path / "vstar")
    (tmp_path / "vstar" / "relative_position" / "sa_10.jpg").write_bytes(b"GIF89a")
    with pytest.raises(ImageLoadError, match=r"line 2: .*sample 'relative_position/sa_10'"):
        load_vstar(tmp_path / "vstar")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_table_cells_that_are_not_images_fail_at_load(tmp_path, fmt):
    records = mme_records()
    records[1]["bytes"] = base64.b64encode(b"not an image").decode()
    path = tmp_path / f"mme.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        write_jsonl(path, records)
    where = "line 2 key" if fmt == "jsonl" else "row 1 column"
    with pytest.raises(ImageLoadError, match=rf"sample '8'.*mme\.{fmt}' {where} 'bytes' is not a decodable image"):
        load_mme_realworld(path)


def test_hrbench_without_an_image_column_fails_at_load(tmp_path):
    path = tmp_path / "hr.tsv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HR_COLUMNS[:-1], delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(hr_rows())
    with pytest.raises(ValueError, match=r"hr\.tsv': expects a column 'image', actual columns: \['index'"):
        load_hrbench(path)


def test_header_checks_show_a_progress_bar_for_large_sets(tmp_path, monkeypatch, capsys):
    import zoomgym.envs.data.loaders as loaders

    path = write_dataset(tmp_path)
    load_jsonl(path)
    assert "images" not in capsys.readouterr().err  # small sets stay quiet
    monkeypatch.setattr(loaders, "PROGRESS_MIN_IMAGES", 1)
    load_jsonl(path)
    assert "checking images of train.jsonl" in capsys.readouterr().err


def test_data_files_that_are_folders_fifos_or_not_text_name_the_file_and_line(tmp_path):
    import os

    with pytest.raises(ValueError, match=r"Expects a jsonl file, actual: .* is a folder"):
        load_jsonl(tmp_path)
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(ValueError, match=r"pipe\.jsonl' is not a regular file"):
        load_jsonl(tmp_path / "pipe.jsonl")
    good = json.dumps(generic_records()[0]).encode()
    path = write_dataset(tmp_path)
    path.write_bytes(good + b"\n" + b'{"id": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl' line 2: expects UTF-8 text, actual: byte 0xe9 at column 12"):
        load_jsonl(path)
    path.write_bytes(good + b"\n" + b"[" * 100_000 + b"\n")
    with pytest.raises(ValueError, match=r"train\.jsonl' line 2: expects a JSON object, actual: nested deeper"):
        load_jsonl(path)
    hr = tmp_path / "hr.tsv"
    write_tsv(hr, hr_rows())
    hr.write_bytes(hr.read_bytes().replace(b"green", b"gr\xffen", 1))
    with pytest.raises(ValueError, match=r"hr\.tsv' line 2: expects UTF-8 text, actual: byte 0xff"):
        load_hrbench(hr)
    (tmp_path / "mme.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"mme\.parquet': expects a parquet file, actual: .*"):
        load_mme_realworld(tmp_path / "mme.parquet")
    make_vstar(tmp_path / "vstar")
    (tmp_path / "vstar" / "relative_position" / "sa_10.json").write_bytes(b"[" * 100_000)
    with pytest.raises(ValueError, match=r"sa_10\.json': expects a JSON object, actual: nested deeper"):
        load_vstar(tmp_path / "vstar")


def test_corrupt_parquet_data_pages_name_the_file(tmp_path):
    path = tmp_path / "mme.parquet"
    pq.write_table(pa.Table.from_pylist(mme_records()), path, compression="none")
    data = bytearray(path.read_bytes())
    start = data.index(b"What is the license")
    data[start : start + 64] = b"\xff" * 64  # inside a data page; the footer still parses
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"mme\.parquet'"):
        load_mme_realworld(path)


def test_table_cells_are_checked_from_their_first_bytes_unless_the_header_is_longer(tmp_path, monkeypatch):
    import zoomgym.envs.data.loaders as loaders

    monkeypatch.setattr(loaders, "HEADER_CHECK_BYTES", 4096)
    seen = []
    monkeypatch.setattr(loaders, "check_image", lambda sample, encoded: seen.append(len(encoded)) or check(sample, encoded))
    check = __import__("zoomgym.envs.data.images", fromlist=["check_image"]).check_image
    records = mme_records()
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8))
    for record, comment in zip(records, (b"", b"x" * 8000)):  # a header longer than 4096 bytes in the second
        buffer = io.BytesIO()
        noise.save(buffer, "JPEG", quality=95, comment=comment)
        record["bytes"] = base64.b64encode(buffer.getvalue()).decode()
        assert len(buffer.getvalue()) > 4 * 4096
    path = tmp_path / "mme.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    first, second = load_mme_realworld(path)
    assert seen[0] <= 4096 + 2 and seen[1] <= 4096 + 2 and 4 * 4096 <= seen[2] <= 4 * 4096 + 2  # the second: 4x more
    assert load_image(first).size == load_image(second).size == (120, 120)


def test_decoding_the_first_bytes_of_a_cell_with_line_breaks_and_without_padding():
    from zoomgym.envs.data.tables import decode_image_field

    raw = png_bytes(tiny_image(9, (64, 64)))
    text = base64.b64encode(raw).decode().rstrip("=")
    wrapped = "\n".join(text[i : i + 8] for i in range(0, len(text), 8))  # a third of it line breaks
    for cell in (text, wrapped, "data:image/png;base64," + wrapped, raw, {"bytes": raw}):
        head = decode_image_field(cell, max_bytes=100)
        assert raw.startswith(head) and 100 <= len(head) <= 102
        assert decode_image_field(cell, max_bytes=len(raw) + 50) == decode_image_field(cell) == raw
