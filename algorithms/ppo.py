"""One PPO update over a batch of episodes, top to bottom: what GRPO and MGPO run every step.

Everything the update reads is in one `PPOBatch` (per episode: token ids and images, its advantage,
the tokens it trains, old, reference and sampler log-probs); everything it is allowed to change is the
model, the optimizer and the scheduler it is given::

    for epoch in range(epochs):
        shuffle the N episodes (one seed per epoch) and split them into `minibatches` mini-batches
        for each mini-batch:
            denominator = the loss aggregation's count over the whole mini-batch (core.agg_denominator)
            for each micro-batch of <= `micro_batch_size` episodes of similar length, a prompt's together:
                logp, entropy = score(micro-batch)                       forward, with gradients
                loss = policy_loss(logp, old, A, mask)                   core.POLICY_LOSSES[policy_loss]
                       + kl_coef * agg(KL(logp, ref))                    when there is a reference
                       - entropy_coef * agg(entropy)
                loss.backward()                                          this micro-batch's share
            clip the global gradient norm, optimizer step, scheduler step

Each micro-batch's loss is divided by its mini-batch's aggregation count, so the accumulated gradient
is exactly that of one loss over the whole mini-batch, whatever the micro-batch size (tested). So the
micro-batches can hold the mini-batch's episodes sorted by length, the episodes of one prompt together
(`agents.trajectory.length_sorted_batches` by `agents.trajectory.prompt_key`): each forward is padded
only to the longest of episodes of similar length and computes a group's shared prompt once
(`agents.shared_prefix`), and only the order in which the gradient accumulates changes (float
rounding). ``perf/padding_ratio`` is the padding that is left, ``perf/computed_ratio`` what the shared
prompts save (`forward_stats`).

Under torchrun each rank holds its share of the episodes (`algorithms.distributed`): the shuffle is of
the global batch (the same seed on every rank), each rank trains the episodes of each mini-batch that it
holds, the denominator is summed over ranks and FSDP sums the gradients, so N ranks take the step one
process takes on the whole batch (tested). A rank with fewer micro-batches in a mini-batch runs
zero-weight ones: a sharded forward/backward is a collective that every rank must join.
The maths is in `algorithms.core`; which episodes, advantages and masks go in is the algorithm's
(`algorithms.grpo`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from zoomgym.agents.trajectory import length_sorted_batches, prompt_key
from zoomgym.algorithms import core, distributed

if TYPE_CHECKING:
    from zoomgym.agents.shared_prefix import PrefixPlan
    from zoomgym.agents.trajectory import Trajectory
    from zoomgym.algorithms.config import Config

Score = Callable[[Sequence["Trajectory"]], tuple[torch.Tensor, torch.Tensor, torch.Tensor, "PrefixPlan"]]
"""``score(trajectories) -> (logp, entropy, sampler_logp, plan)``, the first three ``(n, L)``: the policy's
log-probs and entropies of a micro-batch (with gradients), the sampler's log-probs of the same tokens,
and how the forward ran (`agents.shared_prefix.PrefixPlan`: the token positions it computed)."""


@dataclass(frozen=True)
class PPOSettings:
    """The update's hyperparameters (their meaning: `algorithms.config.AlgorithmConfig`)."""

    epochs: int
    minibatches: int
    micro_batch_size: int
    share_prompts: bool
    policy_loss: str
    clip_low: float
    clip_high: float
    clip_ratio_c: float | None
    loss_agg: str
    norm_length: float
    kl_coef: float
    kl_kind: str
    entropy_coef: float
    tis_cap: float | None
    grad_clip: float

    @classmethod
    def from_config(cls, cfg: Config) -> PPOSettings:
        a, t = cfg.algorithm, cfg.trainer
        return cls(
            epochs=a.ppo_epochs, minibatches=t.prompts_per_step // t.mini_batch_prompts,
            micro_batch_size=t.micro_batch_size, share_prompts=t.share_prompts, policy_loss=a.policy_loss, clip_low=a.clip_low,
            clip_high=a.clip_high, clip_ratio_c=a.clip_ratio_c, loss_agg=a.loss_agg,
            # Dr.GRPO divides by a constant length, the per-turn generation cap, not by this batch's padding.
            norm_length=float(cfg.rollout.max_new_tokens), kl_coef=a.kl_coef, kl_kind=a.kl_kind,
            entropy_coef=a.entropy_coef, tis_cap=a.tis_cap, grad_clip=t.grad_clip,
        )


