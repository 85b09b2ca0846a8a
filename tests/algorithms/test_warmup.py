"""Format warm-up: scripted episodes carry format only (valid boxes, uniform letters), and it teaches it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from zoomgym.agents.backends.base import GenerationRequest
from zoomgym.algorithms.config import WarmupConfig
from zoomgym.envs.data.synthetic import COLOUR_PAIRS, RELATIONS, synthetic


@pytest.fixture(scope="module")
def agent(tiny_model_dir: Path):
    from zoomgym.agents.lmm import LMMAgent

    return LMMAgent.from_pretrained(tiny_model_dir, min_pixels=168 * 168, max_pixels=224 * 224)  # the `cpu` preset


def _env_fn(agent):
    import gymnasium

    from zoomgym import envs  # noqa: F401

    return lambda sample: gymnasium.make("zoomgym/ZoomEnv-v0", dataset=[sample], view_budget=agent.view_budget,
                                         coord_frame=agent.coord_frame)


def test_synthetic_fixed_option_order_maps_each_answer_to_one_letter() -> None:
    samples = synthetic(16, seed=3, preset="cpu", option_order="fixed")
    for sample in samples:
        expected = tuple(COLOUR_PAIRS) if sample.category == "attribute" else RELATIONS
        assert sample.options == expected
        assert sample.meta["option_order"] == "fixed"
    for category in ("attribute", "relative_position"):
        letters = [s.answer for s in samples if s.category == category]
        assert Counter(letters) == Counter("ABCD" * 2)  # every 4 questions of a category use each letter once
    shuffled = synthetic(16, seed=3, preset="cpu")
    assert len({s.options for s in shuffled if s.category == "attribute"}) > 1
    assert [s.answer for s in shuffled] == [s.answer for s in samples]
    with pytest.raises(ValueError, match="option_order"):
        synthetic(1, option_order="sorted")


def test_scripted_turns_ignore_the_sample(agent) -> None:
    from zoomgym.agents.backends.scripted import ScriptedBackend

    backend = ScriptedBackend(agent.adapter, num_options=4, grid=3, side=0.4)
    view = Image.new("RGB", (224, 224))
    crop = Image.new("RGB", (168, 224), "red")
    # A request carries only ids, images and a seed: the text is a function of the seed and image sizes.
    a = backend.text(GenerationRequest([1, 2, 3], [view], seed=5))
    b = backend.text(GenerationRequest([9, 9], [Image.new("RGB", (224, 224), "blue")], seed=5))
    assert a == b and '"bbox_2d"' in a
    answers = [backend.text(GenerationRequest([1], [view, crop], seed=s)) for s in range(400)]
    counts = Counter(text.split("{")[1][0] for text in answers)
    assert set(counts) == set("ABCD") and min(counts.values()) > 70  # uniform: 100 each expected
    assert len(backend.windows(224, 224)) == 9


def test_scripted_episodes_are_valid_zooms_at_chance_accuracy(agent) -> None:
    from zoomgym.agents.backends.scripted import ScriptedBackend
    from zoomgym.algorithms.warmup import scripted_episodes

    samples = synthetic(64, seed=0, preset="cpu", option_order="fixed", categories=["attribute"], clutter=0)
    backend = ScriptedBackend(agent.adapter)
    trajectories = scripted_episodes(agent, samples, _env_fn(agent), seed=0, backend=backend)
    assert all(t.infos[1]["box_valid"] and t.infos[2]["action"] == "answer" for t in trajectories)
    correct = sum(t.reward for t in trajectories)
    assert 8 <= correct <= 24  # chance is 16 of 64; seeded, so the exact count never changes
    first = trajectories[0]
    turns = torch.nonzero(torch.diff(first.loss_mask, prepend=torch.tensor([0])) == 1).numel()
    assert turns == 2  # both scripted turns are trained, env tokens are not


def test_format_warmup_fits_the_scripted_tokens_in_place(agent) -> None:
    import copy

    from zoomgym.agents.backends.hf import HFBackend
    from zoomgym.algorithms.warmup import format_warmup

    agent = copy.copy(agent)
    agent.model = copy.deepcopy(agent.model)  # the module's agent stays untouched for the other tests
    agent.backend = HFBackend(agent.model, agent.adapter)
    before = {k: v.clone() for k, v in agent.model.state_dict().items()}
    samples = synthetic(8, seed=0, preset="cpu", option_order="fixed", categories=["attribute"], clutter=0)
    torch.manual_seed(0)
    stats = format_warmup(agent, samples, _env_fn(agent), WarmupConfig(enabled=True, steps=12, batch_size=2,
                                                                        lr=3e-3), seed=0)
    assert stats["warmup/steps"] == 12
    assert stats["warmup/loss_last"] < 0.6 * stats["warmup/loss_first"]  # 7.2 nats (random) -> about 3.5
    assert any(not torch.equal(before[k], v) for k, v in agent.model.state_dict().items())
