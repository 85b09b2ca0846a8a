"""The steps of scripts/gpu_check.sh that run inside Python: a few trainer steps measured, and the table.

    python scripts/gpu_check.py step --label "bf16 quickstart" --steps 3 --rows ROWS.jsonl -- CONFIG key=value ...
    python scripts/gpu_check.py run-row --label "FSDP2, 1 rank" --run-dir RUN --wall-s 61 --smi-peak-mib 2048 --rows ROWS.jsonl
    python scripts/gpu_check.py table ROWS.jsonl

``step`` builds the config's agent and algorithm and times ``train_step`` (the trainer's own step: rollouts,
scoring, update, weight sync) ``--steps`` times, measuring each step's peak memory with
`zoomgym.algorithms.preflight.measure_peak` (CUDA: ``torch.cuda.max_memory_allocated``; CPU: torch's
allocator trace), and compares the largest with the pre-flight estimate of the same config (with the
prompt length these episodes had, so the comparison tests the memory model, not a guess of the prompt).
``run-row`` reads the per-step times of a finished ``zoomgym train`` run (the torchrun step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

MIB = 2**20


def step_command(args: argparse.Namespace) -> dict:
    from zoomgym.algorithms import preflight as pf
    from zoomgym.algorithms.build import build_agent, resolve_device
    from zoomgym.algorithms.config import load_config, validate

    from zoomgym import algorithms

    config, *overrides = args.items
    cfg = load_config(config, overrides)
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    algo = algorithms.make(cfg.algorithm.name, agent=build_agent(cfg), config=cfg)
    seconds, peaks, trajectories = [], [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        (_, sampled), peak = pf.measure_peak(algo.train_step, device, pf.trainer_tensors(algo))
        seconds.append(time.perf_counter() - start)
        algo.step += 1  # what Trainer.learn does after each step
        peaks.append(peak)
        trajectories += sampled
    prompt = pf.observed_prompt_tokens(trajectories, pf.read_architecture(cfg.model.path))
    estimate = pf.preflight(cfg, prompt_tokens=prompt)
    print(pf.describe(estimate), flush=True)
    return {"label": args.label, "device": device, "steps": args.steps, "step_s": seconds, "peak_bytes": max(peaks),
            "estimate_bytes": estimate.peak, "longest_episode": max(t.length for t in trajectories),
            "worst_case_episode": estimate.workload.tokens_per_episode, "note": args.note}


def run_row_command(args: argparse.Namespace) -> dict:
    from zoomgym.algorithms.logging import read_metrics

    steps = [r for r in read_metrics(args.run_dir) if "train/reward" in r]
    seconds = [sum(v for k, v in r.items() if k.startswith("time/") and k != "time/validation_s") for r in steps]
    return {"label": args.label, "device": args.device, "steps": len(steps), "step_s": seconds,
            "smi_peak_bytes": args.smi_peak_mib * MIB if args.smi_peak_mib else None, "wall_s": args.wall_s,
            "note": args.note}


def table(rows: list[dict]) -> str:
    lines = ["| check | device | steps | step time, median (s) | peak memory (MiB) | pre-flight estimate (MiB) | "
             "measured / estimate | note |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("failed"):
            lines.append(f"| {row['label']} | {row.get('device', '')} | - | - | - | - | - | FAILED: {row['failed']} |")
            continue
        median = f"{statistics.median(row['step_s']):.2f}" if row["step_s"] else "-"
        if "peak_bytes" in row:
            peak = f"{row['peak_bytes'] / MIB:.1f} (allocated)"
            estimate = f"{row['estimate_bytes'] / MIB:.1f}"
            ratio = f"{row['peak_bytes'] / row['estimate_bytes']:.2f}"
        else:
            peak = f"{row['smi_peak_bytes'] / MIB:.1f} (nvidia-smi)" if row.get("smi_peak_bytes") else "-"
            estimate = ratio = "-"
        note = row.get("note") or ""
        if "longest_episode" in row:
            note = f"{note} longest episode {row['longest_episode']} of worst case {row['worst_case_episode']} tokens".strip()
        if row.get("wall_s"):
            note = f"{note} wall {row['wall_s']:.0f} s".strip()
        lines.append(f"| {row['label']} | {row['device']} | {row['steps']} | {median} | {peak} | {estimate} | {ratio} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step", help="time and measure trainer steps of a config")
    step.add_argument("--label", required=True)
    step.add_argument("--steps", type=int, default=3)
    step.add_argument("--rows", type=Path, required=True, help="jsonl file the row is appended to")
    step.add_argument("--note", default="")
    step.add_argument("items", nargs="+", metavar="CONFIG key=value")
    row = sub.add_parser("run-row", help="the row of a finished zoomgym train run")
    row.add_argument("--label", required=True)
    row.add_argument("--run-dir", type=Path, required=True)
    row.add_argument("--rows", type=Path, required=True)
    row.add_argument("--device", default="cuda")
    row.add_argument("--wall-s", type=float, default=None)
    row.add_argument("--smi-peak-mib", type=float, default=None)
    row.add_argument("--note", default="")
    show = sub.add_parser("table", help="print the rows as a markdown table")
    show.add_argument("rows", type=Path)
    args = parser.parse_args(argv)
    if args.command == "table":
        print(table([json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]))
        return 0
    try:
        result = step_command(args) if args.command == "step" else run_row_command(args)
    except Exception as error:  # the check goes on to its next step; the table says what failed
        result = {"label": args.label, "failed": f"{type(error).__name__}: {str(error)[:200]}"}
        print(f"gpu_check: {args.label} failed: {error!r}", file=sys.stderr)
    with args.rows.open("a") as f:
        f.write(json.dumps(result) + "\n")
    return 1 if "failed" in result else 0


if __name__ == "__main__":
    sys.exit(main())
