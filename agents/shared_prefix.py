"""A batch's shared prompts computed once: the prefix/remainder split of the scoring and training forwards.

The ``G`` rollouts of a GRPO/MGPO group start with the same prompt: the same ids, the same view, hence
the same M-RoPE positions. In a causal decoder the hidden states and keys/values of those positions
do not depend on what follows, so they are the same in all ``G`` rows, and one computation serves
them all. A collated batch (`agents.trajectory.collate`) is then scored in two forwards:

1. the **prefix pass**: one row per group of rows sharing a prefix (its first ``p`` tokens), plus every
   row that shares nothing, whole; each layer's keys and values are kept;
2. the **remainder pass**: each sharing row's tokens ``p .. L_i`` with its group's prefix keys/values
   (``index_select``-ed to the rows, so the gradients of all rows add up on the one prefix
   computation) attended before its own, its M-RoPE positions sliced from the whole sequence's.

The log-prob of token ``t`` reads the hidden state at ``t - 1``: tokens ``1 .. p`` of every row of a
group come from the prefix pass (the same distribution, its vocabulary head run once per group; token
``p`` itself differs per row), tokens ``p + 1 ..`` from the remainder pass. The result equals the
single forward's to float rounding (tested: log-probs within 1e-6 in fp32, gradients within 1e-5).

Sharing is found from the batch itself, never from group ids: two rows share their first ``p`` tokens
when their ids are equal there and every image whose pads lie there is the same distinct image
(`agents.models.unique_images`' ``image_index``); a prefix ends before an image, never inside one, and
before each row's last token. Rows are grouped only when the prefix covers each one's whole prompt
(its tokens before the first with ``loss_mask`` 1), so rows of different prompts are never grouped
on a common system prompt. The rows are sorted by those keys and cut into contiguous groups maximising
the tokens saved, ``sum_g (n_g - 1) p_g`` (a dynamic programme over at most a micro-batch of rows), and
the split is used only when it computes fewer token positions, padding included, than the single
right-padded forward (`PrefixPlan.positions`). Without ``image_index`` (pixels not deduplicated)
nothing is shared.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PrefixPlan:
    """How one collated batch of ``N`` rows is run: a prefix pass, then (if any row is split) a remainder pass.

    Attributes:
        lengths: ``L_i``, each row's attended tokens (right padding).
        prefix_rows: the prefix pass, one ``(batch row, width)`` per row of it: a shared prefix
            (its first ``width`` tokens) or a whole row (``width = L_i``).
        source: per batch row, its prefix-pass row, or -1 when the row runs whole in the remainder pass.
        shared: per batch row, ``p_i``, its leading tokens computed by the prefix pass (``L_i`` for a
            row wholly there, 0 for a row wholly in the remainder pass).
        image_runs: per batch row, the ``(start, end)`` of each image's pad run, in order.
    """

    lengths: tuple[int, ...]
    prefix_rows: tuple[tuple[int, int], ...]
    source: tuple[int, ...]
    shared: tuple[int, ...]
    image_runs: tuple[tuple[tuple[int, int], ...], ...] = ()

    @classmethod
    def single(cls, lengths: Sequence[int], image_runs: Sequence[Sequence[tuple[int, int]]] = ()) -> PrefixPlan:
        """The plain plan: every row whole in one forward."""
        lengths = tuple(int(length) for length in lengths)
        return cls(lengths, tuple((i, length) for i, length in enumerate(lengths)), tuple(range(len(lengths))),
                   lengths, tuple(tuple(runs) for runs in image_runs))

    @property
    def remainder_rows(self) -> list[int]:
        """The batch rows of the remainder pass (those not wholly in the prefix pass), in batch order."""
        return [i for i, (p, length) in enumerate(zip(self.shared, self.lengths)) if p < length]

    def members(self, prefix_row: int) -> list[int]:
        """The batch rows whose leading tokens ``prefix_row`` of the prefix pass computes."""
        return [i for i, source in enumerate(self.source) if source == prefix_row]

    @property
    def tokens(self) -> int:
        """Token positions the forwards compute that are not padding: ``sum_prefix w + sum_rem (L_i - p_i)``."""
        return sum(width for _, width in self.prefix_rows) + sum(self.lengths[i] - self.shared[i]
                                                                 for i in self.remainder_rows)

    @property
    def positions(self) -> int:
        """Token positions the forwards compute, padding included: each pass is right-padded to its
        longest row, ``n_prefix * max w + n_rem * max (L_i - p_i)``."""
        rest = self.remainder_rows
        prefix = len(self.prefix_rows) * max((width for _, width in self.prefix_rows), default=0)
        return prefix + len(rest) * max((self.lengths[i] - self.shared[i] for i in rest), default=0)

    @property
    def single_positions(self) -> int:
        """Token positions of the one right-padded forward over the whole rows: ``N * max L_i``."""
        return len(self.lengths) * max(self.lengths, default=0)


def image_runs(row: torch.Tensor, image_pad_id: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` of each run of ``image_pad_id`` in a 1-D id tensor, left to right."""
    is_pad = torch.cat([torch.zeros(1, dtype=torch.int8), (row == image_pad_id).to(torch.int8),
                        torch.zeros(1, dtype=torch.int8)])
    edges = torch.diff(is_pad).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


