"""The synthetic benchmark: the answer is invisible in the view and readable in a tight crop."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from zoomgym.envs.data import load_image, synthetic
from zoomgym.envs.data.synthetic import COLOUR_PAIRS, RELATIONS, SYNTHETIC_PRESETS
from zoomgym.envs.geometry import Box
from zoomgym.envs.views import RESAMPLING, ViewBudget, make_view

# Views are made exactly as the env makes them (envs.views.make_view) under the budget the
# samples were generated for.


def budget_of(sample) -> ViewBudget:
    meta = sample.meta
    return ViewBudget(
        meta["view_min_pixels"], meta["view_max_pixels"], meta["patch_size"], meta["merge_size"]
    )


def whole(sample) -> Box:
    side = sample.meta["canvas_size"]
    return Box(0, 0, side, side)


def view_array(sample, resample: str) -> np.ndarray:
    image, _ = make_view(
        load_image(sample),
        whole(sample),
        budget_of(sample),
        sample_id=sample.id,
        kind="original",
        resample=resample,
    )
    return np.asarray(image, dtype=np.float64)


def crop_array(sample, region: Box) -> np.ndarray:
    image, _ = make_view(load_image(sample), region, budget_of(sample), sample_id=sample.id, kind="crop")
    return np.asarray(image, dtype=np.float64)


def in_view(sample, box: Box) -> tuple[slice, slice]:
    k = sample.meta["view_factor"]
    return slice(int(box.y1) // k, int(box.y2) // k), slice(int(box.x1) // k, int(box.x2) // k)


# Each colour pair lies on one axis through grey: c and 255 - c. A trivial classifier projects the
# crop's deviations from grey on each axis; the pair's own axis carries 3x the energy of any other.
AXES = {
    name: (np.asarray(c, float) - 127.5) / np.linalg.norm(np.asarray(c, float) - 127.5)
    for name, c in COLOUR_PAIRS.items()
}


def classify_checks(pixels: np.ndarray) -> str:
    deviation = pixels.reshape(-1, 3) - 127.5
    return max(AXES, key=lambda name: np.abs(deviation @ AXES[name]).mean())


@pytest.fixture(scope="module")
def attribute_samples():
    return synthetic(16, seed=11, preset="cpu", categories=("attribute",))


@pytest.fixture(scope="module")
def relative_samples():
    return synthetic(16, seed=12, preset="cpu", categories=("relative_position",))


@pytest.mark.parametrize("resample", sorted(RESAMPLING))
def test_attribute_view_of_the_target_is_the_same_for_every_answer(attribute_samples, resample):
    """Viewed target patches of different answers: mean |difference| < 0.1 grey levels (of 255).

    By construction (see envs/data/synthetic.py) every view pixel of a patch is the same grey whatever
    its colours; only the 4 corner pixels, where the filter window is cut on both axes, may differ by
    a few levels (measured: mean 0.02, max 5 for Lanczos). 0.1 is 500x below the crop difference.
    """
    views = {}
    for sample in attribute_samples:
        views.setdefault(sample.answer_text(), []).append(
            view_array(sample, resample)[in_view(sample, sample.boxes[0])]
        )
    assert len(views) == 4, "every answer must occur"
    patches = [(answer, patch) for answer, group in views.items() for patch in group]
    for i, (answer_a, a) in enumerate(patches):
        for answer_b, b in patches[i + 1 :]:
            if answer_a != answer_b:
                difference = np.abs(a - b)
                assert difference.mean() < 0.1
                assert np.count_nonzero(difference.max(axis=-1) > 1) <= 4  # corners only
    # and the view is grey, so no colour at all survives
    assert abs(patches[0][1].mean() - 127.75) < 0.5


def test_attribute_tight_crops_differ_and_a_trivial_classifier_reads_them(attribute_samples):
    crops = {}
    for sample in attribute_samples:
        crop = crop_array(sample, sample.boxes[0])
        assert classify_checks(crop) == sample.answer_text()
        crops.setdefault(sample.answer_text(), crop)
    names = list(crops)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shape = np.minimum(crops[a].shape, crops[b].shape)
            # Two pairs share up to two channels (e.g. black-white and blue-yellow): > 20 levels, 200x the view.
            assert np.abs(crops[a][: shape[0], : shape[1]] - crops[b][: shape[0], : shape[1]]).mean() > 20


def test_the_same_classifier_is_at_chance_on_the_view(attribute_samples):
    predictions = {
        classify_checks(view_array(s, "bicubic")[in_view(s, s.boxes[0])]) for s in attribute_samples
    }
    assert len(predictions) == 1  # one constant guess whatever the answer: chance level


@pytest.mark.parametrize("resample", ["bicubic", "nearest"])
def test_relative_position_view_of_the_frame_is_the_same_for_every_answer(relative_samples, resample):
    """The whole inside of the target frame (its 2 x 2 grid of patches) views the same for all answers.

    So the view tells neither which patch is which nor whether the named pair is a row or a column.
    """
    # Frame ring (3k) and grey margin (3k) off: what is left is the grid, whose view pixels never
    # reach the frame's colour (filter radius <= 3k), which varies between samples, not answers.
    edge = 6 * relative_samples[0].meta["view_factor"]
    views = {}
    for sample in relative_samples:
        x1, y1, x2, y2 = sample.meta["target_frame_box"]
        inside = Box(x1 + edge, y1 + edge, x2 - edge, y2 - edge)
        views.setdefault(sample.answer_text(), []).append(
            view_array(sample, resample)[in_view(sample, inside)]
        )
    assert len(views) == 4
    flat = [(answer, v) for answer, group in views.items() for v in group]
    for i, (answer_a, a) in enumerate(flat):
        for answer_b, b in flat[i + 1 :]:
            if answer_a != answer_b:
                assert np.abs(a - b).mean() < 0.1


def test_relative_position_crop_is_readable(relative_samples):
    pattern = re.compile(r"Where is the (.+) checked square relative to the (.+) checked square\?")
    answers = Counter()
    for sample in relative_samples:
        first, second = pattern.search(sample.question).groups()
        box = sample.boxes[0]
        target = sample.meta["target_size"]
        crop = crop_array(sample, box)
        # Both named patches fill the two ends of the union box: read each end.
        if box.width > box.height:
            cut = crop.shape[1] * target // int(box.width)
            ends = {"start": crop[:, :cut], "end": crop[:, -cut:]}
            before, after = "left of it", "right of it"
        else:
            cut = crop.shape[0] * target // int(box.height)
            ends = {"start": crop[:cut], "end": crop[-cut:]}
            before, after = "above it", "below it"
        read = {end: classify_checks(pixels) for end, pixels in ends.items()}
        assert {read["start"], read["end"]} == {first, second}
        predicted = before if read["start"] == first else after
        assert predicted == sample.answer_text()
        answers[predicted] += 1
    assert set(answers) == set(RELATIONS)


def test_ground_truth_boxes_are_valid_zoom_boxes_in_the_view():
    for preset in SYNTHETIC_PRESETS:
        for sample in synthetic(2, preset=preset):
            k = sample.meta["view_factor"]
            factor = budget_of(sample).factor
            (box,) = sample.boxes
            assert min(box.width, box.height) / k > factor
            assert box.x2 <= sample.meta["canvas_size"] and box.y2 <= sample.meta["canvas_size"]


def test_default_preset_is_high_resolution_with_small_targets():
    (sample,) = synthetic(1, seed=5)
    image = load_image(sample)
    assert image.size == (2940, 2940) and min(image.size) >= 2048
    assert budget_of(sample) == ViewBudget()  # the Qwen2.5-VL default budget
    assert ViewBudget().shown_size(*image.size) == (980, 980) and sample.meta["view_factor"] == 3
    assert sample.boxes[0].area / (2940 * 2940) < 0.002  # V*-like: the median target is < 0.1%


def test_deterministic_and_independent_of_n():
    a = synthetic(4, seed=3, preset="cpu")
    b = synthetic(6, seed=3, preset="cpu")
    for x, y in zip(a, b):
        assert x.image == y.image and x.question == y.question and x.options == y.options
        assert x.answer == y.answer and x.boxes == y.boxes and x.id == y.id
    c = synthetic(4, seed=4, preset="cpu")
    assert all(x.image != z.image for x, z in zip(a, c))


def test_four_options_and_uniform_answer_letters():
    samples = synthetic(32, seed=0, preset="cpu")
    assert Counter(s.category for s in samples) == {"attribute": 16, "relative_position": 16}
    for category in ("attribute", "relative_position"):
        letters = Counter(s.answer for s in samples if s.category == category)
        assert letters == {"A": 4, "B": 4, "C": 4, "D": 4}
    for s in samples:
        assert len(s.options) == 4 and len(set(s.options)) == 4
        assert set(s.options) == set(COLOUR_PAIRS if s.category == "attribute" else RELATIONS)


def test_bad_settings_are_rejected_with_a_useful_message():
    with pytest.raises(ValueError, match=r"actual: 2048 -> 980 px \(factor 2\.090\); nearest valid sizes"):
        synthetic(1, canvas_size=2048)
    with pytest.raises(ValueError, match=r"target_size.*>= 87, actual: 60"):
        synthetic(1, preset="cpu", target_size=60)
    with pytest.raises(ValueError, match="preset"):
        synthetic(1, preset="huge")
    with pytest.raises(ValueError, match="categories"):
        synthetic(1, categories=("counting",))
    with pytest.raises(ValueError, match="frames"):
        synthetic(1, preset="cpu", distractors=5)


def test_other_budgets_work_when_the_canvas_matches():
    # A merge-size-1 model (factor 14) with a 448 x 448 view of a 1344 canvas: k = 3.
    samples = synthetic(
        2,
        preset="cpu",
        canvas_size=1344,
        view_min_pixels=56 * 56,
        view_max_pixels=448 * 448,
        merge_size=1,
        target_size=48,
    )
    assert samples[0].meta["view_factor"] == 3 and load_image(samples[0]).size == (1344, 1344)
