"""The toy RL questions hide their answer in the view and show it in a crop, measured with classifiers
that know exactly where the checks are (stronger than any policy, which has to find them first)."""

from __future__ import annotations

import numpy as np
from zoomgym.envs.data import load_image, synthetic
from zoomgym.envs.data.toy_tasks import TOY_SYNTHETIC, toy_view_answer
from zoomgym.envs.geometry import Box
from zoomgym.envs.views import ViewBudget, make_view

TOY_BUDGET = ViewBudget(224 * 224, 224 * 224, 28, 1)


def region_features(image, box: Box, scale: float) -> np.ndarray:
    """Mean and covariance of the channels over ``box`` (original px) in an image shown at 1/scale: every
    colour pair of checks averages to grey, but which channels move together tells the pairs apart."""
    x1, y1, x2, y2 = (int(round(v / scale)) for v in box.as_tuple())
    pixels = np.asarray(image, dtype=float)[y1:y2, x1:x2].reshape(-1, 3)
    return np.concatenate([pixels.mean(0), np.cov(pixels.T)[np.triu_indices(3)]])


def nearest_centroid_accuracy(train_x, train_y, test_x, test_y) -> float:
    centroids = {label: train_x[train_y == label].mean(0) for label in set(train_y)}
    labels = sorted(centroids)
    predicted = [labels[int(np.argmin([np.linalg.norm(x - centroids[k]) for k in labels]))] for x in test_x]
    return float(np.mean(np.array(predicted) == test_y))


def test_view_hides_the_answer_that_a_crop_shows() -> None:
    samples = synthetic(400, 7, images="pil", **TOY_SYNTHETIC)
    view_x, crop_x, answers, residual = [], [], [], []
    for sample in samples:
        image = load_image(sample)
        full = Box(0, 0, *image.size)
        view, _ = make_view(image, full, TOY_BUDGET, sample_id=sample.id, kind="original")
        target = sample.boxes[0]
        scale = image.size[0] / view.size[0]
        view_x.append(region_features(view, target, scale))
        x1, y1, x2, y2 = (int(round(v / scale)) for v in target.as_tuple())
        residual.append(np.abs(np.asarray(view, dtype=float)[y1:y2, x1:x2] - 127.5).max(-1))
        crop, _ = make_view(image, target, TOY_BUDGET, sample_id=sample.id, kind="crop")
        crop_x.append(region_features(crop, Box(0, 0, target.width, target.height), target.width / crop.size[0]))
        answers.append(sample.answer)
    view_x, crop_x, answers = np.array(view_x), np.array(crop_x), np.array(answers)
    crop_acc = nearest_centroid_accuracy(crop_x[:300], answers[:300], crop_x[300:], answers[300:])
    assert crop_acc >= 0.95, crop_acc
    # The view's colour means carry nothing: 100 held-out questions, 4 balanced letters, chance 0.25
    # with a standard error of about 0.04.
    means = view_x[:, :3]
    assert nearest_centroid_accuracy(means[:300], answers[:300], means[300:], answers[300:]) <= 0.37
    # What is left in the view: the four corner pixels of the 32x32 patch differ from grey by at most
    # 2.5 levels (the rest by rounding, 0.5). A classifier told where the patch is separates the pairs
    # from those corners (the channel covariance); a policy must first find them in a 224x224 image.
    for deviation in residual:
        assert (deviation > 0.5).sum() <= 4 and deviation.max() <= 2.5


def test_view_answer_chats_hold_only_the_view() -> None:
    chats = toy_view_answer(4, 1, TOY_BUDGET)
    for chat in chats:
        assert len(chat.images) == 1 and chat.images[0].size == (224, 224)
        assert chat.reply in {"\\boxed{A}", "\\boxed{B}", "\\boxed{C}", "\\boxed{D}"}
