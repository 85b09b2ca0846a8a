"""Evaluate any agent on any dataset: resumable runs, counterfactual zoom analysis, results and a report.

`evaluate` plays every sample through the one rollout engine (an `LMMAgent` token-exact with its backend,
any other `agents.base.Agent` on text) in each arm of the run (`runner`: ``eval``, and with
``counterfactual`` also ``direct`` and ``oracle_crop``), scores the episodes with `agents.metrics` (the
training validation's vocabulary, key for key) and, given ``out_dir``, keeps everything there::

    out_dir/run.json          what the run is: the model, the data and the protocol of every arm
    out_dir/episodes.jsonl    one scored episode a line, appended as batches finish (`records`)
    out_dir/results.json      every number, the protocol, the model, the data's hash, versions
    out_dir/results.md        the tables
    out_dir/report.html       the tables and sampled trajectories, one offline page (`report`)

Calling it again with the same ``out_dir`` plays only what is missing and gives the numbers an
uninterrupted run gives; another model, data or protocol there is refused (`identity`). Two runs are
compared sample by sample with `compare.compare_runs`.

>>> from zoomgym.agents import OracleAgent                                                     # doctest: +SKIP
>>> metrics = evaluate(OracleAgent(), synthetic(8, preset="cpu"), "zoomgym/ZoomEnv-v0",  # doctest: +SKIP
...                    view_budget=budget, counterfactual=True, out_dir="runs/oracle")
>>> metrics["eval/accuracy"], metrics["counterfactual/tool_gain"]                       # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from zoomgym.agents.evaluate.identity import check_manifest, data_fingerprint, model_fingerprint, versions
from zoomgym.agents.evaluate.records import EpisodeLog, EpisodeRecord
from zoomgym.agents.evaluate.report import report_html
from zoomgym.agents.evaluate.runner import (
    Arm,
    EpisodeAgents,
    EvalSettings,
    arms_for,
    is_lmm,
    run_evaluation,
)
from zoomgym.agents.evaluate.summary import results_markdown, score, tables
from zoomgym.agents.trajectory import Trajectory
from zoomgym.envs import DEFAULT_ENV_ID, episode_spec
from zoomgym.envs.views import ViewBudget

RUN_FILE, EPISODES_FILE, RESULTS_FILE, RESULTS_MD, REPORT_FILE = (
    "run.json", "episodes.jsonl", "results.json", "results.md", "report.html")
FORMAT = "zoomgym-eval/1"
SCORING = ("The model generates every turn; the answer is the last \\boxed{} of its answer turn, read as an option "
           "letter or an option's text (envs.rewards). An episode is right iff that names the correct option; "
           "an episode without a parsable answer, or cut by the turn or context budget, is wrong. Accuracy is "
           "the mean over episodes.")


def render_episode(trajectory: Trajectory | EpisodeRecord, sample: Any, env_fn: Callable[[Any], Any]) -> np.ndarray:
    """``env.render()`` of an episode, replayed from its action texts in a fresh env (exact: the env is
    deterministic given the sample and the actions). ``env_fn`` must build the env with
    ``render_mode="rgb_array"``."""
    env = env_fn(sample)
    env.reset(options={"sample": sample})
    for action in trajectory.actions:
        env.step(action)
    frame = env.render()
    env.close()
    return frame


def describe_agent(agent: Any) -> dict[str, Any]:
    """What identifies an agent in a run: an LMM's model folder fingerprint, backend and dtype, else its class."""
    if is_lmm(agent):
        path = str(agent.model.name_or_path)
        return {"name": Path(path).name or path, **model_fingerprint(path),
                "backend": type(agent.backend).__name__, "dtype": str(agent.model.dtype).removeprefix("torch.")}
    return {"name": type(agent).__name__}


def arm_protocol(arm: Arm, settings: EvalSettings, sample: Any, lmm: bool) -> dict[str, Any]:
    """Everything that decides an arm's episodes, read from an env the arm builds (so defaults are stated)."""
    env = arm.factory(settings.view_budget, settings.coord_frame)(sample).unwrapped
    spec = episode_spec(arm.env_id, arm.env_kwargs)
    sampling = settings.sampling
    return {
        "env_id": arm.env_id, "protocol": env.protocol, "max_turns": env.max_turns, "max_images": spec.max_images,
        "answer_on_last_turn": env.answer_on_last_turn, "oracle_crop": arm.oracle_crop,
        "coord_frame": env.coord_frame, "view_budget": dataclasses.asdict(env.view_budget), "resample": env.resample,
        "box_rules": dataclasses.asdict(env.box_rules), "check_view_budget": env.check_view_budget,
        "prompts": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dataclasses.asdict(env.prompts).items()},
        "sampling": None if not lmm else {
            "temperature": sampling.temperature, "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens,
            "stop_after_block": list(sampling.stop_after_block or ()), "stop": list(sampling.stop)},
        "context_budget": settings.context_budget if lmm else None,
        "draws": settings.draws, "seed": settings.seed, "scoring": SCORING,
    }


