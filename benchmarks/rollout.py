"""Rollout throughput of the tiny model: batched engine vs one episode at a time, and the training forward.

Plays ``N = B*G`` ZoomEnv episodes (2 turns: box, then answer) with the hf backend, sampling at
temperature 1 with a seed, and reports episodes/s and generated (model-sampled) tokens/s for

* ``batched``: `agents.rollout.run_rollouts` over all N episodes (one backend batch per round);
* ``sequential``: the same N episodes, one ``run_rollouts`` call per episode.

``--score`` also times, on the batched rollout's episodes, what the trainer runs on them:

* ``score``: ``collate`` + ``token_logprobs`` of all N in one forward, no gradients (old and
  reference log-probs with a micro-batch of N);
* ``train``: forward and backward of one shuffled mini-batch of the N episodes in micro-batches of
  ``--micro-batch-size``, split as the checkout's PPO update splits them (by length where it has
  `agents.trajectory.length_sorted_batches`, a prompt's episodes together where it has
  `agents.trajectory.prompt_key`, else in the shuffled order), and the padding share of one
  right-padded forward per micro-batch (a checkout that computes shared prompts once computes fewer
  positions: its update's ``perf/computed_ratio``).

``--baseline REF`` runs the same measurements with the code of git ``REF`` too (exported by
`baseline.export_ref`, checked to be what the worker imports), each variant in a fresh process,
alternating round by round so that both see the same load, and prints old / new ratios.

Usage::

    .venv/bin/python benchmarks/rollout.py                     # N = 8, 32, 64 on CPU
    .venv/bin/python benchmarks/rollout.py --sizes 8 --max-new-tokens 16 --device cuda
    .venv/bin/python benchmarks/rollout.py --sizes 32 --modes batched --score --baseline main --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from baseline import REPO, check_imported_from, export_ref
from zoomgym.agents.backends.base import SamplingParams
from zoomgym.agents.lmm import LMMAgent
from zoomgym.agents.models import build_tiny_model
from zoomgym.agents.rollout import run_rollouts
from zoomgym.envs.data import synthetic

# The tiny model's default budget shows the `cpu` preset's 672 px canvases at 448 px, not the 224 px
# they were made for (where the answer is hidden): a speed measurement, so the env's check is off.
ENV_KWARGS = {"check_view_budget": False}
MODES = ("sequential", "batched")


def measure(agent: LMMAgent, samples: list, group_size: int, sampling: SamplingParams, batched: bool) -> tuple:
    """Returns ``(seconds, trajectories)`` of one run."""
    start = time.perf_counter()
    if batched:
        trajectories = agent.rollout(samples, group_size, "zoomgym/ZoomEnv-v0", sampling, env_kwargs=ENV_KWARGS,
                                     progress=False)
    else:
        trajectories = [
            run_rollouts(agent.backend, agent.adapter, [s], 1, "zoomgym/ZoomEnv-v0", sampling, env_kwargs=ENV_KWARGS,
                         progress=False)[0]
            for s in samples
            for _ in range(group_size)
        ]
    return time.perf_counter() - start, trajectories


def _micro_batches(trajectories: list, order: list[int], size: int) -> list[list[int]]:
    """The PPO update's split of a mini-batch in ``order`` (the checkout's own rule)."""
    lengths = [t.length for t in trajectories]
    try:
        from zoomgym.agents.trajectory import length_sorted_batches
    except ImportError:  # code from before length-sorted micro-batches
        return [order[start : start + size] for start in range(0, len(order), size)]
    try:
        from zoomgym.agents.trajectory import prompt_key
    except ImportError:  # code from before a prompt's episodes were kept together
        return length_sorted_batches(lengths, size, order)
    return length_sorted_batches(lengths, size, order, keys=[prompt_key(t) for t in trajectories])


def measure_training(agent: LMMAgent, trajectories: list, micro_batch_size: int) -> dict[str, float]:
    """Seconds of the scoring forward and of one mini-batch's forward + backward; its padding share."""
    start = time.perf_counter()
    with torch.no_grad():
        agent.token_logprobs(agent.collate(trajectories))
    out = {"score (s)": time.perf_counter() - start}
    lengths = [t.length for t in trajectories]
    order = np.random.default_rng(0).permutation(len(trajectories)).tolist()
    micro_batches = _micro_batches(trajectories, order, micro_batch_size)
    agent.model.train()
    start = time.perf_counter()
    for micro in micro_batches:
        logp, entropy = agent.token_logprobs(agent.collate([trajectories[i] for i in micro]), with_entropy=True)
        (logp.sum() + entropy.sum()).backward()
    out["train (s)"] = time.perf_counter() - start
    agent.model.zero_grad(set_to_none=True)
    agent.model.eval()
    positions = sum(len(m) * max(lengths[i] for i in m) for m in micro_batches)
    out["train padding share"] = 1 - sum(lengths) / positions
    return out


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Every measurement of one variant: ``{row: {column: value}}``."""
    with tempfile.TemporaryDirectory() as tmp:
        agent = LMMAgent.from_pretrained(build_tiny_model(Path(tmp) / "tiny", size=args.model_size), device=args.device)
    data = synthetic(max(args.sizes) // args.group_size + 1, seed=0, preset="cpu")  # 672x672 canvases
    sampling = SamplingParams(temperature=1.0, seed=0, max_new_tokens=args.max_new_tokens)
    measure(agent, data[:1], 2, sampling, batched=True)  # warm-up (allocator, kernels)
    rows: dict[str, dict[str, float]] = {}
    for n in args.sizes:
        group = min(args.group_size, n)
        samples = data[: n // group]
        for mode in args.modes:
            seconds, trajectories = measure(agent, samples, group, sampling, batched=mode == "batched")
            tokens = sum(t.response_length for t in trajectories)
            rows[f"{n} {mode}"] = {"seconds": seconds, "episodes/s": len(trajectories) / seconds,
                                   "generated tokens/s": tokens / seconds}
            if mode == "batched" and args.score:
                for key, value in measure_training(agent, trajectories, args.micro_batch_size).items():
                    rows[f"{n} {key}"] = {"seconds" if key.endswith("(s)") else "share": value}
    return rows


def _worker(root: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    command = [sys.executable, __file__, "--worker", str(root), "--sizes", *map(str, args.sizes), "--modes", *args.modes,
               "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens),
               "--model-size", args.model_size, "--device", args.device, "--micro-batch-size", str(args.micro_batch_size)]
    command += ["--score"] if args.score else []
    environment = {**os.environ, "PYTHONPATH": str(root)}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment, cwd=root)
    return json.loads(output.stdout.splitlines()[-1])


def compare(args: argparse.Namespace) -> None:
    """Old and new side by side: median seconds (or shares) over the rounds, and old / new."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        variants = {args.baseline: export_ref(args.baseline, Path(folder)), "this checkout": REPO}
        runs: dict[str, list] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, root in variants.items():
                runs[name].append(_worker(root, args))
    load_after = os.getloadavg()
    old, new = (
        {row: {col: statistics.median(r[row][col] for r in runs[name]) for col in runs[name][0][row]}
         for row in runs[name][0]}
        for name in variants
    )
    print(f"tiny-{args.model_size} on {args.device}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average (1 min) {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after; median of {args.rounds} rounds, G={args.group_size}")
    print(f"| N | measure | {args.baseline} | this checkout | old / new |")
    print("|---|---|---|---|---|")
    for row, columns in new.items():
        n, measure_name = row.split(" ", 1)
        measure_name = measure_name.removesuffix(" (s)")
        column = "share" if "share" in columns else "seconds"
        ratio = old[row][column] / new[row][column] if new[row][column] else float("nan")
        print(f"| {n} | {measure_name} ({column}) | {old[row][column]:.3f} | {new[row][column]:.3f} | {ratio:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 64], help="N = B*G episodes")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="rollout modes to time")
    parser.add_argument("--group-size", type=int, default=8, help="G rollouts per sample")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per turn")
    parser.add_argument("--model-size", default="1m", help="tiny preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--score", action="store_true", help="also time the training forward (module docstring)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="episodes per training forward")
    parser.add_argument("--baseline", help="git ref to time side by side")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant with --baseline")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if Path(args.worker) != REPO:
            check_imported_from(args.worker)
        print(json.dumps(run(args)))
        return
    if args.baseline:
        compare(args)
        return

    rows = run(args)
    print(f"tiny-{args.model_size} on {args.device} ({platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads), ZoomEnv-v0, "
          f"{args.max_new_tokens} new tokens/turn max, G={args.group_size}")
    print("| N = B*G | measure | seconds | episodes/s | generated tokens/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for row, columns in rows.items():
        n, name = row.split(" ", 1)
        if "share" in columns:
            print(f"| {n} | {name} | {columns['share']:.3f} | | | |")
            continue
        if "episodes/s" not in columns:
            print(f"| {n} | {name} | {columns['seconds']:.2f} | | | |")
            continue
        sequential = rows.get(f"{n} sequential", columns)["seconds"]
        print(f"| {n} | {name} | {columns['seconds']:.2f} | {columns['episodes/s']:.2f} | "
              f"{columns['generated tokens/s']:.0f} | {sequential / columns['seconds']:.1f}x |")


if __name__ == "__main__":
    main()
