"""Rollout throughput of the tiny model: batched engine vs one episode at a time.

Plays ``N = B*G`` ZoomEnv episodes (2 turns: box, then answer) with the hf backend, sampling at
temperature 1 with a seed, and reports episodes/s and generated (model-sampled) tokens/s for

* ``batched``: `agents.rollout.run_rollouts` over all N episodes (one backend batch per round);
* ``sequential``: the same N episodes, one ``run_rollouts`` call per episode.

Usage::

    .venv/bin/python benchmarks/rollout.py                     # N = 8, 32, 64 on CPU
    .venv/bin/python benchmarks/rollout.py --sizes 8 --max-new-tokens 16 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from zoomgym.agents.backends.base import SamplingParams
from zoomgym.agents.lmm import LMMAgent
from zoomgym.agents.models import build_tiny_model
from zoomgym.agents.rollout import run_rollouts
from zoomgym.envs.data import synthetic


def measure(agent: LMMAgent, samples: list, group_size: int, sampling: SamplingParams, batched: bool) -> tuple:
    """Returns ``(seconds, episodes, generated tokens)`` of one run."""
    start = time.perf_counter()
    if batched:
        trajectories = agent.rollout(samples, group_size, "zoomgym/ZoomEnv-v0", sampling, progress=False)
    else:
        trajectories = [
            run_rollouts(agent.backend, agent.adapter, [s], 1, "zoomgym/ZoomEnv-v0", sampling, progress=False)[0]
            for s in samples
            for _ in range(group_size)
        ]
    seconds = time.perf_counter() - start
    return seconds, len(trajectories), sum(t.response_length for t in trajectories)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 64], help="N = B*G episodes")
    parser.add_argument("--group-size", type=int, default=8, help="G rollouts per sample")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per turn")
    parser.add_argument("--model-size", default="1m", help="tiny preset")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        agent = LMMAgent.from_pretrained(build_tiny_model(Path(tmp) / "tiny", size=args.model_size), device=args.device)
    budget = agent.view_budget
    data = synthetic(max(args.sizes) // args.group_size + 1, seed=0, preset="cpu")  # 672x672 canvases
    sampling = SamplingParams(temperature=1.0, seed=0, max_new_tokens=args.max_new_tokens)
    measure(agent, data[:1], 2, sampling, batched=True)  # warm-up (allocator, kernels)

    print(f"tiny-{args.model_size} on {args.device} ({platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads), ZoomEnv-v0, "
          f"view {budget.min_pixels}..{budget.max_pixels} px, {args.max_new_tokens} new tokens/turn max, G={args.group_size}")
    print("| N = B*G | mode | seconds | episodes/s | generated tokens/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        group = min(args.group_size, n)
        samples = data[: n // group]
        rows = {mode: measure(agent, samples, group, sampling, batched=mode == "batched")
                for mode in ("sequential", "batched")}
        for mode, (seconds, episodes, tokens) in rows.items():
            speedup = rows["sequential"][0] / seconds
            print(f"| {n} | {mode} | {seconds:.2f} | {episodes / seconds:.2f} | {tokens / seconds:.0f} | {speedup:.1f}x |")


if __name__ == "__main__":
    main()
