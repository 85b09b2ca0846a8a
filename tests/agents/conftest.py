"""Shared fixtures of the agent tests: one tiny Qwen2.5-VL folder per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~1M-parameter Qwen2.5-VL with a small view budget (16..64 visual tokens per image), built offline."""
    from zoomgym.agents.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", size="1m", seed=0,
                            min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)


@pytest.fixture(scope="session")
def tiny_agent(tiny_model_dir: Path):
    """An fp32 CPU `LMMAgent` (hf backend) over the tiny model. Tests must not change its weights."""
    from zoomgym.agents.lmm import LMMAgent

    return LMMAgent.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def samples():
    """Four questions on noise images of different sizes and aspect ratios."""
    import numpy as np
    from PIL import Image
    from zoomgym.envs.data.sample import Sample

    rng = np.random.default_rng(0)
    sizes = [(640, 480), (300, 520), (900, 300), (256, 256)]
    return [
        Sample(f"s{i}", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
               "What colour is the square?", ("red", "green", "blue", "white"), "ABCD"[i], category="attribute")
        for i, (w, h) in enumerate(sizes)
    ]


class ScriptedBackend:
    """Teacher-forces the same text in turn ``k`` of every episode, scored by a real backend.

    Each ``generate`` call is one round of the rollout engine, so call ``k`` forces ``texts[k]`` followed
    by ``<|im_end|>``; the log-probs are the model's, as if it had sampled these tokens.
    """

    def __init__(self, inner, adapter, texts):
        self.inner, self.adapter, self.texts, self.calls = inner, adapter, list(texts), 0

    @property
    def weight_version(self):
        return self.inner.weight_version

    def generate(self, requests, sampling):
        import dataclasses

        ids = self.adapter.tokenizer.encode(self.texts[self.calls], add_special_tokens=False)
        self.calls += 1
        forced = [*ids, self.adapter.end_of_turn_id]
        return self.inner.generate([dataclasses.replace(r, forced_ids=forced) for r in requests], sampling)


@pytest.fixture()
def scripted(tiny_agent):
    """Factory: ``scripted(texts, inner=None)`` -> a `ScriptedBackend` over ``inner`` (default: the tiny
    agent's hf backend)."""
    return lambda texts, inner=None: ScriptedBackend(inner or tiny_agent.backend, tiny_agent.adapter, texts)
