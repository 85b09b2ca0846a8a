"""Env steps per second on 4K and 8K JPEGs: one group of rollouts, shared decode vs decode per rollout.

A GRPO/MGPO group runs ``G`` rollouts (default 8) of one sample. Each rollout resets the env (the
whole image at the view budget: a JPEG draft decode) and, on its grounding step, crops the
full-resolution original (a full decode). With the shared cache (`envs.data.images`) the group
decodes each once; with the cache off (capacity 0) every rollout decodes again (and, holding a
new image object each time, also misses the env's cache of resized views).

Each group starts from an empty cache, so "shared" includes the group's one decode. The oracle
agent (`agents.scripted.OracleAgent`) acts, so every episode is reset + 2 steps (zoom, answer).

Usage::

    .venv/bin/python benchmarks/env_steps.py              # 4K and 8K, G=8, 3 groups per setting
    .venv/bin/python benchmarks/env_steps.py --sizes 4k --groups 5

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["4k", "8k"])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--groups", type=int, default=3, help="groups timed per setting (median reported)")
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


if __name__ == "__main__":
    main()
