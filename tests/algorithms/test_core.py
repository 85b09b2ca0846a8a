"""Formula tests for algorithms/core.py: every expected number is worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from zoomgym.algorithms import core
from zoomgym.algorithms.core import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    agg_denominator,
    agg_loss,
    dynamic_sampling_keep,
    group_advantages,
    kl_penalty,
    logprob_gap_stats,
    masked_mean,
    policy_loss,
    truncated_is_weights,
)


def close(actual, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        atol=atol,
        rtol=0,
    )


# ---------------------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------------------


def test_builtin_registries_hold_the_documented_names():
    assert set(AGGREGATIONS) == {
        "token-mean",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
    }
    assert set(KL_ESTIMATORS) == {"k1", "k2", "low_var_kl"}
    assert core.get_advantage("grpo") is group_advantages
    assert core.get_policy_loss("ppo_clip") is policy_loss
    assert "ppo_clip" in POLICY_LOSSES and "grpo" in ADVANTAGES
    with pytest.raises(ValueError, match="Did you mean 'low_var_kl'"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "low_var")
    with pytest.raises(ValueError, match="Did you mean 'token-mean'"):
        agg_loss(torch.zeros(1, 1), torch.ones(1, 1), "token_mean")


# ---------------------------------------------------------------------------------------------------
# masked_mean
# ---------------------------------------------------------------------------------------------------


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    close(masked_mean(values, mask), 8.0 / 3.0)  # (1 + 3 + 4) / 3
    close(masked_mean(values, mask, dim=-1), [1.0, 3.5])  # row 0: 1/1; row 1: (3 + 4)/2
    close(masked_mean(values, torch.tensor([[0, 0], [1, 1]]), dim=-1), [0.0, 3.5])  # empty row -> 0
    close(masked_mean(values, torch.tensor([[0.5, 0.0], [0.0, 0.0]])), 1.0)  # weights: 0.5*1 / 0.5
    empty = masked_mean(values.requires_grad_(), torch.zeros(2, 2))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="Expects mask with the shape"):
        masked_mean(values, torch.ones(3))


# ---------------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------------


def test_group_advantages_binary_group_of_four():
    # mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.577350 -> A = +-0.866025
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([5, 5, 5, 5]))
    close(adv, [0.866025, -0.866025, 0.866025, -0.866025])


def test_group_advantages_non_contiguous_ids_and_singleton():
    rewards = torch.tensor([0.0, 2.0, 1.0, 4.0, 5.0, 3.0])
    group_ids = torch.tensor([10, -3, 10, -3, 10, 99])
    # group 10: [0, 1, 5] mean 2, deviations -2, -1, 3, sum sq 14, var 14/2 = 7, std 2.645751
    #   A = -2/2.645751 = -0.755929, -1/2.645751 = -0.377964, 3/2.645751 = 1.133893
    # group -3: [2, 4] mean 3, deviations -1, 1, var 2/1 = 2, std 1.414214 -> A = -0.707107, 0.707107
    # group 99: a single rollout -> A = 0 (documented choice)
    close(
        group_advantages(rewards, group_ids),
        [-0.755929, -0.707107, -0.377964, 0.707107, 1.133893, 0.0],
    )
    # Dr.GRPO: only mean-centring
    close(group_advantages(rewards, group_ids, norm_by_std=False), [-2.0, -1.0, -1.0, 1.0, 3.0, 0.0])


def test_group_advantages_equal_rewards_give_zero_and_ints_are_cast():
    adv = group_advantages(torch.tensor([1, 1, 0, 0]), torch.tensor([0, 0, 1, 1]))
    assert adv.dtype == torch.float32
    close(adv, [0.0, 0.0, 0.0, 0.0])
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize("value", [0.7, 0.1, 0.3, 0.9, 1 / 3, 123.456])
@pytest.mark.parametrize("n", [3, 7, 8])
def test_group_advantages_equal_non_binary_rewards_give_exactly_zero(value, n):
    # float32: a plain mean of seven 0.7s is one rounding step off; over a std of ~6e-8 that was A = +0.056
    rewards = torch.full((n,), value, dtype=torch.float32)
    group_ids = torch.zeros(n, dtype=torch.long)
    assert torch.equal(group_advantages(rewards, group_ids), torch.zeros(n))
    assert torch.equal(group_advantages(rewards, group_ids, norm_by_std=False), torch.zeros(n))
    # beside a group that varies, in either order
    mixed = torch.cat([rewards, torch.tensor([0.0, 1.0])])
    adv = group_advantages(mixed, torch.cat([group_ids, torch.ones(2, dtype=torch.long)]))
    assert torch.equal(adv[:n], torch.zeros(n)) and adv[n] < 0 < adv[n + 1]


@pytest.mark.parametrize("eps", [0.0, -1e-6])
def test_group_advantages_rejects_eps_that_would_give_nan(eps):
    with pytest.raises(ValueError, match="Expects eps > 0"):
        group_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long), eps=eps)


def test_group_advantages_eps_is_added_to_the_std():
    # group [0, 1]: deviations -0.5, 0.5, var 0.5, std 0.707107; with eps = 1: A = -+0.5 / 1.707107
    close(
        group_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), eps=1.0),
        [-0.292893, 0.292893],
    )


def test_group_advantages_rejects_bad_inputs():
    with pytest.raises(ValueError, match="Expects rewards of shape"):
        group_advantages(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="Expects group_ids with the shape"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="Expects integer group_ids"):
        group_advantages(torch.zeros(2), torch.zeros(2))


def _loop_group_advantages(rewards, group_ids, norm_by_std, eps):
    """The obvious per-group loop, the way the GRPO paper states it."""
    out = torch.zeros_like(rewards)
    for gid in set(group_ids.tolist()):
        members = group_ids == gid
        group = rewards[members]
        if group.numel() == 1:
            continue  # singleton -> advantage 0
        centred = group - group.mean()
        out[members] = centred / (group.std() + eps) if norm_by_std else centred
    return out


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_group_advantages_vectorised_equals_loop(norm_by_std):
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 40, (1,), generator=generator))
        rewards = torch.randint(0, 3, (n,), generator=generator).float() + torch.rand(n, generator=generator)
        group_ids = torch.randint(-5, 7, (n,), generator=generator) * 13
        expected = _loop_group_advantages(rewards, group_ids, norm_by_std, eps=1e-6)
        actual = group_advantages(rewards, group_ids, norm_by_std=norm_by_std)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_group_advantages_empty_batch():
    assert group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert dynamic_sampling_keep(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


# ---------------------------------------------------------------------------------------------------
# dynamic_sampling_keep
# ---------------------------------------------------------------------------------------------------


def test_dynamic_sampling_keep_drops_constant_groups_and_singletons():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 2.0, 0.5, 0.5])
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 8, 8])
    # group 0 all 1 -> drop; group 1 {0, 1} -> keep; group 2 all 0 -> drop; group 3 alone -> drop;
    # group 8 all 0.5 -> drop
    keep = dynamic_sampling_keep(rewards, group_ids)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, False, True, True, False, False, False, False, False]


# ---------------------------------------------------------------------------------------------------
# agg_loss
# ---------------------------------------------------------------------------------------------------

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the third sequence has no loss token


@pytest.mark.parametrize(
    ("agg", "expected"),
    [
        ("token-mean", 7.0 / 3.0),  # (1 + 2 + 4) / 3 tokens
        ("seq-mean-token-mean", 2.75),  # ((1 + 2)/2 + 4/1) / 2 non-empty sequences
        ("seq-mean-token-sum", 3.5),  # ((1 + 2) + 4) / 2
        ("seq-mean-token-sum-norm", 7.0 / 6.0),  # ((1 + 2)/3 + 4/3) / 2, norm_length = T = 3
    ],
)
def test_agg_loss_modes(agg, expected):
    close(agg_loss(LOSS, MASK, agg), expected)
    close(agg_loss(LOSS, MASK.bool(), agg), expected)  # bool masks behave like 0/1


def test_agg_loss_norm_length_and_denominator():
    close(agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", norm_length=10), 0.35)  # (3/10 + 4/10) / 2
    close(agg_loss(LOSS, MASK, "seq-mean-token-mean", norm_length=10), 2.75)  # ignored by other modes
    close(agg_loss(LOSS, MASK, "token-mean", denominator=7.0), 1.0)  # (1 + 2 + 4) / 7
    close(agg_loss(LOSS, MASK, "token-mean", denominator=torch.tensor(0.0)), 0.0)
    with pytest.raises(ValueError, match="norm_length > 0"):
        agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", norm_length=0)
    with pytest.raises(ValueError, match="denominator >= 0"):
        agg_loss(LOSS, MASK, "token-mean", denominator=-1.0)
    with pytest.raises(ValueError, match="Expects loss_mat of shape"):
        agg_loss(torch.zeros(3), torch.zeros(3), "token-mean")
    with pytest.raises(ValueError, match="Expects mask with the shape"):
        agg_loss(LOSS, MASK[:2], "token-mean")


def test_agg_denominator_counts():
    assert agg_denominator(MASK, "token-mean").item() == 3.0
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        assert agg_denominator(MASK, agg).item() == 2.0


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_agg_loss_all_masked_is_zero_with_grad(agg):
    loss_mat = torch.randn(2, 4, requires_grad=True)
    loss = agg_loss(loss_mat, torch.zeros(2, 4), agg)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(loss_mat.grad, torch.zeros(2, 4))


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_agg_loss_accumulated_micro_batches_equal_the_mini_batch(agg):
    # Micro-batches padded to different lengths; the shared count and norm_length make the sum exact.
    generator = torch.Generator().manual_seed(1)
    loss_mat = torch.randn(6, 5, generator=generator)
    mask = (torch.rand(6, 5, generator=generator) > 0.4).float()
    mask[2] = 0.0  # an empty sequence
    micro = [(loss_mat[:4, :5], mask[:4, :5]), (loss_mat[4:, :3], mask[4:, :3])]
    mask[4:, 3:] = 0.0  # what the second micro-batch sees
    expected = agg_loss(loss_mat, mask, agg, norm_length=5)
    denominator = sum(agg_denominator(m, agg) for _, m in micro)
    accumulated = sum(agg_loss(lm, m, agg, norm_length=5, denominator=denominator) for lm, m in micro)
    close(accumulated, expected)


# ---------------------------------------------------------------------------------------------------
# policy_loss
# ---------------------------------------------------------------------------------------------------

# ratios rho = exp(logp - old_logp) chosen by hand; old_logp = 0 so logp = log(rho)
RATIOS = torch.tensor([[1.5, 0.5], [1.1, 0.7]])
ADV = torch.tensor([1.0, -1.0])  # sequence 0 good, sequence 1 bad
# per token, clip 0.2/0.2 (bounds 0.8 .. 1.2), l = max(-A*rho, -A*clip(rho)):
#   (0,0) A=+1 rho=1.5: max(-1.5, -1.2) = -1.2  clipped (high)
#   (0,1) A=+1 rho=0.5: max(-0.5, -0.8) = -0.5
#   (1,0) A=-1 rho=1.1: max( 1.1,  1.1) =  1.1
#   (1,1) A=-1 rho=0.7: max( 0.7,  0.8) =  0.8  clipped (low)
# token-mean = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05


def _logp(ratios: torch.Tensor) -> torch.Tensor:
    return ratios.log().requires_grad_()


def test_policy_loss_hand_computed_with_stats():
    logp = _logp(RATIOS)
    loss, stats = policy_loss(logp, torch.zeros(2, 2), ADV, torch.ones(2, 2))
    close(loss, 0.05)
    close(stats["actor/pg_loss"], 0.05)
    close(stats["actor/clipfrac"], 0.5)
    close(stats["actor/clipfrac_high"], 0.25)
    close(stats["actor/clipfrac_low"], 0.25)
    close(stats["actor/clipfrac_dual"], 0.0)
    # k3 = rho - 1 - log rho: 1.5 -> 0.094535, 0.5 -> 0.193147, 1.1 -> 0.004690, 0.7 -> 0.056675
    close(stats["actor/approx_kl"], (0.094535 + 0.193147 + 0.004690 + 0.056675) / 4)
    close(stats["actor/ratio_mean"], 0.95)  # (1.5 + 0.5 + 1.1 + 0.7) / 4
    close(stats["actor/ratio_max"], 1.5)
    close(stats["actor/ratio_min"], 0.5)
    assert "actor/is_weight_mean" not in stats
    assert all(not value.requires_grad and value.dim() == 0 for value in stats.values())
    loss.backward()
    # d(-A*rho)/dlogp = -A*rho, / 4 tokens; zero where the clipped term is active
    close(logp.grad, [[0.0, -0.125], [0.275, 0.0]])


def test_policy_loss_clip_higher():
    # clip_high 0.6: token (0,0) rho 1.5 < 1.6 is no longer clipped: -1.5
    loss, stats = policy_loss(_logp(RATIOS), torch.zeros(2, 2), ADV, torch.ones(2, 2), clip_high=0.6)
    close(loss, (-1.5 - 0.5 + 1.1 + 0.8) / 4)  # -0.025
    close(stats["actor/clipfrac"], 0.25)
    close(stats["actor/clipfrac_high"], 0.0)


def test_policy_loss_dual_clip():
    # A = -1, rho = [5, 2], c = 3:
    #   token 0: max(5, 1.2) = 5, min(5, 3) = 3 (dual clip active)
    #   token 1: max(2, 1.2) = 2, min(2, 3) = 2
    logp = _logp(torch.tensor([[5.0, 2.0]]))
    loss, stats = policy_loss(
        logp, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2), clip_ratio_c=3.0
    )
    close(loss, 2.5)
    close(stats["actor/clipfrac_dual"], 0.5)
    close(stats["actor/clipfrac"], 0.0)
    loss.backward()
    close(logp.grad, [[0.0, 1.0]])  # the dual-clipped token is constant; token 1: rho / 2 = 1
    loss_no_dual, _ = policy_loss(
        _logp(torch.tensor([[5.0, 2.0]])), torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2)
    )
    close(loss_no_dual, 3.5)  # (5 + 2) / 2


def test_policy_loss_per_token_advantages():
    # A = [[+1, -1]], rho = 1.5 on both: max(-1.5, -1.2) = -1.2; max(1.5, 1.2) = 1.5 -> mean 0.15
    loss, _ = policy_loss(
        _logp(torch.tensor([[1.5, 1.5]])), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    )
    close(loss, 0.15)


def test_policy_loss_importance_weights():
    weights = torch.tensor([[2.0, 1.0], [1.0, 0.5]], requires_grad=True)
    # (2*-1.2 + 1*-0.5 + 1*1.1 + 0.5*0.8) / 4 = (-2.4 - 0.5 + 1.1 + 0.4) / 4 = -0.35
    loss, stats = policy_loss(_logp(RATIOS), torch.zeros(2, 2), ADV, torch.ones(2, 2), is_weights=weights)
    close(loss, -0.35)
    close(stats["actor/is_weight_mean"], 1.125)  # 4.5 / 4
    loss.backward()
    assert weights.grad is None  # weights are constants


def test_policy_loss_mask_and_aggregation():
    mask = torch.tensor([[1, 0], [0, 1]])
    loss, stats = policy_loss(_logp(RATIOS), torch.zeros(2, 2), ADV, mask)
    close(loss, (-1.2 + 0.8) / 2)  # tokens (0,0) and (1,1) only
    close(stats["actor/clipfrac"], 1.0)
    close(stats["actor/ratio_mean"], 1.1)  # (1.5 + 0.7) / 2
    # seq-mean-token-sum on the full mask: sequence sums -1.7 and 1.9, mean 0.1
    loss, _ = policy_loss(_logp(RATIOS), torch.zeros(2, 2), ADV, torch.ones(2, 2), agg="seq-mean-token-sum")
    close(loss, 0.1)


def test_policy_loss_all_masked():
    logp = torch.randn(2, 3, requires_grad=True)
    loss, stats = policy_loss(logp, torch.randn(2, 3), torch.tensor([1.0, -1.0]), torch.zeros(2, 3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))
    assert all(torch.isfinite(value) for value in stats.values())
    assert stats["actor/clipfrac"].item() == 0.0 and stats["actor/ratio_mean"].item() == 1.0


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_policy_loss_gradient_step_moves_logp_with_the_advantage_sign(advantage):
    # on-policy (rho = 1): d loss / d logp = -A; one SGD step raises logp iff A > 0
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([advantage]), torch.ones(1, 1))
    loss.backward()
    close(logp.grad, [[-advantage]])
    new_logp = logp.detach() - 0.1 * logp.grad
    assert (new_logp > logp.detach()).item() == (advantage > 0)


def test_policy_loss_extreme_ratios_stay_finite():
    logp = torch.tensor([[0.0, -200.0]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.tensor([[-200.0, 0.0]]), torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(value) for value in stats.values())


def test_policy_loss_rejects_bad_inputs():
    logp, old, mask = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"Expects advantages of shape \(N,\)"):
        policy_loss(logp, old, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(logp, old, torch.zeros(2), mask, clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high"):
        policy_loss(logp, old, torch.zeros(2), mask, clip_high=-0.1)
    with pytest.raises(ValueError, match="clip_ratio_c > 1"):
        policy_loss(logp, old, torch.zeros(2), mask, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="is_weights"):
        policy_loss(logp, old, torch.zeros(2), mask, is_weights=torch.ones(2))
    with pytest.raises(ValueError, match="Expects old_logp"):
        policy_loss(logp, torch.zeros(2, 2), torch.zeros(2), mask)


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_inf_and_nan_outside_the_mask_are_ignored(agg):
    """Untrained positions may hold -inf log-probs (image tokens) and NaN: same loss, stats and gradient as
    with zeros there, all finite (a mask that multiplies would give NaN: NaN * 0 = NaN)."""
    inf, nan = float("inf"), float("nan")
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    clean_logp = torch.tensor([[-1.0, -0.5, 0.0, 0.0], [0.0, -2.0, -0.1, 0.0]])
    clean_old = torch.tensor([[-1.2, -0.4, 0.0, 0.0], [0.0, -1.5, -0.3, 0.0]])
    dirty_logp = torch.where(mask > 0, clean_logp, torch.tensor([[-inf, nan, -inf, inf]] * 2))
    dirty_old = torch.where(mask > 0, clean_old, torch.tensor([[-inf, -inf, nan, -inf]] * 2))
    advantages = torch.tensor([[1.0, -1.0, nan, inf], [inf, 0.5, -0.5, nan]])  # per token, garbage off the mask
    weights = torch.where(mask > 0, torch.full((2, 4), 0.9), torch.full((2, 4), nan))

    def run(logp, old, adv):
        logp = logp.clone().requires_grad_(True)
        loss, stats = policy_loss(logp, old, adv, mask, agg=agg, is_weights=weights)
        kl = agg_loss(kl_penalty(logp, old, "low_var_kl"), mask, agg)
        (loss + kl).backward()
        gap = logprob_gap_stats(logp.detach(), old, mask)
        return loss.detach(), kl.detach(), stats, gap, logp.grad

    clean = run(clean_logp, clean_old, torch.where(mask > 0, advantages, 0.0))
    dirty = run(dirty_logp, dirty_old, advantages)
    for a, b in zip(clean[:2], dirty[:2]):
        assert torch.isfinite(b) and torch.equal(a, b)
    for key in clean[2]:
        assert torch.isfinite(dirty[2][key]) and torch.equal(clean[2][key], dirty[2][key]), key
    for key in clean[3]:
        assert torch.isfinite(dirty[3][key]) and torch.equal(clean[3][key], dirty[3][key]), key
    assert torch.isfinite(dirty[4]).all() and torch.equal(clean[4], dirty[4])
    assert torch.equal(dirty[4] * (1 - mask), torch.zeros(2, 4))  # no gradient off the mask
    assert masked_mean(torch.tensor([1.0, nan, -inf]), torch.tensor([1.0, 0.0, 0.0])).item() == 1.0


# ---------------------------------------------------------------------------------------------------
# truncated_is_weights and logprob_gap_stats
# ---------------------------------------------------------------------------------------------------


def test_truncated_is_weights():
    old = torch.tensor([[0.0, 0.0, -1.0]], requires_grad=True)
    sampler = torch.tensor([[-math.log(1.5), -1.0, 0.0]])
    # exp(old - sampler) = [1.5, e = 2.718 -> capped at 2, exp(-1) = 0.367879]
    weights = truncated_is_weights(old, sampler, cap=2.0)
    close(weights, [[1.5, 2.0, 0.367879]])
    assert not weights.requires_grad
    assert torch.isfinite(truncated_is_weights(torch.tensor([500.0]), torch.tensor([-500.0]), cap=3.0)).all()
    with pytest.raises(ValueError, match="cap > 0"):
        truncated_is_weights(old, sampler, cap=0.0)


def test_logprob_gap_stats():
    logp = torch.tensor([[0.0, -1.0], [-2.0, 0.0]])
    sampler = torch.tensor([[0.0, -1.5], [-1.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # d = logp - sampler on the masked tokens: [0, 0.5, -1]
    stats = logprob_gap_stats(logp, sampler, mask)
    close(stats["rollout/logprob_gap_abs_mean"], 0.5)  # (0 + 0.5 + 1) / 3
    close(stats["rollout/logprob_gap_abs_max"], 1.0)
    # exp(d) - 1 - d: 0; e^0.5 - 1.5 = 0.148721; e^-1 - 1 + 1 = 0.367879
    close(stats["rollout/logprob_gap_kl"], (0.148721 + 0.367879) / 3)
    empty = logprob_gap_stats(logp, sampler, torch.zeros(2, 2))
    assert all(value.item() == 0.0 for value in empty.values())


# ---------------------------------------------------------------------------------------------------
# kl_penalty
# ---------------------------------------------------------------------------------------------------

KL_LOGP = torch.tensor([[-1.0, -2.0]])
KL_REF = torch.tensor([[-1.5, -1.0]])  # d = logp - ref = [0.5, -1]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("k1", [[0.5, -1.0]]),
        ("k2", [[0.125, 0.5]]),  # 0.5 * d^2
        # ref - logp = [-0.5, 1]: exp(-0.5) + 0.5 - 1 = 0.106531; exp(1) - 1 - 1 = 0.718282
        ("low_var_kl", [[0.106531, 0.718282]]),
    ],
)
def test_kl_penalty_hand_computed(kind, expected):
    close(kl_penalty(KL_LOGP, KL_REF, kind), expected)


@pytest.mark.parametrize("kind", sorted(KL_ESTIMATORS))
def test_kl_penalty_is_zero_when_policies_agree(kind):
    logp = torch.tensor([[-0.3, -4.0, -1e-3]])
    close(kl_penalty(logp, logp.clone(), kind), torch.zeros(1, 3))


def test_low_var_kl_is_clamped_and_finite():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[30.0, -1000.0]])
    # exp(30) - 31 and exp(-20) + 20 - 1 = 19 (exponent clamped at -20) both clamp to 10
    kl = kl_penalty(logp, ref, "low_var_kl")
    close(kl, [[10.0, 10.0]])
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_kl_penalty_gradients_flow_through_logp_only():
    logp = KL_LOGP.clone().requires_grad_()
    ref = KL_REF.clone().requires_grad_()
    kl_penalty(logp, ref, "k2").sum().backward()
    close(logp.grad, [[0.5, -1.0]])  # d/dlogp 0.5 d^2 = d
    assert ref.grad is None
    with pytest.raises(ValueError, match="Expects ref_logp with the shape"):
        kl_penalty(KL_LOGP, torch.zeros(2, 2), "k1")