def right_pad(rows: Sequence[torch.Tensor], length: int, device: torch.device) -> torch.Tensor:
    """Right-pad 1-D tensors with 0 to (len(rows), length) float32, matching ``collate``'s padding."""
    out = torch.zeros((len(rows), length), dtype=torch.float32, device=device)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row.to(device=device, dtype=torch.float32)
    return out


@dataclass
class PPOBatch:
    """Everything one update reads. Per-episode tensors are lists: each episode has its own length L_i.

    Attributes:
        trajectories: the N episodes (token ids, images, ``sampling_logprobs``: the sampler's).
        advantages: (N,) one per episode, broadcast over the tokens it trains.
        masks: N tensors (L_i,), 1 on the tokens that carry the advantage (the algorithm's loss mask).
        old_logp: N tensors (L_i,), the log-probs under the weights that sampled the episode.
        ref_logp: N tensors (L_i,) under the frozen reference policy, or None (no KL term).
        old_is_sampler: ``old_logp`` are the sampler's own numbers (its numerics are the trainer's), so
            there is no sampler/trainer mismatch to correct, and the gap is measured on the update's
            first forward instead.
    """

    trajectories: Sequence[Trajectory]
    advantages: torch.Tensor
    masks: list[torch.Tensor]
    old_logp: list[torch.Tensor]
    ref_logp: list[torch.Tensor] | None
    old_is_sampler: bool

    def __post_init__(self) -> None:
        n = len(self.trajectories)
        sizes = {"advantages": len(self.advantages), "masks": len(self.masks), "old_logp": len(self.old_logp)}
        if self.ref_logp is not None:
            sizes["ref_logp"] = len(self.ref_logp)
        wrong = {name: size for name, size in sizes.items() if size != n}
        if wrong:
            raise ValueError(f"Expects one entry per trajectory ({n}) in every field, actual: {wrong}")

    def __len__(self) -> int:
        return len(self.trajectories)


