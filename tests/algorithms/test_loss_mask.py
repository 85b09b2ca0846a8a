"""Which tokens carry the advantage: MGPO every model turn, GRPO the answer turn, env tokens never."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from zoomgym.algorithms.grpo import GRPO, last_turn_mask
from zoomgym.algorithms.mgpo import MGPO
from zoomgym.algorithms.ppo import PPOBatch, PPOSettings, micro_batch_loss, right_pad

from zoomgym import algorithms


def runs_of_ones(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)) of every run of 1s."""
    runs, start = [], None
    for t, value in enumerate([*mask.tolist(), 0]):
        if value and start is None:
            start = t
        elif not value and start is not None:
            runs.append((start, t))
            start = None
    return runs


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        ([0, 1, 1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1, 0]),
        ([1, 1, 0, 1], [0, 0, 0, 1]),
        ([0, 1, 1, 1], [0, 1, 1, 1]),
        ([0, 0, 0], [0, 0, 0]),
    ],
)
def test_last_turn_mask(mask: list[int], expected: list[int]) -> None:
    assert last_turn_mask(torch.tensor(mask)).tolist() == expected


@pytest.fixture(scope="module")
def multi_turn(mgpo_run: tuple[Any, dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[MGPO, list]:
    """Real 3-turn episodes of the tiny model, each turn with an image, cut by the turn budget (no answer)."""
    from zoomgym.algorithms.config import load_config

    trained, _ = mgpo_run
    cfg = load_config(trained.run_dir / "config.yaml", [
        "env.id=zoomgym/ZoomEnvMultiTurn-v0", "env.max_turns=3",
        "env.options={answer_on_last_turn: false, check_view_budget: false}",  # an override replaces the dict
        f"logging.run_dir={tmp_path_factory.mktemp('multi')}", "rollout.max_new_tokens=6",
    ])
    algo = algorithms.make("mgpo", agent=trained.agent, config=cfg)
    trajectories = algo.rollout(algo.train_samples[:2], 2, greedy=False, seed=3)
    return algo, trajectories


def test_mgpo_trains_every_model_turn_and_nothing_else(multi_turn: tuple[MGPO, list]) -> None:
    algo, trajectories = multi_turn
    adapter = algo.agent.adapter
    assert {t.num_turns for t in trajectories} == {3}
    for traj in trajectories:
        mask = algo.loss_mask(traj)
        runs = runs_of_ones(mask)
        assert len(runs) == traj.num_turns  # one run of trained tokens per model turn
        for (start, end), action in zip(runs, traj.actions):
            # the trained tokens of turn k are exactly the tokens the model sampled in turn k
            assert adapter.tokenizer.decode(traj.input_ids[start:end].tolist(), skip_special_tokens=True) == action
        env_tokens = (traj.input_ids == adapter.image_pad_id) | (traj.input_ids == adapter.vision_start_id)
        assert not bool((mask.bool() & env_tokens).any()), "an image token carries loss"
        assert int(mask.sum()) == traj.response_length
        # the env's turns (text and images) between the model turns are masked
        assert int((mask == 0).sum()) == traj.length - traj.response_length


def test_grpo_trains_only_the_last_turn(multi_turn: tuple[MGPO, list]) -> None:
    algo, trajectories = multi_turn
    for traj in trajectories:
        runs = runs_of_ones(traj.loss_mask)
        grpo_runs = runs_of_ones(GRPO.loss_mask(algo, traj))
        assert grpo_runs == runs[-1:]


def test_collated_mask_lines_up_with_the_trainer_masks(multi_turn: tuple[MGPO, list]) -> None:
    algo, trajectories = multi_turn
    batch = algo.agent.collate(trajectories)
    length = batch["input_ids"].shape[1]
    ours = right_pad([algo.loss_mask(t) for t in trajectories], length, torch.device("cpu"))
    assert torch.equal(ours, batch["loss_mask"].float())
    padding = batch["attention_mask"] == 0
    assert not bool(ours[padding].any())


def test_over_turn_masking_zeroes_truncated_episodes(multi_turn: tuple[MGPO, list]) -> None:
    algo, trajectories = multi_turn
    assert all(t.truncated for t in trajectories)  # no answer within 3 turns: cut by the turn budget
    assert all(float(algo._trained_tokens(t).sum()) > 0 for t in trajectories)  # off by default
    algo.cfg.algorithm.mask_truncated = True
    try:
        assert all(float(algo._trained_tokens(t).sum()) == 0 for t in trajectories)
    finally:
        algo.cfg.algorithm.mask_truncated = False


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_accumulate_to_the_mini_batch_gradient(multi_turn: tuple[MGPO, list], agg: str) -> None:
    """Gradient accumulation is exact: four micro-batches of one episode == one micro-batch of four."""
    from zoomgym.algorithms import core

    algo, trajectories = multi_turn
    settings = dataclasses.replace(PPOSettings.from_config(algo.cfg), loss_agg=agg)
    masks = [algo.loss_mask(t).float() for t in trajectories]
    old = [t.sampling_logprobs for t in trajectories]
    ref = [0.9 * t.sampling_logprobs for t in trajectories]  # a reference that differs: the KL term has a gradient
    batch = PPOBatch(trajectories, torch.tensor([1.0, -1.0, 0.5, -0.5]), masks, old, ref, old_is_sampler=True)
    denominator = core.agg_denominator(right_pad(masks, max(m.shape[0] for m in masks), torch.device("cpu")), agg)
    params = [p for p in algo.model.parameters() if p.requires_grad]

    def gradients(micro_batches: list[list[int]]) -> list[torch.Tensor]:
        algo.optimizer.zero_grad(set_to_none=True)
        losses = sum(micro_batch_loss(batch, micro, algo._score, settings, denominator, False)[0]["actor/loss"]
                     for micro in micro_batches)
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        algo.optimizer.zero_grad(set_to_none=True)
        return [torch.tensor(losses), *grads]

    one_by_one, together = gradients([[0], [1], [2], [3]]), gradients([[0, 1, 2, 3]])
    assert any(float(g.abs().sum()) > 0 for g in together[1:])
    for a, b in zip(one_by_one, together):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_update_splits_mini_batches_by_length_and_reports_the_padding(multi_turn: tuple[MGPO, list]) -> None:
    """Micro-batches of whole groups, sorted by length, compute each group's prompt once, report the
    positions computed, and step like one forward over the mini-batch."""
    import copy

    from zoomgym.agents.shared_prefix import plan_prefixes
    from zoomgym.agents.trajectory import length_sorted_batches, prompt_key
    from zoomgym.algorithms import ppo

    algo, trajectories = multi_turn
    lengths = [t.length for t in trajectories]
    assert len(set(lengths)) > 1
    masks = [algo.loss_mask(t).float() for t in trajectories]
    batch = PPOBatch(trajectories, torch.tensor([1.0, -1.0, 0.5, -0.5]), masks,
                     [t.sampling_logprobs for t in trajectories], None, old_is_sampler=True)
    saved = copy.deepcopy((algo.model.state_dict(), algo.optimizer.state_dict(), algo.scheduler.state_dict()))

    def update(micro_batch_size: int) -> tuple[dict[str, float], list[torch.Tensor]]:
        settings = dataclasses.replace(PPOSettings.from_config(algo.cfg), epochs=1, minibatches=1,
                                       micro_batch_size=micro_batch_size)
        try:
            stats = ppo.update(batch, model=algo.model, optimizer=algo.optimizer, scheduler=algo.scheduler,
                               score=algo._score, settings=settings, epoch_seeds=[0])
            return stats, [p.detach() - saved[0][name] for name, p in algo.model.named_parameters()]
        finally:
            algo.model.load_state_dict(saved[0])
            algo.optimizer.load_state_dict(saved[1])
            algo.scheduler.load_state_dict(saved[2])

    split, split_weights = update(2)  # weight changes of one optimizer step
    whole, whole_weights = update(4)
    micros = length_sorted_batches(lengths, 2, keys=[prompt_key(t) for t in trajectories])
    assert sorted(map(sorted, micros)) == [[0, 1], [2, 3]]  # one group each (2 prompts x G = 2)
    plans = [plan_prefixes(algo.agent.collate([trajectories[i] for i in micro]), algo.agent.adapter.image_pad_id)
             for micro in micros]
    assert split == {**split, **ppo.forward_stats(plans)}
    assert split["perf/computed_ratio"] < 1  # the prompts ran once per group
    positions = sum(p.positions for p in plans)
    assert split["perf/padding_ratio"] == pytest.approx(1 - sum(p.tokens for p in plans) / positions)
    assert split["perf/computed_ratio"] == pytest.approx(positions / sum(2 * max(p.lengths) for p in plans))
    assert split["perf/computed_ratio"] * sum(2 * max(p.lengths) for p in plans) < 4 * max(lengths)
    algo.cfg.trainer.share_prompts = False  # every episode whole, micro-batches by length alone
    try:
        plain, plain_weights = update(2)
    finally:
        algo.cfg.trainer.share_prompts = True
    by_length = length_sorted_batches(lengths, 2)
    positions = sum(len(micro) * max(lengths[i] for i in micro) for micro in by_length)
    assert plain["perf/computed_ratio"] == 1
    assert plain["perf/padding_ratio"] == pytest.approx(1 - sum(lengths) / positions)
    torch.testing.assert_close(torch.tensor(plain["actor/grad_norm"]), torch.tensor(split["actor/grad_norm"]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(split["actor/grad_norm"]), torch.tensor(whole["actor/grad_norm"]),
                               rtol=1e-5, atol=0)
    # The weight changes agree; AdamW divides each gradient by its own size, so an element whose gradient
    # is float noise may move apart by about lr: compare the whole change, not each element.
    change = torch.cat([b.flatten() for b in whole_weights])
    assert float(change.norm()) > 0
    for weights in (split_weights, plain_weights):
        assert float((torch.cat([a.flatten() for a in weights]) - change).norm()) <= 1e-4 * float(change.norm())
