"""Group-aware decoding for the hf backend: each group's shared prefix stored and read once ("cascade" attention).

The G rollouts of a GRPO/MGPO group start from one prompt, and in every later turn each rollout's
conversation extends it. Stored per row (a ``DynamicCache``), that prefix is G copies of the same keys and
values, every decode step reads all G (G matrix-vector products over the longest part of the context),
and growing the cache by one token copies all of it. Here, per layer of the text decoder:

* ``prefix_keys``/``prefix_values`` ``(P, H_kv, L_p, d)``: the prefix of each of the ``P`` groups once,
  left-padded to the longest (``prefix_valid (P, L_p)``); a row reads the prefix of its group ``g(b)``;
* ``keys``/``values`` ``(B, H_kv, cap, d)``: each row's own tokens (what its conversation added after the
  prefix) in a preallocated buffer whose capacity doubles when full, every row writing the same columns
  ``[0, length)``; ``valid (B, length)`` marks which columns of a row hold a token (pads do not).

A decode step (one new token per row, where the time goes) attends to the two parts apart, each a
softmax over its own keys, for a query ``q`` of row ``b``::

    s_1 = q K_1[g(b)]^T / sqrt(d) + bias_1,  m_1 = max s_1,  z_1 = sum exp(s_1 - m_1),  o_1 = exp(s_1 - m_1) V_1[g(b)]
    s_2 = q K_2[b]^T / sqrt(d) + bias_2 (the row's valid own columns),  m_2, z_2, o_2 alike
    out = (e^(m_1 - m) o_1 + e^(m_2 - m) o_2) / (e^(m_1 - m) z_1 + e^(m_2 - m) z_2),  m = max(m_1, m_2)

which is the softmax over the concatenated keys exactly (the log-sum-exp merge; ``m_1 = -inf`` for a row
without a prefix), scores and sums in float32 at least. Part 1 batches the queries of a group's rows
against its one prefix: one matrix product per group instead of one matrix-vector product per row.
Grouped-query attention needs no ``repeat_kv``: the ``n_rep`` query heads of a key/value head are
folded into the query dimension. Only a prompt that several rows read becomes a prefix (a group of one
row keeps its tokens as its own), and a decode step whose groups all have one row (nothing to share)
takes the fused kernel below. A prefill chunk (many new tokens per row, causal among them) is a
matrix product per row already, so sharing would save little next to the fused kernel: it goes through
``scaled_dot_product_attention`` over the group's prefix gathered in front of the row's own columns,
with one additive mask per forward. A pad of a chunk always sees its own column, so no row of scores
is all ``-inf`` and no NaN reaches the valid tokens through a pad's values.

Wiring, through transformers' own extension points: the cache is a ``transformers.Cache`` of
`GroupLayer`s (the attention modules call its ``update``); the text decoder receives the ready mask as
``attention_mask={"full_attention": GroupMask}`` (the model skips building its own); and `group_attention`
switches only the text decoder's config to the attention function registered here as ``ATTENTION``, for
the forwards of one generation batch, restoring it in ``finally``. The vision tower, the training forward (`agents.scoring`) and
every other caller keep their attention implementation and numerics. Sliding-window layers are not
supported (the hf backend keeps its plain ``DynamicCache`` path for such models).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, Cache
from transformers.cache_utils import CacheLayerMixin

ATTENTION = "zoomgym_group"
MIN_CAPACITY = 64  # own columns a buffer holds at least once it grows (a turn's first decode steps)


@dataclass(eq=False)
class SharedPrefix:
    """A group's shared prefix after a call: per layer ``(keys, values)`` of shape ``(H_kv, L, d)``. The rows
    that kept this object (by identity) form one group in the next call."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[1]


class GroupLayer(CacheLayerMixin):
    """One decoder layer's cache: the groups' prefixes (set by `GroupCache`) and the rows' own columns."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None, prefix_keys: torch.Tensor | None,
                 prefix_values: torch.Tensor | None) -> None:
        super().__init__()
        self.keys, self.values = keys, values  # (B, H_kv, cap, d), columns [0, length) in use; None: none yet
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values  # (P, H_kv, L_p, d) or None
        self.length = 0 if keys is None else keys.shape[2]
        self.is_initialized = keys is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty buffers shaped, typed and placed as the model's first keys and values."""
        self.keys = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[3]))
        self.values = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new ``(B, H_kv, Q, d)`` keys and values at columns ``[length, length + Q)`` (doubling
        the capacity when they do not fit) and returns the rows' columns in use."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self.keys.shape[2]:
            self.keys, self.values = (_grown(t, end) for t in (self.keys, self.values))
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1