def plan_prefixes(batch: Mapping[str, Any], image_pad_id: int, *, share: bool = True) -> PrefixPlan:
    """The `PrefixPlan` of a collated batch (module docstring); the plain one when ``share`` is False,
    when no split computes fewer positions, or when images are not identified (no ``image_index``).

    Args:
        batch: from `agents.trajectory.collate` (``input_ids``, ``attention_mask``, ``image_index``).
        image_pad_id: the adapter's image placeholder id.
        share: look for shared prefixes at all.
    """
    ids = batch["input_ids"].cpu()
    n, width = ids.shape
    mask = batch.get("attention_mask")
    lengths = [width] * n if mask is None else (mask.cpu().cumsum(-1).argmax(-1) + 1).tolist()
    runs = [image_runs(ids[i, : lengths[i]], image_pad_id) for i in range(n)]
    plain = PrefixPlan.single(lengths, runs)
    images = batch.get("image_index")
    if not share or n < 2 or (images is None and batch.get("pixel_values") is not None):
        return plain
    # Each image's pads replaced by -(1 + its distinct image): equal keys mean equal ids and equal images.
    keys = ids.clone()
    image = 0
    for i in range(n):
        for start, end in runs[i]:
            keys[i, start:end] = -1 - int(images[image])
            image += 1
    order = sorted(range(n), key=lambda i: keys[i, : lengths[i]].tolist())
    adjacent = [_common_prefix(keys, lengths, runs, a, b) for a, b in zip(order, order[1:])]
    loss_mask = batch.get("loss_mask")
    prompts = [0] * n if loss_mask is None else [int(row.nonzero()[0]) if row.any() else length
                                                 for row, length in zip(loss_mask.cpu() > 0, lengths)]
    groups = _best_groups(adjacent, [prompts[i] for i in order])
    shared_groups = [(order[a:b], p) for a, b, p in groups if b - a > 1 and p > 0]
    if not shared_groups:
        return plain
    singles = [i for a, b, p in groups if b - a == 1 or p == 0 for i in order[a:b]]
    candidates = [_layout(lengths, runs, shared_groups, singles, whole_in_prefix) for whole_in_prefix in (True, False)]
    best = min(candidates, key=lambda plan: plan.positions)
    return best if best.positions < plain.positions else plain


def _common_prefix(keys: torch.Tensor, lengths: Sequence[int], runs: Sequence[Sequence[tuple[int, int]]],
                   a: int, b: int) -> int:
    """Leading tokens rows ``a`` and ``b`` share, ending before an image, leaving each row >= 1 token."""
    m = min(lengths[a], lengths[b])
    differ = (keys[a, :m] != keys[b, :m]).nonzero()
    p = int(differ[0]) if differ.numel() else m
    p = min(p, lengths[a] - 1, lengths[b] - 1)
    for row in (a, b):
        for start, end in runs[row]:
            if start < p < end:  # never cut an image's pads: its embeddings go to one pass whole
                p = start
    return p


def _best_groups(adjacent: Sequence[int], prompts: Sequence[int]) -> list[tuple[int, int, int]]:
    """Contiguous groups ``(a, b, p)`` of rows ``a .. b - 1`` (in key order) maximising ``sum (b - a - 1) p``,
    where ``p`` is the smallest of the group's adjacent common prefixes (0 for a single row) and must
    cover every member's prompt (``prompts[i]``: its tokens before the first trained one)."""
    n = len(adjacent) + 1
    best = [0] * (n + 1)  # best[b]: tokens saved by the best grouping of rows 0 .. b - 1
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # cut[b]: (a, p) of the last group of that grouping
    for b in range(1, n + 1):
        best[b], cut[b] = best[b - 1], (b - 1, 0)
        shared, prompt = None, prompts[b - 1]
        for a in range(b - 2, -1, -1):
            shared = adjacent[a] if shared is None else min(shared, adjacent[a])
            prompt = max(prompt, prompts[a])
            saved = best[a] + (b - a - 1) * shared
            if shared >= prompt and saved > best[b]:
                best[b], cut[b] = saved, (a, shared)
    groups = []
    b = n
    while b > 0:
        a, p = cut[b]
        groups.append((a, b, p))
        b = a
    return groups[::-1]


def _layout(lengths: Sequence[int], runs: Sequence[Sequence[tuple[int, int]]],
            shared_groups: Sequence[tuple[Sequence[int], int]], singles: Sequence[int],
            whole_in_prefix: bool) -> PrefixPlan:
    """The plan of these groups with the unshared rows whole in the prefix pass or in the remainder pass."""
    n = len(lengths)
    source, shared = [-1] * n, [0] * n
    prefix_rows: list[tuple[int, int]] = []
    for rows, p in sorted(shared_groups, key=lambda group: min(group[0])):
        for i in rows:
            source[i], shared[i] = len(prefix_rows), p
        prefix_rows.append((min(rows), p))
    if whole_in_prefix:
        for i in sorted(singles):
            source[i], shared[i] = len(prefix_rows), lengths[i]
            prefix_rows.append((i, lengths[i]))
    return PrefixPlan(tuple(lengths), tuple(prefix_rows), tuple(source), tuple(shared), tuple(map(tuple, runs)))


