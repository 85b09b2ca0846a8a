"""The evaluation's metrics, hand-computed: target hits, crop usefulness, tool gain and harm, repeated draws, benchmark splits."""

from __future__ import annotations

import math

import pytest
from PIL import Image
from zoomgym.agents.evaluate.records import EpisodeRecord
from zoomgym.agents.metrics import (
    TARGET_MAX_AREA,
    counterfactual_metrics,
    covers_truth,
    episode_metrics,
    paired_outcomes,
    repeat_metrics,
    target_hit,
    useful_crop,
)
from zoomgym.envs.data import Sample
from zoomgym.envs.geometry import Box

TRUTH = Box(100, 100, 200, 200)
IMAGE = Image.new("RGB", (400, 400))


def sample(sample_id: str = "q", category: str = "", boxes=(TRUTH,), **meta) -> Sample:
    return Sample(sample_id, IMAGE, "What is it?", ("red", "blue", "green", "white"), "B", category, boxes, meta)


def episode(correct: bool, s: Sample, box: Box | None = None, arm: str = "eval", draw: int = 0,
            valid: bool = True) -> EpisodeRecord:
    """A two-turn zoom episode (or, without ``box``, a one-turn answer) as the metrics read it; ``valid=False``:
    the box was refused and the env fell back to the original."""
    start = {"next_turn": "ground" if box else "answer", "sample": s, "visual_tokens": 64}
    steps = [{"next_turn": "answer", "box_valid": valid, "fallback": not valid, "box_original": box,
              "action": "zoom" if valid else "fallback", "sample": s}] if box else []
    end = {"next_turn": None, "action": "answer", "correct": correct, "sample": s, "visual_tokens": 128 if box else 64}
    return EpisodeRecord(arm, s.id, 0, draw, s.category, ["..."] * (len(steps) + 1), [start, *steps, end],
                         float(correct), len(steps) + 1, True, False, False)


def test_a_crop_is_useful_when_it_holds_the_truth_or_overlaps_it_by_half():
    assert covers_truth(Box(90, 90, 210, 210), [TRUTH]) and covers_truth(TRUTH, [TRUTH])
    assert not covers_truth(Box(101, 90, 210, 210), [TRUTH]) and not covers_truth(Box(0, 0, 10, 10), [])
    assert covers_truth(Box(0, 0, 500, 500), [TRUTH, Box(300, 300, 400, 400)])
    assert not covers_truth(Box(0, 0, 250, 250), [TRUTH, Box(300, 300, 400, 400)])  # one of two
    assert useful_crop(Box(100, 100, 200, 180), [TRUTH])  # IoU 0.8, cuts part of the box
    assert useful_crop(Box(100, 100, 200, 150), [TRUTH])  # IoU 0.5 exactly
    assert not useful_crop(Box(100, 100, 200, 149), [TRUTH])
    assert useful_crop(Box(0, 0, 1000, 1000), [TRUTH])  # holds it: useful however large


def test_crop_usefulness_over_valid_boxes_on_samples_with_boxes_per_category():
    a, b, none = sample("a", "attribute"), sample("b", "position"), sample("c", "attribute", boxes=())
    episodes = [episode(True, a, Box(90, 90, 210, 210)), episode(False, a, Box(0, 0, 50, 50)),
                episode(True, b, Box(100, 100, 200, 160)), episode(True, none, Box(0, 0, 50, 50))]
    m = episode_metrics(episodes, "eval")
    assert m["eval/crop_useful_ratio"] == pytest.approx(2 / 3)  # the sample without boxes is left out
    assert m["eval/crop_useful_ratio/attribute"] == 0.5 and m["eval/crop_useful_ratio/position"] == 1.0
    assert "eval/crop_useful_ratio" not in episode_metrics([episode(True, none, Box(0, 0, 50, 50))], "eval")


def test_a_target_hit_holds_a_targets_centre_in_at_most_a_quarter_of_the_image():
    size = (400, 400)  # a quarter: 40000 px^2; TRUTH's centre is (150, 150)
    assert TARGET_MAX_AREA == 0.25
    assert target_hit(Box(140, 140, 160, 160), [TRUTH], size)  # small, on the centre
    assert target_hit(Box(0, 0, 200, 200), [TRUTH], size)  # exactly a quarter
    assert not target_hit(Box(0, 0, 201, 200), [TRUTH], size)  # a hair more than a quarter
    assert not target_hit(Box(0, 0, 400, 400), [TRUTH], size)  # the whole image "covers" everything: no hit
    assert not target_hit(Box(100, 100, 149, 200), [TRUTH], size)  # on the box, not on its centre
    assert target_hit(Box(340, 340, 360, 360), [TRUTH, Box(300, 300, 400, 400)], size)  # one target's centre
    assert not target_hit(Box(140, 140, 160, 160), [], size)