def _grown(buffer: torch.Tensor, needed: int) -> torch.Tensor:
    """``buffer`` (B, H_kv, cap, d) copied into one of capacity ``max(needed, 2 cap, MIN_CAPACITY)``: a row's
    columns grow by doubling, so ``T`` tokens cost ``O(log T)`` copies instead of one per token."""
    capacity = max(needed, 2 * buffer.shape[2], MIN_CAPACITY)
    out = buffer.new_zeros((*buffer.shape[:2], capacity, buffer.shape[3]))
    out[:, :, : buffer.shape[2]] = buffer
    return out


class GroupCache(Cache):
    """The text decoder's cache of one generation batch: groups' prefixes once, rows' own columns apart.

    Args:
        layers: one `GroupLayer` per decoder layer.
        valid: ``(B, length)`` bool, which own columns of each row hold a token.
        prefixes: the groups' `SharedPrefix` objects (``P`` of them, in the order of the prefix tensors).
        prefix_valid: ``(P, L_p)`` bool, the groups' prefix columns in use (left-padded).
        group: ``(B,)`` long, the group of each row, ``-1`` for a row without a prefix.
    """

    def __init__(self, layers: list[GroupLayer], valid: torch.Tensor, prefixes: list[SharedPrefix],
                 prefix_valid: torch.Tensor, group: torch.Tensor) -> None:
        super().__init__(layers=layers)
        self.valid, self.prefixes, self.prefix_valid, self.group = valid, prefixes, prefix_valid, group
        self._index_groups()

    @classmethod
    def for_prefill(cls, rows: Sequence[tuple[SharedPrefix | None, list[tuple[torch.Tensor, torch.Tensor]] | None]],
                    num_layers: int, device: torch.device) -> GroupCache:
        """The cache before a prefill of ``rows``: per row its group's prefix (or ``None``) and its own kept
        columns (per layer ``(keys, values)`` of shape ``(H_kv, L, d)``, or ``None``), own columns
        left-padded to the longest. Buffers take the dtype of the kept tensors (or of the model's first keys)."""
        prefixes: list[SharedPrefix] = []
        group = []
        for prefix, _ in rows:
            if prefix is None:
                group.append(-1)
                continue
            index = next((i for i, p in enumerate(prefixes) if p is prefix), None)
            if index is None:
                index = len(prefixes)
                prefixes.append(prefix)
            group.append(index)
        width = max((own[0][0].shape[1] for _, own in rows if own is not None), default=0)
        prefix_width = max((p.length for p in prefixes), default=0)
        valid = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
        for row, (_, own) in enumerate(rows):
            if own is not None:
                valid[row, width - own[0][0].shape[1] :] = True
        prefix_valid = torch.zeros((len(prefixes), prefix_width), dtype=torch.bool, device=device)
        for index, prefix in enumerate(prefixes):
            prefix_valid[index, prefix_width - prefix.length :] = True
        layers = []
        for layer in range(num_layers):
            keys, values = (_left_padded([None if own is None else own[layer][part] for _, own in rows], width)
                            for part in (0, 1))
            prefix_keys, prefix_values = (_left_padded([p.layers[layer][part] for p in prefixes], prefix_width)
                                          for part in (0, 1))
            layers.append(GroupLayer(keys, values, prefix_keys, prefix_values))
        return cls(layers, valid, prefixes, prefix_valid, torch.tensor(group, dtype=torch.long, device=device))

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def _index_groups(self) -> None:
        """Rebuilds the group layout of part 1: ``members (P * G_max,)``, the row at each slot of each group
        (free slots repeat a row; their results are never read), and ``slot (B,)``, each row's slot."""
        group = self.group.tolist()
        sizes = [0] * len(self.prefixes)
        slot = []
        for g in group:
            slot.append(sizes[g] if g >= 0 else -1)
            if g >= 0:
                sizes[g] += 1
        self.group_size = max(sizes, default=0)
        members = [0] * (len(self.prefixes) * self.group_size)
        for row, (g, s) in enumerate(zip(group, slot)):
            if g >= 0:
                slot[row] = g * self.group_size + s
                members[slot[row]] = row
        device = self.valid.device
        self.members = torch.tensor(members, dtype=torch.long, device=device)
        self.slot_read = torch.tensor(slot, dtype=torch.long, device=device).clamp_(min=0)  # -1: any slot
        self.has_prefix = self.group >= 0
        self.all_have_prefix = bool(self.has_prefix.all())
        self.prefix_bias = _bias(self.prefix_valid)  # (P, L_p)
        # (B, L_p): each row's group prefix, all -inf for a row without one (its prefix part is empty)
        self.row_prefix_bias = (self.prefix_bias[self.group.clamp(min=0)].masked_fill_(~self.has_prefix[:, None],
                                                                                        float("-inf"))
                                if self.prefixes else None)

    def mask(self, new_valid: torch.Tensor) -> dict[str, GroupMask]:
        """The ``attention_mask`` argument of the next forward, whose ``Q`` new tokens per row are valid where
        ``new_valid (B, Q)`` is; records them as the rows' next columns."""
        start = self.length
        self.valid = torch.cat([self.valid, new_valid.to(torch.bool)], dim=1)
        return {"full_attention": GroupMask(self, start)}

    def promote(self, fresh: torch.Tensor) -> None:
        """After a prefill: the rows ``fresh (B,)`` bool (rows without a prefix that several requests read)
        become groups of their own, their columns so far the group's prefix (the fork then shares it
        between the rows that read it)."""
        rows = fresh.nonzero()[:, 0]
        if len(rows) == 0:
            return
        width = self.length
        old = len(self.prefixes)
        new_width = max(width, self.prefix_valid.shape[1])
        pad = new_width - self.prefix_valid.shape[1]
        prefix_valid = torch.cat([self.prefix_valid.new_zeros((old, pad)), self.prefix_valid], dim=1)
        added_valid = torch.cat([self.valid.new_zeros((len(rows), new_width - width)), self.valid[rows]], dim=1)
        self.prefix_valid = torch.cat([prefix_valid, added_valid])
        for layer in self.layers:
            parts_k, parts_v = [], []
            if layer.prefix_keys is not None:
                shape = (old, layer.keys.shape[1], pad, layer.keys.shape[3])
                parts_k += [torch.cat([layer.keys.new_zeros(shape), layer.prefix_keys], dim=2)]
                parts_v += [torch.cat([layer.values.new_zeros(shape), layer.prefix_values], dim=2)]
            shape = (len(rows), layer.keys.shape[1], new_width - width, layer.keys.shape[3])
            parts_k.append(torch.cat([layer.keys.new_zeros(shape), layer.keys[rows, :, :width]], dim=2))
            parts_v.append(torch.cat([layer.values.new_zeros(shape), layer.values[rows, :, :width]], dim=2))
            layer.prefix_keys, layer.prefix_values = torch.cat(parts_k), torch.cat(parts_v)
        group = self.group.clone()
        group[rows] = torch.arange(old, old + len(rows), device=group.device)
        self.group = group
        self.prefixes = [*self.prefixes, *(self._shared(old + i) for i in range(len(rows)))]
        if bool(fresh.all()):  # nothing of the rows' own is left: start their columns afresh
            self.valid = self.valid[:, :0]
            for layer in self.layers:
                layer.keys, layer.values, layer.length = layer.keys[:, :, :0], layer.values[:, :, :0], 0
        else:
            self.valid = self.valid & ~fresh[:, None]
        self._index_groups()

    def _shared(self, index: int) -> SharedPrefix:
        """Group ``index``'s prefix as views of the prefix tensors (its columns in use: the last ones)."""
        start = int((~self.prefix_valid[index]).sum())
        return SharedPrefix([(layer.prefix_keys[index, :, start:], layer.prefix_values[index, :, start:])
                             for layer in self.layers])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps rows ``indices`` (in that order, repeats allowed: the fork); groups no row reads are dropped."""
        self.valid = self.valid[indices]
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[indices], layer.values[indices]
        group = self.group[indices]
        live = sorted(set(group.tolist()) - {-1})
        if len(live) < len(self.prefixes):
            keep = torch.tensor(live, dtype=torch.long, device=group.device)
            renumber = torch.full((len(self.prefixes) + 1,), -1, dtype=torch.long, device=group.device)
            renumber[keep] = torch.arange(len(live), device=group.device)
            group = renumber[group]  # -1 reads the last entry, itself -1
            self.prefixes = [self.prefixes[g] for g in live]
            self.prefix_valid = self.prefix_valid[keep]
            for layer in self.layers:
                if layer.prefix_keys is not None:
                    layer.prefix_keys, layer.prefix_values = layer.prefix_keys[keep], layer.prefix_values[keep]
        self.group = group
        self._index_groups()

    def kept(self, row: int) -> tuple[SharedPrefix | None, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Row ``row``'s group prefix and its own tokens per layer ``(H_kv, L, d)`` (pads dropped)."""
        held = self.valid[row]
        own = [(layer.keys[row, :, : self.length][:, held], layer.values[row, :, : self.length][:, held])
               for layer in self.layers]
        g = int(self.group[row])
        return (self.prefixes[g] if g >= 0 else None), own


