"""MGPO: multi-turn grounding-based policy optimisation (Huang et al. 2025).

GRPO (algorithms/grpo.py) played on ZoomEnv's two-turn protocol: turn 1 the model writes the box of the
area that matters, the env crops it from the full-resolution original and shows it, turn 2 the model
answers. The reward is only the answer's correctness, yet the trajectory's advantage is put on **every
token the model generated in every turn** (its box turn included), with the env's tokens (its text and
the crop's image tokens) masked out: this is how grounding is learned from a binary answer reward.

It changes two things of GRPO and inherits the rest (collection, scoring, the PPO update):

* the env: ``zoomgym/ZoomEnv-v0`` (``env.id: zoomgym/ZoomEnvMultiTurn-v0`` with ``env.max_turns`` gives
  more zoom turns; over-turn masking, ``algorithm.mask_truncated``, then stops blaming episodes that ran
  out of turns);
* the loss mask: the trajectory's whole ``loss_mask`` (1 exactly on sampled tokens, every turn).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from zoomgym.algorithms.grpo import GRPO

if TYPE_CHECKING:
    from zoomgym.agents.trajectory import Trajectory


class MGPO(GRPO):
    """GRPO over multi-turn zoom episodes, trained on every model-generated token of every turn.

    Example:
        ``algorithms.make("mgpo", agent=agent, config=cfg).learn(10)``
    """

    default_env_id = "zoomgym/ZoomEnv-v0"

    def loss_mask(self, trajectory: Trajectory) -> torch.Tensor:
        """(L,) every token the model sampled, in every turn; env, template and image tokens are 0."""
        return trajectory.loss_mask