def test_target_hit_ratio_counts_every_grounding_turn_and_invalid_boxes_as_misses():
    a, b, none = sample("a", "attribute"), sample("b", "position"), sample("c", "attribute", boxes=())
    episodes = [
        episode(True, a, Box(140, 140, 160, 160)),  # hit
        episode(True, a, Box(0, 0, 400, 400)),  # valid, holds the centre, but the whole image: miss
        episode(False, a, Box(140, 140, 160, 160), valid=False),  # refused box (fallback): miss
        episode(True, b, Box(120, 130, 180, 170)),  # hit
        episode(False, b, Box(300, 300, 390, 390)),  # valid, elsewhere: miss
        episode(True, none, Box(140, 140, 160, 160)),  # no ground truth: not counted
        episode(True, a),  # answered without a grounding turn: not counted
    ]
    m = episode_metrics(episodes, "eval")
    assert m["eval/target_hit_ratio"] == pytest.approx(2 / 5)
    assert m["eval/target_hit_ratio/attribute"] == pytest.approx(1 / 3) and m["eval/target_hit_ratio/position"] == 0.5
    assert m["eval/valid_box_ratio"] == pytest.approx(5 / 6)  # what the hit rate corrects: most boxes are "valid"
    assert "eval/target_hit_ratio" not in episode_metrics(episodes[5:], "eval")


def test_tool_gain_harm_and_oracle_headroom_pair_questions_and_draws():
    qs = [sample(f"q{i}", "xy"[i % 2]) for i in range(5)]
    direct_ok, zoom_ok = [0, 0, 1, 1, 0], [1, 0, 0, 1, 1]  # gain, both wrong, harm, both right, gain
    direct = [episode(bool(ok), s, arm="direct") for s, ok in zip(qs, direct_ok)]
    zoom = [episode(bool(ok), s, TRUTH) for s, ok in zip(qs, zoom_ok)]
    oracle = [episode(True, s, arm="oracle_crop") for s in qs[:4]]  # q4 has no oracle episode
    m = counterfactual_metrics(direct, zoom, "cf", oracle=oracle)
    assert m["cf/pairs"] == 5 and m["cf/tool_gain"] == 0.4 and m["cf/tool_harm"] == 0.2
    assert m["cf/net_gain"] == pytest.approx(0.2) and m["cf/both_right"] == 0.2 and m["cf/both_wrong"] == 0.2
    # category x: q0 (gain), q2 (harm), q4 (gain); y: q1 (both wrong), q3 (both right)
    assert m["cf/tool_gain/x"] == pytest.approx(2 / 3) and m["cf/tool_harm/x"] == pytest.approx(1 / 3)
    assert m["cf/net_gain/x"] == pytest.approx(1 / 3) and m["cf/net_gain/y"] == 0.0
    assert m["cf/oracle_crop_headroom"] == 0.5  # oracle 4/4 vs zoom 2/4 on q0..q3
    assert paired_outcomes(direct, zoom)[("q2", 0)] == "harm"
    # Draws pair with draws: the n-th episode of a question without zoom with its n-th with zoom.
    twice = [episode(False, qs[0], arm="direct"), episode(True, qs[0], arm="direct", draw=1)]
    assert paired_outcomes(twice, [episode(True, qs[0], TRUTH), episode(False, qs[0], TRUTH, draw=1)]) == {
        ("q0", 0): "gain", ("q0", 1): "harm"}


def test_avg_and_pass_at_k_with_their_spread():
    qs = [sample(f"q{i}") for i in range(3)]
    table = [[1, 0], [1, 1], [0, 0]]  # questions x draws
    episodes = [episode(bool(ok), s, draw=d) for s, row in zip(qs, table) for d, ok in enumerate(row)]
    m = repeat_metrics(episodes, "eval")
    assert m["eval/avg@2"] == 0.5
    assert m["eval/avg@2_std"] == pytest.approx(math.sqrt(((2 / 3 - 0.5) ** 2 + (1 / 3 - 0.5) ** 2) / 1))
    assert m["eval/pass@2"] == pytest.approx(2 / 3)
    assert m["eval/pass@2_se"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 3))
    assert repeat_metrics(episodes[::2], "eval") == {}  # one draw each: nothing to report


def test_mme_realworld_l2_categories_and_hrbench_rotations():
    mme = [sample("1", "Perception/OCR", (), **{"l2-category": "license"}), sample("2", "Perception/OCR", (),
           **{"l2-category": "text"}), sample("3", "Reasoning", (), **{"l2-category": "text"})]
    m = episode_metrics([episode(ok, s) for s, ok in zip(mme, [True, True, False])], "eval")
    assert m["eval/l2_accuracy/license"] == 1.0 and m["eval/l2_accuracy/text"] == 0.5
    assert m["eval/accuracy/Perception/OCR"] == 1.0 and m["eval/accuracy/Reasoning"] == 0.0

    def rotations(question: str, correct: list[bool]) -> list[EpisodeRecord]:
        out = []
        for r, ok in enumerate(correct):
            options = ["red", "blue", "green", "white"][r:] + ["red", "blue", "green", "white"][:r]
            s = Sample(f"{question}{r}", b"", question, tuple(options), "ABCD"[options.index("blue")], "single",
                       meta={"cycle_category": f"cycle{r}"})
            out.append(episode(ok, s))
        return out

    episodes = rotations("Which colour?", [True, True, True, True]) + rotations("Which flag?", [True, False, True, True])
    m = episode_metrics(episodes, "eval")
    assert m["eval/rotation_accuracy"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)  # mean over the four rotations
    assert m["eval/all_rotations_accuracy"] == 0.5  # one of two questions right in all four