class GroupMask:
    """What the text decoder's attention reads in one forward of a `GroupCache`: the cache, and which keys
    each new token sees."""

    def __init__(self, cache: GroupCache, start: int) -> None:
        self.cache = cache
        length = cache.length
        # The split pays where a group has rows to share its prefix; a chunk, or a batch of groups of one
        # row (nothing shared), takes the fused kernel.
        self.split = length - start == 1 and cache.group_size > 1
        self.bias: torch.Tensor | None = None
        self.causal = False
        if not self.split and not cache.prefixes and (start == 0 or length - start == 1) and bool(cache.valid.all()):
            # No pads and no prefix: a whole prompt is plainly causal, a decode step sees every column, so the
            # kernel needs no mask (and skips the blocks above the diagonal).
            self.causal = start == 0 and length > 1
            return
        if length - start == 1:  # decode: the new token is valid and the last column
            own = cache.valid[:, None, :]
        else:  # valid own columns up to the token's own, and its own (a pad's too)
            col = torch.arange(length, device=cache.valid.device)
            new = torch.arange(start, length, device=cache.valid.device)[:, None]
            own = (cache.valid[:, None, :] & (col <= new)) | (col == new)  # (B, Q, L)
        own_bias = _bias(own[:, None])  # (B, 1, Q, L), additive: SDPA would convert a bool mask per call
        if self.split:
            self.own_bias = own_bias  # (B, 1, 1, L): kv heads, folded heads
        elif cache.prefixes:
            prefix = cache.row_prefix_bias[:, None, None, :].expand(-1, 1, own.shape[1], -1)
            self.bias = torch.cat([prefix, own_bias], dim=3)  # (B, 1, Q, L_p + L)
        else:
            self.bias = own_bias

    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """``(B, Q, H, d)`` attention output of ``query (B, H, Q, d)`` over each row's group prefix and its
        own columns ``key``/``value (B, H_kv, L, d)``."""
        layer = self.cache.layers[module.layer_idx]
        if self.split:
            return self._decode(layer, query, key, value, scaling).transpose(1, 2)
        # Many queries per row are matrix products already, and a group of one row shares nothing: the fused
        # kernel reads the group's prefix gathered in front of the row's own columns.
        if layer.prefix_keys is not None:
            rows = self.cache.group.clamp(min=0)
            key = torch.cat([layer.prefix_keys[rows], key], dim=2)
            value = torch.cat([layer.prefix_values[rows], value], dim=2)
        gqa = _masked_gqa_kernel(query.device)
        if not gqa and query.shape[1] != key.shape[1]:
            rep = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        mask = None if self.bias is None else self.bias.to(query.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=self.causal, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2)

    def _decode(self, layer: GroupLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                scaling: float) -> torch.Tensor:
        """One new token per row, ``(B, H, 1, d)``: the split of the module docstring."""
        batch, heads, _, dim = query.shape
        kv_heads = key.shape[1]
        rep = heads // kv_heads
        folded = query.reshape(batch, kv_heads, rep, dim)  # head h = kv * rep + r reads kv head kv
        own_max, own_sum, own_out = _part(folded, key, value, self.own_bias, scaling)
        if layer.prefix_keys is None:
            return (own_out / own_sum).to(query.dtype).view(batch, heads, 1, dim)
        cache = self.cache
        groups, size = len(cache.prefixes), cache.group_size
        # The rep queries of each of a group's slots against its one prefix: (P, H_kv, G_max * rep, d).
        grouped = folded[cache.members].view(groups, size, kv_heads, rep, dim).transpose(1, 2)
        grouped = grouped.reshape(groups, kv_heads, size * rep, dim)
        parts = _part(grouped, layer.prefix_keys, layer.prefix_values, cache.prefix_bias[:, None, None, :], scaling)
        # Back to rows: (P, H_kv, G_max * rep, x) -> (B, H_kv, rep, x).
        prefix_max, prefix_sum, prefix_out = (
            t.view(groups, kv_heads, size, rep, -1).transpose(1, 2).reshape(groups * size, kv_heads, rep, -1)[
                cache.slot_read]
            for t in parts)
        if not cache.all_have_prefix:  # a row without a group has an empty part 1
            prefix_max = prefix_max.masked_fill(~cache.has_prefix.view(-1, 1, 1, 1), float("-inf"))
        top = torch.maximum(own_max, prefix_max)
        own_scale, prefix_scale = (own_max - top).exp_(), (prefix_max - top).exp_()
        out = (own_out * own_scale + prefix_out * prefix_scale) / (own_sum * own_scale + prefix_sum * prefix_scale)
        return out.to(query.dtype).view(batch, heads, 1, dim)


