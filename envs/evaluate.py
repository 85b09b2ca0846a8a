"""Run an agent over samples in a zoom env: accuracy, grounding statistics and rendered episodes.

``python -m zoomgym.envs.evaluate --agent oracle random --n 50 --out runs/demo`` runs the scripted agents over
synthetic samples, prints a table and writes ``metrics.json`` and a few ``*.png`` per agent.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from PIL import Image
from zoomgym.envs.data.sample import Sample


def evaluate(
    env: str | gym.Env,
    agent: Any,
    samples: Sequence[Sample],
    *,
    env_options: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    n_render: int = 4,
) -> dict[str, Any]:
    """Plays one episode per sample and summarises them.

    Args:
        env: a registered id (``batch_size`` copies are made with ``gymnasium.make(env, dataset=samples,
            render_mode="rgb_array", **env_options)``) or one env instance (then episodes run one at a
            time).
        agent: anything with ``act(observations, infos) -> list[str]`` (`agents.base.Agent`).
        samples: the episodes to play, in order.
        env_options: extra ``gymnasium.make`` arguments (e.g. ``coord_frame``, ``view_budget``).
        batch_size: envs stepped together, so the agent acts on batches.
        out_dir: where to write ``metrics.json`` and the first ``n_render`` episodes as PNG.
        n_render: episodes to render (needs ``render_mode="rgb_array"`` on a given env instance).

    Returns:
        Metrics: ``episodes``, ``accuracy`` (mean reward), ``valid_box_rate`` (valid boxes / grounding
        turns), ``fallback_rate`` (fallbacks / grounding turns), ``zoom_rate`` (episodes with a zoom),
        ``truncated_rate``, ``mean_turns``, ``mean_visual_tokens``, ``mean_iou`` (valid boxes of
        samples with ground truth; None without any), ``accuracy_zoomed`` / ``accuracy_not_zoomed``
        and ``accuracy_by_category``.
    """
    if not samples:
        raise ValueError("Expects at least one sample to evaluate, actual: none")
    if isinstance(env, str):
        options = {"render_mode": "rgb_array", **(env_options or {})}
        envs = [gym.make(env, dataset=list(samples), **options) for _ in range(min(batch_size, len(samples)))]
    else:
        envs = [env]
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    episodes: list[dict[str, Any]] = []
    for start in range(0, len(samples), len(envs)):
        chunk = samples[start : start + len(envs)]
        episodes.extend(_play(envs[: len(chunk)], agent, chunk, start, out, n_render))
    for e in envs:
        e.close()
    metrics = summarise(episodes)
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _play(envs: list[gym.Env], agent: Any, samples: Sequence[Sample], start: int, out: Path | None,
          n_render: int) -> list[dict[str, Any]]:
    """Runs one episode per (env, sample) in lockstep; returns per-episode records."""
    observations, infos, records = [], [], []
    for env, sample in zip(envs, samples, strict=True):
        obs, info = env.reset(options={"sample": sample})
        observations.append(obs)
        infos.append(info)
        records.append({"sample_id": sample.id, "category": sample.category, "reward": 0.0, "turns": 0,
                        "ground_turns": 0, "valid_boxes": 0, "fallbacks": 0, "zoomed": False,
                        "truncated": False, "ious": [], "visual_tokens": info["visual_tokens"]})
    active = list(range(len(envs)))
    while active:
        actions = agent.act([observations[i] for i in active], [infos[i] for i in active])
        still = []
        for i, action in zip(active, actions, strict=True):
            kind = infos[i]["next_turn"]
            obs, reward, terminated, truncated, info = envs[i].step(action)
            record = records[i]
            record["turns"] = info["turn"]
            record["visual_tokens"] = info["visual_tokens"]
            if kind in ("ground", "ground_or_answer") and info["action"] != "answer":
                record["ground_turns"] += 1
                record["valid_boxes"] += info["box_valid"]
                record["fallbacks"] += info["fallback"]
                record["zoomed"] |= info["action"] == "zoom"
                if info["box_valid"] and info["iou"] is not None:
                    record["ious"].append(info["iou"])
            observations[i], infos[i] = obs, info
            if terminated or truncated:
                record["reward"] = float(reward)
                record["truncated"] = bool(truncated)
                index = start + i
                if out is not None and index < n_render and envs[i].render_mode == "rgb_array":
                    frame = envs[i].render()
                    Image.fromarray(frame).save(out / f"episode_{index:03d}_{_safe(record['sample_id'])}.png")
            else:
                still.append(i)
        active = still
    return records


def summarise(episodes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregates per-episode records from `evaluate` into the metrics it returns."""
    ground_turns = sum(e["ground_turns"] for e in episodes)
    ious = [v for e in episodes for v in e["ious"]]
    by_category: dict[str, list[float]] = defaultdict(list)
    for e in episodes:
        by_category[e["category"] or "uncategorised"].append(e["reward"])
    zoomed = [e["reward"] for e in episodes if e["zoomed"]]
    not_zoomed = [e["reward"] for e in episodes if not e["zoomed"]]

    def mean(values: Sequence[float]) -> float | None:
        return float(np.mean(values)) if len(values) else None

    return {
        "episodes": len(episodes),
        "accuracy": mean([e["reward"] for e in episodes]),
        "valid_box_rate": sum(e["valid_boxes"] for e in episodes) / ground_turns if ground_turns else None,
        "fallback_rate": sum(e["fallbacks"] for e in episodes) / ground_turns if ground_turns else None,
        "zoom_rate": mean([float(e["zoomed"]) for e in episodes]),
        "truncated_rate": mean([float(e["truncated"]) for e in episodes]),
        "mean_turns": mean([e["turns"] for e in episodes]),
        "mean_visual_tokens": mean([e["visual_tokens"] for e in episodes]),
        "mean_iou": mean(ious),
        "accuracy_zoomed": mean(zoomed),
        "accuracy_not_zoomed": mean(not_zoomed),
        "accuracy_by_category": {k: mean(v) for k, v in sorted(by_category.items())},
    }


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60]


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """The command line: scripted agents over synthetic samples."""
    from zoomgym import (
        agents,
        envs,  # noqa: F401  (registers the env ids)
    )
    from zoomgym.envs.data import synthetic
    from zoomgym.envs.data.synthetic import budget_made_for

    parser = argparse.ArgumentParser(prog="python -m zoomgym.envs.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--agent", nargs="+", choices=["oracle", "random"], default=["oracle", "random"])
    parser.add_argument("--env", default="zoomgym/ZoomEnv-v0")
    parser.add_argument("--n", type=int, default=50, help="synthetic samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="default", help="synthetic preset (its view budget is used)")
    parser.add_argument("--render", type=int, default=4, help="episodes rendered as PNG per agent")
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args(argv)

    samples = synthetic(args.n, seed=args.seed, preset=args.preset)
    budget = budget_made_for(samples[0])
    results = {}
    for name in args.agent:
        agent = agents.OracleAgent() if name == "oracle" else agents.RandomAgent(seed=args.seed)
        results[name] = evaluate(args.env, agent, samples, env_options={"view_budget": budget},
                                 out_dir=Path(args.out) / name, n_render=args.render)
    print(f"{args.env}, {args.n} synthetic samples (preset {args.preset!r}, seed {args.seed})")
    print(f"{'agent':<8} {'accuracy':>8} {'valid box':>9} {'fallback':>8} {'mean IoU':>8}")
    for name, m in results.items():
        iou = "-" if m["mean_iou"] is None else f"{m['mean_iou']:.2f}"
        valid = "-" if m["valid_box_rate"] is None else f"{m['valid_box_rate']:.2f}"
        fallback = "-" if m["fallback_rate"] is None else f"{m['fallback_rate']:.2f}"
        print(f"{name:<8} {m['accuracy']:>8.2f} {valid:>9} {fallback:>8} {iou:>8}")
    print(f"metrics and rendered episodes under {args.out}/")
    return results


if __name__ == "__main__":
    main()
