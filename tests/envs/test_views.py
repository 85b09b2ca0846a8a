from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from zoomgym.envs.geometry import Box
from zoomgym.envs.views import MAX_ASPECT_RATIO, RESAMPLING, ViewBudget, make_view

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


def assert_accepted_fixed_point(budget: ViewBudget, shown: tuple[int, int]) -> None:
    """A size the processor accepts (aspect <= 200) and leaves alone: in budget, factor multiples."""
    w, h = shown
    assert w % budget.factor == 0 and h % budget.factor == 0 and w > 0 and h > 0
    assert budget.min_pixels <= w * h <= budget.max_pixels
    assert max(w, h) / min(w, h) <= MAX_ASPECT_RATIO
    assert budget.shown_size(w, h) == shown


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 70000), height=st.integers(1, 70000), merge=st.sampled_from([1, 2]))
def test_shown_size_contract(width: int, height: int, merge: int) -> None:
    # Every aspect, 1:70000 included: an image or region beyond 200 is shown squeezed to 200.
    budget = ViewBudget(merge_size=merge)
    assert_accepted_fixed_point(budget, budget.shown_size(width, height))


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
    assert_accepted_fixed_point(budget, budget.shown_size(width, height))


def test_extreme_aspect_original_is_shown_at_a_size_the_processor_accepts() -> None:
    # 387x63306 (aspect 164) rounds to 56x12796 (aspect 228) under Qwen's smart resize; the adapter's
    # processor then refused it mid-rollout ("absolute aspect ratio must be smaller than 200").
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    budget = ViewBudget()
    for width, height in ((387, 63306), (63306, 387), (10, 3000), (1, 16384), (16384, 60)):
        w, h = budget.shown_size(width, height)
        assert_accepted_fixed_point(budget, (w, h))
        assert smart_resize(h, w, budget.factor, budget.min_pixels, budget.max_pixels) == (h, w)
    assert budget.shown_size(387, 63306) == (56, 9156)  # aspect 163.5, the closest to 163.6 in budget


@settings(max_examples=200, deadline=None)
@given(
    width=st.floats(1, 70000),
    height=st.floats(1, 70000),
    min_tokens=st.integers(1, 1300),
    extra_tokens=st.sampled_from([0, 1, 3, 50, 1000]),
    merge=st.sampled_from([1, 2]),
)
def test_every_shown_size_is_left_alone_by_the_real_processor(
    width: float, height: float, min_tokens: int, extra_tokens: int, merge: int
) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    factor = 14 * merge
    try:
        budget = ViewBudget(min_pixels=min_tokens * factor**2, max_pixels=(min_tokens + extra_tokens) * factor**2,
                            merge_size=merge)
    except ValueError:
        return
    w, h = budget.shown_size(width, height)
    assert smart_resize(h, w, factor, budget.min_pixels, budget.max_pixels) == (h, w)


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