def _part(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
          scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One part of a split softmax: ``(m, z, o)`` with ``m = max s``, ``z = sum exp(s - m)`` and
    ``o = exp(s - m) V`` (unnormalised) for ``s = q K^T scaling + bias``, in float32 at least (a bf16
    model's scores and sums are float32, as in its own attention's softmax)."""
    exact = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query, key.transpose(2, 3)).to(exact).mul_(scaling).add_(bias)
    top = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(top).exp_()
    return top, weights.sum(dim=-1, keepdim=True), torch.matmul(weights.to(value.dtype), value).to(exact)


def _masked_gqa_kernel(device: torch.device) -> bool:
    """Whether SDPA's fused kernels on ``device`` take grouped-query heads with a mask: CPU's do; CUDA's would
    fall back to the unfused kernel (as transformers' own sdpa path knows), so there the key/value heads
    are repeated instead."""
    return device.type == "cpu"


def _left_padded(parts: Sequence[torch.Tensor | None], width: int) -> torch.Tensor | None:
    """``parts`` (each ``(H_kv, L_i, d)`` or ``None``: nothing) stacked as ``(n, H_kv, width, d)``, each part in
    the last ``L_i`` columns; ``None`` when no part is given."""
    like = next((p for p in parts if p is not None), None)
    if like is None:
        return None
    out = like.new_zeros((len(parts), like.shape[0], width, like.shape[2]))
    for row, part in enumerate(parts):
        if part is not None:
            out[row, :, width - part.shape[1] :] = part
    return out


def _bias(allowed: torch.Tensor) -> torch.Tensor:
    """0 where ``allowed``, ``-inf`` elsewhere (float32: scores are summed in float32)."""
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _group_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``ATTENTION``: only for forwards over a `GroupCache`."""
    if not isinstance(attention_mask, GroupMask):
        raise TypeError(f"Expects the {ATTENTION!r} attention to run with a GroupMask from GroupCache.mask, "
                        f"actual mask: {type(attention_mask).__name__}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attention_mask.attend(module, query, key, value, scale), None


AttentionInterface.register(ATTENTION, _group_attention)


@contextlib.contextmanager
def group_attention(model: Any) -> Iterator[None]:
    """Within: ``model``'s text decoder attends with `GroupMask`s (its vision tower is unchanged)."""
    from zoomgym.agents.models.qwen import _rope_index_owner

    config = _rope_index_owner(model).language_model.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


__all__ = ["ATTENTION", "GroupCache", "GroupLayer", "GroupMask", "SharedPrefix", "group_attention"]
