"""The transformers backend (CPU and GPU): our own batched sampling loop over the model's forward.

Why not ``model.generate``: we need the sampling log-prob of every token under one documented
definition (``log softmax(logits / T)``, see `agents.backends.base`), per-row stop rules on decoded
text, per-row seeds whose draws do not depend on who else is in the batch, explicit M-RoPE positions,
and KV caches that outlive a call. A short loop over the forward with a KV cache does all of that exactly.

One turn of a batch:

1. prefill: each request's prompt is split into a kept prefix (the KV cache its conversation left in
   the previous call, see below) and the ids after it; keyed prompts that are identical and have no
   kept prefix (the G rollouts of a group in their first turn) become one row. The rows' new ids are
   **left**-padded to a common length, pads masked out. ``position_ids (3, B, L)`` of the new ids
   come from the model's own rope index over them alone, computed with the attention mask (pads get
   no positions), shifted by the kept prefix's next position; each text run and image of the rope
   index starts where the last one ended, so these are exactly the positions of the whole prompt;
2. fork: a row that several requests read (a group's first prompt) becomes that group's **shared
   prefix**, stored once and read by each of its requests (`agents.backends.cascade`), never copied G
   ways; any other row keeps its tokens as its own;
3. decode: row ``i``'s ``k``-th new token sits at text position ``next_pos[i] + k`` on all three M-RoPE
   axes, where ``next_pos[i] = max(prompt positions of row i) + 1``; rows that finish leave the batch
   and the cache.

The cache (`agents.backends.cascade.GroupCache`) holds per layer each group's shared prefix once and
each row's own tokens (its generated tokens and what its later turns appended) in a buffer whose
capacity doubles; a decode step attends to the two parts apart, the queries of a group's rows batched
against their one prefix, and merges them exactly (log-sum-exp). Only the text decoder's attention is
switched, for the generation forwards alone; the vision tower and the training forward
(`agents.scoring`) keep the model's own attention and numerics. A model with sliding-window layers
takes the plain path instead: a ``DynamicCache`` with a padding mask, nothing kept.

Kept caches: when a keyed request finishes, its group's prefix (the same object for the whole group) and
its own keys and values (pads dropped) are kept under its ``cache_key`` with the ids they hold (the
prompt and the generated tokens but the last, which was never fed) and the next position. The next
call's request with that key reuses them if its prompt extends those ids with the same images, and
prefills only what the rollout engine appended (the last token, the env's reply, a crop); requests that
kept the same prefix form a group again, so a group's first prompt is stored and read once in every
turn. A kept cache serves the next call only; ``load_weights`` and ``sleep`` drop them all, so no cache
computed with old weights is ever read.

Draws: greedy is argmax; otherwise ``p = softmax(logits / T)``, truncated to the smallest set of
tokens whose mass reaches ``top_p`` and renormalised, drawn with the row's own ``torch.Generator``
(seeded from the request), so a seeded episode samples the same tokens alone or in any batch.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from zoomgym.agents.backends.base import (
    Generation,
    GenerationRequest,
    SamplingParams,
    StopWatcher,
    decode_text,
    has_stop_strings,
    placeholder_ids,
)
from zoomgym.agents.backends.cascade import GroupCache, SharedPrefix, group_attention
from zoomgym.agents.models.unique_images import unique_image_inputs, with_image_features
from zoomgym.agents.scoring import next_token_logprobs


def sample_next(
    logp: torch.Tensor, sampling: SamplingParams, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Draws one token per row from ``logp = next_token_logprobs(...)`` of shape ``(b, V)``.

    Greedy takes the argmax; otherwise ``p = exp(logp)`` is cut to the smallest top set whose mass
    reaches ``top_p``, renormalised, and drawn with the row's generator (``None``: the global RNG).

    The draw is ``torch.multinomial(p_i, 1, generator=g_i)`` row by row, computed as torch computes it
    (``argmax(p_i / q_i)`` with ``q_i ~ Exp(1)`` drawn by ``g_i`` over the vocabulary, the Gumbel-max
    trick): the same tokens from the same generator states, with only the exponential draws per row
    and the division and argmax batched.
    """
    if sampling.greedy:
        return logp.argmax(dim=-1)
    probs = logp.exp()
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p (the top token is always kept).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= sampling.top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    noise = torch.empty_like(probs)
    for row, generator in zip(noise, generators):
        row.exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


