"""The training forward reproduces the sampling-time log-prob of every generated token.

Episodes of 1, 2 and 3 turns (DirectVQA, ZoomEnv, ZoomEnvMultiTurn) with images of different sizes
(originals of four aspect ratios, crops of two more), collated into one right-padded batch: positions
come from the model's rope index over each whole sequence, so a crop after the original (pitfall 4)
or missing ``mm_token_type_ids`` (pitfall 12) would show up here as a mismatch.
"""

from __future__ import annotations

import pytest
import torch
from zoomgym.agents.backends.base import SamplingParams
from zoomgym.agents.rollout import run_rollouts

TOL = 1e-4
ZOOM_1 = '```json\n[{"bbox_2d": [12, 20, 150, 100], "label": "key area"}]\n```'
ZOOM_2 = '```json\n[{"bbox_2d": [8, 6, 100, 190], "label": "closer"}]\n```'
ANSWER = "The square is red, \\boxed{A}"

CASES = {
    "direct-1-turn": ("zoomgym/DirectVQA-v0", {}, [ANSWER]),
    "zoom-2-turns": ("zoomgym/ZoomEnv-v0", {}, [ZOOM_1, ANSWER]),
    "multiturn-3-turns": ("zoomgym/ZoomEnvMultiTurn-v0", {"max_turns": 3}, [ZOOM_1, ZOOM_2, ANSWER]),
}


def max_masked_diff(agent, trajectories, temperature=1.0):
    batch = agent.collate(trajectories)
    with torch.no_grad():
        logp, _ = agent.token_logprobs(batch, temperature=temperature)
    mask = batch["loss_mask"].bool()
    assert mask.any()
    return (logp[mask] - batch["sampling_logprobs"][mask]).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_forced_turns_parity(tiny_agent, samples, scripted, case):
    env_id, env_kwargs, texts = CASES[case]
    trajectories = run_rollouts(scripted(texts), tiny_agent.adapter, samples[:3], 1, env_id,
                                SamplingParams(temperature=1.0), env_kwargs=env_kwargs)
    assert [t.num_turns for t in trajectories] == [len(texts)] * len(trajectories)
    assert all(t.terminated for t in trajectories)
    # Every zoom was valid, so each episode shows 1 + (turns - 1) images of several sizes.
    sizes = {im.size for t in trajectories for im in t.images}
    assert all(len(t.images) == len(texts) for t in trajectories)
    assert len(sizes) >= (3 if len(texts) == 1 else 5)
    assert len({t.length for t in trajectories}) > 1  # the batch really is padded
    assert max_masked_diff(tiny_agent, trajectories) < TOL


def test_sampled_three_turn_parity(tiny_agent, samples):
    temperature = 0.7  # the trainer must divide by the sampling temperature too
    trajectories = tiny_agent.rollout(
        samples[:2], 2, "zoomgym/ZoomEnvMultiTurn-v0",
        SamplingParams(temperature=temperature, seed=1, max_new_tokens=8), env_kwargs={"max_turns": 3},
    )
    assert {t.num_turns for t in trajectories} == {3}
    assert max_masked_diff(tiny_agent, trajectories, temperature) < TOL


def test_greedy_logprobs_use_temperature_one(tiny_agent, samples):
    trajectories = tiny_agent.rollout(samples[2:], 1, "zoomgym/DirectVQA-v0",
                                      SamplingParams(temperature=0.0, max_new_tokens=8))
    assert max_masked_diff(tiny_agent, trajectories, 1.0) < TOL
