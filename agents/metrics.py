"""Episode metrics: one vocabulary for training, validation and evaluation.

``episode_metrics(episodes, prefix)`` runs every function of `EPISODE_METRICS` over the same
episodes and returns ``{f"{prefix}/{key}": value}``. Each function gets the `Episodes` view (the
episodes with their grounding turns worked out once) and returns its keys; a value of None means
undefined for these episodes (no grounding turn, no known box, no token ids) and is left out. The
keys are defined in ARCHITECTURE.md's metrics glossary.

An episode is a `Trajectory` or anything that reads like one (`Episode`: the evaluation's stored
`agents.evaluate.records.EpisodeRecord`), so a run scored from disk gets the numbers it got live.
Besides the per-batch metrics, the evaluation uses three functions over several batches:
`counterfactual_metrics` (the same questions without and with zoom), `repeat_metrics` (K draws per
question) and the box tests `covers_truth` / `useful_crop`.

A metric is one function here plus its glossary line::

    @episode_metric
    def answered_ratio(episodes: Episodes) -> dict[str, float | None]:
        \"\"\"Share of episodes whose final answer could be parsed.\"\"\"
        return {"answered_ratio": mean([float(t.infos[-1].get("answer") is not None) for t in episodes.trajectories])}
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np
from zoomgym.envs.data import image_size
from zoomgym.envs.geometry import Box

UNCATEGORISED = "none"
"""The category key of samples without a category (``accuracy/none``)."""

GROUNDING_TURNS = ("ground", "ground_or_answer")
"""Turn kinds (``info["next_turn"]``) in which the env asks for, or allows, a box."""

USEFUL_IOU = 0.5
"""A crop whose IoU with a ground-truth box reaches this is useful even if it cuts part of the box."""

TARGET_MAX_AREA = 0.25
"""Largest share of the image's area a box may cover and still be a `target_hit`. Containing a target's
centre alone is no evidence of grounding: a box of the whole image contains every centre, and so does any
box large enough. Without this bound a policy drawing ever larger boxes, valid but on no object in
particular, would read as one learning where to look, while ``valid_box_ratio`` rises and ``iou`` falls."""

OUTCOMES = ("gain", "harm", "both_right", "both_wrong")
"""A question's outcome without and with zoom: wrong -> right, right -> wrong, right twice, wrong twice."""


class Episode(Protocol):
    """What the metrics read of an episode (`agents.trajectory.Trajectory` has all of it).

    ``infos`` are the env's infos (reset, then one per step; ``infos[0]["sample"]`` is the `Sample`);
    ``length`` is 0 for an episode without token ids.
    """

    infos: list[dict[str, Any]]
    reward: float
    category: str
    sample_id: str
    num_turns: int
    truncated: bool
    context_truncated: bool

    @property
    def length(self) -> int: ...

    @property
    def response_length(self) -> int: ...


MetricFn = Callable[["Episodes"], dict[str, float | None]]

EPISODE_METRICS: list[MetricFn] = []
"""The metrics `episode_metrics` computes, in order; `episode_metric` appends one."""


def episode_metric(fn: MetricFn) -> MetricFn:
    """Decorator adding ``fn(episodes) -> {key: value or None}`` to `EPISODE_METRICS`."""
    EPISODE_METRICS.append(fn)
    return fn


def mean(values: Sequence[float]) -> float | None:
    """The mean, or None for no values."""
    return float(np.mean(values)) if len(values) else None


def covers_truth(box: Box, truth: Sequence[Box], eps: float = 1e-6) -> bool:
    """Whether ``box`` (original pixels) contains every ground-truth box (False without any)."""
    return bool(truth) and all(box.x1 <= t.x1 + eps and box.y1 <= t.y1 + eps and box.x2 >= t.x2 - eps
                               and box.y2 >= t.y2 - eps for t in truth)


def useful_crop(box: Box, truth: Sequence[Box]) -> bool:
    """Whether a crop of ``box`` shows what the question is about: it contains every ground-truth box
    (`covers_truth`), or its IoU with one of them is at least `USEFUL_IOU`."""
    return covers_truth(box, truth) or any(box.iou(t) >= USEFUL_IOU for t in truth)