class HFBackend:
    """Batched generation with a transformers Qwen-VL model: the trainer's own model object.

    Capabilities (`agents.backends.base.Backend`): it shares the trainer's model (a weight sync only
    stamps the version, LoRA adapters sample as they are); its log-probs are the trainer's when the
    model computes in float32 (the same forward, so the sampler's numbers serve as old log-probs);
    ``sleep`` hands the CUDA allocator's cached blocks back (the weights stay).

    Args:
        model: a ``*ForConditionalGeneration`` model (eval mode is set here).
        adapter: the model's adapter (``agents.models``): pad/image ids, image tensors, rope index, decode.
        max_batch_size: requests per forward batch (``None``: all at once).
    """

    shares_model = True
    can_sleep = True

    def __init__(self, model: Any, adapter: Any, max_batch_size: int | None = None) -> None:
        self.model = model
        self.adapter = adapter
        self.max_batch_size = max_batch_size
        self.weight_version = 0
        self._kept: dict[Hashable, _Kept] = {}  # conversation key -> its KV cache after the last call

    @classmethod
    def from_pretrained(cls, path: str, *, model: Any, adapter: Any, dtype: str, max_images: int,
                        max_context_tokens: int | None = None, seed: int = 0,
                        max_batch_size: int | None = None) -> HFBackend:
        """The backend over the agent's loaded ``model`` (`agents.backends.BACKENDS` builds every backend
        with these arguments). The model already carries ``path`` and ``dtype``; this loop sizes nothing
        in advance (``max_images``, ``max_context_tokens``) and seeds per request (``seed``)."""
        return cls(model, adapter, max_batch_size=max_batch_size)

    @property
    def logprobs_match_trainer(self) -> bool:
        """True in float32: sampling and training run the same forward (bf16 kernels differ by ~1e-3)."""
        return next(self.model.parameters()).dtype == torch.float32

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        step = self.max_batch_size or max(1, len(requests))
        # The caches kept by the previous call serve this one only; this call keeps its own.
        kept, self._kept = self._kept, {}
        out: list[Generation] = []
        for start in range(0, len(requests), step):
            out += self._generate_batch(requests[start : start + step], sampling, kept)
        return out

    @torch.no_grad()
    def _generate_batch(self, requests: Sequence[GenerationRequest], sampling: SamplingParams,
                        kept: dict[Hashable, _Kept]) -> list[Generation]:
        if not requests:
            return []
        self.model.eval()
        device = self.device
        n = len(requests)
        prefills, source = _plan_prefills(requests, kept)
        width = max(len(p.ids) for p in prefills)
        input_ids = torch.full((len(prefills), width), self.adapter.pad_id, dtype=torch.long)
        new_mask = torch.zeros((len(prefills), width), dtype=torch.long)
        for row, p in enumerate(prefills):
            input_ids[row, width - len(p.ids) :] = torch.tensor(p.ids, dtype=torch.long)
            new_mask[row, width - len(p.ids) :] = 1
        pixels = unique_image_inputs(self.adapter, [im for p in prefills for im in p.images])
        pixels = {k: v.to(device) for k, v in pixels.items()}
        new_mask = new_mask.to(device)
        inputs = self.adapter.forward_kwargs(self.model, input_ids.to(device), new_mask, **pixels)
        offset = torch.tensor([0 if p.past is None else p.past.next_position for p in prefills], device=device)
        next_pos = inputs["position_ids"].amax(dim=(0, 2)) + 1 + offset  # (rows,): first free text position
        inputs["position_ids"] = inputs["position_ids"] + offset.view(1, -1, 1)  # pads too: they are masked
        inputs = with_image_features(self.model, inputs)
        rows = _PlainRows(self.model) if _has_sliding_layers(self.model) else _GroupRows(self.model, prefills, device)
        with rows.attending():  # the text decoder's attention switched for this batch's forwards only
            inputs["attention_mask"] = rows.mask(new_mask)
            logits = rows.forward(**inputs, logits_to_keep=1)
            index = torch.tensor(source, device=device)  # fork the shared rows
            reads = Counter(source)
            rows.fork(index, torch.tensor([p.past is None and reads[row] > 1 for row, p in enumerate(prefills)],
                                          device=device))
            logits, next_pos = logits[index], next_pos[index]

            generators = [_generator(r.seed, device) for r in requests]
            tokens: list[list[int]] = [[] for _ in requests]
            logprobs: list[list[float]] = [[] for _ in requests]
            reasons: list[str] = ["length"] * n
            eos = set(sampling.stop_token_ids)
            banned = placeholder_ids(self.adapter)
            watchers = [
                StopWatcher(sampling, lambda ids: decode_text(self.adapter, ids))
                if has_stop_strings(sampling) and r.forced_ids is None
                else None
                for r in requests
            ]
            active = list(range(n))  # request index of each row still in the batch
            step = 0
            while active:
                logp = next_token_logprobs(logits, sampling.logprob_temperature, banned)
                new = sample_next(logp, sampling, [generators[i] for i in active])
                for row, i in enumerate(active):
                    if requests[i].forced_ids is not None:
                        new[row] = requests[i].forced_ids[step]
                new_logp = logp.gather(-1, new[:, None])[:, 0].tolist()
                keep: list[int] = []
                for row, (i, tok) in enumerate(zip(active, new.tolist())):
                    forced = requests[i].forced_ids
                    tokens[i].append(tok)
                    logprobs[i].append(new_logp[row])
                    limit = requests[i].max_new_tokens if forced is None else min(len(forced), requests[i].max_new_tokens)
                    if tok in eos:
                        reasons[i] = "eos"
                    elif watchers[i] is not None and watchers[i].add(tok):
                        reasons[i] = "stop"
                    elif len(tokens[i]) < limit:
                        keep.append(row)
                        continue
                    if rows.keeps and requests[i].cache_key is not None:
                        # The row holds the prompt and the `step` tokens fed so far (not the one just drawn).
                        prefix, own = rows.cache.kept(row)
                        self._kept[requests[i].cache_key] = _Kept(
                            ids=[*requests[i].prompt_ids, *tokens[i][:-1]],
                            images=list(requests[i].images),
                            next_position=int(next_pos[row]) + step,
                            prefix=prefix,
                            layers=own,
                        )
                if not keep:
                    break
                if len(keep) < len(active):
                    index = torch.tensor(keep, device=device)
                    rows.select(index)
                    next_pos, new = next_pos[index], new[index]
                    active = [active[row] for row in keep]
                position_ids = (next_pos + step).view(1, -1, 1).expand(3, -1, -1)
                logits = rows.forward(
                    input_ids=new[:, None],
                    attention_mask=rows.mask(torch.ones((len(active), 1), dtype=torch.long, device=device)),
                    position_ids=position_ids,
                )
                step += 1
            return [Generation(t, lp, r) for t, lp, r in zip(tokens, logprobs, reasons)]  # type: ignore[arg-type]

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        """Copies the trainer's tensors into the model in place (a no-op copy when they are shared) and
        drops the kept KV caches, computed with the old weights."""
        self._kept = {}
        params = dict(self.model.state_dict())
        unknown = [name for name in state_dict if name not in params]
        if unknown:
            raise ValueError(f"Expects state dict keys of the model, actual unknown keys: {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in state_dict.items():
                if params[name].data_ptr() != tensor.data_ptr():
                    params[name].copy_(tensor)
        self.weight_version = int(version)

    def sleep(self) -> None:
        """Drops the kept KV caches and frees the CUDA caching allocator's unused blocks; the HF model
        shares its weights with training."""
        self._kept = {}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        """Nothing to restore: ``sleep`` kept the weights in place."""

    def close(self) -> None:
        """Drops the kept KV caches; the model belongs to the trainer."""
        self._kept = {}


def _has_sliding_layers(model: Any) -> bool:
    """Whether a decoder layer attends within a sliding window (its cache holds the window only)."""
    return any(layer.is_sliding for layer in DynamicCache(config=model.config).layers)


class _GroupRows:
    """The rows of a batch over a `GroupCache` (each group's shared prefix once): the default path."""

    keeps = True

    def __init__(self, model: Any, prefills: Sequence[_Prefill], device: torch.device) -> None:
        self.model = model
        self.cache = GroupCache.for_prefill(
            [(None, None) if p.past is None else (p.past.prefix, p.past.layers) for p in prefills],
            model.config.get_text_config().num_hidden_layers, device)

    def mask(self, new_valid: torch.Tensor) -> dict[str, Any]:
        return self.cache.mask(new_valid)

    def attending(self) -> contextlib.AbstractContextManager[None]:
        return group_attention(self.model)

    def forward(self, **inputs: Any) -> torch.Tensor:
        """The last position's logits of a forward that extends the cache (inside `attending`)."""
        return self.model(**inputs, past_key_values=self.cache, use_cache=True).logits[:, -1]

    def fork(self, index: torch.Tensor, shared: torch.Tensor) -> None:
        """After the prefill: the rows that several requests read (``shared``: a group's first prompt) become
        their groups' prefixes, then each request reads row ``index[i]``."""
        self.cache.promote(shared)
        self.cache.batch_select_indices(index)

    def select(self, index: torch.Tensor) -> None:
        self.cache.batch_select_indices(index)


class _PlainRows:
    """The rows of a batch over a ``DynamicCache`` with a padding mask: models with sliding-window layers,
    whose caches are never kept (a window cannot be cut out and extended)."""

    keeps = False

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.attention_mask: torch.Tensor | None = None

    def mask(self, new_valid: torch.Tensor) -> torch.Tensor:
        past = self.attention_mask
        self.attention_mask = new_valid if past is None else torch.cat([past, new_valid], dim=1)
        return self.attention_mask

    def attending(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def forward(self, **inputs: Any) -> torch.Tensor:
        return self.model(**inputs, past_key_values=self.cache, use_cache=True).logits[:, -1]

    def fork(self, index: torch.Tensor, shared: torch.Tensor) -> None:
        self.select(index)

    def select(self, index: torch.Tensor) -> None:
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@dataclass
class _Kept:
    """The KV cache of one conversation after its turn, for its next turn to extend."""

    ids: list[int]  # the tokens it holds: the prompt and every generated token but the last (never fed)
    images: list[Any]  # the images among ``ids``, in order
    next_position: int  # the M-RoPE position of the token after ``ids``
    prefix: SharedPrefix | None  # the keys and values of its group's shared prefix (the same object in the group)
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # its own keys and values after it per layer, (heads, n, head_dim)

    def extended_by(self, request: GenerationRequest) -> bool:
        """Whether ``request``'s prompt is these ids and images with at least one token appended."""
        n = len(self.ids)
        return (len(request.prompt_ids) > n and request.prompt_ids[:n] == self.ids
                and same_images(self.images, request.images[: len(self.images)]))


@dataclass
class _Prefill:
    """One row of the prefill forward: a kept cache (or none) and the ids and images after it."""

    past: _Kept | None
    ids: list[int]
    images: list[Any]


def _plan_prefills(requests: Sequence[GenerationRequest],
                   kept: dict[Hashable, _Kept]) -> tuple[list[_Prefill], list[int]]:
    """The prefill rows of a batch and the row each request reads (``source``).

    A keyed request extends the cache its key kept (taken out of ``kept``) when its prompt extends that
    cache's ids and images; keyed requests without one share a row when their ids and images are equal;
    every other request is a row of its whole prompt.
    """
    prefills: list[_Prefill] = []
    source: list[int] = []
    fresh: dict[tuple[int, ...], list[int]] = {}  # prompt ids -> rows of keyed whole prompts
    for request in requests:
        past = kept.pop(request.cache_key, None) if request.cache_key is not None else None
        if past is not None and past.extended_by(request):
            source.append(len(prefills))
            prefills.append(_Prefill(past, request.prompt_ids[len(past.ids) :], request.images[len(past.images) :]))
            continue
        if request.cache_key is not None:
            rows = fresh.setdefault(tuple(request.prompt_ids), [])
            match = next((row for row in rows if same_images(prefills[row].images, request.images)), None)
            if match is not None:
                source.append(match)
                continue
            rows.append(len(prefills))
        source.append(len(prefills))
        prefills.append(_Prefill(None, list(request.prompt_ids), list(request.images)))
    return prefills, source


def same_images(first: Sequence[Any], second: Sequence[Any]) -> bool:
    """Whether two image lists hold the same pixels in order (the same objects, or equal size, mode and bytes)."""
    return len(first) == len(second) and all(
        a is b or (a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()) for a, b in zip(first, second)
    )
