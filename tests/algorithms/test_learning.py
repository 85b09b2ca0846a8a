"""The trainer learns what the reward asks, in CI: a positive control, and learning to look from a toy base.

The reward here needs no looking: every held-out and training question has the same correct letter,
one that the warmed-up model does not write yet. From a random tiny model, the format warm-up teaches
the two-turn format (valid boxes, a letter in turn 2) at chance; MGPO must then move the answer turn's
letter from the warmed-up policy's choice to the rewarded one. A wrong sign of the advantages, a loss
mask that misses the answer turn, or stale sampling weights leave the held-out accuracy at 0
(measured: 0.0 -> 1.0 in 8 steps; with the advantages negated, or the loss mask all zero, it stays at
0.0). It does not test the crop or grounding, and the box format is free to drift here (the reward
ignores it; without a KL term the boxes stopped parsing).

The second test does: the quickstart's MGPO run from a committed toy base (`tests/fixtures/toy_base`,
a `make toy-base` build kept as a fixture because a build takes about 15 minutes; its report is
``build_report.json``), where the answer can be read only from the crop of a box on the target. A few
steps must lift held-out accuracy by 15 points (measured: 0.633 -> 0.914 in 8 steps on 128 held-out
questions, target hits 0.70 -> 0.87, 45 s). Broken once each on purpose, it fails: the crop replaced by
the view, 0.227 -> 0.266; the advantages negated, 0.633 -> 0.406; the loss mask zeroed, 0.633 -> 0.633.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from zoomgym.algorithms.config import load_config
from zoomgym.envs.data.synthetic import synthetic

pytestmark = pytest.mark.slow

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
TOY_BASE = Path(__file__).resolve().parents[1] / "fixtures" / "toy_base"


def one_letter(n: int, seed: int, letter: str) -> list:
    """``n`` synthetic attribute questions whose correct option is at ``letter`` (fixed option order)."""
    samples = synthetic(4 * n, seed, preset="cpu", categories=("attribute",), option_order="fixed")
    return [s for s in samples if s.answer == letter][:n]


def test_mgpo_learns_a_reward_that_needs_no_looking(tiny_model_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from zoomgym.agents.backends.base import SamplingParams
    from zoomgym.algorithms.build import build_agent, env_factory
    from zoomgym.algorithms.warmup import format_warmup
    from zoomgym.envs.actions import extract_boxed
    from zoomgym.envs.data import DATASETS

    from zoomgym import algorithms

    torch.manual_seed(0)
    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", "model.dtype=float32", "model.min_pixels=28224", "model.max_pixels=50176",
        "env.id=zoomgym/ZoomEnv-v0", "data.train={name: one_letter, options: {n: 32, seed: 0}}",
        "data.val=[{name: one_letter, options: {n: 32, seed: 1}}]", "rollout.group_size=8", "rollout.max_new_tokens=40",
        "algorithm.name=mgpo", "algorithm.kl_coef=0.0", "algorithm.entropy_coef=0.0", "trainer.steps=8",
        "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=4", "trainer.micro_batch_size=16", "trainer.lr=1e-3",
        "trainer.weight_decay=0.0", "trainer.device=cpu", "trainer.val_every=0", "trainer.save_every=0",
        "warmup.steps=100", "warmup.batch_size=8", "warmup.lr=3e-3", "warmup.box_grid=2", "warmup.box_side=0.5",
        "logging.render_every=0", "logging.progress_bar=false", f"logging.run_dir={tmp_path / 'run'}"])
    agent = build_agent(cfg)
    env_fn = env_factory(cfg, "zoomgym/ZoomEnv-v0", agent)
    probe = synthetic(16, 5, preset="cpu", categories=("attribute",), option_order="fixed")
    format_warmup(agent, probe * 2, env_fn, cfg.warmup, seed=0)
    greedy = agent.rollout(probe, 1, env=env_fn, sampling=SamplingParams(temperature=0.0, max_new_tokens=40, seed=0))
    written = [extract_boxed(t.actions[-1]) for t in greedy]
    letter = next(x for x in "DCBA" if x not in written)  # a letter the warmed-up policy does not write
    monkeypatch.setitem(DATASETS, "one_letter", lambda n, seed: one_letter(n, seed, letter))
    algo = algorithms.make("mgpo", agent=agent, config=cfg)
    algo.learn(cfg.trainer.steps)
    before, after = algo.first_validation["val/one_letter/accuracy"], algo.last_validation["val/one_letter/accuracy"]
    assert before == 0.0 and after >= 0.15 + before, (before, after)


def test_mgpo_learns_where_to_look_from_the_toy_base(tmp_path: Path) -> None:
    from zoomgym.algorithms.config import load_config
    from zoomgym.algorithms.run import run

    torch.manual_seed(0)
    held_out = ("{name: synthetic, options: {n: 128, seed: 1, preset: cpu, categories: [attribute], "
                "option_order: fixed, distractors: 0}}")
    cfg = load_config(QUICKSTART, [
        f"model.path={TOY_BASE}", f"data.val=[{held_out}]", "trainer.steps=8", "trainer.val_every=8",
        "trainer.save_every=0", "logging.render_every=0", "logging.progress_bar=false", "logging.tensorboard=false",
        f"logging.run_dir={tmp_path / 'run'}"])
    algo = run(cfg)
    before, after = algo.first_validation["val/synthetic/accuracy"], algo.last_validation["val/synthetic/accuracy"]
    hits = (algo.first_validation["val/synthetic/target_hit_ratio"], algo.last_validation["val/synthetic/target_hit_ratio"])
    assert after >= before + 0.15, (before, after, hits)