def micro_batch_loss(
    batch: PPOBatch,
    micro: list[int],
    score: Score,
    settings: PPOSettings,
    denominator: torch.Tensor,
    measure_gap: bool,
    zero_weight: bool = False,
) -> tuple[dict[str, float], dict[str, Any], float, PrefixPlan]:
    """Forward and backward of one micro-batch (the episodes ``micro`` of ``batch``).

    ``zero_weight``: a pass whose loss mask is all zero (its gradient is exactly 0), for a rank that has
    run out of episodes in a mini-batch while other ranks still train (module docstring).

    Returns:
        (its shares of the mini-batch's loss terms, token-mean stats, its number of loss tokens, the
        forward's plan).
    """
    s = settings
    logp, entropy, sampler, plan = score([batch.trajectories[i] for i in micro])  # (n, L) each
    device, length = logp.device, logp.shape[1]
    mask = right_pad([batch.masks[i] for i in micro], length, device)  # (n, L)
    if zero_weight:
        mask = torch.zeros_like(mask)
    # Untrained positions may hold -inf (image-pad tokens the model can never emit). core's losses select
    # them away already; zeroing them here also keeps kl_penalty, which takes no mask, finite everywhere.
    trained = mask > 0
    logp = torch.where(trained, logp.float(), 0.0)
    entropy = torch.where(trained, entropy.float(), 0.0)
    old = torch.where(trained, right_pad([batch.old_logp[i] for i in micro], length, device), 0.0)
    sampler = sampler.to(device=device, dtype=torch.float32)  # 0 off the sampled tokens
    # Truncated IS corrects a sampler whose numerics differ from the trainer's; its own numbers need none.
    is_weights = core.truncated_is_weights(old, sampler, cap=s.tis_cap) if s.tis_cap and not batch.old_is_sampler else None
    agg = {"agg": s.loss_agg, "norm_length": s.norm_length, "denominator": denominator.to(device)}

    pg_loss, stats = core.get_policy_loss(s.policy_loss)(
        logp, old, batch.advantages[micro].to(device), mask,
        clip_low=s.clip_low, clip_high=s.clip_high, clip_ratio_c=s.clip_ratio_c, is_weights=is_weights, **agg,
    )
    loss = pg_loss
    parts = {"actor/pg_loss": float(pg_loss.detach())}
    if batch.ref_logp is not None:
        ref = torch.where(trained, right_pad([batch.ref_logp[i] for i in micro], length, device), 0.0)
        kl = core.agg_loss(core.kl_penalty(logp, ref, s.kl_kind), mask, **agg)
        loss = loss + s.kl_coef * kl
        parts["actor/kl"] = float(kl.detach())
    if s.entropy_coef > 0:
        loss = loss - s.entropy_coef * core.agg_loss(entropy, mask, **agg)
    loss.backward()
    parts["actor/loss"] = float(loss.detach())

    stats.pop("actor/pg_loss", None)
    stats["actor/entropy"] = core.masked_mean(entropy.detach(), mask)
    if measure_gap:
        stats.update(core.logprob_gap_stats((logp.detach() if batch.old_is_sampler else old), sampler, mask))
    return parts, stats, float(mask.sum()), plan


