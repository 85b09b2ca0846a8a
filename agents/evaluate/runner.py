"""Playing an evaluation: arms, batches, draws, and the episode log a run resumes from.

An evaluation plays every selected sample ``draws`` times in each of its arms, one `Arm` per env:

* ``eval``: the env under test (``zoomgym/ZoomEnv-v0`` unless told otherwise);
* ``direct``: the same questions in ``zoomgym/DirectVQA-v0``, one answer turn on the whole image
  (counterfactual runs);
* ``oracle_crop``: the env under test with its first turn played by `agents.scripted.OracleAgent`,
  so the model's first turn is the answer with the ground-truth crop shown (`OracleCropEnv`; samples
  with ground-truth boxes only): an upper bound on what a perfect box would give.

Every arm goes through the one rollout engine in batches of ``batch_size`` samples (an `LMMAgent`
token-exact with its backend, any other agent through `agents.rollout.play_episodes`); each batch's
episodes are appended to the `EpisodeLog` as soon as the batch is scored. Episode ``draw`` of the
sample at dataset position ``index`` is seeded as episode ``index * draws + draw`` in every arm, so a
run cut into batches, interrupted and resumed draws exactly what one uninterrupted call would.

A sample whose image fails to decode as its env resets or steps (`envs.data.ImageLoadError`) is skipped
in that arm with all its draws (`SkippedImages`: named on stderr once, counted by `evaluate` in
``<arm>/skipped_samples``); the run goes on, and a resumed run tries it again.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium
from tqdm import tqdm
from zoomgym.agents.evaluate.records import EpisodeLog, EpisodeRecord, records_by_arm
from zoomgym.agents.rollout import env_factory, play_episodes
from zoomgym.envs import episode_spec

MAIN_ARM, DIRECT_ARM, ORACLE_ARM = "eval", "direct", "oracle_crop"
DIRECT_ENV_ID = "zoomgym/DirectVQA-v0"


class OracleCropEnv(gymnasium.Wrapper):
    """A zoom env whose first turn `OracleAgent` plays: ``reset`` returns the chat after the
    ground-truth box (the union of the sample's boxes, grown to at least two visual tokens a side) was
    written and its crop shown, so the agent's first turn sees the crop.

    The reset info is the env's info after that step (``turn == 1``, ``next_turn`` the agent's turn).
    """

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        from zoomgym.agents.scripted import OracleAgent

        chat, info = self.env.reset(**kwargs)
        if info["next_turn"] == "answer":
            raise ValueError(f"Expects a zoom env for the oracle crop, actual: {self.env.spec.id if self.env.spec else self.env} "
                             "answers in its first turn")
        chat, _, terminated, truncated, info = self.env.step(OracleAgent().act([chat], [info])[0])
        if terminated or truncated or not info["box_valid"]:
            raise RuntimeError(f"sample {info['sample'].id!r}: expects the oracle's box to zoom, actual: {info['action']}")
        return chat, info


@dataclass(frozen=True)
class Arm:
    """One env the samples are played in.

    Attributes:
        name: the arm's name, the prefix of its metrics (``eval/accuracy``).
        env_id: a registered `ZoomEnv` id.
        env_kwargs: its ``gymnasium.make`` options (prompts, max_turns, ...; not the view budget).
        oracle_crop: wrap the env in `OracleCropEnv` (the arm then plays samples with boxes only).
    """

    name: str
    env_id: str
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    oracle_crop: bool = False

    def factory(self, view_budget: Any, coord_frame: str | None, render: bool = False) -> Callable[[Any], Any]:
        """``sample -> env`` of this arm with the agent's view budget and frame."""
        make = env_factory(self.env_id, self.env_kwargs, view_budget=view_budget, coord_frame=coord_frame,
                           render=render)
        return (lambda sample: OracleCropEnv(make(sample))) if self.oracle_crop else make

    def plays(self, sample: Any) -> bool:
        """Whether the arm plays ``sample`` (the oracle crop needs ground-truth boxes)."""
        return bool(sample.boxes) or not self.oracle_crop


