"""Scoring: the entropy of each position's distribution (the log-prob definition: test_logprob_parity)."""

from __future__ import annotations

import math

import torch
from zoomgym.agents.scoring import entropy_from_logits


def close(actual, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


def test_entropy_hand_computed():
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # uniform over 4: log 4 = 1.386294
            [0.0, math.log(3.0), -math.inf, -math.inf],  # p = [0.25, 0.75, 0, 0]: 0.562335
            [1000.0, 0.0, 0.0, 0.0],  # one-hot up to e^-1000: 0
        ]
    )
    # 0.25 * ln 4 + 0.75 * ln(4/3) = 0.346574 + 0.215762 = 0.562335
    close(entropy_from_logits(logits), [1.386294, 0.562335, 0.0])


def test_entropy_shape_and_finite_gradient_with_masked_vocab():
    logits = torch.randn(2, 3, 5)
    logits[..., 0] = -math.inf
    logits.requires_grad_()
    entropy = entropy_from_logits(logits)
    assert entropy.shape == (2, 3)
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[..., 0], torch.zeros(2, 3))
    # matches the definition -sum p log p over the unmasked entries
    probs = torch.softmax(logits.detach()[..., 1:], dim=-1)
    close(entropy.detach(), -(probs * probs.log()).sum(-1))
