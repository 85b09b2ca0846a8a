"""Seeds: every random draw of a run comes from integers derived from ``(trainer.seed, step, ...)``.

So N steps straight and N/2 + ``--resume`` + N/2 draw the same prompts, samples and mini-batches.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (run seed, step, stream, ...), stable across runs and platforms."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


VALIDATION_STREAM = 1 << 20
"""``derive_seed(trainer.seed, VALIDATION_STREAM)`` seeds validation episodes (greedy: only env resets)."""
WARMUP_STREAM = 1 << 21
"""``derive_seed(trainer.seed, WARMUP_STREAM)`` seeds the format warm-up's draws."""
