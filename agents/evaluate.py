"""Evaluate any agent: one greedy episode per sample through the rollout engine, then `agents.metrics`.

A scripted agent (`agents.scripted`, any `agents.base.Agent`) plays through `play_episodes`, an
`LMMAgent` through its token-exact rollouts with greedy decoding; both give `Trajectory` lists, so the
metrics are the training validation's, key for key.

>>> from zoomgym.agents import OracleAgent                                                      # doctest: +SKIP
>>> metrics = evaluate(OracleAgent(), synthetic(8, preset="cpu"), "zoomgym/ZoomEnv-v0",  # doctest: +SKIP
...                    env_kwargs={"view_budget": budget}, out_dir="runs/oracle", n_render=2)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from zoomgym.agents.metrics import episode_metrics
from zoomgym.agents.rollout import EnvSpec, env_factory, play_episodes
from zoomgym.agents.trajectory import Trajectory

METRICS_FILE = "metrics.json"


def play_greedy(
    agent: Any,
    samples: Sequence[Any],
    env: EnvSpec,
    *,
    seed: int = 0,
    context_budget: int | None = None,
    max_new_tokens: int | None = None,
) -> list[Trajectory]:
    """One episode per sample: an `LMMAgent` decodes greedily (token-exact), any other agent acts on text.

    Args:
        agent: an ``LMMAgent`` or anything with ``act(observations, infos) -> list[str]``.
        samples: the episodes to play, in order.
        env: an env id or a factory ``sample -> env`` (for an LMM agent an id is made with the agent's
            view budget and frame, and a factory must use them: `agents.rollout.env_factory`).
        seed: env resets use ``seed + i`` for sample ``i``.
        context_budget: an LMM episode's token budget (None: unlimited).
        max_new_tokens: an LMM's per-turn cap (None: its sampling default).
    """
    if _is_lmm(agent):
        from zoomgym.agents.backends.base import SamplingParams

        cap = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        return agent.rollout(samples, 1, env, SamplingParams(temperature=0.0, seed=seed, **cap),
                             context_budget=context_budget)
    return play_episodes(agent, samples, 1, env, seed=seed)


def render_episode(trajectory: Trajectory, sample: Any, env_fn: Callable[[Any], Any]) -> np.ndarray:
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


def evaluate(
    agent: Any,
    samples: Sequence[Any],
    env: str,
    *,
    env_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    prefix: str = "eval",
    out_dir: str | Path | None = None,
    n_render: int = 0,
    context_budget: int | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """Plays one greedy episode per sample (`play_greedy`) and returns their `agents.metrics`.

    Args:
        agent: an ``LMMAgent`` or any `agents.base.Agent`.
        samples: the episodes to play, in order (at least one).
        env: a registered env id, made with ``env_kwargs`` (and an LMM agent's view budget and frame).
        env_kwargs: ``gymnasium.make`` options (e.g. ``view_budget``, ``coord_frame``, ``max_turns``).
        seed: env resets use ``seed + i``.
        prefix: the metrics' key prefix (``eval/accuracy``).
        out_dir: where to write ``metrics.json`` and the first ``n_render`` episodes as PNG.
        n_render: episodes to render (replayed with ``render_mode="rgb_array"``).
        context_budget, max_new_tokens: an LMM agent's token budgets (see `play_greedy`).

    Returns:
        ``{prefix}/episodes`` and the ``{prefix}/{key}`` metrics (ARCHITECTURE.md, metrics glossary).
    """
    if not samples:
        raise ValueError("Expects at least one sample to evaluate, actual: none")
    view = {"view_budget": agent.view_budget, "coord_frame": agent.coord_frame} if _is_lmm(agent) else {}
    trajectories = play_greedy(agent, samples, env_factory(env, env_kwargs, **view), seed=seed,
                               context_budget=context_budget, max_new_tokens=max_new_tokens)
    metrics = {f"{prefix}/episodes": float(len(trajectories)), **episode_metrics(trajectories, prefix)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        render_fn = env_factory(env, env_kwargs, **view, render=True)
        for index, (traj, sample) in enumerate(zip(trajectories[:n_render], samples)):
            name = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(sample.id))[:60]
            Image.fromarray(render_episode(traj, sample, render_fn)).save(out / f"episode_{index:03d}_{name}.png")
    return metrics


def _is_lmm(agent: Any) -> bool:
    from zoomgym.agents.lmm import LMMAgent

    return isinstance(agent, LMMAgent)
