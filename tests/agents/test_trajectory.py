"""Trajectory validation and collate: right padding, targets, 3-D M-RoPE positions for every image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoomgym.agents.backends.base import SamplingParams
from zoomgym.agents.trajectory import Trajectory

ZOOM = '```json\n[{"bbox_2d": [12, 20, 150, 100], "label": "key area"}]\n```'


def test_trajectory_checks_shapes():
    ids = torch.arange(5)
    with pytest.raises(ValueError, match="one shape"):
        Trajectory(ids, torch.zeros(4, dtype=torch.long), torch.zeros(5), [], torch.zeros(0, 3), 0.0)
    with pytest.raises(ValueError, match="image_grid_thw"):
        Trajectory(ids, torch.zeros(5, dtype=torch.long), torch.zeros(5), [], torch.zeros(1, 3), 0.0)
    traj = Trajectory(ids, torch.tensor([0, 0, 1, 1, 0]), torch.zeros(5), [], torch.zeros(0, 3), 1.0)
    assert traj.length == 5 and traj.response_length == 2


def test_collate_pads_right_and_gives_images_3d_positions(tiny_agent, samples, scripted):
    from zoomgym.agents.rollout import run_rollouts

    trajectories = run_rollouts(scripted([ZOOM, "\\boxed{B}"]), tiny_agent.adapter, samples[:2], 1,
                                "zoomgym/ZoomEnv-v0", SamplingParams())
    batch = tiny_agent.collate(trajectories)
    n, width = len(trajectories), max(t.length for t in trajectories)
    assert batch["input_ids"].shape == (n, width) and batch["position_ids"].shape == (3, n, width)
    for i, traj in enumerate(trajectories):
        assert batch["input_ids"][i, : traj.length].tolist() == traj.input_ids.tolist()
        assert batch["attention_mask"][i].sum() == traj.length and batch["attention_mask"][i, : traj.length].all()
        assert torch.equal(batch["loss_mask"][i, : traj.length], traj.loss_mask.float())
        assert torch.equal(batch["sampling_logprobs"][i, : traj.length], traj.sampling_logprobs)
        assert batch["loss_mask"][i, traj.length :].sum() == 0
        # Pitfall 4/12: every image (the crop after the original too) has 2-D spread positions:
        # (t, h, w) differ on its tokens, unlike text where all three axes are equal.
        pos = batch["position_ids"][:, i, : traj.length]
        is_image = traj.input_ids == tiny_agent.adapter.image_pad_id
        assert not torch.equal(pos[1][is_image], pos[2][is_image])
        assert torch.equal(pos[0][~is_image], pos[1][~is_image])
        runs = torch.diff(torch.cat([torch.zeros(1), is_image.float(), torch.zeros(1)])).nonzero().flatten()
        assert len(runs) == 2 * len(traj.images) == 4
        for start, end in zip(runs[0::2].tolist(), runs[1::2].tolist()):
            grid_h, grid_w = traj.image_grid_thw[(runs[0::2] == start).nonzero()[0, 0], 1:].tolist()
            assert pos[1, start:end].max() - pos[1, start:end].min() == grid_h // 2 - 1
            assert pos[2, start:end].max() - pos[2, start:end].min() == grid_w // 2 - 1
    assert torch.equal(batch["image_grid_thw"], torch.cat([t.image_grid_thw for t in trajectories]))
    assert batch["mm_token_type_ids"].sum() == sum(int((t.input_ids == tiny_agent.adapter.image_pad_id).sum())
                                                   for t in trajectories)
    assert batch["rewards"].tolist() == [t.reward for t in trajectories]
    assert batch["group_ids"].tolist() == [0, 1] and batch["weight_versions"].tolist() == [0, 0]


def test_collate_rejects_grids_that_disagree_with_the_images(tiny_agent, samples):
    traj = tiny_agent.rollout(samples[:1], 1, "zoomgym/DirectVQA-v0", SamplingParams(temperature=0, max_new_tokens=2))[0]
    traj.image_grid_thw = traj.image_grid_thw.flip(-1).contiguous()
    with pytest.raises(ValueError, match="grids"):
        tiny_agent.collate([traj])


def padding(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of the positions of one right-padded forward per batch that are padding."""
    positions = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1 - sum(lengths[i] for batch in batches for i in batch) / positions


def test_length_sorted_batches_pad_least():
    from zoomgym.agents.trajectory import length_sorted_batches

    lengths = [30, 10, 31, 12, 29, 11]
    sorted_split = length_sorted_batches(lengths, 2)
    assert sorted_split == [[1, 5], [3, 4], [0, 2]]
    # 1 - 123 / (2 * (11 + 29 + 31)) = 1 - 123 / 142
    assert padding(lengths, sorted_split) == pytest.approx(19 / 142)
    # A subset keeps its members (ties in the order given); every split of fixed size pads at least as much.
    assert length_sorted_batches(lengths, 4, [5, 0, 1]) == [[1, 5, 0]]
    assert length_sorted_batches([3, 3, 3], 2, [2, 0, 1]) == [[2, 0], [1]]
    rng = np.random.default_rng(0)
    for _ in range(20):
        order = rng.permutation(6).tolist()
        assert padding(lengths, sorted_split) <= padding(lengths, [order[:2], order[2:4], order[4:]])
    with pytest.raises(ValueError, match="batch size"):
        length_sorted_batches(lengths, 0)
    # Distinct keys: the plain split.
    assert length_sorted_batches(lengths, 2, keys=range(6)) == sorted_split


def test_length_sorted_batches_keep_a_prompt_together():
    from zoomgym.agents.trajectory import length_sorted_batches

    lengths = [30, 10, 31, 12, 29, 11, 20, 21]
    keys = ["a", "b", "a", "b", "a", "b", "c", "c"]
    # Whole groups where they fit, groups of similar length together, each group sorted by length.
    assert length_sorted_batches(lengths, 3, keys=keys) == [[1, 5, 3], [6, 7], [4, 0, 2]]
    assert length_sorted_batches(lengths, 5, keys=keys) == [[1, 5, 3, 6, 7], [4, 0, 2]]
    # A group larger than a batch is cut into length-sorted pieces; no batch mixes in a piece of another.
    assert length_sorted_batches(lengths, 2, keys=keys) == [[1, 5], [3], [6, 7], [4, 0], [2]]
    assert length_sorted_batches(lengths, 2, [0, 2, 4], keys=keys) == [[4, 0], [2]]
