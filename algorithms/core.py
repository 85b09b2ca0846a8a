"""The pure maths of GRPO/MGPO: advantages, policy losses, KL estimators and loss aggregation.

Every function here is a small torch function with its hyperparameters as explicit arguments (no config
objects) and its formula in the docstring. The pluggable parts live in four registries, each selected
by name from a config key (the trainer, `algorithms.ppo`, calls them with these arguments):

- ``ADVANTAGES`` (``algorithm.advantage``): ``fn(rewards (N,), group_ids (N,), *, norm_by_std) ->
  advantages (N,)``, ``norm_by_std`` from ``algorithm.norm_adv_by_std``.
- ``POLICY_LOSSES`` (``algorithm.policy_loss``): ``fn(logp, old_logp, advantages, mask, *, clip_low,
  clip_high, clip_ratio_c, is_weights, agg, norm_length, denominator) -> (loss, stats)``, the
  signature of :func:`policy_loss`.
- ``KL_ESTIMATORS`` (``algorithm.kl_kind``): ``fn(logp (N, T), ref_logp (N, T)) -> per-token KL (N, T)``.
- ``AGGREGATIONS`` (``algorithm.loss_agg``): ``fn(loss_mat (N, T), mask (N, T), norm_length) ->
  (total, count)``; the loss is ``total / count`` (see :func:`agg_loss`).

Add one with a decorator (``@register_advantage("my_adv")``); a duplicate name raises. Look one up with
``get_advantage(name)`` and friends; an unknown name raises ``ValueError`` listing the known names.

Shape letters (ARCHITECTURE.md): ``N`` trajectories (``B`` prompts x ``G`` rollouts), ``T`` tokens.
Masks are 1 (or True) on the tokens that count (model-generated tokens) and 0 elsewhere (prompt, env
turns, padding). Statistics are detached 0-d tensors under namespaced keys (``actor/clipfrac``); call
``float()`` on them when logging (kept as tensors so that GPU code does not synchronise per key).

References: PPO (arXiv 1707.06347), GRPO / DeepSeekMath (arXiv 2402.03300), DAPO (arXiv 2503.14476),
Dr.GRPO (arXiv 2503.20783), dual-clip PPO (arXiv 1912.09729), k1/k2/k3 KL estimators
(J. Schulman, "Approximating KL divergence", 2020), truncated importance sampling for sampler/trainer
mismatch (F. Yao et al., "Your efficient RL framework secretly brings you off-policy RL training", 2025).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from zoomgym.registry import Registry

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "agg_denominator",
    "agg_loss",
    "dynamic_sampling_keep",
    "get_advantage",
    "get_aggregation",
    "get_kl_estimator",
    "get_policy_loss",
    "group_advantages",
    "kl_penalty",
    "logprob_gap_stats",
    "masked_mean",
    "policy_loss",
    "register_advantage",
    "register_aggregation",
    "register_kl_estimator",
    "register_policy_loss",
    "truncated_is_weights",
]

# exp() of a log-ratio beyond this overflows float32/bf16 to inf; PPO clipping makes such tokens
# irrelevant to the gradient anyway, so clamping only protects the statistics from inf/NaN.
_MAX_LOG_RATIO = 20.0


# --------------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------------


ADVANTAGES: Registry[Callable[..., Tensor]] = Registry("advantage estimator")
POLICY_LOSSES: Registry[Callable[..., tuple[Tensor, dict[str, Tensor]]]] = Registry("policy loss")
KL_ESTIMATORS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("KL estimator")
AGGREGATIONS: Registry[Callable[[Tensor, Tensor, float], tuple[Tensor, Tensor]]] = Registry(
    "loss aggregation"
)

register_advantage = ADVANTAGES.register
register_policy_loss = POLICY_LOSSES.register
register_kl_estimator = KL_ESTIMATORS.register
register_aggregation = AGGREGATIONS.register
get_advantage = ADVANTAGES.lookup
get_policy_loss = POLICY_LOSSES.lookup
get_kl_estimator = KL_ESTIMATORS.lookup
get_aggregation = AGGREGATIONS.lookup


# --------------------------------------------------------------------------------------------------
# Checks and masked reductions
# --------------------------------------------------------------------------------------------------


def _check_same_shape(name: str, tensor: Tensor, like_name: str, like: Tensor) -> None:
    if tensor.shape != like.shape:
        raise ValueError(
            f"Expects {name} with the shape of {like_name} {tuple(like.shape)}, actual {tuple(tensor.shape)}"
        )


def _check_2d(name: str, tensor: Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"Expects {name} of shape (N, T), actual shape {tuple(tensor.shape)}")


def _safe_divide(total: Tensor, count: Tensor) -> Tensor:
    # An empty selection (count 0) gives 0 that stays in the graph (zero gradient), never 0/0 = NaN.
    positive = count > 0
    return torch.where(positive, total / torch.where(positive, count, torch.ones_like(count)), total * 0.0)


def _zero_outside(values: Tensor, mask: Tensor) -> Tensor:
    # Positions outside the mask may hold anything (-inf log-probs of image tokens, NaN from
    # -inf - -inf); `values * 0` would keep their NaN, so they are replaced by 0 instead. Gradients of
    # a where() reach only the selected branch, so nothing flows back into the replaced entries.
    return torch.where(mask != 0, values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the entries where ``mask`` is non-zero; 0 where there are none.

    ``masked_mean(x, m) = sum(m * x) / sum(m)`` (over ``dim``, or all entries when ``dim`` is None), and
    0 (not NaN) when ``sum(m) == 0``. ``mask`` may be bool or float (weights). Entries of ``values``
    where ``m == 0`` are ignored even when they are inf or NaN.

    Args:
        values: any shape.
        mask: the shape of ``values``.
        dim: the dimension to reduce; None reduces everything to a 0-d tensor.

    Returns:
        The masked mean, differentiable w.r.t. ``values``.
    """
    _check_same_shape("mask", mask, "values", values)
    values = _zero_outside(values, mask)
    mask = mask.to(values.dtype)
    if dim is None:
        return _safe_divide((values * mask).sum(), mask.sum())
    return _safe_divide((values * mask).sum(dim), mask.sum(dim))


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------


