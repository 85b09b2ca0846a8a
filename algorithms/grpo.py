"""GRPO: group-relative policy optimisation on single-turn visual question answering.

One RL step, top to bottom (``GRPO.train_step``)::

    1. collect   B prompts x G rollouts through the agent's backend (zoomgym/DirectVQA-v0 by default),
                 all sampled with the weights of version `step` (asserted on every trajectory);
                 DAPO dynamic sampling optionally drops groups whose rewards are all equal and tops up.
    2. advantage A_i = (r_i - mean_g r) / (std_g r + eps) per trajectory (core.group_advantages);
                 without std normalisation for Dr.GRPO.
    3. mask      which tokens carry A_i: GRPO trains the answer, i.e. the model's last turn;
                 MGPO (algorithms/mgpo.py) every model turn. Over-turn masking zeroes truncated episodes.
    4. score     old log-probs: the sampler's own when it computes them with the trainer's numerics
                 (hf backend, fp32), else recomputed; reference log-probs for the KL loss (kl_coef > 0).
    5. update    ppo_epochs x mini-batches of mini_batch_prompts groups, micro-batches of
                 micro_batch_size episodes with gradient accumulation (the aggregation's denominator is
                 the whole mini-batch's), loss = PPO-clip + kl_coef * KL - entropy_coef * entropy,
                 grad-norm clip, AdamW, lr schedule.
    6. sync      wake the backend (it sleeps during 4-5, freeing a colocated vLLM's memory) and push the new
                 weights to it as version step + 1.

Everything generic (optimizer, validation, logging, checkpoints, the loop) is in algorithms/trainer.py;
the maths is in algorithms/core.py. Override :meth:`GRPO.advantages`, :meth:`GRPO.loss_mask` or
:meth:`GRPO.collect` to make a new algorithm and register it with ``algorithms.register``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from zoomgym.algorithms import core
from zoomgym.algorithms.trainer import Trainer, derive_seed, episode_metrics

if TYPE_CHECKING:
    from zoomgym.agents.trajectory import Trajectory
    from zoomgym.envs.data import Sample


def last_turn_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Keep only the last contiguous run of 1s of a loss mask: the model's final (answer) turn.

    The model's turns are runs of 1s separated by env tokens (mask 0), so the last run is the answer
    turn of an episode that ended with an answer. ``[0,1,1,0,0,1,1,0] -> [0,0,0,0,0,1,1,0]``.

    Args:
        loss_mask: (L,) 0/1 mask of one trajectory.

    Returns:
        (L,) mask of the same dtype.
    """
    ones = torch.nonzero(loss_mask, as_tuple=False).flatten()
    out = torch.zeros_like(loss_mask)
    if ones.numel() == 0:
        return out
    end = int(ones[-1]) + 1
    zeros_before = torch.nonzero(loss_mask[:end] == 0, as_tuple=False).flatten()
    start = int(zeros_before[-1]) + 1 if zeros_before.numel() else 0
    out[start:end] = loss_mask[start:end]
    return out


def _pad(rows: Sequence[torch.Tensor], length: int, device: torch.device) -> torch.Tensor:
    """Right-pad 1-D tensors with 0 to (len(rows), length), matching ``agent.collate``'s padding."""
    out = torch.zeros((len(rows), length), dtype=torch.float32, device=device)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row.to(device=device, dtype=torch.float32)
    return out


