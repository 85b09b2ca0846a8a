from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from zoomgym.envs.geometry import (
    FRAMES,
    Box,
    Frame,
    clamp_box,
    get_frame,
    grow_box,
    original_to_region,
    region_to_original,
    register_frame,
)
from zoomgym.envs.views import ViewBudget, make_view

BUDGET = ViewBudget()


def close(a: Box, b: Box, tol: float = 1e-6) -> bool:
    scale = max(1.0, *(abs(v) for v in a.as_tuple()))
    return all(math.isclose(x, y, rel_tol=tol, abs_tol=tol * scale) for x, y in zip(a.as_tuple(), b.as_tuple()))


@st.composite
def sizes(draw: st.DrawFn) -> tuple[int, int]:
    """Image sizes with aspect ratio at most 8."""
    width = draw(st.integers(56, 4000))
    return width, draw(st.integers(max(56, width // 8), min(4000, width * 8)))


@st.composite
def sub_box(draw: st.DrawFn, width: float, height: float) -> Box:
    """A box inside ``[0, width] x [0, height]``, at least a tenth of the shorter side and of aspect
    ratio within [1/2, 2] where the image allows it (so chains of crops stay reasonable)."""
    short = min(width, height)
    w = draw(st.floats(0.1, 1.0)) * short
    h = min(w * draw(st.floats(0.5, 2.0)), height)
    x1 = draw(st.floats(0, 1)) * (width - w)
    y1 = draw(st.floats(0, 1)) * (height - h)
    return Box(x1, y1, x1 + w, y1 + h)


def test_registry_has_the_three_frames() -> None:
    assert {"qwen25", "norm1000", "relative"} <= set(FRAMES)


def test_unknown_frame_suggests_a_name() -> None:
    with pytest.raises(ValueError, match="Did you mean 'norm1000'"):
        get_frame("norm100")


def test_duplicate_frame_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_frame(Frame("qwen25", FRAMES["qwen25"].to_shown, FRAMES["qwen25"].from_shown, "rule"))


@pytest.mark.parametrize(
    ("frame", "coords", "expected"),
    [
        ("qwen25", (10, 20, 30, 40), (10, 20, 30, 40)),
        ("norm1000", (500, 250, 1000, 1000), (700, 200, 1400, 800)),
        ("relative", (0.5, 0.25, 1.0, 1.0), (700, 200, 1400, 800)),
    ],
)
def test_frames_map_to_shown_pixels(frame: str, coords: tuple, expected: tuple) -> None:
    assert FRAMES[frame].to_shown(coords, (1400, 800)) == pytest.approx(expected)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), size=sizes(), frame=st.sampled_from(sorted(FRAMES)))
def test_frame_round_trip(data: st.DataObject, size: tuple[int, int], frame: str) -> None:
    box = data.draw(sub_box(*size))
    converter = FRAMES[frame]
    there = converter.from_shown(box.as_tuple(), size)
    back = Box(*converter.to_shown(there, size))
    assert close(back, box)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), original=sizes(), frame=st.sampled_from(sorted(FRAMES)), depth=st.integers(1, 4))
def test_crops_of_crops_map_back_through_the_chain(
    data: st.DataObject, original: tuple[int, int], frame: str, depth: int
) -> None:
    """A box written in the frame of the image shown last maps to original pixels through every view,
    and equals the composition of the per-view affine maps computed independently."""
    region = Box(0, 0, *original)
    converter = FRAMES[frame]
    # Independent bookkeeping: original = offset + scale * shown, composed by hand.
    for _ in range(depth):
        shown = BUDGET.shown_size(region.width, region.height)
        box_shown = data.draw(sub_box(*shown))
        written = converter.from_shown(box_shown.as_tuple(), shown)
        parsed = Box(*converter.to_shown(written, shown))
        next_region = region_to_original(parsed, region, shown)
        sx, sy = region.width / shown[0], region.height / shown[1]
        expected = Box(
            region.x1 + sx * box_shown.x1,
            region.y1 + sy * box_shown.y1,
            region.x1 + sx * box_shown.x2,
            region.y1 + sy * box_shown.y2,
        )
        assert close(next_region, expected)
        assert close(original_to_region(next_region, region, shown), box_shown)
        # Every region stays inside the previous one, hence inside the original.
        assert next_region.x1 >= region.x1 - 1e-6 and next_region.x2 <= region.x2 + 1e-6
        assert next_region.y1 >= region.y1 - 1e-6 and next_region.y2 <= region.y2 + 1e-6
        region = next_region


@pytest.mark.parametrize("frame", sorted(FRAMES))
def test_chained_crops_show_the_marker_where_the_mapping_says(frame: str) -> None:
    """Pixel-level check: crop a crop of a real image and find a one-colour marker at the mapped spot."""
    pixels = np.zeros((1500, 2000, 3), dtype=np.uint8)
    pixels[700:760, 1300:1360] = (255, 255, 255)  # the marker, original pixels
    original = Image.fromarray(pixels)
    marker = Box(1300, 700, 1360, 760)
    converter = FRAMES[frame]
    image, view = make_view(original, Box(0, 0, 2000, 1500), BUDGET, sample_id="m", kind="original",
                            resample="nearest")
    for step_box in (Box(1000, 500, 1800, 1100), Box(1250, 650, 1450, 820)):  # original pixels
        shown_box = view.from_original(step_box)
        written = converter.from_shown(shown_box.as_tuple(), view.shown_size)
        region = view.to_original(Box(*converter.to_shown(written, view.shown_size)))
        assert close(region, step_box)
        image, view = make_view(original, region, BUDGET, sample_id="m", kind="crop", resample="nearest")
        on_view = view.from_original(marker)
        cx, cy = int((on_view.x1 + on_view.x2) / 2), int((on_view.y1 + on_view.y2) / 2)
        assert image.getpixel((cx, cy)) == (255, 255, 255)
        outside = (max(0, int(on_view.x1) - 5), max(0, int(on_view.y1) - 5))
        assert image.getpixel(outside) == (0, 0, 0)


def test_clamp_and_grow() -> None:
    assert clamp_box(Box(-10, -5, 50, 60), 40, 40) == Box(0, 0, 40, 40)
    assert clamp_box(Box(50, 50, 60, 60), 40, 40) is None
    grown = grow_box(Box(0, 0, 4, 4), 56, 448, 448)
    assert grown == Box(0, 0, 56, 56)
    grown = grow_box(Box(440, 200, 448, 210), 56, 448, 448)
    assert grown.x2 == 448 and grown.width == 56 and grown.height == 56
    assert grow_box(Box(0, 0, 10, 10), 1000, 100, 50) == Box(0, 0, 100, 50)


def test_box_reads_as_the_four_sequence_of_the_benchmarks():
    box = Box(10, 20, 30.5, 60)
    assert list(box) == [10.0, 20.0, 30.5, 60.0]
    assert box == [10, 20, 30.5, 60] and box == (10, 20, 30.5, 60) and box != [10, 20, 30, 60]
    assert np.asarray(box).tolist() == [10.0, 20.0, 30.5, 60.0]
    assert box[2] == 30.5 and len(box) == 4
    assert {box: 1}[Box(10, 20, 30.5, 60)] == 1