def arms_for(env_id: str, env_kwargs: Mapping[str, Any] | None = None, counterfactual: bool = False) -> list[Arm]:
    """The arms of an evaluation of ``env_id``: ``eval``, plus ``direct`` and ``oracle_crop`` when counterfactual.

    Raises:
        ValueError: counterfactual on an env that does not zoom.
    """
    env_kwargs = dict(env_kwargs or {})
    main = Arm(MAIN_ARM, env_id, env_kwargs)
    if not counterfactual:
        return [main]
    if episode_spec(env_id, env_kwargs).protocol != "zoom":
        raise ValueError(f"Expects a zoom env for --counterfactual (it compares the env with {DIRECT_ENV_ID}), "
                         f"actual: {env_id!r}")
    direct_kwargs = {k: v for k, v in env_kwargs.items() if k != "max_turns"}
    return [Arm(DIRECT_ARM, DIRECT_ENV_ID, direct_kwargs), main, Arm(ORACLE_ARM, env_id, env_kwargs, oracle_crop=True)]


class EpisodeAgents:
    """Agents with state of their own per episode (random draws, replayed scripts): ``make(sample, index,
    draw, arm)`` builds the agent of one episode, which then plays alone.

    >>> agents = EpisodeAgents(lambda sample, index, draw, arm: RandomAgent(seed=index))  # doctest: +SKIP
    """

    def __init__(self, make: Callable[[Any, int, int, str], Any]) -> None:
        self.make = make


@dataclass(frozen=True)
class EvalSettings:
    """How every arm is played.

    Attributes:
        view_budget: the `envs.views.ViewBudget` of every env (an LMM agent's own).
        coord_frame: the frame boxes are written in (an LMM agent's own; None: the env's default).
        draws: episodes per sample (``K``); more than one needs sampling.
        sampling: an LMM agent's `SamplingParams` (greedy by default); unused by other agents.
        seed: env resets and sampling draws are seeded from it (see the module docstring).
        context_budget: an LMM episode's token budget (None: unlimited).
        batch_size: samples per rollout batch (and per append to the log).
    """

    view_budget: Any
    coord_frame: str | None = None
    draws: int = 1
    sampling: Any = None
    seed: int = 0
    context_budget: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.draws < 1 or self.batch_size < 1:
            raise ValueError(f"Expects draws >= 1 and batch_size >= 1, actual: {self.draws}, {self.batch_size}")


class SkippedImages:
    """The rollout engine's ``on_image_error`` in an evaluation: the samples whose image failed to decode,
    each named on stderr the first time only."""

    def __init__(self) -> None:
        self.sample_ids: set[str] = set()

    def __call__(self, error: Any) -> None:
        if error.sample_id not in self.sample_ids:
            self.sample_ids.add(error.sample_id)
            tqdm.write(f"zoomgym: skipping sample {error.sample_id!r}, its image failed to decode (named once, "
                       f"counted in <arm>/skipped_samples, tried again on resume): {error}", file=sys.stderr)


def is_lmm(agent: Any) -> bool:
    """Whether ``agent`` is an `LMMAgent` (played token-exact through its backend), without importing torch
    for scripted agents."""
    from zoomgym.agents.lmm import LMMAgent

    return isinstance(agent, LMMAgent)


