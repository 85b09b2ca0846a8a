"""GRPO: group-relative policy optimisation on single-turn visual question answering.

One RL step, top to bottom (``GRPO.train_step``)::

    1. collect   B prompts x G rollouts through the agent's backend (zoomgym/DirectVQA-v0 by default),
                 all sampled with the weights of version `step` (asserted on every trajectory);
                 DAPO dynamic sampling optionally drops groups whose rewards are all equal and tops up.
    2. advantage one per trajectory from the estimator named by ``algorithm.advantage``
                 (core.ADVANTAGES; "grpo": A_i = (r_i - mean_g r) / (std_g r + eps), Dr.GRPO without std).
    3. mask      which tokens carry A_i: GRPO trains the answer, i.e. the model's last turn;
                 MGPO (algorithms/mgpo.py) every model turn. Over-turn masking zeroes truncated episodes.
    4. score     old log-probs: the sampler's own when its numbers are the trainer's (the backend's
                 ``logprobs_match_trainer``: hf in fp32), else recomputed; reference log-probs for the
                 KL loss (kl_coef > 0). Together: one `algorithms.ppo.PPOBatch`.
    5. update    `algorithms.ppo.update`: ppo_epochs x mini-batches of mini_batch_prompts groups,
                 micro-batches with gradient accumulation, loss = ``algorithm.policy_loss`` + kl_coef * KL
                 - entropy_coef * entropy, grad-norm clip, AdamW, lr schedule.
    6. sync      wake the backend (it sleeps during 4-5 when it can, freeing a colocated vLLM's memory)
                 and push the new weights to it as version step + 1.

Everything generic (optimizer, validation, logging, checkpoints, the loop) is in algorithms/trainer.py;
the maths is in algorithms/core.py. Under torchrun every rank draws the same B prompts and plays its
contiguous share of whole groups (`algorithms.distributed`), episodes seeded by their place in the global
batch. Override :meth:`GRPO.advantages`, :meth:`GRPO.loss_mask` or
:meth:`GRPO.collect` to make a new algorithm and register it with ``algorithms.register``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from zoomgym.agents.shared_prefix import PrefixPlan, plan_prefixes
from zoomgym.agents.trajectory import length_sorted_batches, prompt_key
from zoomgym.algorithms import core, distributed, ppo
from zoomgym.algorithms.build import Datasets, sampling_params
from zoomgym.algorithms.config import Config
from zoomgym.algorithms.seeds import derive_seed
from zoomgym.algorithms.trainer import Trainer

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


class GRPO(Trainer):
    """GRPO on single-turn episodes: the answer turn carries the group-relative advantage.

    Args:
        agent: an ``agents.LMMAgent``.
        config: the run config (``algorithms.config.Config``).
        env_id: default ``config.env.id``, else ``zoomgym/DirectVQA-v0``.
        datasets: the config's samples when loaded already (`algorithms.trainer.Trainer`).

    Attributes:
        reference_model: the frozen initial policy of the KL loss; None when ``kl_coef`` is 0 or with
            LoRA (the reference is then the model with its adapters disabled).

    Example:
        ``algorithms.make("grpo", agent=agent, config=cfg).learn(10)``
    """

    default_env_id = "zoomgym/DirectVQA-v0"
    supports_distributed = True

    def __init__(self, agent: Any, config: Config, env_id: str | None = None, *,
                 datasets: Datasets | None = None) -> None:
        super().__init__(agent, config, env_id, datasets=datasets)
        # The sampling temperature: training log-probs are the backend's definition at the same T.
        self.logprob_temperature = sampling_params(config, greedy=False, seed=0).logprob_temperature

    def make_frozen_models(self) -> list[torch.nn.Module]:
        """``reference_model``: a frozen copy of the initial policy for the KL loss; None when kl_coef is 0
        or with LoRA."""
        self.reference_model: torch.nn.Module | None = None
        if self.cfg.algorithm.kl_coef == 0 or self.peft_model is not None:
            return []
        self.reference_model = copy.deepcopy(self.model).eval()
        self.reference_model.requires_grad_(False)
        return [self.reference_model]

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps per RL step: epochs x (prompts per step / prompts per mini-batch)."""
        t = self.cfg.trainer
        return self.cfg.algorithm.ppo_epochs * (t.prompts_per_step // t.mini_batch_prompts)

    # -- hooks a new algorithm overrides ---------------------------------------------------------------

    def advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """(N,) per-trajectory advantages from the estimator named by ``algorithm.advantage``."""
        a = self.cfg.algorithm
        return core.get_advantage(a.advantage)(rewards, group_ids, norm_by_std=a.norm_adv_by_std)

    def loss_mask(self, trajectory: Trajectory) -> torch.Tensor:
        """(L,) tokens trained for this trajectory: GRPO trains the answer, the model's last turn."""
        return last_turn_mask(trajectory.loss_mask)

    # -- one RL step ---------------------------------------------------------------------------------------

    def train_step(self) -> tuple[dict[str, float], list[Trajectory]]:
        """Collect, score and update once (see the module docstring); returns (metrics, trajectories)."""
        from zoomgym.agents.metrics import episode_metrics

        a = self.cfg.algorithm
        start = time.perf_counter()
        self.env_clock.reset()
        trajectories, sampled = self.collect()
        rollout_s = time.perf_counter() - start
        self.agent.sleep()  # a colocated vLLM hands its GPU memory to training (hf: frees cached blocks)
        episodes = distributed.gather_episodes(sampled)  # every rank's: the metrics are of the global batch
        metrics = episode_metrics(episodes, "train")
        metrics["time/env_s"] = self.env_clock.seconds
        metrics["time/generation_s"] = rollout_s - self.env_clock.seconds
        generated = sum(t.response_length for t in episodes)
        metrics["perf/generated_tokens_per_s"] = generated / max(metrics["time/generation_s"], 1e-9)
        if a.dynamic_sampling:
            metrics["train/dynamic_sampling_kept_ratio"] = len(trajectories) / max(len(sampled), 1)

        if distributed.all_sum(len(trajectories)):
            start = time.perf_counter()
            rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float32)
            group_ids = torch.tensor([t.group_id for t in trajectories], dtype=torch.long)
            advantages = self.advantages(rewards, group_ids)  # (N,)
            masks = [self._trained_tokens(t) for t in trajectories]
            batch = self.make_batch(trajectories, advantages, masks)
            metrics["time/scoring_s"] = time.perf_counter() - start

            start = time.perf_counter()
            metrics.update(self.update(batch))
            metrics["time/training_s"] = time.perf_counter() - start
            processed = a.ppo_epochs * distributed.all_sum(sum(t.length for t in trajectories))
            metrics["perf/train_tokens_per_s"] = processed / max(metrics["time/training_s"], 1e-9)
            metrics["train/advantage_abs_mean"] = distributed.mean_over_ranks(advantages.abs())
            trained = torch.tensor([float(m.sum()) for m in masks], dtype=torch.float64)
            metrics["train/trained_tokens"] = distributed.mean_over_ranks(trained)
        start = time.perf_counter()
        self.agent.wake_up()
        self.agent.sync_weights(self.step + 1)
        metrics["time/weight_sync_s"] = time.perf_counter() - start
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
            samples = self.next_prompts(t.prompts_per_step)  # the same B prompts on every rank
            mine = distributed.shard_range(len(samples))  # this rank's whole groups
            batch = self.rollout([samples[i] for i in mine], r.group_size, greedy=False,
                                 seed=derive_seed(t.seed, self.step, 1, round_index),
                                 first_episode=mine.start * r.group_size)
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

    # -- scoring and the update ------------------------------------------------------------------------

    def reuses_sampling_logprobs(self) -> bool:
        """Whether the sampler's log-probs serve as old log-probs: its numerics are the trainer's."""
        return bool(self.agent.backend.logprobs_match_trainer)

    def _logprobs(self, batch: dict[str, Any], model: Any, plan: PrefixPlan | None = None,
                  with_entropy: bool = False) -> Any:
        return distributed.call_as_forward(model, self.agent.token_logprobs, batch, with_entropy=with_entropy,
                                           temperature=self.logprob_temperature, model=model, plan=plan)

    def _plan(self, batch: dict[str, Any], *, update: bool = False) -> PrefixPlan:
        """How a collated batch's forward runs: its shared prompts once (`agents.shared_prefix`).

        Not in the update's forwards under torchrun: there FSDP2 all-gathers and reduce-scatters per decoder
        layer and per forward, pairing them across ranks, and a split micro-batch runs every layer twice,
        so ranks whose micro-batches split differently would deadlock (measured with 2 ranks). The
        scoring forwards run on gathered weights (`distributed.gathered`, no collectives) and share."""
        sharded_update = update and distributed.is_distributed()
        return plan_prefixes(batch, self.agent.adapter.image_pad_id,
                             share=self.cfg.trainer.share_prompts and not sharded_update)

    def make_batch(self, trajectories: Sequence[Trajectory], advantages: torch.Tensor,
                   masks: list[torch.Tensor]) -> ppo.PPOBatch:
        """The update's `algorithms.ppo.PPOBatch`: old and reference log-probs per trajectory, each (L_i,)."""
        reuse = self.reuses_sampling_logprobs()
        need_ref = self.cfg.algorithm.kl_coef > 0
        old = [t.sampling_logprobs for t in trajectories] if reuse else [None] * len(trajectories)
        ref: list[Any] = [None] * len(trajectories)
        if not reuse or need_ref:
            self.model.eval()
            # Gathered: the ranks hold different numbers of episodes, so of forwards.
            with torch.no_grad(), distributed.gathered(self.model, self.reference_model):
                keys = [prompt_key(t) for t in trajectories] if self.cfg.trainer.share_prompts else None
                for micro in length_sorted_batches([t.length for t in trajectories], self.cfg.trainer.micro_batch_size,
                                                   keys=keys):
                    batch = self.agent.collate([trajectories[i] for i in micro])
                    plan = self._plan(batch)
                    if not reuse:
                        logp, _ = self._logprobs(batch, self.model, plan)
                        for row, i in enumerate(micro):
                            old[i] = logp[row, : trajectories[i].length].float().cpu()
                    if need_ref:
                        logp = self._reference_logprobs(batch, plan)
                        for row, i in enumerate(micro):
                            ref[i] = logp[row, : trajectories[i].length].float().cpu()
        return ppo.PPOBatch(trajectories, advantages, masks, old, ref if need_ref else None, old_is_sampler=reuse)

    def _reference_logprobs(self, batch: dict[str, Any], plan: PrefixPlan | None = None) -> torch.Tensor:
        if self.peft_model is not None:
            with self.peft_model.disable_adapter():
                return self._logprobs(batch, self.model, plan)[0]
        return self._logprobs(batch, self.reference_model, plan)[0]

    def _score(self, trajectories: Sequence[Trajectory]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PrefixPlan]:
        """`algorithms.ppo.Score`: the policy's log-probs and entropies of a micro-batch, with gradients."""
        batch = self.agent.collate(trajectories)
        plan = self._plan(batch, update=True)
        logp, entropy = self._logprobs(batch, self.model, plan, with_entropy=True)
        return logp, entropy, batch["sampling_logprobs"], plan

    def update(self, batch: ppo.PPOBatch) -> dict[str, float]:
        """`algorithms.ppo.update` of this step's batch on the trained model; returns its stats."""
        settings = ppo.PPOSettings.from_config(self.cfg)
        seeds = [derive_seed(self.cfg.trainer.seed, self.step, 2, epoch) for epoch in range(settings.epochs)]
        return ppo.update(batch, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                          score=self._score, settings=settings, epoch_seeds=seeds)
