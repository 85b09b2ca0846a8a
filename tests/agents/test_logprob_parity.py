"""The training forward reproduces the sampling-time log-prob of every generated token, and the hf
backend's KV reuse reproduces a whole re-prefill.

Episodes of 1, 2 and 3 turns (DirectVQA, ZoomEnv, ZoomEnvMultiTurn) with images of different sizes
(originals of four aspect ratios, crops of two more), collated into one right-padded batch: positions
come from the model's own rope index over each whole sequence, so a crop after the original (pitfall 4)
or missing ``mm_token_type_ids`` (pitfall 12) would show up here as a mismatch.

KV reuse (`agents.backends.hf`): the same episodes played with the rollout engine's cache keys (a group's
first prompt prefilled once and forked, each later turn prefilled only from what was appended, its M-RoPE
positions continued from the kept prefix) and without them (every turn prefilled whole, batched and
padded alike) give the same tokens and log-probs within 1e-6 in fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from zoomgym.agents.backends.base import GenerationRequest, SamplingParams
from zoomgym.agents.rollout import run_rollouts

TOL = 1e-4
CACHE_TOL = 1e-6
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


# ---- KV reuse in the hf backend ------------------------------------------------------------------------


class Uncached:
    """The wrapped backend with every request's cache key removed: each turn is prefilled whole, in the
    same batches with the same padding (the hf backend before KV reuse)."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def weight_version(self):
        return self.inner.weight_version

    def generate(self, requests, sampling):
        return self.inner.generate([dataclasses.replace(r, cache_key=None) for r in requests], sampling)


@contextlib.contextmanager
def prefill_shapes(model):
    """Records ``(rows, length)`` of every forward of ``model`` that feeds more than one token per row."""
    shapes = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            shapes.append(tuple(ids.shape))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield shapes
    finally:
        handle.remove()


def assert_same_episodes(cached, whole):
    assert [t.input_ids.tolist() for t in cached] == [t.input_ids.tolist() for t in whole]
    assert [t.num_turns for t in cached] == [t.num_turns for t in whole]
    diff = max((c.sampling_logprobs - w.sampling_logprobs).abs().max().item() for c, w in zip(cached, whole))
    assert diff < CACHE_TOL, f"max |cached - whole prefill| log-prob = {diff:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_kv_reuse_equals_whole_prefills_on_forced_turns(tiny_agent, samples, scripted, case):
    """Crops of several sizes after originals of four: the appended image's M-RoPE positions must continue
    the kept prefix's exactly, or the log-probs move."""
    env_id, env_kwargs, texts = CASES[case]
    group, backend, adapter = 2, tiny_agent.backend, tiny_agent.adapter
    runs = {}
    for name, inner in (("whole", Uncached(backend)), ("cached", backend)):
        with prefill_shapes(tiny_agent.model) as shapes:
            runs[name] = run_rollouts(scripted(texts, inner), adapter, samples, group, env_id,
                                      SamplingParams(temperature=1.0), env_kwargs=env_kwargs)
        runs[name + " shapes"] = shapes
    assert all(t.num_turns == len(texts) and len(t.images) == len(texts) for t in runs["cached"])
    assert len({t.length for t in runs["cached"]}) > 1  # the batches really are padded
    assert_same_episodes(runs["cached"], runs["whole"])
    whole, cached = runs["whole shapes"], runs["cached shapes"]
    assert len(whole) == len(cached) == len(texts)  # one prefill per turn
    # The group's shared first prompt is prefilled once per sample; later turns prefill far fewer tokens.
    assert whole[0][0] == len(samples) * group and cached[0] == (len(samples), whole[0][1])
    for turn in range(1, len(texts)):
        assert cached[turn][0] == whole[turn][0] and cached[turn][1] < whole[turn][1] - whole[0][1] // 2


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_kv_reuse_equals_whole_prefills_on_sampled_turns(tiny_agent, samples, temperature):
    sampling = SamplingParams(temperature=temperature, seed=1, max_new_tokens=8)
    played = {
        name: run_rollouts(backend, tiny_agent.adapter, samples[:3], 2, "zoomgym/ZoomEnvMultiTurn-v0", sampling,
                           env_kwargs={"max_turns": 3})
        for name, backend in (("whole", Uncached(tiny_agent.backend)), ("cached", tiny_agent.backend))
    }
    assert {t.num_turns for t in played["cached"]} == {3}
    assert_same_episodes(played["cached"], played["whole"])


@pytest.mark.parametrize("release", ["sync_weights", "sleep"])
def test_kept_caches_do_not_outlive_the_weights(tiny_model_dir, release):
    """A cache kept under a key is dropped when the weights are synced (or the backend sleeps): the next
    turn of that key, after the weights changed, scores as a whole prefill with the new weights does."""
    from zoomgym.agents.lmm import LMMAgent

    agent = LMMAgent.from_pretrained(tiny_model_dir)  # its weights change below
    adapter = agent.adapter
    prompt = adapter.encode_prefix([{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}])
    sampling = SamplingParams(temperature=1.0, stop_token_ids=adapter.eos_ids)
    agent.backend.generate([GenerationRequest(prompt, forced_ids=[5, 6, 7], cache_key="episode")], sampling)
    with torch.no_grad():
        for param in agent.model.model.language_model.layers.parameters():
            param.mul_(1.5)
    agent.sync_weights(1) if release == "sync_weights" else agent.sleep()
    longer = [*prompt, 5, 6, 7, *adapter.encode_prefix([{"role": "user", "content": "More"}])]
    (kept,) = agent.backend.generate([GenerationRequest(longer, forced_ids=[8, 9], cache_key="episode")], sampling)
    (whole,) = agent.backend.generate([GenerationRequest(longer, forced_ids=[8, 9])], sampling)
    assert max(abs(a - b) for a, b in zip(kept.logprobs, whole.logprobs)) < CACHE_TOL