def target_hit(box: Box, truth: Sequence[Box], image_size: tuple[int, int]) -> bool:
    """Whether ``box`` (original pixels) hits a target: it contains the centre of one of the ground-truth
    boxes and covers at most `TARGET_MAX_AREA` of the ``(width, height)`` image (False without truth)."""
    if box.area > TARGET_MAX_AREA * image_size[0] * image_size[1]:
        return False
    return any(box.x1 <= (t.x1 + t.x2) / 2 <= box.x2 and box.y1 <= (t.y1 + t.y2) / 2 <= box.y2 for t in truth)


def sample_of(episode: Episode) -> Any:
    """The episode's `Sample` (``infos[0]["sample"]``), or None."""
    return episode.infos[0].get("sample") if episode.infos else None


@dataclass(frozen=True)
class Episodes:
    """A batch of episodes as the metric functions read them."""

    trajectories: Sequence[Episode]

    @cached_property
    def correct(self) -> list[float]:
        """Per episode, 1.0 if its final answer was right."""
        return [float(bool(t.infos[-1].get("correct"))) for t in self.trajectories]

    @cached_property
    def grounding(self) -> list[tuple[Episode, dict[str, Any]]]:
        """``(trajectory, info)`` of every step that answered a grounding turn without answering: the
        env asked for (or allowed) a box, and ``info`` says what became of it."""
        return [(traj, info) for traj in self.trajectories for before, info in zip(traj.infos, traj.infos[1:])
                if before.get("next_turn") in GROUNDING_TURNS and info.get("action") != "answer"]

    @cached_property
    def zoomed(self) -> list[bool]:
        """Per episode, whether the model was shown at least one crop (wrote a valid box)."""
        return [any(info.get("box_valid") for info in t.infos[1:]) for t in self.trajectories]

    @cached_property
    def samples(self) -> list[Any]:
        """Per episode, its `Sample` (None when the infos do not carry it)."""
        return [sample_of(t) for t in self.trajectories]

    def meta(self, key: str) -> list[Any]:
        """Per episode, ``sample.meta[key]`` (None when absent)."""
        return [None if s is None else s.meta.get(key) for s in self.samples]


def episode_metrics(trajectories: Sequence[Episode], prefix: str) -> dict[str, float]:
    """Every `EPISODE_METRICS` key of ``trajectories`` as ``{prefix}/{key}`` (undefined ones left out)."""
    episodes = Episodes(trajectories)
    out: dict[str, float] = {}
    for fn in EPISODE_METRICS:
        out.update({f"{prefix}/{key}": value for key, value in fn(episodes).items() if value is not None})
    return out


@episode_metric
def outcome(episodes: Episodes) -> dict[str, float | None]:
    """``reward``, ``accuracy`` and, when samples have categories, ``accuracy/<category>``."""
    out = {"reward": mean([t.reward for t in episodes.trajectories]), "accuracy": mean(episodes.correct)}
    out.update(_by_category("accuracy", [t.category for t in episodes.trajectories], episodes.correct))
    return out


def _by_category(key: str, categories: Sequence[str], values: Sequence[float]) -> dict[str, float | None]:
    """``{key}/<category>``: the mean of ``values`` per category, when some episode has a category."""
    groups: dict[str, list[float]] = defaultdict(list)
    for category, value in zip(categories, values):
        groups[category or UNCATEGORISED].append(value)
    if len(groups) == 1 and UNCATEGORISED in groups:
        return {}
    return {f"{key}/{category}": mean(group) for category, group in sorted(groups.items())}


@episode_metric
def grounding(episodes: Episodes) -> dict[str, float | None]:
    """Grounding health, only when there were grounding turns: ``valid_box_ratio``, ``fallback_ratio``,
    ``iou``, ``zoom_rate``, ``accuracy_zoomed``, ``accuracy_not_zoomed``."""
    turns = episodes.grounding
    if not turns:
        return {}
    correct, zoomed = episodes.correct, episodes.zoomed
    return {
        "valid_box_ratio": mean([float(bool(info["box_valid"])) for _, info in turns]),
        "fallback_ratio": mean([float(bool(info.get("fallback"))) for _, info in turns]),
        "iou": mean([float(info["iou"]) for _, info in turns if info.get("iou") is not None and info["box_valid"]]),
        "zoom_rate": mean([float(z) for z in zoomed]),
        "accuracy_zoomed": mean([c for c, z in zip(correct, zoomed) if z]),
        "accuracy_not_zoomed": mean([c for c, z in zip(correct, zoomed) if not z]),
    }


