"""Format warm-up: a short supervised cold start that teaches the zoom protocol's *format* and nothing else.

A randomly initialised model never writes a parseable box or a ``\\boxed{}`` letter, so every reward is
0, every group advantage is 0 and RL has nothing to learn from (the cold-start problem; MGPO's answer
for real LMMs is the fixed two-turn template, which a random model cannot follow). The warm-up fixes
only that: it teacher-forces the model on scripted episodes played in the real env, where

* the grounding turn is a valid box drawn **uniformly at random** from a grid of windows covering the
  image shown (``warmup.box_grid`` per side, side ``warmup.box_side``), written as the env's JSON;
* the answer turn is ``The answer is \\boxed{X}.`` with ``X`` **uniform over the options' letters**.

Neither draw looks at the sample (`agents.backends.scripted.ScriptedBackend` sees only the images' sizes
and a seed), so the transcripts hold no information about the answer or the target's position: after
the warm-up the model writes valid boxes and well-formed answers at chance accuracy, and any later gain
comes from RL.

Training is supervised fine-tuning's own step (`algorithms.sft.teacher_forcing_step`: one AdamW step per
warm-up step, grad-norm clip 1), on scripted episodes instead of chats::

    L = - sum_{i,t} mask[i,t] * log p(x[i,t] | x[i,<t], images) / sum_{i,t} mask[i,t]

over the scripted tokens of both turns (the env's tokens and the images are masked, exactly as in RL).
Only the data differs from ``zoomgym sft``: episodes played in the real env by a scripted backend, so
their tokens are laid out exactly as RL's rollouts.

Example:
    >>> from zoomgym.algorithms.warmup import format_warmup                       # doctest: +SKIP
    >>> stats = format_warmup(agent, samples, env_fn, WarmupConfig(enabled=True, steps=30))  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from zoomgym.agents.backends.base import SamplingParams
from zoomgym.agents.backends.scripted import ScriptedBackend
from zoomgym.agents.rollout import ImageErrorHandler, run_rollouts
from zoomgym.algorithms.sft import teacher_forcing_step

if TYPE_CHECKING:
    from zoomgym.agents.trajectory import Trajectory
    from zoomgym.algorithms.config import WarmupConfig


def scripted_episodes(agent: Any, samples: Sequence[Any], env_fn: Callable[[Any], Any], seed: int,
                      backend: ScriptedBackend, on_image_error: ImageErrorHandler | None = None) -> list[Trajectory]:
    """One scripted episode per sample, token-exact as the RL rollouts (same engine, same env)."""
    return run_rollouts(backend, agent.adapter, samples, 1, env_fn, SamplingParams(seed=seed, max_new_tokens=256),
                        on_image_error=on_image_error)


def format_warmup(agent: Any, samples: Sequence[Any], env_fn: Callable[[Any], Any], config: WarmupConfig,
                  seed: int = 0, on_image_error: ImageErrorHandler | None = None) -> dict[str, float]:
    """Teacher-force ``agent.model`` on scripted format-only episodes (module docstring); in place.

    Args:
        agent: an ``LMMAgent`` (its model is trained; its backend gets the new weights as version 0).
        samples: the training set; each step draws ``config.batch_size`` of them at random.
        env_fn: ``sample -> env`` with the agent's view budget and coordinate frame (the trainer's).
        config: the ``warmup`` section of the run config.
        seed: seeds the draws of samples and of the scripted boxes and letters.
        on_image_error: skip samples whose image fails to decode (`agents.rollout`); a step that drew only
            such samples trains on nothing.

    Returns:
        ``warmup/loss_first``, ``warmup/loss_last`` (mean token NLL of the first and last step),
        ``warmup/steps`` and ``warmup/seconds``.
    """
    start = time.perf_counter()
    num_options = max(len(s.options) for s in samples)
    backend = ScriptedBackend(agent.adapter, num_options, config.box_grid, config.box_side)
    model = agent.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    losses = []
    model.train()
    for step in range(config.steps):
        picked = [samples[int(i)] for i in rng.integers(len(samples), size=config.batch_size)]
        trajectories = scripted_episodes(agent, picked, env_fn, int(rng.integers(2**31)), backend, on_image_error)
        if not trajectories:
            continue
        # Whole rows: one episode per drawn sample, so a batch rarely shares a prompt, and a split would save
        # little but change the rounding the warmed-up tiny policy's letter depends on (it collapses to one
        # letter; tests/algorithms/test_learning.py's positive control starts from that letter).
        stats = teacher_forcing_step(agent, trajectories, optimizer, micro_batch_size=config.batch_size, grad_clip=1.0,
                                     share_prompts=False)
        losses.append(stats["sft/loss"])
        if step == 0 or (step + 1) % 10 == 0:
            print(f"format warm-up {step + 1}/{config.steps}: token NLL {losses[-1]:.3f}", flush=True)
    model.eval()
    agent.sync_weights(agent.weight_version)
    return {
        "warmup/loss_first": losses[0] if losses else float("nan"),
        "warmup/loss_last": losses[-1] if losses else float("nan"),
        "warmup/steps": float(config.steps),
        "warmup/seconds": time.perf_counter() - start,
    }
