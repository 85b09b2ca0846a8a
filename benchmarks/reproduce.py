"""The paper's claim at toy scale: from the toy base, MGPO (zoom) vs GRPO (no zoom), several seeds.

    make reproduce                                   # = python benchmarks/reproduce.py
    python benchmarks/reproduce.py --seeds 0 1 2 --steps 30 --val-every 5 --jobs 2 --out runs/reproduce

Both algorithms train from the same toy base (`zoomgym toy-base`, cached) with configs/quickstart.yaml:
the same prompts, steps, batch, learning rate and seeds; MGPO on zoomgym/ZoomEnv-v0, GRPO on
zoomgym/DirectVQA-v0, which shows the same 224x224 view and asks for the letter at once. Every
`--val-every` steps both are validated greedily on the same held-out questions (256 by default).

A supervised control shows that the view carries no answer: the toy base fine-tuned by SFT to answer
straight from the view (`toy_view_answer` chats) is scored on held-out view questions. The other side
of the visual-token comparison (``--full-resolution``, on by default, one seed): GRPO on DirectVQA with
the view budget raised until the whole canvas is shown at the crop's resolution, where the checks are
plain in one look.

Writes under ``--out``: one run folder per algorithm and seed (metrics.jsonl, TensorBoard), the
control's run, ``results.json`` (every curve, final means and spreads, wall times, the machine) and
``curves.png`` (accuracy, target-hit rate and valid-box ratio vs step; mean and min..max over seeds).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from zoomgym.envs.data.synthetic import SYNTHETIC_PRESETS

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
CURVES = ("accuracy", "target_hit_ratio", "valid_box_ratio", "iou", "visual_tokens")
"""Validation metrics tabled (``val/synthetic/<name>``), the first three plotted; GRPO has no boxes."""


CANVAS_SIDE = SYNTHETIC_PRESETS["cpu"]["canvas_size"]
"""Side of the quickstart's synthetic canvas, in pixels."""


def full_resolution_tokens() -> int:
    """Visual tokens of one look at the whole 672 px canvas at full resolution (what a single turn needs
    to see the checks as a crop shows them), under the toy base's patch geometry."""
    from zoomgym.agents.models.tiny import TOY_BASE_MODEL
    from zoomgym.envs.views import ViewBudget

    side = CANVAS_SIDE
    factor = TOY_BASE_MODEL["patch_size"] * TOY_BASE_MODEL["merge_size"]
    w, h = ViewBudget(side * side, side * side, TOY_BASE_MODEL["patch_size"], TOY_BASE_MODEL["merge_size"]).shown_size(side, side)
    return (w // factor) * (h // factor)


def curve(run_dir: Path, name: str) -> dict[int, float]:
    """``step -> val/synthetic/<name>`` from a run's metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if f"val/synthetic/{name}" in record:
            out[int(record["step"])] = float(record[f"val/synthetic/{name}"])
    return out


FULL_RESOLUTION_LOOK = "grpo-full-resolution"
"""The run that answers in one look at the whole canvas at the crop's resolution (GRPO on DirectVQA with
the view budget raised to the canvas), the other side of the visual-token comparison."""


def full_resolution_overrides() -> list[str]:
    """Config overrides of `FULL_RESOLUTION_LOOK`: the whole canvas shown at its own resolution. The
    samples were made for the quickstart's budget, so the env's budget check is turned off on purpose."""
    side = CANVAS_SIDE
    return ["algorithm.name=grpo", f"model.min_pixels={side * side}", f"model.max_pixels={side * side}",
            "env.options.check_view_budget=false"]


def train(label: str, seed: int, base: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One RL run from the base: ``label`` is an algorithm of the quickstart, or `FULL_RESOLUTION_LOOK`."""
    from zoomgym.algorithms.config import load_config
    from zoomgym.algorithms.run import run

    if args.jobs > 1:
        torch.set_num_threads(1)  # one core per run: runs side by side, no oversubscription
    run_dir = args.out / f"{label}-seed{seed}"
    algorithm = [] if label == FULL_RESOLUTION_LOOK else [f"algorithm.name={label}"]
    extra = full_resolution_overrides() if label == FULL_RESOLUTION_LOOK else []
    overrides = [f"model.path={base}", *algorithm, *extra, f"trainer.seed={seed}",
                 f"trainer.steps={args.steps}", f"trainer.val_every={args.val_every}", f"logging.run_dir={run_dir}",
                 "trainer.save_every=0", "logging.render_every=0",
                 f"logging.progress_bar={str(args.jobs == 1 and not os.environ.get('CI')).lower()}"]
    cfg = load_config(QUICKSTART, overrides)
    cfg.data.val[0].options["n"] = args.val_items  # the quickstart's held-out questions, as many as asked
    start = time.perf_counter()
    run(cfg)
    return {"run_dir": str(run_dir), "seconds": time.perf_counter() - start,
            "curves": {name: curve(run_dir, name) for name in CURVES}}