@episode_metric
def shape(episodes: Episodes) -> dict[str, float | None]:
    """Episode shape: ``turns``, ``generated_tokens`` (episodes with token ids only), ``visual_tokens``,
    ``truncated_ratio``, ``context_truncated_ratio``."""
    trajectories = episodes.trajectories
    with_tokens = [t for t in trajectories if t.length > 0]
    return {
        "turns": mean([t.num_turns for t in trajectories]),
        "generated_tokens": mean([t.response_length for t in with_tokens]),
        "visual_tokens": mean([float(t.infos[-1].get("visual_tokens") or 0) for t in trajectories]),
        "truncated_ratio": mean([float(t.truncated) for t in trajectories]),
        "context_truncated_ratio": mean([float(t.context_truncated) for t in trajectories]),
    }


@episode_metric
def crop_usefulness(episodes: Episodes) -> dict[str, float | None]:
    """``crop_useful_ratio`` (and ``/<category>``): over valid boxes on samples with ground-truth boxes,
    the share whose crop is a `useful_crop`."""
    useful, categories = [], []
    for traj, info in episodes.grounding:
        sample = sample_of(traj)
        if info["box_valid"] and info.get("box_original") is not None and sample is not None and sample.boxes:
            useful.append(float(useful_crop(info["box_original"], sample.boxes)))
            categories.append(traj.category)
    if not useful:
        return {}
    return {"crop_useful_ratio": mean(useful), **_by_category("crop_useful_ratio", categories, useful)}


@episode_metric
def target_hits(episodes: Episodes) -> dict[str, float | None]:
    """``target_hit_ratio`` (and ``/<category>``): over every grounding turn on samples with ground-truth
    boxes, the share whose box is a `target_hit`; an invalid box or a fallback is a miss."""
    hits, categories = [], []
    for traj, info in episodes.grounding:
        sample = sample_of(traj)
        if sample is None or not sample.boxes:
            continue
        box = info.get("box_original")
        hits.append(float(bool(info["box_valid"]) and box is not None and target_hit(box, sample.boxes,
                                                                                      image_size(sample))))
        categories.append(traj.category)
    if not hits:
        return {}
    return {"target_hit_ratio": mean(hits), **_by_category("target_hit_ratio", categories, hits)}


@episode_metric
def l2_categories(episodes: Episodes) -> dict[str, float | None]:
    """``l2_accuracy/<l2-category>``: accuracy per MME-RealWorld ``l2-category`` (``sample.meta``)."""
    labels = episodes.meta("l2-category")
    if all(label is None for label in labels):
        return {}
    groups: dict[str, list[float]] = defaultdict(list)
    for label, ok in zip(labels, episodes.correct):
        groups[UNCATEGORISED if label is None else str(label)].append(ok)
    return {f"l2_accuracy/{label}": mean(values) for label, values in sorted(groups.items())}


def rotation_group(sample: Any) -> tuple[Any, ...]:
    """The question an HR-Bench row rotates: its category, question, set of options and correct text
    (the four rotations of a question share them; only the order of the options differs)."""
    return (sample.category, sample.question, tuple(sorted(sample.options)), sample.answer_text())


@episode_metric
def option_rotations(episodes: Episodes) -> dict[str, float | None]:
    """HR-Bench (samples with ``meta["cycle_category"]``): ``rotation_accuracy``, the mean over option
    rotations of each rotation's accuracy, and ``all_rotations_accuracy``, the share of questions
    answered right in every one of their episodes (all four rotations)."""
    cycles = episodes.meta("cycle_category")
    if all(cycle is None for cycle in cycles):
        return {}
    by_cycle: dict[str, list[float]] = defaultdict(list)
    by_question: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for sample, cycle, ok in zip(episodes.samples, cycles, episodes.correct):
        by_cycle[str(cycle)].append(ok)
        by_question[rotation_group(sample)].append(ok)
    return {
        "rotation_accuracy": mean([mean(values) for values in by_cycle.values()]),  # type: ignore[misc]
        "all_rotations_accuracy": mean([float(min(values)) for values in by_question.values()]),
    }


