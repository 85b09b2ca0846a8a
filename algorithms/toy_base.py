"""The toy base: a tiny model that can ground and read, for RL on CPU (``zoomgym toy-base``, ``make toy-base``).

A random tiny model earns no reward in the zoom env, so RL from it learns nothing; a real LMM starts
RL already able to point and to read. The toy base stands in for that on 2 CPU cores:

1. build a random tiny Qwen2.5-VL with the toy-base settings (`agents.models.tiny.TOY_BASE_MODEL`);
2. fine-tune it (`algorithms.sft`) on ``configs/toy_base.yaml``: general single-turn grounding and
   reading chats on synthetic canvases disjoint from the RL sets (`envs.data.toy_tasks`), never the
   two-turn zoom protocol;
3. pick a checkpoint by its held-out validation (`pick_checkpoint`): reading solid, grounding only
   partly there (hit rate near the middle of `HIT_RANGE`), so RL has something to learn and a gain
   can be told apart from the base's own skill;
4. copy it to ``CACHE/toy-base-<recipe hash>/model`` (a stock transformers folder) with
   ``report.json``: the step picked, why, its validation numbers and the whole recipe; the link
   ``CACHE/toy-base`` names the latest one built or reused (``configs/quickstart.yaml`` loads
   ``.cache/toy-base/model``).

The folder name hashes the recipe (the config after overrides, the model settings, the selection
rule, the zoomgym version), so a changed recipe builds anew and an unchanged one is reused. A build
that was killed resumes from its newest checkpoint. Every build runs on `BUILD_THREADS` torch threads.
The same recipe on another machine (other CPU kernels) or after a change in the float order of the
training code can give another model: read the build's ``report.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zoomgym.algorithms.checkpoint import latest_checkpoint
from zoomgym.algorithms.config import Config, load_config, parse_override, to_dict

TOY_BASE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy_base.yaml"
"""The SFT recipe of the toy base."""

MIN_READING = 0.8
"""A checkpoint qualifies when it answers at least this share of held-out reading chats ..."""
MIN_VALID_BOXES = 0.85
"""... and writes a valid box for at least this share of held-out grounding chats."""
HIT_RANGE = (0.4, 0.6)
"""Grounding hit rate wanted: the earliest qualifying checkpoint inside it, else the qualifying one
closest to its middle (else the last checkpoint)."""

BUILD_THREADS = 2
"""torch CPU threads of every build, whoever calls it (``make toy-base``, ``make demo`` through the model
builder, ``make reproduce``): a float sum is split by thread count, and a 700-step SFT run amplifies
that rounding into a different model (measured: a build with 2 threads and one with 1, same code and
recipe, kept different checkpoints). Pinned, a build is a function of the recipe and the machine."""

READING_KEY, VALID_KEY, HIT_KEY = ("val/reading/answer_accuracy", "val/grounding/box_valid_ratio",
                                   "val/grounding/box_hit_ratio")
"""The validation metrics the selection reads (the config's val sets are labelled reading and grounding)."""


def recipe(cfg: Config) -> dict[str, Any]:
    """Everything the toy base depends on (not where it is written)."""
    from zoomgym.agents.models.tiny import TOY_BASE_MODEL

    import zoomgym

    values = to_dict(cfg)
    values.pop("logging", None)
    values["model"].pop("path", None)
    return {"config": values, "model": TOY_BASE_MODEL, "zoomgym": zoomgym.__version__,
            "selection": {"min_reading": MIN_READING, "min_valid_boxes": MIN_VALID_BOXES, "hit_range": HIT_RANGE}}


def recipe_hash(values: dict[str, Any]) -> str:
    """12 hex digits of the recipe's SHA-256 (its JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def pick_checkpoint(history: dict[int, dict[str, float]], steps: Sequence[int]) -> tuple[int, str]:
    """The checkpoint step to keep and why (module docstring, step 3).

    Args:
        history: validation metrics by step.
        steps: the steps that have a checkpoint, ascending.
    """
    low, high = HIT_RANGE
    qualified = [s for s in steps if s in history and history[s].get(READING_KEY, 0) >= MIN_READING
                 and history[s].get(VALID_KEY, 0) >= MIN_VALID_BOXES]
    inside = [s for s in qualified if low <= history[s].get(HIT_KEY, 0) <= high]
    if inside:
        return inside[0], f"the earliest checkpoint with reading >= {MIN_READING}, valid boxes >= {MIN_VALID_BOXES} and hit rate in {list(HIT_RANGE)}"
    if qualified:
        best = min(qualified, key=lambda s: (abs(history[s].get(HIT_KEY, 0) - (low + high) / 2), s))
        return best, (f"no checkpoint had a hit rate in {list(HIT_RANGE)}; the one closest to its middle among those with "
                      f"reading >= {MIN_READING} and valid boxes >= {MIN_VALID_BOXES}")
    return steps[-1], f"no checkpoint reached reading >= {MIN_READING} with valid boxes >= {MIN_VALID_BOXES}: the last one"


def validation_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """Validation metrics by step from a run's ``metrics.jsonl`` (torn lines skipped)."""
    history: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if any(key.startswith("val/") for key in record):
            history.setdefault(int(record["step"]), {}).update({k: v for k, v in record.items() if k.startswith("val/")})
    return history


def build_toy_base(overrides: Sequence[str] = (), cache: str | Path = ".cache", force: bool = False) -> Path:
    """The toy base's model folder: reused when its recipe was built before, else built (module docstring).

    Args:
        overrides: dotted overrides of ``configs/toy_base.yaml`` (they change the recipe hash).
        cache: folder that holds ``toy-base-<hash>/``.
        force: rebuild even if a finished build exists.

    Returns:
        ``CACHE/toy-base-<hash>/model``; its ``report.json`` sits beside it.
    """
    import torch
    from zoomgym.agents.models import build_tiny_model
    from zoomgym.agents.models.tiny import TOY_BASE_MODEL
    from zoomgym.algorithms.run import run_sft

    for item in overrides:
        key = parse_override(item)[0]
        if key.split(".")[0] == "model" or key == "logging.run_dir":
            raise ValueError(f"Expects overrides of the recipe (sft.*, trainer.*) or of logging, actual: {item!r} "
                             "(toy-base sets the model and the run folder itself)")
    cfg = load_config(TOY_BASE_CONFIG, list(overrides))
    values = recipe(cfg)
    home = Path(cache) / f"toy-base-{recipe_hash(values)}"
    model_dir, report_file = home / "model", home / "report.json"
    if report_file.is_file() and not force:
        _link_latest(home)
        return model_dir
    if force:
        shutil.rmtree(home, ignore_errors=True)
    start = time.perf_counter()
    init = home / "init"
    if not (init / "config.json").is_file():
        build_tiny_model(init, seed=cfg.trainer.seed, **TOY_BASE_MODEL)
    run_dir = home / "run"
    cfg = load_config(TOY_BASE_CONFIG, [*overrides, f"model.path={init}", f"logging.run_dir={run_dir}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        run_sft(cfg, resume=latest_checkpoint(run_dir) is not None)
    finally:
        torch.set_num_threads(threads)
    steps = sorted(int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
    history = validation_history(run_dir)
    step, why = pick_checkpoint(history, steps)
    staging = home / "model.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(run_dir / "checkpoints" / f"step_{step:06d}", staging, ignore=shutil.ignore_patterns("trainer_state.pt"))
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    report = {"model": str(model_dir), "step": step, "why": why, "validation": history.get(step, {}),
              "history": {str(s): history[s] for s in sorted(history)}, "build_seconds": time.perf_counter() - start,
              "recipe": values}
    report_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
    _link_latest(home)
    return model_dir


def _link_latest(home: Path) -> None:
    """Point ``CACHE/toy-base`` at ``home`` (replaced atomically: a reader never sees it missing)."""
    link, staging = home.parent / "toy-base", home.parent / f".toy-base-link-{os.getpid()}"
    staging.unlink(missing_ok=True)
    staging.symlink_to(home.name, target_is_directory=True)
    os.replace(staging, link)


def build_toy_base_into(out_dir: str | Path, overrides: Sequence[str] = (), cache: str | Path = ".cache") -> Path:
    """The ``toy_base`` model builder (``model.build: {builder: toy_base, into: .cache/toy-base/model}``):
    `build_toy_base`, then the model copied to ``out_dir`` unless that is where it already is."""
    model_dir = build_toy_base(overrides, cache=cache)
    out = Path(out_dir)
    if not out.exists() or out.resolve() != model_dir.resolve():
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
    return out


def describe_report(model_dir: Path) -> str:
    """A few lines on a built toy base: where, which step, its held-out numbers."""
    report = json.loads((model_dir.parent / "report.json").read_text())
    v = report["validation"]
    return (f"toy base: {model_dir}\n  step {report['step']}: {report['why']}\n"
            f"  held-out: reading accuracy {v.get(READING_KEY, float('nan')):.3f}, grounding hit rate "
            f"{v.get(HIT_KEY, float('nan')):.3f}, valid boxes {v.get(VALID_KEY, float('nan')):.3f}")
