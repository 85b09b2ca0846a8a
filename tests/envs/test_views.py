from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from zoomgym.envs.geometry import Box
from zoomgym.envs.views import RESAMPLING, ViewBudget, make_view

BUDGET = ViewBudget()


# (width, height, merge_size) -> (w, h) from transformers 5.23's torch-free Qwen2-VL `smart_resize`
# (image_processing_pil_qwen2_vl), min_pixels=256*28*28, max_pixels=1280*28*28, patch 14. Recorded
# once rather than imported: importing the processor costs seconds of test time.
PROCESSOR_SIZES = {
    (4000, 3000, 2): (1148, 840),
    (7680, 4320, 2): (1316, 728),
    (3840, 2160, 2): (1316, 728),
    (1690, 1500, 2): (1036, 924),
    (5759, 1440, 2): (1988, 476),
    (60, 60, 2): (448, 448),
    (29, 700, 2): (112, 2212),
    (2940, 2940, 2): (980, 980),
    (333, 777, 1): (336, 784),
    (1400, 700, 2): (1400, 700),
    (17, 23, 1): (392, 532),
    (8000, 50, 2): (8008, 56),
    (2800, 1400, 2): (1400, 700),
    (449, 447, 2): (448, 448),
    (1, 1, 2): (448, 448),
    (14, 2000, 1): (42, 5362),
}


@pytest.mark.parametrize(("case", "expected"), PROCESSOR_SIZES.items())
def test_shown_size_matches_the_processor(case: tuple[int, int, int], expected: tuple[int, int]) -> None:
    width, height, merge = case
    assert ViewBudget(merge_size=merge).shown_size(width, height) == expected


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 9000), height=st.integers(1, 9000), merge=st.sampled_from([1, 2]))
def test_shown_size_contract(width: int, height: int, merge: int) -> None:
    budget = ViewBudget(merge_size=merge)
    if max(width, height) / min(width, height) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            budget.shown_size(width, height)
        return
    shown_w, shown_h = budget.shown_size(width, height)
    assert shown_w % budget.factor == 0 and shown_h % budget.factor == 0
    if max(width, height) / min(width, height) <= 50:  # extreme aspects may pin a side at one factor
        assert budget.min_pixels <= shown_w * shown_h <= budget.max_pixels
        # Idempotent: the processor leaves an image at its shown size alone.
        assert budget.shown_size(shown_w, shown_h) == (shown_w, shown_h)


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 5000),
    height=st.integers(1, 5000),
    min_tokens=st.integers(1, 400),
    extra_tokens=st.integers(0, 8),
)
def test_tight_budgets_give_fixed_points_inside_the_budget(
    width: int, height: int, min_tokens: int, extra_tokens: int
) -> None:
    # min_pixels close to (or equal to) max_pixels: Qwen's rounding alone can leave the budget.
    try:
        budget = ViewBudget(min_pixels=min_tokens * 28 * 28, max_pixels=(min_tokens + extra_tokens) * 28 * 28)
    except ValueError:  # e.g. exactly 317 tokens: a prime above 200 makes no grid of aspect <= 200
        assert extra_tokens == 0 and min_tokens > 200
        return
    if max(width, height) / min(width, height) > 50:  # extreme aspects may find no in-budget size
        return
    shown = budget.shown_size(width, height)
    assert shown[0] % 28 == 0 and shown[1] % 28 == 0
    assert budget.min_pixels <= shown[0] * shown[1] <= budget.max_pixels
    assert budget.shown_size(*shown) == shown


def test_equal_min_and_max_pixels_keep_the_shown_size_stable() -> None:
    budget = ViewBudget(min_pixels=112 * 112, max_pixels=112 * 112)
    assert budget.shown_size(112, 84) == (112, 112)  # Qwen's rounding alone: 140x112, then 112x84 again
    assert budget.shown_size(4000, 3000) == (112, 112)
    with pytest.raises(ValueError, match="whole number"):
        ViewBudget(min_pixels=800, max_pixels=1000)  # no multiple of 28*28 = 784 in [800, 1000]
    with pytest.raises(ValueError, match="aspect"):
        ViewBudget(min_pixels=317 * 784, max_pixels=317 * 784)  # 317 tokens: only a 1 x 317 grid


def test_small_crops_are_enlarged_and_large_images_reduced() -> None:
    assert BUDGET.shown_size(60, 60) == (448, 448)
    w, h = BUDGET.shown_size(7680, 4320)
    assert w * h <= BUDGET.max_pixels and w > 1000
    assert BUDGET.visual_tokens(448, 448) == 256
    assert BUDGET.grid_thw(448, 476) == (1, 34, 32)


def test_factor_follows_patch_and_merge_size() -> None:
    budget = ViewBudget(min_pixels=64 * 14 * 14, max_pixels=256 * 14 * 14, patch_size=14, merge_size=1)
    assert budget.factor == 14
    assert budget.shown_size(210, 210) == (210, 210)  # 15 tokens a side: fine at 14, not at 28
    assert ViewBudget().shown_size(210, 210) == (448, 448)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_pixels": 0}, "positive int"),
        ({"min_pixels": 10**7}, "min_pixels <= max_pixels"),
        ({"min_pixels": 10, "max_pixels": 100}, "max_pixels >= factor"),
        ({"merge_size": 2.0}, "positive int"),
    ],
)
def test_budget_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ViewBudget(**kwargs)


def fine_stripes(size: int) -> Image.Image:
    """One-pixel black/white stripes: grey when reduced by a smoothing filter, crisp when enlarged."""
    xx = np.tile(np.arange(size), (size, 1))
    return Image.fromarray(((xx % 2) * 255).astype(np.uint8)).convert("RGB")


@pytest.mark.parametrize("resample", sorted(RESAMPLING))
def test_crops_come_from_the_full_resolution_original(resample: str) -> None:
    original = fine_stripes(3000)
    view, info = make_view(original, Box(0, 0, 3000, 3000), BUDGET, sample_id="s", kind="original",
                           resample=resample)
    crop, crop_info = make_view(original, Box(1000, 1000, 1040, 1040), BUDGET, sample_id="s", kind="crop",
                                resample=resample)
    assert view.size == info.shown_size and crop.size == crop_info.shown_size == (448, 448)
    assert crop_info.region == Box(1000, 1000, 1040, 1040) and crop_info.kind == "crop"
    # The enlarged crop shows the stripes (high contrast) whatever the filter.
    assert np.asarray(crop).std() > 60
    if resample != "nearest":  # a smoothing filter averages the checks to grey in the reduced view
        assert np.asarray(view).std() < 20


def test_make_view_rejects_regions_outside_and_unknown_filters() -> None:
    image = Image.new("RGB", (100, 100))
    with pytest.raises(ValueError, match="inside the 100x100"):
        make_view(image, Box(50, 50, 150, 90), BUDGET, sample_id="s", kind="crop")
    with pytest.raises(ValueError, match="resample"):
        make_view(image, Box(0, 0, 50, 50), BUDGET, sample_id="s", kind="crop", resample="box-ish")
