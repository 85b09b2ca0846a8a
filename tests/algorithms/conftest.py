"""Fixtures of the trainer tests: one tiny Qwen2.5-VL per session and a CPU-sized run config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from zoomgym.algorithms.config import Config, load_config

# A 112x112 view (16 visual tokens per image) keeps every forward cheap; the trainer does not need the
# synthetic answers to be hidden in the view, only real multi-turn episodes with images, so the runs opt
# out of the env's check that synthetic samples are shown at the size they were made for (224x224).
MIN_PIXELS, MAX_PIXELS = 112 * 112, 112 * 112


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest offline tiny model (about 1M parameters), built once per session."""
    from zoomgym.agents.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", size="1m", seed=0,
                            min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def tiny_run_config(model_dir: Path, run_dir: Path, *overrides: str) -> Config:
    """A few-second CPU run of the tiny model (B=2, G=2, 8 tokens per turn, 3 steps), plus `overrides`.

    Two mini-batches of one prompt each and micro-batches of one episode exercise gradient accumulation;
    a KL coefficient exercises the reference model.
    """
    base = [
        f"model.path={model_dir}",
        "model.dtype=float32",
        f"model.min_pixels={MIN_PIXELS}",
        f"model.max_pixels={MAX_PIXELS}",
        "data.train={name: synthetic, options: {n: 6, seed: 0, preset: cpu}}",
        "data.val=[{name: synthetic, options: {n: 2, seed: 1, preset: cpu}}]",
        "env.options.check_view_budget=false",
        "rollout.group_size=2",
        "rollout.max_new_tokens=8",
        "algorithm.kl_coef=0.01",
        "algorithm.entropy_coef=0.001",
        "trainer.steps=3",
        "trainer.prompts_per_step=2",
        "trainer.mini_batch_prompts=1",
        "trainer.micro_batch_size=1",
        "trainer.lr=1e-3",
        "trainer.device=cpu",
        "trainer.val_every=0",
        "trainer.save_every=0",
        "logging.render_every=0",
        "logging.progress_bar=false",
        f"logging.run_dir={run_dir}",
    ]
    return load_config(None, [*base, *overrides])


@pytest.fixture
def tiny_config(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., Config]:
    """``tiny_config(*overrides)``: `tiny_run_config` in this test's temporary folder."""

    def make(*overrides: str) -> Config:
        return tiny_run_config(tiny_model_dir, tmp_path / "run", *overrides)

    return make


@pytest.fixture(scope="session")
def mgpo_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, torch.Tensor]]:
    """One 3-step MGPO run shared by the tests that inspect a finished run: (algorithm, initial weights).

    Validated before and after, with a rendered trajectory at step 3, checkpointed after every step (the
    resume test continues from step 1 and must reach the same weights).
    """
    from zoomgym.algorithms.build import build_agent

    from zoomgym import algorithms

    cfg = tiny_run_config(tiny_model_dir, tmp_path_factory.mktemp("mgpo") / "run", "algorithm.name=mgpo",
                          "trainer.val_every=3", "logging.render_every=3", "logging.render_count=1",
                          "trainer.save_every=1", "trainer.keep_checkpoints=0")
    agent = build_agent(cfg)
    initial = {name: p.detach().clone() for name, p in agent.model.named_parameters()}
    algo = algorithms.make("mgpo", agent=agent, config=cfg)
    assert algo.learn(3) is algo
    algo.close()
    return algo, initial
