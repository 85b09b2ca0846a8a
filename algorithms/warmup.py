"""Format warm-up: a short supervised cold start that teaches the zoom protocol's *format* and nothing else.

A randomly initialised model never writes a parseable box or a ``\\boxed{}`` letter, so every reward is
0, every group advantage is 0 and RL has nothing to learn from (the cold-start problem; MGPO's answer
for real LMMs is the fixed two-turn template, which a random model cannot follow). The warm-up fixes
only that: it teacher-forces the model on scripted episodes played in the real env, where

* the grounding turn is a valid box drawn **uniformly at random** from a grid of windows covering the
  image shown (``warmup.box_grid`` per side, side ``warmup.box_side``), written as the env's JSON;
* the answer turn is ``The answer is \\boxed{X}.`` with ``X`` **uniform over the options' letters**.

Neither draw looks at the sample (``ScriptedBackend`` sees only the images' sizes and a seed), so the
transcripts hold no information about the answer or the target's position: after the warm-up the
model writes valid boxes and well-formed answers at chance accuracy, and any later gain comes from RL.

Loss (one optimizer step per warm-up step, AdamW, grad-norm clip)::

    L = - sum_{i,t} mask[i,t] * log p(x[i,t] | x[i,<t], images) / sum_{i,t} mask[i,t]

over the scripted tokens of both turns (the env's tokens and the images are masked, exactly as in RL).

Example:
    >>> from zoomgym.algorithms.warmup import format_warmup                       # doctest: +SKIP
    >>> stats = format_warmup(agent, samples, env_fn, WarmupConfig(enabled=True, steps=30))  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from zoomgym.agents.backends.base import Generation, GenerationRequest, SamplingParams
from zoomgym.agents.rollout import run_rollouts
from zoomgym.agents.scripted import answer_text, format_box
from zoomgym.envs.data.sample import LETTERS
from zoomgym.envs.geometry import Box

if TYPE_CHECKING:
    from zoomgym.agents.trajectory import Trajectory
    from zoomgym.algorithms.config import WarmupConfig


class ScriptedBackend:
    """A `Backend` that writes format-only turns without a model: random valid boxes, random letters.

    Boxes are drawn uniformly from a ``grid x grid`` set of square windows of side ``side`` (a fraction
    of the image's shorter side) whose corners are evenly spaced from edge to edge, so together they
    cover the image. A discrete set matters: greedy decoding of a model taught *continuous* random
    corners writes the most likely digits for each corner, often an empty box; taught a few windows,
    it writes one of them, and RL can learn which window to pick from the image.

    A request whose conversation shows one image is the grounding turn (the original only); one with
    more images is the answer turn (the crop or the fallback came back). All randomness comes from the
    request's seed, which the rollout engine derives from ``(sampling seed, episode, turn)``.

    Args:
        adapter: the model adapter (tokenizer, end-of-turn id, coordinate frame, merged-patch size).
        num_options: answers are drawn from the first ``num_options`` letters.
        grid: windows per image side.
        side: window side as a fraction of the shorter image side, in (0, 1].
    """

    def __init__(self, adapter: Any, num_options: int = 4, grid: int = 3, side: float = 0.4) -> None:
        if not 0 < side <= 1:
            raise ValueError(f"Expects 0 < side <= 1, actual: {side}")
        if grid < 1:
            raise ValueError(f"Expects grid >= 1, actual: {grid}")
        if not 2 <= num_options <= len(LETTERS):
            raise ValueError(f"Expects 2 <= num_options <= {len(LETTERS)}, actual: {num_options}")
        self.adapter = adapter
        self.num_options = num_options
        self.grid, self.side = grid, side
        self.weight_version = 0

    def windows(self, width: int, height: int) -> list[Box]:
        """The ``grid**2`` candidate boxes on an image of ``width x height`` shown pixels, row by row."""
        # One pixel of margin: format_box rounds outwards and the box must stay inside the image.
        side = max(self.side * min(width, height), self.adapter.factor + 2.0)
        xs = np.linspace(1.0, width - 1.0 - side, self.grid) if self.grid > 1 else [(width - side) / 2]
        ys = np.linspace(1.0, height - 1.0 - side, self.grid) if self.grid > 1 else [(height - side) / 2]
        return [Box(float(x), float(y), float(x) + side, float(y) + side) for y in ys for x in xs]

    def text(self, request: GenerationRequest) -> str:
        """The scripted turn for `request` (seeded by ``request.seed``)."""
        rng = np.random.default_rng(request.seed)
        if len(request.images) > 1:
            return answer_text(LETTERS[int(rng.integers(self.num_options))])
        width, height = request.images[-1].size
        windows = self.windows(width, height)
        return format_box(windows[int(rng.integers(len(windows)))], self.adapter.coord_frame, (width, height))

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        out = []
        for request in requests:
            text = self.text(request)
            ids = list(self.adapter.tokenizer.encode(text, add_special_tokens=False))
            if len(request.images) > 1:  # the answer turn ends the message; a grounding turn stops at its fence
                ids.append(self.adapter.end_of_turn_id)
            ids = ids[: request.max_new_tokens]
            out.append(Generation(ids, [0.0] * len(ids), "eos" if ids[-1] == self.adapter.end_of_turn_id else "stop"))
        return out

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        self.weight_version = int(version)

    def sleep(self) -> None:
        """Nothing to release."""

    def wake_up(self) -> None:
        """Nothing to restore."""


def scripted_episodes(agent: Any, samples: Sequence[Any], env_fn: Callable[[Any], Any], seed: int,
                      backend: ScriptedBackend) -> list[Trajectory]:
    """One scripted episode per sample, token-exact as the RL rollouts (same engine, same env)."""
    return run_rollouts(backend, agent.adapter, samples, 1, env_fn, SamplingParams(seed=seed, max_new_tokens=256))


def format_warmup(agent: Any, samples: Sequence[Any], env_fn: Callable[[Any], Any], config: WarmupConfig,
                  seed: int = 0) -> dict[str, float]:
    """Teacher-force ``agent.model`` on scripted format-only episodes (module docstring); in place.

    Args:
        agent: an ``LMMAgent`` (its model is trained; its backend gets the new weights as version 0).
        samples: the training set; each step draws ``config.batch_size`` of them at random.
        env_fn: ``sample -> env`` with the agent's view budget and coordinate frame (the trainer's).
        config: the ``warmup`` section of the run config.
        seed: seeds the draws of samples and of the scripted boxes and letters.

    Returns:
        ``warmup/loss_first``, ``warmup/loss_last`` (mean token NLL of the first and last step),
        ``warmup/steps`` and ``warmup/seconds``.
    """
    start = time.perf_counter()
    num_options = max(len(s.options) for s in samples)
    backend = ScriptedBackend(agent.adapter, num_options, config.box_grid, config.box_side)
    model = agent.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    losses = []
    model.train()
    for step in range(config.steps):
        picked = [samples[int(i)] for i in rng.integers(len(samples), size=config.batch_size)]
        trajectories = scripted_episodes(agent, picked, env_fn, int(rng.integers(2**31)), backend)
        batch = agent.collate(trajectories)
        logp, _ = agent.token_logprobs(batch)
        mask = batch["loss_mask"].to(logp.device).float()
        loss = -(torch.where(mask > 0, logp, 0.0) * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
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