def play_batch(agent: Any, arm: Arm, batch: Sequence[tuple[int, Any]], settings: EvalSettings,
               on_image_error: SkippedImages | None = None) -> list[EpisodeRecord]:
    """Every draw of each ``(index, sample)`` of ``batch`` in ``arm``, as records in batch order; with
    ``on_image_error``, a sample whose image fails to decode has none (the module docstring)."""
    samples, k = [sample for _, sample in batch], settings.draws
    ids = [index * k + draw for index, _ in batch for draw in range(k)]
    factory = arm.factory(settings.view_budget, settings.coord_frame)
    if isinstance(agent, EpisodeAgents):
        trajectories = [t for index, sample in batch for draw in range(k)
                        for t in play_episodes(agent.make(sample, index, draw, arm.name), [sample], 1, factory,
                                               seed=settings.seed, episode_ids=[index * k + draw], progress=False,
                                               on_image_error=on_image_error)]
    elif is_lmm(agent):
        trajectories = agent.rollout(samples, k, factory, settings.sampling, context_budget=settings.context_budget,
                                     progress=False, episode_ids=ids, on_image_error=on_image_error)
    else:
        trajectories = play_episodes(agent, samples, k, factory, seed=settings.seed, episode_ids=ids, progress=False,
                                     on_image_error=on_image_error)
    played = {t.sample_id for t in trajectories}  # the engine drops a failed sample's draws together
    return [EpisodeRecord.of(t, arm.name, index, draw)
            for t, (index, draw) in zip(trajectories, [(i, d) for i, s in batch if s.id in played for d in range(k)])]


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_evaluation(
    agent: Any,
    samples: Sequence[Any],
    arms: Sequence[Arm],
    settings: EvalSettings,
    *,
    indices: Sequence[int] | None = None,
    log: EpisodeLog | None = None,
    progress: bool | None = None,
) -> dict[str, list[EpisodeRecord]]:
    """Plays what is not yet in ``log`` and returns every arm's records, as read back from it.

    Args:
        agent: an ``LMMAgent``, any `agents.base.Agent`, or `EpisodeAgents`.
        samples: the samples to evaluate (ids unique).
        arms: the arms (`arms_for`).
        settings: how to play them.
        indices: each sample's position in its dataset (default ``0..n-1``): what seeds its episodes.
        log: the run's ``episodes.jsonl`` (its records count as done); None keeps records in memory.
        progress: a progress bar over the episodes to play (None: when there are 64 or more).

    Returns:
        Per arm name, the records of the given samples sorted by index and draw, each with its
        `Sample` attached to its infos (what the metrics read), exactly as a resumed run reads them.
    """
    indices = list(range(len(samples))) if indices is None else [int(i) for i in indices]
    by_id = {sample.id: sample for sample in samples}
    if len(by_id) != len(samples) or len(indices) != len(samples):
        raise ValueError("Expects unique sample ids and one index per sample, actual: repeated ids or a length mismatch")
    stored: list[dict[str, Any]] = log.open() if log is not None else []
    done = {(r["arm"], r["sample_id"], r["draw"]) for r in stored}
    todo = {arm.name: [(i, s) for i, s in zip(indices, samples) if arm.plays(s)
                       and any((arm.name, s.id, d) not in done for d in range(settings.draws))] for arm in arms}
    total = sum(len(items) for items in todo.values()) * settings.draws
    bar = tqdm(total=total, desc="eval", unit="episode", disable=not (progress if progress is not None else total >= 64))
    skipped = SkippedImages()
    for arm in arms:
        bar.set_postfix_str(arm.name)
        for batch in _batches(todo[arm.name], settings.batch_size):
            new = [r for r in play_batch(agent, arm, batch, settings, skipped) if r.key not in done]
            if log is not None:
                log.append(new)
            stored += [r.to_json() for r in new]
            done |= {r.key for r in new}
            bar.update(len(batch) * settings.draws)
    bar.close()
    wanted = {(arm.name, s.id, d) for arm in arms for s in samples if arm.plays(s) for d in range(settings.draws)}
    records, seen = [], set()
    for raw in stored:
        key = (raw["arm"], raw["sample_id"], raw["draw"])
        if key in wanted and key not in seen:  # records of other samples or draws stay in the file, unread
            seen.add(key)
            records.append(EpisodeRecord.from_json(raw, by_id[raw["sample_id"]]))
    return records_by_arm(records, [arm.name for arm in arms])

