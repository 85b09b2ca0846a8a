"""A group's shared prompt computed once (`agents.shared_prefix`) scores exactly like one whole forward.

Real episodes of 2 and 3 turns (ZoomEnvMultiTurn, sampled at temperature 1) from G = 4 rollouts of two
prompts, right-padded, in whole and mixed groups: the split forward's log-probs and entropies equal the
single forward's within 1e-6 in fp32 and the gradients of a loss of both within 1e-5 (relative, per
parameter), with and without gradient checkpointing and through LoRA adapters. Sharing is found from
ids and pixels: two prompts of the same ids showing different images share nothing past the image.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from zoomgym.agents.backends.base import SamplingParams
from zoomgym.agents.rollout import run_rollouts
from zoomgym.agents.scoring import token_logprobs
from zoomgym.agents.shared_prefix import PrefixPlan, plan_prefixes
from zoomgym.envs.data.sample import Sample

ZOOM = '```json\n[{"bbox_2d": [12, 20, 150, 100], "label": "key area"}]\n```'
ANSWER = "The square is red, \\boxed{A}"
TOL = 1e-6
GRAD_TOL = 1e-5


@pytest.fixture(scope="module")
def groups(tiny_agent, samples):
    """Two groups of G = 4 sampled episodes of up to 3 turns, group by group."""
    trajectories = run_rollouts(tiny_agent.backend, tiny_agent.adapter, samples[:2], 4, "zoomgym/ZoomEnvMultiTurn-v0",
                                SamplingParams(temperature=1.0, seed=0, max_new_tokens=24),
                                env_kwargs={"max_turns": 3})
    assert max(t.num_turns for t in trajectories) >= 2
    assert len({t.length for t in trajectories}) > 2  # right padding in every batch
    return trajectories


def scored(model, adapter, batch, plan, *, grad: bool):
    """(logp, entropy, gradients of a loss of both by parameter name) under ``plan``."""
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        logp, entropy = token_logprobs(model, adapter, batch, with_entropy=True, plan=plan)
    grads = {}
    if grad:
        mask = batch["loss_mask"]
        # Trained tokens, and a few prompt positions too: gradients through the shared prefix's own log-probs.
        finite = torch.isfinite(logp)
        prompt = torch.zeros_like(mask)
        prompt[:, 1:8] = 1
        weights = torch.linspace(0.5, 1.5, logp.shape[0])[:, None]
        loss = (torch.where(finite, logp, 0.0) * (mask + prompt) * weights).sum() + 0.3 * (entropy * mask).sum()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    return logp.detach(), entropy.detach(), grads


def shared_groups(plan: PrefixPlan) -> list[tuple[list[int], int]]:
    """``(rows, p)`` of each prefix-pass row that rows share (not a whole row)."""
    return [(plan.members(g), width) for g, (row, width) in enumerate(plan.prefix_rows) if width < plan.lengths[row]]


def assert_same_scores(model, adapter, batch, *, grad: bool = True) -> PrefixPlan:
    plan = plan_prefixes(batch, adapter.image_pad_id)
    assert plan.remainder_rows, "expected a batch whose rows share a prefix"
    single = PrefixPlan.single(plan.lengths, plan.image_runs)
    logp, entropy, grads = scored(model, adapter, batch, single, grad=grad)
    logp_s, entropy_s, grads_s = scored(model, adapter, batch, plan, grad=grad)
    finite = torch.isfinite(logp)
    assert torch.equal(finite, torch.isfinite(logp_s))  # image pads: -inf on both sides
    assert (logp[finite] - logp_s[finite]).abs().max() < TOL
    assert (entropy - entropy_s).abs().max() < TOL
    assert grads.keys() == grads_s.keys() and bool(grads) == grad
    for name, g in grads.items():
        assert (g - grads_s[name]).norm() <= GRAD_TOL * g.norm() + 1e-12, name
    return plan


def test_whole_groups_share_their_prompt(tiny_agent, groups):
    batch = tiny_agent.collate(groups)
    plan = assert_same_scores(tiny_agent.model, tiny_agent.adapter, batch)
    # One shared prefix per group, found from the batch: each at least the first prompt (up to its
    # first sampled token), never reaching past a row's last token.
    assert sorted(sorted(rows) for rows, _ in shared_groups(plan)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for i, traj in enumerate(groups):
        assert int(traj.loss_mask.nonzero()[0]) <= plan.shared[i] < traj.length
    assert plan.positions < plan.single_positions and plan.tokens < sum(plan.lengths)


def test_mixed_groups_and_no_grad(tiny_agent, groups):
    # Three of one group, one of the other, in shuffled order: only the three share.
    mixed = [groups[5], groups[0], groups[6], groups[2], groups[7]]
    batch = tiny_agent.collate(mixed)
    plan = assert_same_scores(tiny_agent.model, tiny_agent.adapter, batch)
    assert sorted(sorted(rows) for rows, _ in shared_groups(plan)) == [[0, 2, 4], [1, 3]]
    with torch.no_grad():  # the reference forward
        assert_same_scores(tiny_agent.model, tiny_agent.adapter, batch, grad=False)


def test_prompts_of_equal_ids_and_different_images_share_nothing_past_the_image(tiny_agent, scripted):
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(2)]
    twins = [Sample(f"t{i}", Image.fromarray(p), "What colour is the square?", ("red", "green", "blue", "white"), "A",
                    category="attribute") for i, p in enumerate(pixels)]
    trajectories = run_rollouts(scripted([ZOOM, ANSWER]), tiny_agent.adapter, twins, 2, "zoomgym/ZoomEnv-v0",
                                SamplingParams(temperature=1.0))
    assert len({tuple(t.input_ids.tolist()) for t in trajectories}) == 1  # the very same ids in all four
    batch = tiny_agent.collate(trajectories)
    plan = assert_same_scores(tiny_agent.model, tiny_agent.adapter, batch)
    # Never one group across the two images; rollouts of one sample are identical here: they share all
    # but their last token.
    assert sorted(sorted(rows) for rows, _ in shared_groups(plan)) == [[0, 1], [2, 3]]
    assert all(plan.shared[i] == plan.lengths[i] - 1 for i in range(4))
    # Without the prompt rule (no loss mask: any common prefix) one episode of each image group on the
    # text before the image, never into it.
    pair = tiny_agent.collate([trajectories[0], trajectories[2]])
    pair.pop("loss_mask")
    unmasked = plan_prefixes(pair, tiny_agent.adapter.image_pad_id)
    assert shared_groups(unmasked) == [([0, 1], unmasked.image_runs[0][0][0])]
    assert_same_scores(tiny_agent.model, tiny_agent.adapter, pair, grad=False)


def test_nothing_shared_is_the_single_forward(tiny_agent, groups):
    batch = tiny_agent.collate([groups[0], groups[4]])
    plan = plan_prefixes(batch, tiny_agent.adapter.image_pad_id)
    assert plan == PrefixPlan.single(plan.lengths, plan.image_runs)  # a common system prompt is not worth a split
    assert plan_prefixes(tiny_agent.collate(groups), tiny_agent.adapter.image_pad_id, share=False).remainder_rows == []


def test_gradient_checkpointing_and_lora(tiny_agent, groups):
    from zoomgym.algorithms.config import LoraConfig, ModelConfig
    from zoomgym.algorithms.trainer import prepare_model

    batch = tiny_agent.collate([groups[1], groups[3], groups[0], groups[6], groups[4]])
    checkpointed = copy.deepcopy(tiny_agent.model)
    prepare_model(checkpointed, ModelConfig(gradient_checkpointing=True))
    checkpointed.train()
    assert_same_scores(checkpointed, tiny_agent.adapter, batch)
    lora = copy.deepcopy(tiny_agent.model)
    prepare_model(lora, ModelConfig(gradient_checkpointing=True,
                                    lora=LoraConfig(enabled=True, rank=4, target_modules=["q_proj", "v_proj"])))
    lora.train()
    for name, p in lora.named_parameters():  # adapters start at 0 (B = 0): make them matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(0))
    assert_same_scores(lora, tiny_agent.adapter, batch)


@pytest.mark.parametrize("whole_in_prefix", [True, False])
def test_rows_that_share_nothing_in_either_pass(tiny_agent, groups, whole_in_prefix):
    from zoomgym.agents.shared_prefix import _layout

    batch = tiny_agent.collate([groups[0], groups[4], groups[1], groups[2]])
    plan = plan_prefixes(batch, tiny_agent.adapter.image_pad_id)
    assert [sorted(rows) for rows, _ in shared_groups(plan)] == [[0, 2, 3]]
    (rows, p), = shared_groups(plan)
    forced = _layout(plan.lengths, plan.image_runs, [(rows, p)], [1], whole_in_prefix)
    assert (forced.source[1] >= 0) == whole_in_prefix and forced.remainder_rows == ([0, 2, 3] if whole_in_prefix
                                                                                    else [0, 1, 2, 3])
    single = PrefixPlan.single(plan.lengths, plan.image_runs)
    logp, entropy, grads = scored(tiny_agent.model, tiny_agent.adapter, batch, single, grad=True)
    logp_s, entropy_s, grads_s = scored(tiny_agent.model, tiny_agent.adapter, batch, forced, grad=True)
    finite = torch.isfinite(logp)
    assert torch.equal(finite, torch.isfinite(logp_s))
    assert (logp[finite] - logp_s[finite]).abs().max() < TOL and (entropy - entropy_s).abs().max() < TOL
    for name, g in grads.items():
        assert (g - grads_s[name]).norm() <= GRAD_TOL * g.norm() + 1e-12, name
