"""A backend without a model: format-only scripted turns (random valid boxes, random letters)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from zoomgym.agents.backends.base import Generation, GenerationRequest, SamplingParams
from zoomgym.agents.scripted import answer_text, format_box
from zoomgym.envs.data.sample import LETTERS
from zoomgym.envs.geometry import Box


class ScriptedBackend:
    """A `Backend` that writes format-only turns without a model: random valid boxes, random letters.

    Boxes are drawn uniformly from a ``grid x grid`` set of square windows of side ``side`` (a fraction
    of the image's shorter side) whose corners are evenly spaced from edge to edge, so together they
    cover the image. A discrete set matters: greedy decoding of a model taught *continuous* random
    corners writes the most likely digits for each corner, often an empty box; taught a few windows,
    it writes one of them, and RL can learn which window to pick from the image.

    Not a rollout engine for training, so not in `agents.backends.BACKENDS`: the format warm-up
    (`algorithms.warmup`) plays it through the rollout engine to get token-exact scripted episodes.

    A request whose conversation shows one image is the grounding turn (the original only); one with
    more images is the answer turn (the crop or the fallback came back). All randomness comes from the
    request's seed, which the rollout engine derives from ``(sampling seed, episode, turn)``.

    Args:
        adapter: the model adapter (tokenizer, end-of-turn id, coordinate frame, merged-patch size).
        num_options: answers are drawn from the first ``num_options`` letters.
        grid: windows per image side.
        side: window side as a fraction of the shorter image side, in (0, 1].
    """

    shares_model = False
    logprobs_match_trainer = False  # it reports log-prob 0 for every scripted token
    can_sleep = False

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

    def close(self) -> None:
        """Nothing to shut down."""