# -- the two passes ----------------------------------------------------------------------------------------


def split_hidden_states(inner: Any, inputs: Mapping[str, Any], plan: PrefixPlan,
                        pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states of the prefix pass ``(n_prefix, W_p, H)`` and the remainder pass ``(n_rem, W_r, H)``.

    Args:
        inner: the Qwen-VL ``...Model`` (``model.model`` of a ForConditionalGeneration, or of its wrapper).
        inputs: the batch's forward inputs after `agents.models.unique_images.with_image_features`
            (``input_ids``, ``position_ids (3, N, L)``, ``mm_encoder_outputs`` with one entry per image).
        plan: a plan with a remainder pass.
        pad_id: the id of padding positions.
    """
    from transformers.cache_utils import Cache

    ids, positions = inputs["input_ids"], inputs["position_ids"]
    encoded = inputs.get("mm_encoder_outputs", {}).get("image")
    features = encoded.pooler_output if encoded is not None else ()
    first_image = [0]
    for runs in plan.image_runs:
        first_image.append(first_image[-1] + len(runs))

    def pass_inputs(spans: Sequence[tuple[int, int, int]]) -> dict[str, Any]:
        """Right-padded inputs of rows ``(batch row, start, end)``: tokens ``start .. end`` of each."""
        width = max(end - start for _, start, end in spans)
        out_ids = ids.new_full((len(spans), width), pad_id)
        mask = ids.new_zeros((len(spans), width))
        out_positions = positions.new_zeros((positions.shape[0], len(spans), width))
        shown = []
        for j, (i, start, end) in enumerate(spans):
            out_ids[j, : end - start] = ids[i, start:end]
            mask[j, : end - start] = 1
            out_positions[:, j, : end - start] = positions[:, i, start:end]
            shown += [features[first_image[i] + k] for k, (a, b) in enumerate(plan.image_runs[i])
                      if start <= a and b <= end]
        out = {"input_ids": out_ids, "attention_mask": mask, "position_ids": out_positions}
        if shown:
            out["mm_encoder_outputs"] = {"image": type(encoded)(pooler_output=tuple(shown))}
        return out

    recording_layer, prefix_layer = _cache_layers()
    layers = inner.config.get_text_config().num_hidden_layers
    prefix = pass_inputs([(i, 0, width) for i, width in plan.prefix_rows])
    recorded = Cache(layers=[recording_layer() for _ in range(layers)])
    rest = plan.remainder_rows
    remainder = pass_inputs([(i, plan.shared[i], plan.lengths[i]) for i in rest])
    rows = torch.tensor([max(plan.source[i], 0) for i in rest], device=ids.device)
    has_prefix = torch.tensor([plan.source[i] >= 0 for i in rest], device=ids.device)
    with _cache_under_checkpointing(inner):
        hidden_prefix = inner(**prefix, past_key_values=recorded, use_cache=False).last_hidden_state
        prefix_kv = Cache(layers=[prefix_layer(layer.keys.index_select(0, rows), layer.values.index_select(0, rows))
                                  for layer in recorded.layers])
        remainder["attention_mask"] = torch.cat(
            [prefix["attention_mask"].index_select(0, rows) * has_prefix[:, None], remainder["attention_mask"]], dim=1)
        hidden_rest = inner(**remainder, past_key_values=prefix_kv, use_cache=False).last_hidden_state
    return hidden_prefix, hidden_rest


@functools.cache
def _cache_layers() -> tuple[type, type]:
    """The two passes' cache layers (classes built on first use: transformers is imported only then)."""
    from transformers.cache_utils import DynamicLayer

    class RecordingLayer(DynamicLayer):
        """Keeps the keys/values of the prefix pass; replaces rather than appends, so the recompute of a
        checkpointed layer in the backward pass writes the same states again, and the pass sees no past."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states

        def get_seq_length(self) -> int:
            return 0

    class PrefixLayer(DynamicLayer):
        """The remainder pass's past: each row's prefix keys/values before its own. Read only (never
        grows), so a checkpointed layer's recompute reads the same states."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return RecordingLayer, PrefixLayer


@contextlib.contextmanager
def _cache_under_checkpointing(module: torch.nn.Module) -> Iterator[None]:
    """Let checkpointed decoder layers keep the two passes' caches (transformers drops a cache under
    gradient checkpointing, because a growing cache would be written twice by the recompute; these two
    never grow). Non-reentrant checkpointing, which `algorithms.trainer.prepare_model` configures, keeps
    the graph of the states the cache hands from the prefix pass to the remainder pass."""
    layers = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(type(m), "_can_checkpoint_with_cache")]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


__all__ = ["PrefixPlan", "image_runs", "plan_prefixes", "split_hidden_states"]
