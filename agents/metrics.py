"""Episode metrics: one vocabulary for training, validation and evaluation, over `Trajectory` lists.

``episode_metrics(trajectories, prefix)`` runs every function of `EPISODE_METRICS` over the same
episodes and returns ``{f"{prefix}/{key}": value}``. Each function gets the `Episodes` view (the
trajectories with their grounding turns worked out once) and returns its keys; a value of None means
undefined for these episodes (no grounding turn, no known box, no token ids) and is left out. The
keys are defined in ARCHITECTURE.md's metrics glossary.

A metric is one function here plus its glossary line::

    @episode_metric
    def answered_ratio(episodes: Episodes) -> dict[str, float | None]:
        \"\"\"Share of episodes whose final answer could be parsed.\"\"\"
        return {"answered_ratio": mean([float(t.infos[-1].get("answer") is not None) for t in episodes.trajectories])}
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from zoomgym.agents.trajectory import Trajectory

UNCATEGORISED = "none"
"""The category key of samples without a category (``accuracy/none``)."""

GROUNDING_TURNS = ("ground", "ground_or_answer")
"""Turn kinds (``info["next_turn"]``) in which the env asks for, or allows, a box."""

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


@dataclass(frozen=True)
class Episodes:
    """A batch of episodes as the metric functions read them."""

    trajectories: Sequence[Trajectory]

    @cached_property
    def correct(self) -> list[float]:
        """Per episode, 1.0 if its final answer was right."""
        return [float(bool(t.infos[-1].get("correct"))) for t in self.trajectories]

    @cached_property
    def grounding(self) -> list[tuple[Trajectory, dict[str, Any]]]:
        """``(trajectory, info)`` of every step that answered a grounding turn without answering: the
        env asked for (or allowed) a box, and ``info`` says what became of it."""
        return [(traj, info) for traj in self.trajectories for before, info in zip(traj.infos, traj.infos[1:])
                if before.get("next_turn") in GROUNDING_TURNS and info.get("action") != "answer"]

    @cached_property
    def zoomed(self) -> list[bool]:
        """Per episode, whether the model was shown at least one crop (wrote a valid box)."""
        return [any(info.get("box_valid") for info in t.infos[1:]) for t in self.trajectories]


def episode_metrics(trajectories: Sequence[Trajectory], prefix: str) -> dict[str, float]:
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
    by_category: dict[str, list[float]] = defaultdict(list)
    for traj, ok in zip(episodes.trajectories, episodes.correct):
        by_category[traj.category or UNCATEGORISED].append(ok)
    if len(by_category) > 1 or UNCATEGORISED not in by_category:
        out.update({f"accuracy/{category}": mean(values) for category, values in sorted(by_category.items())})
    return out


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