def data_identity(samples: Sequence[Any], data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What identifies the data of a run: its name (``data["name"]``, default ``"samples"``), how many
    samples the whole dataset has, and their `identity.data_fingerprint`."""
    return {"name": (data or {}).get("name", "samples"), "samples": len(samples), "sha256": data_fingerprint(samples)}


def check_resumable(out_dir: str | Path, model: Mapping[str, Any], samples: Sequence[Any],
                    data: Mapping[str, Any] | None = None) -> None:
    """Refuses an ``out_dir`` holding a run of another model or data before anything is built (a model
    that takes minutes to load); `evaluate` checks the protocol too, which needs the agent's view.

    Raises:
        ValueError: as `identity.check_manifest`.
    """
    check_manifest(Path(out_dir) / RUN_FILE, {"model": dict(model), "data": data_identity(samples, data), "protocol": {}})


def evaluate(
    agent: Any,
    samples: Sequence[Any],
    env: str = DEFAULT_ENV_ID,
    *,
    env_kwargs: Mapping[str, Any] | None = None,
    view_budget: Any = None,
    counterfactual: bool = False,
    draws: int = 1,
    sampling: Any = None,
    seed: int = 0,
    context_budget: int | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    out_dir: str | Path | None = None,
    n_trajectories: int = 24,
    model: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> dict[str, float]:
    """Plays and scores the samples in every arm; with ``out_dir``, resumable and written to disk.

    Args:
        agent: an ``LMMAgent``, any `agents.base.Agent`, or `runner.EpisodeAgents`.
        samples: the whole dataset (its hash identifies the data); ``limit`` selects the first ones.
        env: the env under test (a registered `ZoomEnv` id).
        env_kwargs: its ``gymnasium.make`` options (prompts, max_turns, ...), shared by every arm.
        view_budget: the view of every env (an LMM agent's own when None; else the env's default).
        counterfactual: add the ``direct`` (no zoom) and ``oracle_crop`` arms.
        draws: episodes per sample, ``K`` (``avg@K``, ``pass@K``); more than one needs ``sampling``
            with a temperature for an LMM agent.
        sampling: an LMM agent's `SamplingParams` (default greedy, 1024 new tokens per turn).
        seed: seeds env resets and draws (episode ``k`` of sample ``i`` is episode ``i * K + k``).
        context_budget: an LMM episode's token budget.
        limit: evaluate the first ``limit`` samples (the rest of the data still identifies it).
        batch_size: samples per rollout batch.
        out_dir: keep the run there (see the module docstring); None plays everything in memory.
        n_trajectories: trajectory cards in ``report.html``.
        model: what identifies the agent (default `describe_agent`).
        data: ``name`` and ``source`` of the data, for the outputs (default ``"samples"``).
        progress: a progress bar (None: for 64 episodes or more).

    Returns:
        Every number (`summary.score`): ``eval/...`` (and ``direct/...``, ``oracle_crop/...``,
        ``counterfactual/...``), as defined in ARCHITECTURE.md's metrics glossary.

    Raises:
        ValueError: no samples, greedy draws, or an ``out_dir`` holding another run.
    """
    from zoomgym.agents.backends.base import SamplingParams

    if not samples:
        raise ValueError("Expects at least one sample to evaluate, actual: none")
    lmm = is_lmm(agent)
    if lmm:
        view_budget, frame = agent.view_budget, agent.coord_frame
        sampling = sampling if sampling is not None else SamplingParams(temperature=0.0, seed=seed)
        if draws > 1 and sampling.greedy:
            raise ValueError(f"Expects a temperature > 0 to draw {draws} episodes per sample, actual: greedy decoding")
    else:
        frame = None
    if view_budget is None:
        view_budget = ViewBudget()
    elif isinstance(view_budget, Mapping):
        view_budget = ViewBudget(**view_budget)
    settings = EvalSettings(view_budget, frame, draws, sampling, seed, context_budget, batch_size)
    arms = arms_for(env, env_kwargs, counterfactual)
    selection = list(samples[:limit] if limit is not None else samples)
    if not selection:
        raise ValueError(f"Expects --limit to leave at least one sample, actual: {limit!r}")
    manifest = {
        "model": dict(model) if model is not None else describe_agent(agent),
        "data": data_identity(samples, data),
        "protocol": {arm.name: arm_protocol(arm, settings, selection[0], lmm) for arm in arms},
    }
    log = None
    if out_dir is not None:
        out = Path(out_dir)
        stored = check_manifest(out / RUN_FILE, manifest)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(stored, indent=2) + "\n")
        log = EpisodeLog(out / EPISODES_FILE)
    records = run_evaluation(agent, selection, arms, settings, log=log, progress=progress)
    metrics = score(records, draws)
    for arm in arms:  # a sample whose image failed to decode has no records in the arm (runner)
        played = {record.sample_id for record in records[arm.name]}
        metrics[f"{arm.name}/skipped_samples"] = float(sum(arm.plays(s) and s.id not in played for s in selection))
    if out_dir is not None:
        results = {"format": FORMAT, "model": manifest["model"],
                   "data": {**manifest["data"], "source": (data or {}).get("source"), "evaluated": len(selection)},
                   "protocol": manifest["protocol"], "versions": versions(),
                   "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "metrics": metrics}
        table_list = tables(metrics, records, draws)
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
        (out / RESULTS_MD).write_text(results_markdown(results, table_list))
        page = report_html(results, table_list, records, {s.id: s for s in selection}, arms, settings, n_trajectories,
                           seed)
        (out / REPORT_FILE).write_text(page)
    return metrics


__all__ = ["Arm", "EpisodeAgents", "EpisodeLog", "EpisodeRecord", "EvalSettings", "arm_protocol", "arms_for",
           "check_resumable", "data_identity", "describe_agent", "evaluate", "render_episode"]