def _occurrences(episodes: Sequence[Episode]) -> list[tuple[str, int]]:
    """``(sample_id, n)``: the n-th episode of its sample (draw n of a question played K times)."""
    seen: Counter[str] = Counter()
    keys = []
    for episode in episodes:
        keys.append((episode.sample_id, seen[episode.sample_id]))
        seen[episode.sample_id] += 1
    return keys


def paired_outcomes(direct: Sequence[Episode], zoom: Sequence[Episode]) -> dict[tuple[str, int], str]:
    """The `OUTCOMES` entry of every ``(sample_id, draw)`` played both without zoom and with it."""
    without = dict(zip(_occurrences(direct), Episodes(direct).correct))
    out = {}
    for key, ok in zip(_occurrences(zoom), Episodes(zoom).correct):
        if key in without:
            before = without[key]
            out[key] = ("both_right" if ok else "harm") if before else ("gain" if ok else "both_wrong")
    return out


def counterfactual_metrics(direct: Sequence[Episode], zoom: Sequence[Episode], prefix: str,
                           oracle: Sequence[Episode] = ()) -> dict[str, float]:
    """Tool gain and harm of the same questions played without zoom (``direct``) and with it (``zoom``),
    paired by sample and draw: ``{prefix}/pairs``, ``tool_gain``, ``tool_harm``, ``net_gain``,
    ``both_right``, ``both_wrong``, and ``tool_gain/<category>``, ``tool_harm/<category>``,
    ``net_gain/<category>`` when samples have categories. With ``oracle`` (the same questions answered
    after the ground-truth crop), ``oracle_crop_headroom``: its accuracy minus the accuracy of the
    ``zoom`` episodes of the same samples and draws."""
    out = _tool_effect(direct, zoom)
    with_zoom = dict(zip(_occurrences(zoom), Episodes(zoom).correct))
    pairs = [(ok, with_zoom[key]) for key, ok in zip(_occurrences(oracle), Episodes(oracle).correct) if key in with_zoom]
    if pairs:
        out["oracle_crop_headroom"] = float(np.mean([a - b for a, b in pairs]))
    return {f"{prefix}/{key}": value for key, value in out.items() if value is not None}


def _tool_effect(direct: Sequence[Episode], zoom: Sequence[Episode]) -> dict[str, float | None]:
    outcomes = paired_outcomes(direct, zoom)
    if not outcomes:
        return {}
    category = {episode.sample_id: episode.category for episode in zoom}
    values = list(outcomes.values())
    categories = [category[sample_id] for sample_id, _ in outcomes]
    out: dict[str, float | None] = {"pairs": float(len(values))}
    for name in OUTCOMES:
        out[name if name.startswith("both") else f"tool_{name}"] = mean([float(v == name) for v in values])
    out["net_gain"] = out["tool_gain"] - out["tool_harm"]  # type: ignore[operator]
    net = [float(v == "gain") - float(v == "harm") for v in values]
    out.update(_by_category("tool_gain", categories, [float(v == "gain") for v in values]))
    out.update(_by_category("tool_harm", categories, [float(v == "harm") for v in values]))
    out.update(_by_category("net_gain", categories, net))
    return out


def repeat_metrics(episodes: Sequence[Episode], prefix: str) -> dict[str, float]:
    """K draws per question (``K > 1``, the same for every question): ``{prefix}/avg@K`` (the mean
    accuracy), ``avg@K_std`` (the standard deviation over the K draws of each draw's accuracy),
    ``pass@K`` (the share of questions right in at least one draw) and ``pass@K_se`` (its standard
    error over questions, ``sqrt(p (1 - p) / n)``)."""
    draws: dict[str, list[float]] = defaultdict(list)
    for episode, ok in zip(episodes, Episodes(episodes).correct):
        draws[episode.sample_id].append(ok)
    counts = {len(values) for values in draws.values()}
    if len(counts) != 1 or (k := counts.pop()) < 2:
        return {}
    table = np.array(list(draws.values()))  # (questions, K)
    passed = float(table.max(axis=1).mean())
    return {
        f"{prefix}/avg@{k}": float(table.mean()),
        f"{prefix}/avg@{k}_std": float(table.mean(axis=0).std(ddof=1)),
        f"{prefix}/pass@{k}": passed,
        f"{prefix}/pass@{k}_se": float(np.sqrt(passed * (1 - passed) / len(table))),
    }