class _Average:
    """Running token-weighted means of stats (``*_max`` keys keep the maximum, ``*_min`` the minimum)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.extremes: dict[str, float] = {}

    def add(self, stats: dict[str, Any], weight: float) -> None:
        for key, value in stats.items():
            value = float(value)
            if key.endswith("_max"):
                self.extremes[key] = max(self.extremes.get(key, value), value)
            elif key.endswith("_min"):
                self.extremes[key] = min(self.extremes.get(key, value), value)
            else:
                self.sums[key] += value * weight
                self.weights[key] += weight

    def result(self) -> dict[str, float]:
        means = {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}
        return {**means, **self.extremes}


class GRPO(Trainer):
    """GRPO on single-turn episodes: the answer turn carries the group-relative advantage.

    Args:
        agent: an ``agents.LMMAgent``.
        config: the run config (``algorithms.config.Config``).
        env_id: default ``config.env.id``, else ``zoomgym/DirectVQA-v0``.

    Example:
        ``algorithms.make("grpo", agent=agent, config=cfg).learn(10)``
    """

    default_env_id = "zoomgym/DirectVQA-v0"

    # -- hooks a new algorithm overrides ---------------------------------------------------------------

    def advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """(N,) per-trajectory advantages: ``core.group_advantages`` (Dr.GRPO without std norm)."""
        return core.group_advantages(rewards, group_ids, norm_by_std=self.cfg.algorithm.norm_adv_by_std)

    def loss_mask(self, trajectory: Trajectory) -> torch.Tensor:
        """(L,) tokens trained for this trajectory: GRPO trains the answer, the model's last turn."""
        return last_turn_mask(trajectory.loss_mask)

    # -- one RL step ---------------------------------------------------------------------------------------

    def train_step(self) -> tuple[dict[str, float], list[Trajectory]]:
        """Collect, score and update once (see the module docstring); returns (metrics, trajectories)."""
        a = self.cfg.algorithm
        start = time.perf_counter()
        self.env_seconds = 0.0
        trajectories, sampled = self.collect()
        rollout_s = time.perf_counter() - start
        self.agent.backend.sleep()  # colocated vLLM hands its GPU memory to training (hf: frees cached blocks)
        metrics = episode_metrics(sampled, "train")
        metrics["time/env_s"] = self.env_seconds
        metrics["time/generation_s"] = rollout_s - self.env_seconds
        generated = sum(t.response_length for t in sampled)
        metrics["perf/generated_tokens_per_s"] = generated / max(metrics["time/generation_s"], 1e-9)
        if a.dynamic_sampling:
            metrics["train/dynamic_sampling_kept_ratio"] = len(trajectories) / max(len(sampled), 1)

        if trajectories:
            start = time.perf_counter()
            rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float32)
            group_ids = torch.tensor([t.group_id for t in trajectories], dtype=torch.long)
            advantages = self.advantages(rewards, group_ids)  # (N,)
            masks = [self._trained_tokens(t) for t in trajectories]
            old_logp, ref_logp, reuse = self.score(trajectories)
            metrics["time/scoring_s"] = time.perf_counter() - start

            start = time.perf_counter()
            metrics.update(self.update(trajectories, advantages, masks, old_logp, ref_logp, reuse))
            metrics["time/training_s"] = time.perf_counter() - start
            processed = a.ppo_epochs * sum(t.length for t in trajectories)
            metrics["perf/train_tokens_per_s"] = processed / max(metrics["time/training_s"], 1e-9)
            metrics["train/advantage_abs_mean"] = float(advantages.abs().mean())
            metrics["train/trained_tokens"] = float(sum(float(m.sum()) for m in masks) / len(masks))
        self.agent.backend.wake_up()
        self.agent.sync_weights(self.step + 1)
        return metrics, sampled

    def _trained_tokens(self, trajectory: Trajectory) -> torch.Tensor:
        mask = self.loss_mask(trajectory).float()
        if self.cfg.algorithm.mask_truncated and trajectory.truncated:
            return torch.zeros_like(mask)  # over-turn masking: no credit, no blame for a cut episode
        return mask

    def next_prompts(self, count: int) -> list[Sample]:
        """The next `count` training samples: a fresh seeded permutation of the set every epoch."""
        n = len(self.train_samples)
        orders: dict[int, np.ndarray] = {}  # epoch -> its permutation (a step spans at most a few epochs)
        picked = []
        for k in range(self.prompts_drawn, self.prompts_drawn + count):
            epoch, position = divmod(k, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng(derive_seed(self.cfg.trainer.seed, epoch, 7)).permutation(n)
            picked.append(self.train_samples[int(orders[epoch][position])])
        self.prompts_drawn += count
        return picked

    def collect(self) -> tuple[list[Trajectory], list[Trajectory]]:
        """B x G episodes at the current weights: (trajectories to train on, every trajectory sampled).

        With DAPO dynamic sampling, groups with equal rewards are dropped and fresh prompts are sampled
        (at most ``dynamic_sampling_max_rounds`` rounds) until B informative groups are found.
        """
        t, r, a = self.cfg.trainer, self.cfg.rollout, self.cfg.algorithm
        wanted = t.prompts_per_step * r.group_size
        kept: list[Trajectory] = []
        sampled: list[Trajectory] = []
        rounds = a.dynamic_sampling_max_rounds if a.dynamic_sampling else 1
        for round_index in range(rounds):
            samples = self.next_prompts(t.prompts_per_step)
            batch = self.rollout(samples, r.group_size, greedy=False,
                                 seed=derive_seed(t.seed, self.step, 1, round_index))
            stale = sorted({tr.weight_version for tr in batch} - {self.step})
            if stale:
                raise RuntimeError(
                    f"Expects trajectories sampled with weight version {self.step}, actual: {stale} "
                    "(the rollout backend did not receive the trainer's latest weights)"
                )
            for traj in batch:  # group ids unique across rounds
                traj.group_id += round_index * t.prompts_per_step
            sampled += batch
            if not a.dynamic_sampling:
                return batch, sampled
            rewards = torch.tensor([tr.reward for tr in batch], dtype=torch.float32)
            keep = core.dynamic_sampling_keep(rewards, torch.tensor([tr.group_id for tr in batch]))
            kept += [tr for tr, k in zip(batch, keep.tolist()) if k]
            if len(kept) >= wanted:
                break
        return kept[:wanted], sampled  # groups are contiguous and G divides `wanted`: whole groups

    # -- scoring ---------------------------------------------------------------------------------------

    def reuses_sampling_logprobs(self) -> bool:
        """Whether the sampler's log-probs are the trainer's: the hf backend on this very model in fp32."""
        dtype = next(self.model.parameters()).dtype
        return self.cfg.rollout.backend == "hf" and dtype == torch.float32

    def _micro_batches(self, indices: Sequence[int]) -> list[list[int]]:
        size = self.cfg.trainer.micro_batch_size
        return [list(indices[i : i + size]) for i in range(0, len(indices), size)]

    def score(self, trajectories: Sequence[Trajectory]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, bool]:
        """Old and reference log-probs per trajectory, each (L_i,).

        Returns:
            (old_logp, ref_logp or None when kl_coef is 0, whether old_logp are the sampler's own).
        """
        reuse = self.reuses_sampling_logprobs()
        need_ref = self.cfg.algorithm.kl_coef > 0
        old = [t.sampling_logprobs for t in trajectories] if reuse else [None] * len(trajectories)
        ref: list[Any] = [None] * len(trajectories)
        if reuse and not need_ref:
            return old, None, True
        self.model.eval()
        with torch.no_grad():
            for micro in self._micro_batches(range(len(trajectories))):
                batch = self.agent.collate([trajectories[i] for i in micro])
                if not reuse:
                    logp, _ = self.agent.token_logprobs(batch, temperature=self.logprob_temperature)
                    for row, i in enumerate(micro):
                        old[i] = logp[row, : trajectories[i].length].float().cpu()
                if need_ref:
                    logp = self._reference_logprobs(batch)
                    for row, i in enumerate(micro):
                        ref[i] = logp[row, : trajectories[i].length].float().cpu()
        return old, (ref if need_ref else None), reuse

    def _reference_logprobs(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.peft_model is not None:
            with self.peft_model.disable_adapter():
                return self.agent.token_logprobs(batch, temperature=self.logprob_temperature)[0]
        return self.reference_agent.token_logprobs(batch, temperature=self.logprob_temperature)[0]

    # -- the policy update ---------------------------------------------------------------------------------

    def update(
        self,
        trajectories: Sequence[Trajectory],
        advantages: torch.Tensor,
        masks: Sequence[torch.Tensor],
        old_logp: Sequence[torch.Tensor],
        ref_logp: Sequence[torch.Tensor] | None,
        reuse: bool,
    ) -> dict[str, float]:
        """PPO epochs over mini-batches with micro-batch gradient accumulation; returns averaged stats.

        Each micro-batch's loss is divided by its mini-batch's aggregation count
        (``core.agg_denominator``), so the accumulated gradient is exactly that of one loss over the
        whole mini-batch, whatever the micro-batch size.
        """
        a, t = self.cfg.algorithm, self.cfg.trainer
        num_minibatches = t.prompts_per_step // t.mini_batch_prompts
        params = [p for p in self.model.parameters() if p.requires_grad]
        token_stats = _Average()  # token-weighted means over the whole step (clip fractions, entropy, gap)
        losses: dict[str, list[float]] = defaultdict(list)  # one value per mini-batch
        for epoch in range(a.ppo_epochs):
            order = np.random.default_rng(derive_seed(t.seed, self.step, 2, epoch)).permutation(len(trajectories))
            for mb_index, minibatch in enumerate(np.array_split(order, num_minibatches)):
                if len(minibatch) == 0:
                    continue
                longest = max(int(masks[i].shape[0]) for i in minibatch)
                mb_mask = _pad([masks[i] for i in minibatch], longest, torch.device("cpu"))
                denominator = core.agg_denominator(mb_mask, a.loss_agg)
                self.optimizer.zero_grad(set_to_none=True)
                self.model.train()
                mb_losses: dict[str, float] = defaultdict(float)
                for micro in self._micro_batches(minibatch.tolist()):
                    # Sampler vs trainer log-probs: recomputed old log-probs cover every token; reused ones are
                    # compared with the first mini-batch's forward, whose weights are still those that sampled.
                    measure_gap = epoch == 0 and (mb_index == 0 or not reuse)
                    parts, stats, tokens = self._accumulate(
                        trajectories, micro, advantages, masks, old_logp, ref_logp, reuse, denominator, measure_gap
                    )
                    for key, value in parts.items():
                        mb_losses[key] += value
                    token_stats.add(stats, tokens)
                grad_clip = t.grad_clip if t.grad_clip > 0 else float("inf")
                losses["actor/grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(params, grad_clip)))
                self.optimizer.step()
                self.scheduler.step()
                for key, value in mb_losses.items():
                    losses[key].append(value)
        self.model.eval()
        out = token_stats.result()
        out.update({key: float(np.mean(values)) for key, values in losses.items()})
        out["actor/grad_norm_max"] = float(np.max(losses["actor/grad_norm"]))
        return out

    def _accumulate(
        self,
        trajectories: Sequence[Trajectory],
        micro: list[int],
        advantages: torch.Tensor,
        masks: Sequence[torch.Tensor],
        old_logp: Sequence[torch.Tensor],
        ref_logp: Sequence[torch.Tensor] | None,
        reuse: bool,
        denominator: torch.Tensor,
        measure_gap: bool,
    ) -> tuple[dict[str, float], dict[str, Any], float]:
        """Forward and backward of one micro-batch.

        Returns:
            (its shares of the mini-batch's loss terms, token-mean stats, its number of loss tokens).
        """
        a = self.cfg.algorithm
        batch = self.agent.collate([trajectories[i] for i in micro])
        logp, entropy = self.agent.token_logprobs(batch, with_entropy=True, temperature=self.logprob_temperature)
        device, length = logp.device, logp.shape[1]
        mask = _pad([masks[i] for i in micro], length, device)  # (n, L)
        # Untrained positions may hold -inf (image-pad tokens the model can never emit). core's losses select
        # them away already; zeroing them here also keeps kl_penalty, which takes no mask, finite everywhere.
        trained = mask > 0
        logp = torch.where(trained, logp.float(), 0.0)
        entropy = torch.where(trained, entropy.float(), 0.0)
        old = torch.where(trained, _pad([old_logp[i] for i in micro], length, device), 0.0)  # (n, L)
        sampler = batch["sampling_logprobs"].to(device=device, dtype=torch.float32)  # (n, L), 0 off the mask
        is_weights = core.truncated_is_weights(old, sampler, cap=a.tis_cap) if a.tis_cap and not reuse else None
        # Dr.GRPO divides by a constant length, the per-turn generation cap, not by this batch's padding.
        agg = {"agg": a.loss_agg, "norm_length": float(self.cfg.rollout.max_new_tokens),
               "denominator": denominator.to(device)}

        pg_loss, stats = core.policy_loss(
            logp, old, advantages[micro].to(device), mask,
            clip_low=a.clip_low, clip_high=a.clip_high, clip_ratio_c=a.clip_ratio_c, is_weights=is_weights, **agg,
        )
        loss = pg_loss
        parts = {"actor/pg_loss": float(pg_loss.detach())}
        if ref_logp is not None:
            ref = torch.where(trained, _pad([ref_logp[i] for i in micro], length, device), 0.0)
            kl = core.agg_loss(core.kl_penalty(logp, ref, a.kl_kind), mask, **agg)
            loss = loss + a.kl_coef * kl
            parts["actor/kl"] = float(kl.detach())
        if a.entropy_coef > 0:
            loss = loss - a.entropy_coef * core.agg_loss(entropy, mask, **agg)
        loss.backward()
        parts["actor/loss"] = float(loss.detach())

        stats.pop("actor/pg_loss")
        stats["actor/entropy"] = core.masked_mean(entropy.detach(), mask)
        if measure_gap:
            stats.update(core.logprob_gap_stats((logp.detach() if reuse else old), sampler, mask))
        return parts, stats, float(mask.sum())