def _check_groups(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"Expects rewards of shape (N,), actual shape {tuple(rewards.shape)}")
    _check_same_shape("group_ids", group_ids, "rewards", rewards)
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise TypeError(f"Expects integer group_ids, actual dtype {group_ids.dtype}")


@register_advantage("grpo")
def group_advantages(
    rewards: Tensor, group_ids: Tensor, norm_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantage of each trajectory (GRPO outcome supervision).

    For trajectory ``i`` in group ``g`` (the rollouts of one prompt) with ``n_g`` members::

        mean_g = (1 / n_g) * sum_{j in g} r_j
        std_g  = sqrt( (1 / (n_g - 1)) * sum_{j in g} (r_j - mean_g)^2 )     (unbiased, Bessel)
        A_i    = (r_i - mean_g) / (std_g + eps)      if norm_by_std      (GRPO)
        A_i    =  r_i - mean_g                       otherwise           (Dr.GRPO)

    The unbiased std is what the reference (verl, ``torch.std``) uses. A group whose rewards are all
    equal gets ``A = 0`` for every member, exactly, whatever the value: the mean is taken of
    ``r_j - min_g r`` (all 0 in such a group) and the minimum added back, so no rounding step is left
    over (verl's plain float32 mean of seven rewards of 0.7 is off by one rounding step, and divided by
    a std of ~6e-8 that gives every member A = +0.056). A group of one rollout has no peer to compare
    with: we give it ``A = 0`` (its mean is its own reward; its std is taken as 0). verl instead sets
    mean 0 and std 1 for singletons, i.e. ``A = r``, which rewards a lone rollout as if the baseline
    were 0.

    Args:
        rewards: (N,) scalar reward per trajectory; ints are cast to float32.
        group_ids: (N,) integer group of each trajectory; any values, not necessarily contiguous or
            sorted.
        norm_by_std: divide by the group std (GRPO); False gives plain mean-centring (Dr.GRPO).
        eps: added to the std so that a zero-variance group does not divide 0 by 0; must be > 0.

    Returns:
        (N,) advantages, one per trajectory (the caller broadcasts them to the trajectory's tokens).

    Ref: DeepSeekMath (arXiv 2402.03300) section 4.1.2; Dr.GRPO (arXiv 2503.20783).
    """
    _check_groups(rewards, group_ids)
    if not eps > 0:
        raise ValueError(f"Expects eps > 0 (a group of equal rewards has std 0, and 0 / 0 is NaN), actual {eps}")
    if not rewards.dtype.is_floating_point:
        rewards = rewards.float()
    _, group = torch.unique(group_ids, return_inverse=True)  # (N,) contiguous 0..num_groups-1
    num_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, group, torch.ones_like(rewards)
    )
    # Shifted by the group minimum: a group of equal rewards sums exact zeros, so its mean is exact.
    low = torch.empty_like(count).scatter_reduce(0, group, rewards, reduce="amin", include_self=False)
    shifted = rewards - low[group]
    total = torch.zeros_like(count).index_add_(0, group, shifted)
    centred = shifted - (total / count)[group]
    if not norm_by_std:
        return centred
    # Two-pass variance (sum of squared deviations), stable where sum(r^2) - n*mean^2 is not.
    squares = torch.zeros_like(count).index_add_(0, group, centred.square())
    std = (squares / (count - 1).clamp(min=1)).sqrt()  # singletons: 0 / 1 -> std 0, and centred is 0
    return centred / (std[group] + eps)


def dynamic_sampling_keep(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Which trajectories DAPO dynamic sampling keeps: those whose group's rewards are not all equal.

    ``keep_i = max_{j in g(i)} r_j > min_{j in g(i)} r_j``. A group whose rollouts all got the same
    reward (all right or all wrong), including a group of one, has zero advantage everywhere and gives
    no gradient, so DAPO drops it and samples more prompts. The comparison is exact (no tolerance):
    rewards are compared as given.

    Args:
        rewards: (N,) reward per trajectory.
        group_ids: (N,) integer group of each trajectory (any values).

    Returns:
        (N,) bool, True for the trajectories of the groups to keep (the same value across a group).

    Ref: DAPO (arXiv 2503.14476) section 3.2.
    """
    _check_groups(rewards, group_ids)
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    empty = torch.empty(num_groups, dtype=rewards.dtype, device=rewards.device)
    high = empty.scatter_reduce(0, group, rewards, reduce="amax", include_self=False)
    low = empty.scatter_reduce(0, group, rewards, reduce="amin", include_self=False)
    return (high > low)[group]


# --------------------------------------------------------------------------------------------------
# Loss aggregation
# --------------------------------------------------------------------------------------------------


def _sequence_counts(mask: Tensor) -> tuple[Tensor, Tensor]:
    tokens_per_seq = mask.sum(-1)  # (N,)
    non_empty = (tokens_per_seq > 0).to(mask.dtype)  # (N,)
    return tokens_per_seq, non_empty


@register_aggregation("token-mean")
def _token_mean(loss_mat: Tensor, mask: Tensor, norm_length: float) -> tuple[Tensor, Tensor]:
    """total = sum_{i,t} m_it l_it; count = sum_{i,t} m_it (every token weighs the same)."""
    return (loss_mat * mask).sum(), mask.sum()


@register_aggregation("seq-mean-token-mean")
def _seq_mean_token_mean(loss_mat: Tensor, mask: Tensor, norm_length: float) -> tuple[Tensor, Tensor]:
    """total = sum_i (sum_t m_it l_it / sum_t m_it); count = #{i : sum_t m_it > 0} (every sequence weighs
    the same; GRPO paper)."""
    tokens_per_seq, non_empty = _sequence_counts(mask)
    per_seq = _safe_divide((loss_mat * mask).sum(-1), tokens_per_seq)  # (N,), 0 for empty sequences
    return per_seq.sum(), non_empty.sum()


@register_aggregation("seq-mean-token-sum")
def _seq_mean_token_sum(loss_mat: Tensor, mask: Tensor, norm_length: float) -> tuple[Tensor, Tensor]:
    """total = sum_{i,t} m_it l_it; count = #{i : sum_t m_it > 0} (sum over tokens, mean over
    sequences)."""
    _, non_empty = _sequence_counts(mask)
    return (loss_mat * mask).sum(), non_empty.sum()


@register_aggregation("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(loss_mat: Tensor, mask: Tensor, norm_length: float) -> tuple[Tensor, Tensor]:
    """total = sum_{i,t} m_it l_it / norm_length; count = #{i : sum_t m_it > 0} (Dr.GRPO: a constant
    length instead of each sequence's own length, so long answers are not down-weighted)."""
    _, non_empty = _sequence_counts(mask)
    return (loss_mat * mask).sum() / norm_length, non_empty.sum()


def _aggregate(loss_mat: Tensor, mask: Tensor, agg: str, norm_length: float | None) -> tuple[Tensor, Tensor]:
    _check_2d("loss_mat", loss_mat)
    _check_same_shape("mask", mask, "loss_mat", loss_mat)
    aggregation = get_aggregation(agg)
    if norm_length is None:
        norm_length = float(mask.shape[-1])
    if norm_length <= 0:
        raise ValueError(f"Expects norm_length > 0, actual {norm_length}")
    return aggregation(_zero_outside(loss_mat, mask), mask.to(loss_mat.dtype), norm_length)


def agg_denominator(mask: Tensor, agg: str) -> Tensor:
    """The count that :func:`agg_loss` divides by for this ``mask``: tokens or non-empty sequences.

    ``token-mean``: ``sum_{i,t} m_it``; every ``seq-mean-*`` mode: ``#{i : sum_t m_it > 0}``.
    With gradient accumulation over micro-batches, sum this over the micro-batches of a mini-batch and
    pass the sum as ``denominator`` to :func:`agg_loss` for each micro-batch: the accumulated gradient
    then equals that of one :func:`agg_loss` over the whole mini-batch (a plain mean of per-micro-batch
    token means would weigh a token of a short micro-batch more).

    Args:
        mask: (N, T) loss mask.
        agg: an ``AGGREGATIONS`` name.

    Returns:
        0-d tensor, the count (a whole number, in ``mask``'s float dtype or float32).
    """
    _check_2d("mask", mask)
    dtype = mask.dtype if mask.dtype.is_floating_point else torch.float32
    _, count = _aggregate(torch.zeros(mask.shape, dtype=dtype, device=mask.device), mask, agg, 1.0)
    return count.detach()


def agg_loss(
    loss_mat: Tensor,
    mask: Tensor,
    agg: str = "token-mean",
    norm_length: float | None = None,
    denominator: Tensor | float | None = None,
) -> Tensor:
    """Reduce a per-token loss (N, T) to a scalar over the masked tokens.

    With ``m`` the mask, ``l`` the per-token loss, ``n_i = sum_t m_it`` and ``S = #{i : n_i > 0}``
    (sequences with at least one loss token)::

        token-mean               = sum_{i,t} m_it l_it / sum_{i,t} m_it
        seq-mean-token-mean      = (1/S) sum_{i: n_i>0} (sum_t m_it l_it / n_i)
        seq-mean-token-sum       = (1/S) sum_{i: n_i>0}  sum_t m_it l_it
        seq-mean-token-sum-norm  = (1/S) sum_{i: n_i>0}  sum_t m_it l_it / norm_length   (Dr.GRPO)

    ``norm_length`` defaults to ``T = mask.shape[-1]``; Dr.GRPO means a constant (the maximum
    response length), so pass one explicitly when micro-batches are padded to different ``T``. (verl's
    ``seq-mean-token-sum-norm`` sums over sequences instead of averaging: ours is its value / S.)
    ``denominator`` replaces the divisor (``sum m`` or ``S``), e.g. with the count of a whole
    mini-batch from :func:`agg_denominator` under gradient accumulation. An all-zero mask, or a
    ``denominator`` of 0, gives a loss of exactly 0 that is still connected to ``loss_mat`` (its
    gradient is 0), never NaN. Entries of ``loss_mat`` outside the mask are ignored even when they
    are inf or NaN (they are selected away, not multiplied by 0).

    Args:
        loss_mat: (N, T) per-token loss.
        mask: (N, T) bool or float loss mask.
        agg: an ``AGGREGATIONS`` name (above).
        norm_length: the constant length of ``seq-mean-token-sum-norm`` (> 0); ignored by the others.
        denominator: optional divisor replacing this batch's own count.

    Returns:
        0-d tensor.
    """
    total, count = _aggregate(loss_mat, mask, agg, norm_length)
    if denominator is not None:
        count = torch.as_tensor(denominator, dtype=total.dtype, device=total.device)
        if count < 0:
            raise ValueError(f"Expects denominator >= 0, actual {float(count)}")
    return _safe_divide(total, count)


# --------------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------------


def _broadcast_advantages(advantages: Tensor, logp: Tensor) -> Tensor:
    if advantages.shape == logp.shape:
        return advantages
    if advantages.shape == logp.shape[:1]:
        return advantages.unsqueeze(-1).expand_as(logp)
    raise ValueError(
        f"Expects advantages of shape (N,) = {tuple(logp.shape[:1])} or (N, T) = {tuple(logp.shape)}, "
        f"actual {tuple(advantages.shape)}"
    )


def _check_clip(clip_low: float, clip_high: float, clip_ratio_c: float | None) -> None:
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"Expects 0 <= clip_low < 1, actual {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"Expects clip_high >= 0, actual {clip_high}")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"Expects clip_ratio_c > 1 (dual-clip bound), actual {clip_ratio_c}")


@register_policy_loss("ppo_clip")
def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    clip_ratio_c: float | None = None,
    is_weights: Tensor | None = None,
    norm_length: float | None = None,
    denominator: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, with clip-higher (DAPO), optional dual clip and importance weights.

    Per token, with ``rho = exp(logp - old_logp)`` (the log-ratio clamped to +-20 before ``exp``)::

        l_clip = max( -A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high) )
        l      = min( l_clip, -A * c )   where A < 0 and clip_ratio_c = c is given   (dual clip)
        l      = l_clip                  otherwise
        l      = w * l                   if is_weights w is given (treated as constants)
        loss   = agg_loss(l, mask, agg, norm_length, denominator)

    ``clip_high > clip_low`` is DAPO's clip-higher (lets unlikely tokens with A > 0 rise further).
    The gradient of ``-A * rho`` w.r.t. ``logp`` is ``-A * rho``: a positive advantage raises the log-prob
    of its token. The dual clip bounds the loss of a token with A < 0 whose ratio exploded (rho > c).

    Stats (detached 0-d tensors, means over the masked tokens):

    - ``actor/pg_loss``: the returned loss.
    - ``actor/clipfrac``: fraction where the clipped term is active (``l_clip > -A * rho``), i.e.
      ``clipfrac_high + clipfrac_low``.
    - ``actor/clipfrac_high``: A > 0 and rho > 1 + clip_high. ``actor/clipfrac_low``: A < 0 and
      rho < 1 - clip_low.
    - ``actor/clipfrac_dual``: A < 0 and the dual clip is active (rho > c); 0 without ``clip_ratio_c``.
    - ``actor/approx_kl``: k3 estimate of KL(pi_old || pi_theta): mean of ``rho - 1 - log rho`` (>= 0,
      unbiased under samples from pi_old; the same estimator as CleanRL's ``approx_kl``).
    - ``actor/ratio_mean``, ``actor/ratio_max``, ``actor/ratio_min``: of rho (1 when nothing is masked).
    - ``actor/is_weight_mean``: mean of ``is_weights`` (only when given).

    Args:
        logp: (N, T) log-probs of the sampled tokens under the policy being trained (with grad).
        old_logp: (N, T) log-probs under the policy that produced the data (no grad needed).
        advantages: (N,) per trajectory (broadcast over its tokens) or (N, T) per token.
        mask: (N, T) loss mask, 1 on model-generated tokens; the other inputs may hold anything
            (inf, NaN) where it is 0.
        clip_low: epsilon of the lower clip bound ``1 - clip_low``, in [0, 1).
        clip_high: epsilon of the upper clip bound ``1 + clip_high`` (DAPO uses 0.28).
        agg: an ``AGGREGATIONS`` name.
        clip_ratio_c: dual-clip constant ``c > 1`` (3.0 in the dual-clip paper); None disables it.
        is_weights: (N, T) truncated importance weights (see :func:`truncated_is_weights`); detached here.
        norm_length: constant length for ``seq-mean-token-sum-norm`` (see :func:`agg_loss`).
        denominator: divisor override for gradient accumulation (see :func:`agg_denominator`).

    Returns:
        (loss, stats): 0-d loss with grad w.r.t. ``logp``, and the stats above.

    Ref: PPO (arXiv 1707.06347) eq. 7; DAPO (arXiv 2503.14476) section 3.1; dual-clip PPO
    (arXiv 1912.09729).
    """
    _check_2d("logp", logp)
    _check_same_shape("old_logp", old_logp, "logp", logp)
    _check_same_shape("mask", mask, "logp", logp)
    _check_clip(clip_low, clip_high, clip_ratio_c)
    # Outside the mask, inputs may be -inf or NaN (image tokens the model never emits): select them away
    # before any arithmetic so that neither the loss, the stats nor the gradient of logp see them.
    logp = _zero_outside(logp, mask)
    old_logp = _zero_outside(old_logp.detach(), mask)
    advantages = _zero_outside(_broadcast_advantages(advantages.detach().to(logp.dtype), logp), mask)  # (N, T)
    if is_weights is not None:
        _check_same_shape("is_weights", is_weights, "logp", logp)
        is_weights = _zero_outside(is_weights.detach().to(logp.dtype), mask)

    log_ratio = (logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # (N, T)
    ratio = log_ratio.exp()
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    dual_active = torch.zeros_like(mask, dtype=torch.bool)
    if clip_ratio_c is not None:
        loss_dual = -advantages * clip_ratio_c
        dual_active = (advantages < 0) & (loss_dual < per_token)
        per_token = torch.where(dual_active, loss_dual, per_token)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = agg_loss(per_token, mask, agg, norm_length=norm_length, denominator=denominator)

    with torch.no_grad():
        token_mask = mask.to(torch.bool)
        fmask = mask.to(logp.dtype)
        high = (advantages > 0) & (ratio > 1.0 + clip_high)
        low = (advantages < 0) & (ratio < 1.0 - clip_low)
        any_token = bool(token_mask.any())
        stats = {
            "actor/pg_loss": loss.detach(),
            "actor/clipfrac": masked_mean((loss_clipped > loss_unclipped).to(logp.dtype), fmask),
            "actor/clipfrac_high": masked_mean(high.to(logp.dtype), fmask),
            "actor/clipfrac_low": masked_mean(low.to(logp.dtype), fmask),
            "actor/clipfrac_dual": masked_mean(dual_active.to(logp.dtype), fmask),
            "actor/approx_kl": masked_mean(ratio - 1.0 - log_ratio, fmask),
            "actor/ratio_mean": masked_mean(ratio, fmask) if any_token else ratio.new_tensor(1.0),
            "actor/ratio_max": ratio[token_mask].max() if any_token else ratio.new_tensor(1.0),
            "actor/ratio_min": ratio[token_mask].min() if any_token else ratio.new_tensor(1.0),
        }
        if is_weights is not None:
            stats["actor/is_weight_mean"] = masked_mean(is_weights.to(logp.dtype), fmask)
    return loss, stats


def truncated_is_weights(old_logp: Tensor, sampler_logp: Tensor, cap: float = 2.0) -> Tensor:
    """Truncated importance weights correcting for a sampler whose numerics differ from the trainer's.

    ``w = min( exp(old_logp - sampler_logp), cap )``, computed as ``exp(min(old - sampler, log cap))``
    so that it cannot overflow, and detached: the weights rescale the per-token loss of
    :func:`policy_loss` (``is_weights=``) but are not trained through. ``old_logp`` is the trainer's
    log-prob of the token under the weights that sampled it, ``sampler_logp`` the rollout engine's
    (e.g. vLLM). Entries outside the loss mask are meaningless and ignored by the loss.

    Args:
        old_logp: (N, T) trainer log-probs of the sampled tokens.
        sampler_logp: (N, T) sampler log-probs of the same tokens.
        cap: upper bound C > 0 of the weights (Yao et al. use 2).

    Returns:
        (N, T) weights in (0, cap].

    Ref: F. Yao et al., "Your efficient RL framework secretly brings you off-policy RL training" (2025).
    """
    _check_same_shape("sampler_logp", sampler_logp, "old_logp", old_logp)
    if not cap > 0:
        raise ValueError(f"Expects cap > 0, actual {cap}")
    with torch.no_grad():
        return (old_logp - sampler_logp).clamp(max=math.log(cap)).exp()


def logprob_gap_stats(logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the trainer's log-probs are from the sampler's on the sampled tokens (log every step).

    With ``d = logp - sampler_logp`` over the masked tokens:

    - ``rollout/logprob_gap_abs_mean``: mean of ``|d|``; ``rollout/logprob_gap_abs_max``: max of ``|d|``.
    - ``rollout/logprob_gap_kl``: k3 estimate of KL(pi_sampler || pi_trainer): mean of
      ``exp(d) - 1 - d`` (>= 0; 0 iff the two agree on every token).

    All are 0 when nothing is masked. A gap that grows over training signals stale rollout weights or
    a numerics mismatch (bf16 vs fp32, different kernels); see :func:`truncated_is_weights`.

    Args:
        logp: (N, T) trainer log-probs of the sampled tokens.
        sampler_logp: (N, T) log-probs reported by the sampler.
        mask: (N, T) loss mask.

    Returns:
        Detached 0-d tensors under the keys above.
    """
    _check_same_shape("sampler_logp", sampler_logp, "logp", logp)
    _check_same_shape("mask", mask, "logp", logp)
    with torch.no_grad():
        gap = (logp - sampler_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        token_mask = mask.to(torch.bool)
        fmask = mask.to(gap.dtype)
        abs_max = gap.abs()[token_mask].max() if token_mask.any() else gap.new_tensor(0.0)
        return {
            "rollout/logprob_gap_abs_mean": masked_mean(gap.abs(), fmask),
            "rollout/logprob_gap_abs_max": abs_max,
            "rollout/logprob_gap_kl": masked_mean(gap.exp() - 1.0 - gap, fmask),
        }


# --------------------------------------------------------------------------------------------------
# KL penalty
# --------------------------------------------------------------------------------------------------


@register_kl_estimator("k1")
def _kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp - ref_logp (unbiased for KL(pi || pi_ref), high variance, can be negative)."""
    return logp - ref_logp


@register_kl_estimator("k2")
def _kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2 (biased, low variance, >= 0)."""
    return 0.5 * (logp - ref_logp).square()


@register_kl_estimator("low_var_kl")
def _kl_low_var(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10] (unbiased, >= 0; GRPO's KL)."""
    # The exponent is clamped first so that a huge gap gives the clamp value, not inf/NaN.
    log_ratio = (ref_logp - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return (log_ratio.exp() - log_ratio - 1.0).clamp(-10.0, 10.0)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "low_var_kl") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled tokens' log-probs.

    With ``d = logp - ref_logp`` (tokens sampled from pi_theta)::

        k1          = d                                   unbiased, can be negative
        k2          = 0.5 * d^2                           biased, >= 0, gradient = d * grad(logp)
        low_var_kl  = clamp(exp(-d) + d - 1, -10, 10)     k3: unbiased, >= 0 (GRPO's KL loss)

    The caller aggregates with :func:`agg_loss` (e.g. ``kl_coef * agg_loss(kl, mask, agg)``).
    ``ref_logp`` is treated as given (the reference model is frozen); gradients flow through ``logp``.

    Args:
        logp: (N, T) log-probs of the sampled tokens under the policy being trained.
        ref_logp: (N, T) log-probs of the same tokens under the reference policy.
        kind: a ``KL_ESTIMATORS`` name.

    Returns:
        (N, T) per-token KL estimate.

    Ref: J. Schulman, "Approximating KL divergence" (2020); DeepSeekMath (arXiv 2402.03300) eq. 4.
    """
    _check_same_shape("ref_logp", ref_logp, "logp", logp)
    return get_kl_estimator(kind)(logp, ref_logp.detach())
