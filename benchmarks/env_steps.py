"""Env steps per second on 4K and 8K JPEGs: one group of rollouts, shared decode vs decode per rollout.

A GRPO/MGPO group runs ``G`` rollouts (default 8) of one sample. Each rollout resets the env (the
whole image at the view budget: a JPEG draft decode) and, on its grounding step, crops the
full-resolution original (a full decode). With the shared cache (`envs.data.images`) the group
decodes each once; with the cache off (capacity 0) every rollout decodes again (and, holding a
new image object each time, also misses the env's cache of resized views).

Each group starts from an empty cache, so "shared" includes the group's one decode. The oracle
agent (`agents.scripted.OracleAgent`) acts, so every episode is reset + 2 steps (zoom, answer).

``--batch B`` adds a second table: B groups of distinct images of the first size through the rollout
engine (`agents.rollout.play_episodes`), its envs a group per thread (as it runs them) vs every env in
the calling thread, from an empty cache each time.

Usage::

    .venv/bin/python benchmarks/env_steps.py              # 4K and 8K, G=8, 3 groups per setting
    .venv/bin/python benchmarks/env_steps.py --sizes 4k --groups 5
    .venv/bin/python benchmarks/env_steps.py --sizes 4k --batch 8   # also B = 8 groups, threads vs one thread

Prints a Markdown table (median over groups).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import gymnasium
import numpy as np
from PIL import Image
from zoomgym.agents import rollout
from zoomgym.agents.scripted import OracleAgent
from zoomgym.envs.data import Sample, clear_image_cache, image_cache_info, set_image_cache_capacity
from zoomgym.envs.geometry import Box

from zoomgym import envs  # noqa: F401  (registers the zoomgym ids)

SIZES = {"4k": (3840, 2160), "8k": (7680, 4320)}


def photo_like_jpeg(path: Path, size: tuple[int, int], seed: int = 0) -> None:
    """A JPEG with photo-like entropy: a smooth colour field plus grain (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(9, 16, 3), dtype=np.uint8))
    field = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, size=(size[1], size[0], 1), dtype=np.int16)
    Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(path, quality=90)


def run_group(env: gymnasium.Env, agent: OracleAgent, group_size: int) -> tuple[float, int]:
    """Runs ``group_size`` episodes from an empty cache; returns (seconds, env steps)."""
    clear_image_cache()
    steps = 0
    start = time.perf_counter()
    for _ in range(group_size):
        observation, info = env.reset(options={"index": 0})
        done = False
        while not done:
            (action,) = agent.act([observation], [info])
            observation, _, terminated, truncated, info = env.step(action)
            steps += 1
            done = terminated or truncated
        assert info["correct"], "the oracle must answer right"
    return time.perf_counter() - start, steps


def run_batch(samples: list[Sample], group_size: int, threads: bool) -> float:
    """Seconds for the groups of ``samples`` through the rollout engine, from an empty cache."""
    clear_image_cache()
    spread = rollout.map_in_threads
    if not threads:
        rollout.map_in_threads = lambda function, items: [function(item) for item in items]
    try:
        start = time.perf_counter()
        played = rollout.play_episodes(OracleAgent(), samples, group_size, "zoomgym/ZoomEnv-v0", progress=False)
        seconds = time.perf_counter() - start
    finally:
        rollout.map_in_threads = spread
    assert all(t.reward == 1.0 for t in played), "the oracle must answer right"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["4k", "8k"])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--groups", type=int, default=3, help="groups timed per setting (median reported)")
    parser.add_argument("--batch", type=int, default=0, help="B groups through the rollout engine (0: skip)")
    args = parser.parse_args()

    capacity = image_cache_info().max_bytes
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.sizes:
            width, height = SIZES[name]
            path = Path(folder) / f"{name}.jpg"
            photo_like_jpeg(path, (width, height))
            # One object in the frame's lower right: a small ground-truth box the oracle zooms into.
            box = (0.7 * width, 0.6 * height, 0.7 * width + 300, 0.6 * height + 200)
            sample = Sample(
                id=f"bench-{name}",
                image=path,
                question="What is in the box?",
                options=("a", "b", "c", "d"),
                answer="C",
                boxes=(Box(*box),),
            )
            env = gymnasium.make("zoomgym/ZoomEnv-v0", dataset=[sample])
            agent = OracleAgent()
            for mode, cache_bytes in (("shared (cache)", capacity), ("per rollout (cache off)", 0)):
                set_image_cache_capacity(cache_bytes)
                run_group(env, agent, 1)  # warm-up: imports, first allocations
                timings, decodes = [], []
                for _ in range(args.groups):
                    seconds, steps = run_group(env, agent, args.group_size)
                    timings.append(seconds)
                    decodes.append(image_cache_info().decodes)
                seconds = statistics.median(timings)
                rows.append(
                    (
                        name,
                        f"{width}x{height}",
                        path.stat().st_size,
                        mode,
                        steps / seconds,
                        seconds,
                        statistics.median(decodes),
                    )
                )
            env.close()
        set_image_cache_capacity(capacity)
        batch_rows = []
        if args.batch:
            name = args.sizes[0]
            samples = []
            for b in range(args.batch):
                path = Path(folder) / f"batch-{b}.jpg"
                photo_like_jpeg(path, SIZES[name], seed=b + 1)
                w, h = SIZES[name]
                samples.append(Sample(f"batch-{b}", path, "What is in the box?", ("a", "b", "c", "d"), "C",
                                      boxes=(Box(0.7 * w, 0.6 * h, 0.7 * w + 300, 0.6 * h + 200),)))
            run_batch(samples[:1], 1, threads=False)  # warm-up
            for threads in (False, True, False, True):  # alternated: both see the same load
                batch_rows.append((threads, run_batch(samples, args.group_size, threads)))

    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"Pillow {Image.__version__}; group of {args.group_size} oracle rollouts (reset + 2 steps each), "
        f"median of {args.groups} groups\n"
    )
    print("| image | JPEG size | decode | env steps/s | s per group | decodes per group |")
    print("|---|---|---|---|---|---|")
    for name, dims, nbytes, mode, rate, seconds, n_decodes in rows:
        print(
            f"| {name} ({dims}) | {nbytes / 1e6:.1f} MB | {mode} | {rate:.1f} | {seconds:.2f} | {n_decodes:g} |"
        )
    if batch_rows:
        episodes = args.batch * args.group_size
        print(f"\n{args.batch} groups x {args.group_size} oracle rollouts of {args.sizes[0]} JPEGs through the rollout "
              f"engine (best of 2)\n")
        print("| envs | seconds | env steps/s |")
        print("|---|---|---|")
        for threads in (False, True):
            best = min(seconds for t, seconds in batch_rows if t == threads)
            label = "a group per thread" if threads else "all in the calling thread"
            print(f"| {label} | {best:.2f} | {2 * episodes / best:.1f} |")  # zoom + answer per episode


if __name__ == "__main__":
    main()
