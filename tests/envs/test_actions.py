from __future__ import annotations

import pytest
from zoomgym.envs.actions import BoxRules, extract_boxed, iter_box_candidates, read_box
from zoomgym.envs.geometry import Box

SHOWN = (1000, 800)


DEFAULT_RULES = BoxRules()


def read(text: str, frame: str = "qwen25", rules: BoxRules = DEFAULT_RULES, scale=(2.0, 2.0)):
    return read_box(text, frame, SHOWN, scale, rules, 28)


@pytest.mark.parametrize(
    "text",
    [
        '```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "the sign"}]\n```',
        '[{"bbox_2d": [100, 200, 300, 400], "label": "the sign"}]',  # no fence
        'I will look here: [{"label": "x", "bbox_2d": [100, 200, 300, 400], "score": 0.9}] and stop.',
        "[100, 200, 300, 400]",  # bare list
        "[100.0, 200.0, 300.0, 400.0]",  # floats
        "[ 1e2 ,2E2, +300 , 400.]",  # exponents, signs, trailing dot
        "{'bbox_2d': [100, 200, 300, 400]}",  # single quotes
        "```json\n[{\"bbox_2d\": [100, 200, 300, 400]}\n```",  # broken JSON (unclosed list)
    ],
)
def test_accepted_box_formats(text: str) -> None:
    reading = read(text)
    assert reading.valid and reading.box_shown == Box(100, 200, 300, 400)


def test_first_valid_box_wins_and_keyed_boxes_come_first() -> None:
    text = 'first [0, 0, 10, 10] then [50, 50, 150, 150] and [{"bbox_2d": [400, 400, 600, 600]}]'
    assert read(text).box_shown == Box(400, 400, 600, 600)
    text = "[0, 0, 10, 10] is tiny, [50, 50, 150, 150] is fine, [200, 200, 300, 300] too"
    assert read(text).box_shown == Box(50, 50, 150, 150)
    assert [c for c in iter_box_candidates('[1,2,3,4] "bbox_2d": [5,6,7,8]')] == [(5, 6, 7, 8), (1, 2, 3, 4)]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[300, 200, 100, 400]", "reversed x"),
        ("[100, 200, 100, 400]", "zero width"),
        ("[100, 200, 128, 400]", "side of exactly one merged patch (must be larger)"),
        ("[-10, 200, 300, 400]", "outside on the left"),
        ("[100, 200, 1001, 400]", "outside on the right"),
        ("[0, 0, 999, 9.9]", "too thin"),
        ("[0, 0, 3000, 29.5]", "outside"),
        ("no box here", "nothing"),
        ("[nan, 1, 2, 3] [NaN, inf, 1, 2]", "non-numbers"),
        ("[1e400, 0, 1e401, 100]", "overflow to inf"),
    ],
)
def test_invalid_boxes(text: str, why: str) -> None:
    assert not read(text).valid, why


def test_aspect_ratio_limit_is_strict() -> None:
    rules = BoxRules(min_side=1.0)
    assert read("[0, 0, 990, 10]", rules=rules).valid  # 99:1
    assert not read("[0, 0, 1000, 10]", rules=rules).valid  # 100:1
    assert not read("[0, 0, 990, 10]", rules=BoxRules(min_side=1.0, max_aspect=50)).valid


def test_invalid_box_is_still_reported_for_diagnostics() -> None:
    reading = read("[-10, 200, 300, 400]")
    assert not reading.valid and reading.box_shown == Box(-10, 200, 300, 400)
    assert read("[300, 200, 100, 400]").box_shown is None  # cannot form a box at all


def test_clamp_clips_to_the_image() -> None:
    reading = read("[-10, 700, 300, 900]", rules=BoxRules(clamp=True))
    assert reading.valid and reading.box_shown == Box(0, 700, 300, 800)
    assert not read("[1200, 0, 1300, 100]", rules=BoxRules(clamp=True)).valid  # nothing left


def test_configurable_min_side_and_region_size() -> None:
    assert read("[100, 200, 120, 230]", rules=BoxRules(min_side=14)).valid
    assert not read("[100, 200, 120, 230]").valid
    # 100 shown px at 0.005 original px per shown px is half an original pixel: too small to crop.
    assert not read("[100, 100, 200, 200]", scale=(0.005, 0.005)).valid
    assert read("[100, 100, 200, 200]", scale=(0.005, 0.005), rules=BoxRules(min_region_side=0.1)).valid


@pytest.mark.parametrize(
    ("frame", "text"),
    [("norm1000", "[100, 250, 300, 500]"), ("relative", "[0.1, 0.25, 0.3, 0.5]")],
)
def test_frames_are_converted_before_checking(frame: str, text: str) -> None:
    reading = read(text, frame=frame)
    assert reading.valid and reading.box_shown == Box(100, 200, 300, 400)


def test_edge_of_the_image_in_normalised_frames_is_inside() -> None:
    assert read("[0, 0, 1000, 1000]", frame="norm1000").box_shown == Box(0, 0, 1000, 800)
    assert read("[0.5, 0.5, 1.0, 1.0]", frame="relative").valid


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{A}", "A"),
        (r"first \boxed{A}, on reflection \boxed{C}", "C"),
        (r"\boxed{\text{B}}", r"\text{B}"),
        (r"\boxed {D}", "D"),
        (r"\boxed{A} and an unclosed \boxed{B", "A"),
        (r"\boxed{}", ""),
        ("no answer", None),
        (r"\boxed{" * 1000, None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected
