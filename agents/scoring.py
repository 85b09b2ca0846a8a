"""Scoring token ids under a model: per-token log-probs and entropies of a collated batch.

One definition of a token's log-prob serves the sampler (`agents.backends.hf`) and the trainer::

    logp(token_t) = log softmax(z_{t-1})[token_t],   z = logits / T with the placeholder ids at -inf

(`agents.backends.base` explains ``T`` and the placeholder ids), so PPO's ratio compares the same
distribution on both sides. The entropy of each position is that distribution's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from zoomgym.agents.backends.base import placeholder_ids
from zoomgym.agents.models.unique_images import with_image_features
from zoomgym.agents.shared_prefix import PrefixPlan, plan_prefixes, split_hidden_states
from zoomgym.agents.trajectory import MODEL_INPUTS


def scaled_logits(logits: torch.Tensor, temperature: float, banned: Sequence[int] = ()) -> torch.Tensor:
    """``logits / T`` in float32 with ``banned`` ids (e.g. `placeholder_ids`) at ``-inf``.

    Args:
        logits: ``(..., V)`` raw next-token logits.
        temperature: ``T`` (`SamplingParams.logprob_temperature`).
        banned: ids excluded from the distribution.
    """
    logits = logits.float()
    if banned:
        logits = logits.index_fill(-1, torch.tensor(list(banned), device=logits.device), float("-inf"))
    return logits / temperature


def next_token_logprobs(logits: torch.Tensor, temperature: float, banned: Sequence[int] = ()) -> torch.Tensor:
    """``log softmax(logits / T)`` in float32 with ``banned`` ids at ``-inf`` (see `scaled_logits`)."""
    return torch.log_softmax(scaled_logits(logits, temperature, banned), dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution over the last dimension, per position.

    ``H(z) = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v`` with ``p = softmax(z)``, which never
    evaluates ``log 0`` and is stable for large or ``-inf`` logits (a masked vocabulary entry,
    ``z_v = -inf``, contributes 0). Computed in ``logits``' dtype: pass float32 logits for exact
    values from a bf16 model.

    Args:
        logits: (..., V) unnormalised scores, e.g. (N, T, V).

    Returns:
        (...) entropies in nats, e.g. (N, T), differentiable.
    """
    probs = torch.softmax(logits, dim=-1)
    # p * z with p = 0 and z = -inf is NaN in IEEE (and so would be its gradient through a where());
    # such entries contribute 0 to the expectation, so their logit is replaced by 0 before multiplying.
    finite_logits = logits.masked_fill(probs == 0, 0.0)
    expected_logit = (probs * finite_logits).sum(-1)
    return torch.logsumexp(logits, dim=-1) - expected_logit


def token_logprobs(
    model: Any,
    adapter: Any,
    batch: Mapping[str, Any],
    *,
    with_entropy: bool = False,
    temperature: float = 1.0,
    plan: PrefixPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of a collated batch under ``model`` (differentiable).

    ``logp[:, t] = log softmax(logits[:, t - 1] / temperature)[input_ids[:, t]]`` for ``t >= 1`` and 0
    at ``t = 0`` and after a row's last attended token (placeholder ids excluded, exactly as at
    sampling); ``entropy[:, t]`` is the entropy of that same distribution. Use the sampling
    temperature (1 for greedy) so these match the rollout's ``sampling_logprobs``. Each distinct image
    of the batch runs through the vision tower once (`agents.models.unique_images`), and a prefix that
    rows share (a group's prompt) runs through the language model once, its vocabulary head too
    (`agents.shared_prefix`).

    Args:
        model: a Qwen-VL ``...ForConditionalGeneration`` (or a peft wrapper of it): the policy being
            trained, or a frozen reference of the same architecture and vocabulary.
        adapter: the model adapter (placeholder ids).
        batch: from `agents.trajectory.collate`.
        with_entropy: also return the per-token entropy.
        temperature: ``T`` of the definition above.
        plan: how the forward is split (`agents.shared_prefix.plan_prefixes`); default: planned here,
            sharing what the batch shares.

    Returns:
        ``(logp (N, L), entropy (N, L) or None)``, float32, on the model's device.
    """
    device = next(model.parameters()).device
    if plan is None:
        plan = plan_prefixes(batch, adapter.image_pad_id)
    inputs = with_image_features(model, {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch})
    rest = plan.remainder_rows
    if rest:
        hidden, hidden_rest = split_hidden_states(model.model, inputs, plan, adapter.pad_id)
    else:  # one forward of the whole rows
        hidden, hidden_rest = model.model(**inputs, use_cache=False).last_hidden_state, None  # (N, L, H)
    input_ids = inputs["input_ids"]
    n, length = input_ids.shape
    logp = hidden.new_zeros((n, length), dtype=torch.float32)
    entropy = hidden.new_zeros((n, length), dtype=torch.float32) if with_entropy else None
    banned = placeholder_ids(adapter)

    def score(states: torch.Tensor, rows: Sequence[int], start: int) -> None:
        """Tokens ``start + 1 .. start + len(states)`` of ``rows`` from the hidden states before them.
        One row of (positions, V) logits at a time bounds memory for 150K vocabularies."""
        z = scaled_logits(model.lm_head(states), temperature, banned)
        log_probs = torch.log_softmax(z, dim=-1)
        stop = start + states.shape[0] + 1
        entropies = entropy_from_logits(z) if entropy is not None else None
        for i in rows:
            logp[i, start + 1 : stop] = log_probs.gather(-1, input_ids[i, start + 1 : stop, None])[:, 0]
            if entropy is not None:
                entropy[i, start + 1 : stop] = entropies

    # Each row's logits up to its last attended token: the vocabulary head skips right padding (0 there).
    for g, (_, width) in enumerate(plan.prefix_rows):  # a shared prefix: its distributions once for its rows
        rows = plan.members(g)
        count = min(width, min(plan.lengths[i] for i in rows) - 1)  # a whole row has no token after its last
        if count > 0:
            score(hidden[g, :count], rows, 0)
    for m, i in enumerate(rest):  # a row's remainder: tokens p_i + 1 .. L_i - 1
        count = plan.lengths[i] - plan.shared[i] - 1
        if count > 0:
            score(hidden_rest[m, :count], [i], plan.shared[i])
    return logp, entropy
