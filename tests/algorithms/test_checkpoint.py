"""Checkpoints: exact resume, pruning, RNG state round trip, atomic layout."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from zoomgym.algorithms.checkpoint import (
    TRAINER_STATE,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    rng_state,
    set_rng_state,
)
from zoomgym.algorithms.config import load_config
from zoomgym.algorithms.logging import read_metrics
from zoomgym.algorithms.run import run


def test_rng_state_round_trip() -> None:
    state = rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_missing_trainer_state_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=TRAINER_STATE):
        load_trainer_state(tmp_path)
    assert latest_checkpoint(tmp_path) is None


def test_resume_continues_exactly(mgpo_run: tuple[Any, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """N steps straight == N/2 steps, then --resume, then the rest: identical weights, bit for bit.

    The shared MGPO run went 1 -> 2 -> 3 in one process, checkpointing each step; a copy of its folder
    cut back to the step-1 checkpoint is resumed in a fresh agent and algorithm and must land on the
    same step-3 weights, optimizer state and per-step numbers.
    """
    straight, _ = mgpo_run
    assert [step for step, _ in list_checkpoints(straight.run_dir)] == [1, 2, 3]
    halves_dir = tmp_path / "halves"
    shutil.copytree(straight.run_dir, halves_dir)
    for step in (2, 3):
        shutil.rmtree(halves_dir / "checkpoints" / f"step_{step:06d}")
    assert latest_checkpoint(halves_dir).name == "step_000001"
    # what `zoomgym train --resume RUN_DIR` does: the run's own config (validation and images off: they
    # draw no training randomness), the run's own folder
    cfg = load_config(halves_dir / "config.yaml", [f"logging.run_dir={halves_dir}", "trainer.val_every=0",
                                                   "logging.render_every=0", "data.val=[]", "trainer.keep_checkpoints=1"])
    resumed = run(cfg, resume=True)

    assert resumed.step == 3 and resumed.run_dir == halves_dir
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), f"{name} differs after resume"
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"]) for k in opt_a)
    # the log continues without duplicates, and the resumed steps saw the same rollouts and losses
    train_a = [r for r in read_metrics(straight.run_dir) if "train/reward" in r]
    train_b = [r for r in read_metrics(halves_dir) if "train/reward" in r]
    assert [r["step"] for r in train_b] == [1, 2, 3]
    for key in ("train/reward", "actor/pg_loss", "actor/kl", "actor/entropy", "train/generated_tokens"):
        assert [r[key] for r in train_a] == [r[key] for r in train_b], key
    assert [step for step, _ in list_checkpoints(halves_dir)] == [3]  # keep_checkpoints=1 pruned step 1