def update(
    batch: PPOBatch,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    score: Score,
    settings: PPOSettings,
    epoch_seeds: Sequence[int],
) -> dict[str, float]:
    """PPO epochs over mini-batches with micro-batch gradient accumulation (module docstring).

    Args:
        batch: the episodes and what the update reads of them.
        model: the module being trained (its trainable parameters are clipped and stepped).
        optimizer, scheduler: stepped once per mini-batch.
        score: the policy's log-probs and entropies of a micro-batch (`Score`).
        settings: the hyperparameters.
        epoch_seeds: one seed per epoch for the order of the episodes.

    Returns:
        Token-weighted means of the loss stats over the step (``actor/clipfrac``, ``actor/entropy``,
        ``rollout/logprob_gap_*``, ...), per-mini-batch means of the loss terms and the gradient norm,
        ``actor/grad_norm_max``, ``perf/padding_ratio`` and ``perf/computed_ratio`` (`forward_stats`).
    """
    s = settings
    if len(epoch_seeds) != s.epochs:
        raise ValueError(f"Expects one seed per epoch ({s.epochs}), actual: {len(epoch_seeds)}")
    params = [p for p in model.parameters() if p.requires_grad]
    lengths = [t.length for t in batch.trajectories]
    prompts = [prompt_key(t) for t in batch.trajectories] if s.share_prompts else None
    forwards: list[PrefixPlan] = []  # every micro-batch forward of the update, for its positions
    token_stats = _Average()  # token-weighted means over the whole step (clip fractions, entropy, gap)
    losses: dict[str, list[float]] = defaultdict(list)  # one value per mini-batch
    shard = distributed.batch_shard(len(batch))  # this rank's episodes in the global batch (all of it in one process)
    for epoch, seed in enumerate(epoch_seeds):
        order = np.random.default_rng(seed).permutation(shard.total)
        for mb_index, global_minibatch in enumerate(np.array_split(order, s.minibatches)):
            if len(global_minibatch) == 0:
                continue
            minibatch = np.asarray(shard.local(global_minibatch), dtype=np.int64)  # this rank's, in shuffled order
            longest = max((int(batch.masks[i].shape[0]) for i in minibatch), default=0)
            mb_mask = right_pad([batch.masks[i] for i in minibatch], longest, torch.device("cpu"))
            denominator = distributed.all_sum(core.agg_denominator(mb_mask, s.loss_agg))
            optimizer.zero_grad(set_to_none=True)
            model.train()
            mb_losses: dict[str, float] = defaultdict(float)
            micros = length_sorted_batches(lengths, s.micro_batch_size, minibatch.tolist(), keys=prompts)
            for index in range(distributed.all_max(len(micros))):
                zero_weight = index >= len(micros)
                if zero_weight and len(batch) == 0:
                    raise RuntimeError(f"Expects every rank to hold episodes of the step, actual: rank "
                                       f"{distributed.rank()} has none (all of its groups were skipped)")
                micro = [0] if zero_weight else micros[index]
                # Sampler vs trainer log-probs: recomputed old log-probs cover every token; the sampler's own
                # are compared with the first mini-batch's forward, whose weights are still those that sampled.
                measure_gap = epoch == 0 and (mb_index == 0 or not batch.old_is_sampler) and not zero_weight
                parts, stats, tokens, plan = micro_batch_loss(batch, micro, score, s, denominator, measure_gap,
                                                              zero_weight=zero_weight)
                for key, value in parts.items():  # 0 from a zero-weight pass: every rank sums the same keys
                    mb_losses[key] += value
                if not zero_weight:
                    token_stats.add(stats, tokens)
                    forwards.append(plan)
            grad_clip = s.grad_clip if s.grad_clip > 0 else float("inf")
            losses["actor/grad_norm"].append(distributed.full_norm(torch.nn.utils.clip_grad_norm_(params, grad_clip)))
            optimizer.step()
            scheduler.step()
            for key, value in mb_losses.items():
                losses[key].append(distributed.all_sum(value))  # each rank's share of the mini-batch's loss
    model.eval()
    token_stats.reduce_over_ranks()
    out = token_stats.result()
    out.update({key: float(np.mean(values)) for key, values in losses.items()})
    out["actor/grad_norm_max"] = float(np.max(losses["actor/grad_norm"]))
    out.update(forward_stats(forwards))
    return out


def forward_stats(plans: Sequence[PrefixPlan]) -> dict[str, float]:
    """The token positions of an update's forwards: ``perf/padding_ratio``, the share of those computed
    that are padding, ``1 - sum tokens / sum positions``, and ``perf/computed_ratio``, those computed over
    those one right-padded forward per micro-batch would compute, ``sum positions / sum n_mb max L_i``
    (below 1 by the prompts computed once, `agents.shared_prefix`); 0 and 1 for no forwards."""
    # Every rank's forwards (the same collective on every rank: each runs the update).
    positions = distributed.all_sum(sum(plan.positions for plan in plans))
    single = distributed.all_sum(sum(plan.single_positions for plan in plans))
    tokens = distributed.all_sum(sum(plan.tokens for plan in plans))
    return {"perf/padding_ratio": 1.0 - tokens / positions if positions else 0.0,
            "perf/computed_ratio": positions / single if single else 1.0}


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

    def reduce_over_ranks(self) -> None:
        """Make these the averages of every rank's stats together (no-op in a single process)."""
        if not distributed.is_distributed():
            return
        keys = sorted(set().union(*distributed.all_gather_object({*self.sums, *self.extremes})))  # every rank's
        for key in keys:
            if key.endswith("_max"):
                self.extremes[key] = distributed.all_max(self.extremes.get(key, -math.inf))
            elif key.endswith("_min"):
                self.extremes[key] = distributed.all_min(self.extremes.get(key, math.inf))
            else:
                self.sums[key] = distributed.all_sum(self.sums.get(key, 0.0))
                self.weights[key] = distributed.all_sum(self.weights.get(key, 0.0))

    def result(self) -> dict[str, float]:
        means = {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}
        return {**means, **self.extremes}
