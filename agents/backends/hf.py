"""The transformers backend (CPU and GPU): our own batched sampling loop over the model's forward.

Why not ``model.generate``: we need the sampling log-prob of every token under one documented
definition (``log softmax(logits / T)``, see `agents.backends.base`), per-row stop rules on decoded
text, per-row seeds whose draws do not depend on who else is in the batch, and explicit M-RoPE
positions. A short loop over the forward with a KV cache does all of that exactly.

One turn of a batch:

1. prefill: prompts are **left**-padded to a common length; ``position_ids (3, B, L)`` come from the
   model's own rope index computed with the attention mask (pads get no positions and are never
   attended), so each row's positions equal those of the same prompt alone;
2. decode: row ``i``'s ``k``-th new token sits at text position ``next_pos[i] + k`` on all three M-RoPE
   axes, where ``next_pos[i] = max(prompt positions of row i) + 1``; rows that finish leave the batch
   and the KV cache (``Cache.batch_select_indices``).

Draws: greedy is argmax; otherwise ``p = softmax(logits / T)``, truncated to the smallest set of
tokens whose mass reaches ``top_p`` and renormalised, drawn with the row's own ``torch.Generator``
(seeded from the request), so a seeded episode samples the same tokens alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from zoomgym.agents.backends.base import (
    Generation,
    GenerationRequest,
    SamplingParams,
    StopWatcher,
    decode_text,
    has_stop_strings,
    placeholder_ids,
)
from zoomgym.agents.models.unique_images import unique_image_inputs, with_image_features
from zoomgym.agents.scoring import next_token_logprobs


def sample_next(
    logp: torch.Tensor, sampling: SamplingParams, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Draws one token per row from ``logp = next_token_logprobs(...)`` of shape ``(b, V)``.

    Greedy takes the argmax; otherwise ``p = exp(logp)`` is cut to the smallest top set whose mass
    reaches ``top_p``, renormalised, and drawn with the row's generator (``None``: the global RNG).
    """
    if sampling.greedy:
        return logp.argmax(dim=-1)
    probs = logp.exp()
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p (the top token is always kept).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= sampling.top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])


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
        out: list[Generation] = []
        for start in range(0, len(requests), step):
            out += self._generate_batch(requests[start : start + step], sampling)
        return out

    @torch.no_grad()
    def _generate_batch(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        if not requests:
            return []
        self.model.eval()
        device = self.device
        n = len(requests)
        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((n, width), self.adapter.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(requests):
            input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attention_mask[i, width - len(r.prompt_ids) :] = 1
        pixels = unique_image_inputs(self.adapter, [im for r in requests for im in r.images])
        pixels = {k: v.to(device) for k, v in pixels.items()}
        inputs = self.adapter.forward_kwargs(
            self.model, input_ids.to(device), attention_mask.to(device), **pixels
        )
        next_pos = inputs["position_ids"].amax(dim=(0, 2)) + 1  # (n,): first free text position per row
        out = self.model(**with_image_features(self.model, inputs), use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1]
        attention_mask = inputs["attention_mask"]

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
            new_logp = logp.gather(-1, new[:, None])[:, 0]
            keep: list[int] = []
            for row, i in enumerate(active):
                forced = requests[i].forced_ids
                tok = int(new[row])
                tokens[i].append(tok)
                logprobs[i].append(float(new_logp[row]))
                limit = requests[i].max_new_tokens if forced is None else min(len(forced), requests[i].max_new_tokens)
                if tok in eos:
                    reasons[i] = "eos"
                elif watchers[i] is not None and watchers[i].add(tok):
                    reasons[i] = "stop"
                elif len(tokens[i]) < limit:
                    keep.append(row)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention_mask, next_pos, new = attention_mask[index], next_pos[index], new[index]
                active = [active[row] for row in keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
            position_ids = (next_pos + step).view(1, -1, 1).expand(3, -1, -1)
            out = self.model(
                input_ids=new[:, None],
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            cache, logits = out.past_key_values, out.logits[:, -1]
            step += 1
        return [Generation(t, lp, r) for t, lp, r in zip(tokens, logprobs, reasons)]  # type: ignore[arg-type]

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        """Copies the trainer's tensors into the model in place (a no-op copy when they are shared)."""
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
        """Frees the CUDA caching allocator's unused blocks; the HF model shares its weights with training."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        """Nothing to restore: ``sleep`` kept the weights in place."""


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