def supervised_control(base: Path, args: argparse.Namespace) -> dict[str, Any]:
    """SFT of the base on view-only questions; held-out accuracy should stay near chance (0.25)."""
    from zoomgym.algorithms.config import load_config
    from zoomgym.algorithms.run import run_sft

    run_dir = args.out / "control-view-sft"
    cfg = load_config(None, [
        f"model.path={base}", "model.dtype=float32", "trainer.device=cpu", f"trainer.steps={args.control_steps}",
        "sft.train=[{task: toy_view_answer, n: 2048, seed: 3000}]",
        f"sft.val=[{{task: toy_view_answer, n: {args.val_items}, seed: 3001, label: view}}]",
        "sft.batch_size=32", "trainer.micro_batch_size=16", "trainer.lr=1e-3", "trainer.weight_decay=0.0",
        f"trainer.val_every={max(1, args.control_steps // 4)}", "trainer.save_every=0", "logging.render_every=0",
        f"logging.run_dir={run_dir}"])
    start = time.perf_counter()
    sft = run_sft(cfg)
    return {"run_dir": str(run_dir), "seconds": time.perf_counter() - start,
            "accuracy": sft.last_validation.get("val/view/answer_accuracy")}


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Final and step-0 means and spreads over seeds, per algorithm and metric."""
    out: dict[str, Any] = {}
    for algorithm, seeds in runs.items():
        out[algorithm] = {}
        for name in CURVES:
            curves = [r["curves"][name] for r in seeds if r["curves"][name]]
            if curves:
                out[algorithm][name] = {"start": spread([c[min(c)] for c in curves]), "end": spread([c[max(c)] for c in curves])}
        out[algorithm]["seconds"] = spread([r["seconds"] for r in seeds])
    return out


def table(results: dict[str, Any]) -> str:
    """``results.md``: the README's table, final numbers as mean [min, max] over seeds."""
    def cell(summary: dict[str, Any], name: str, when: str) -> str:
        if name not in summary:
            return "-"
        v = summary[name][when]
        return f"{v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]"

    lines = [f"| algorithm (env) | accuracy, step 0 | accuracy, step {results['steps']} | target-hit ratio, step 0 -> "
             f"{results['steps']} | valid-box ratio, step 0 -> {results['steps']} | IoU, step {results['steps']} | "
             "visual tokens / episode | wall time per run |", "|---|---|---|---|---|---|---|---|"]
    envs = {"mgpo": "ZoomEnv-v0", "grpo": "DirectVQA-v0", FULL_RESOLUTION_LOOK: f"DirectVQA-v0, {CANVAS_SIDE} px view"}
    for algorithm, summary in results["summary"].items():
        tokens = summary.get("visual_tokens", {}).get("end", {}).get("mean")
        lines.append(
            f"| {algorithm} ({envs.get(algorithm, '?')}) | {cell(summary, 'accuracy', 'start')} | {cell(summary, 'accuracy', 'end')} "
            f"| {cell(summary, 'target_hit_ratio', 'start')} -> {cell(summary, 'target_hit_ratio', 'end')} "
            f"| {cell(summary, 'valid_box_ratio', 'start')} -> {cell(summary, 'valid_box_ratio', 'end')} "
            f"| {cell(summary, 'iou', 'end')} | {tokens:.0f} | {summary['seconds']['mean'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """``curves.png``: one panel per metric, a line per algorithm (mean over seeds) in its min..max band."""
    from PIL import Image, ImageDraw

    colours = {"mgpo": (31, 119, 180), "grpo": (214, 39, 40), FULL_RESOLUTION_LOOK: (44, 160, 44)}
    panel_w, panel_h, pad = 420, 300, 48
    image = Image.new("RGB", (panel_w * len(CURVES[:3]), panel_h + 30), "white")
    draw = ImageDraw.Draw(image)
    for p, name in enumerate(CURVES[:3]):
        x0, y0, x1, y1 = p * panel_w + pad, 30, (p + 1) * panel_w - 12, panel_h - pad + 30
        draw.rectangle([x0, y0, x1, y1], outline=(80, 80, 80))
        draw.text((x0, 8), f"held-out {name} vs step", fill="black")
        steps = sorted({s for seeds in runs.values() for r in seeds for s in r["curves"][name]}) or [0, 1]
        span = max(steps) - min(steps) or 1

        def xy(step: float, value: float, x0: int = x0, x1: int = x1, y0: int = y0, y1: int = y1,
               first: int = min(steps), span: int = span) -> tuple[float, float]:
            return x0 + (step - first) / span * (x1 - x0), y1 - value * (y1 - y0)

        for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
            draw.line([xy(min(steps), tick), xy(max(steps), tick)], fill=(225, 225, 225))
            draw.text((x0 - 34, xy(0, tick)[1] - 6), f"{tick:.2f}", fill="black")
        for step in (min(steps), max(steps)):
            draw.text((xy(step, 0)[0] - 6, y1 + 6), str(step), fill="black")
        for row, (algorithm, seeds) in enumerate(runs.items()):
            curves = [r["curves"][name] for r in seeds if r["curves"][name]]
            if not curves:
                continue
            shared = sorted(set.intersection(*(set(c) for c in curves)))
            lows = [xy(s, min(c[s] for c in curves)) for s in shared]
            highs = [xy(s, max(c[s] for c in curves)) for s in shared]
            light = tuple(int(255 - (255 - v) * 0.25) for v in colours.get(algorithm, (0, 0, 0)))
            if len(shared) > 1:
                draw.polygon(lows + highs[::-1], fill=light)
            draw.line([xy(s, statistics.fmean(c[s] for c in curves)) for s in shared], fill=colours.get(algorithm, "black"), width=3)
            draw.text((x1 - 120, y0 + 8 + 14 * row), f"{algorithm} (n={len(curves)})", fill=colours.get(algorithm, "black"))
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--val-every", type=int, default=5)
    parser.add_argument("--val-items", type=int, default=256)
    parser.add_argument("--control-steps", type=int, default=100)
    parser.add_argument("--algorithms", nargs="+", default=["mgpo", "grpo"])
    parser.add_argument("--full-resolution", action=argparse.BooleanOptionalAction, default=True,
                        help=f"also run {FULL_RESOLUTION_LOOK} (one seed): one look at the whole canvas")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one torch thread each")
    args = parser.parse_args(argv)
    from zoomgym.algorithms.toy_base import build_toy_base, describe_report

    start = time.perf_counter()
    base = build_toy_base()
    print(describe_report(base), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in args.algorithms}
    rl_start = time.perf_counter()
    jobs = [(algorithm, seed) for seed in args.seeds for algorithm in args.algorithms]
    if args.full_resolution:
        jobs.append((FULL_RESOLUTION_LOOK, args.seeds[0]))
        runs[FULL_RESOLUTION_LOOK] = []
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = list(pool.map(train, *zip(*jobs), [base] * len(jobs), [args] * len(jobs)))
    for (algorithm, _), result in zip(jobs, done):
        runs[algorithm].append(result)
    rl_seconds = time.perf_counter() - rl_start
    control = supervised_control(base, args) if args.control_steps else None
    results = {
        "base": json.loads((base.parent / "report.json").read_text())["validation"], "seeds": args.seeds,
        "steps": args.steps, "val_items": args.val_items, "runs": runs, "summary": summarise(runs),
        "control": control, "full_resolution_visual_tokens": full_resolution_tokens(), "rl_seconds": rl_seconds, "total_seconds": time.perf_counter() - start,
        "machine": {"cpus": os.cpu_count(), "jobs": args.jobs, "platform": platform.platform(),
                    "load_average_at_end": os.getloadavg()},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(runs, args.out / "curves.png")
    (args.out / "results.md").write_text(table(results))
    for algorithm, summary in results["summary"].items():
        acc = summary["accuracy"]
        print(f"{algorithm}: accuracy {acc['start']['mean']:.3f} -> {acc['end']['mean']:.3f} "
              f"(end min {acc['end']['min']:.3f}, max {acc['end']['max']:.3f}, {len(args.seeds)} seeds)")
    if control:
        print(f"supervised control from the view: held-out accuracy {control['accuracy']:.3f} (chance 0.25)")
    print(f"RL wall time {rl_seconds / 60:.1f} min; results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
