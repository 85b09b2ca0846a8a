"""The generation-engine interface shared by every backend.

A backend turns token-id prompts (plus the images their ``<|image_pad|>`` runs stand for) into sampled
token ids with their sampling-time log-probs. Nothing here re-tokenises text: prompts arrive as ids and
generations leave as ids; text is decoded only to detect stop strings.

Log-prob semantics (one definition for every backend and the trainer)::

    sampling_logprob(token_t) = log softmax(logits_t / T)[token_t],   T = temperature if > 0 else 1

over the vocabulary without the image/video placeholder and vision marker ids (`placeholder_ids`: their logits are set to
``-inf`` at sampling and in training alike; a sampled placeholder would claim image features that do not
exist). Top-p changes which tokens may be *drawn*, never the reported log-prob. The
trainer evaluates ``log softmax(logits / T)`` on the same tokens, so PPO's ratio compares the same
distribution on both sides (exactly 1 on the first epoch when sampler and trainer share weights).

Stop rules (checked on the decoded text of the turn's generated tokens, after every token; the token
that completes a stop is kept whole, with its log-prob):

* a sampled token in ``stop_token_ids`` (end of turn, e.g. ``<|im_end|>``): ``finish_reason="eos"``;
* any string of ``stop`` appears in the text: ``finish_reason="stop"``;
* ``stop_after_block = (open, close)``: ``close`` appears after the first ``open`` (with the default
  ```` ("```json", "```") ```` the turn ends at the closing fence of the first JSON block, the point
  where the env has everything it reads): ``finish_reason="stop"``;
* ``max_new_tokens`` tokens were generated: ``finish_reason="length"``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image

FinishReason = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How each turn is sampled.

    Attributes:
        temperature: softmax temperature; ``0`` means greedy (argmax; log-probs then use ``T = 1``).
        top_p: nucleus sampling mass in ``(0, 1]``; affects which tokens can be drawn, not log-probs.
        max_new_tokens: per-turn cap on generated tokens (a context budget may lower it further).
        stop: plain stop strings.
        stop_after_block: ``(open, close)``: stop once ``close`` follows the first ``open``; ``None`` off.
        stop_token_ids: end-of-turn ids; empty means "the agent fills in its adapter's end-of-turn ids".
        seed: base seed; with a seed, every episode's draws are reproducible and independent of batching.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    stop: tuple[str, ...] = ()
    stop_after_block: tuple[str, str] | None = ("```json", "```")
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"Expects temperature >= 0, actual: {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"Expects top_p in (0, 1], actual: {self.top_p!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"Expects max_new_tokens >= 1, actual: {self.max_new_tokens!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        if self.stop_after_block is not None:
            if len(self.stop_after_block) != 2 or not all(self.stop_after_block):
                raise ValueError(
                    f"Expects stop_after_block = (open, close) of non-empty strings, actual: {self.stop_after_block!r}"
                )
            object.__setattr__(self, "stop_after_block", tuple(self.stop_after_block))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """The ``T`` of the log-prob definition: the sampling temperature, or 1 for greedy decoding."""
        return self.temperature if self.temperature > 0.0 else 1.0


@dataclass
class GenerationRequest:
    """One prompt of a batch.

    Attributes:
        prompt_ids: the whole conversation so far as ids, ending with the assistant header.
        images: the images whose ``<|image_pad|>`` runs appear in ``prompt_ids``, in order, at shown size.
        max_new_tokens: cap for this request (``min`` of the per-turn cap and the context room left).
        seed: seed of this request's draws (``None``: the backend's global RNG).
        forced_ids: teacher forcing: score these ids instead of sampling (their log-probs under the
            same definition; no stop rules; ``finish_reason`` is ``"eos"`` if the last one is a stop
            token, else ``"length"``). For likelihood scoring and scripted replays of model turns.
        cache_key: the conversation this prompt belongs to (the rollout engine: its episode, a key unique
            to the run), for backends that keep KV caches between calls (hf). Such a backend prefills the
            keyed prompts of one call that are identical (ids and images: a group's first turn) once,
            keeps each conversation's cache after its turn, and in the next call prefills only what was
            appended to a kept prefix (same ids, same images). ``None``: prefilled whole, nothing kept.
            A key must not be reused after the weights change.
    """

    prompt_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)
    max_new_tokens: int = 1024
    seed: int | None = None
    forced_ids: list[int] | None = None
    cache_key: Hashable | None = None


@dataclass
class Generation:
    """What a backend sampled for one request.

    Attributes:
        token_ids: the sampled ids, the stopping token included (``T`` of them).
        logprobs: ``T`` sampling log-probs, see the module docstring for the definition.
        finish_reason: ``"eos"`` (a stop token was sampled and is the last id), ``"stop"`` (a stop string
            ends in the last token) or ``"length"``.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


@runtime_checkable
class Backend(Protocol):
    """A generation engine. ``weight_version`` is the version of the weights it samples with.

    Capabilities, read by the agent and the trainer instead of the backend's name:

    * ``shares_model``: it samples with the trainer's model object itself, so a weight sync only stamps
      the version (and LoRA adapters need no merge);
    * ``logprobs_match_trainer``: its sampling log-probs equal the trainer's recomputation to float
      rounding, so they serve as the PPO old log-probs (no scoring forward);
    * ``can_sleep``: ``sleep()`` releases its accelerator memory while the trainer updates.

    A backend is registered in `agents.backends.BACKENDS` and built by its classmethod
    ``from_pretrained(path, *, model, adapter, dtype, max_images, max_context_tokens, seed, **settings)``
    (``model``: the trainer's loaded copy; ``max_images``: the env's image budget per episode;
    ``settings``: its own config section, ``rollout.<name>``).
    """

    weight_version: int
    shares_model: bool
    logprobs_match_trainer: bool
    can_sleep: bool

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        """Samples one continuation per request (one turn each)."""
        ...

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        """Replaces the weights in place with the trainer's and records their version."""
        ...

    def sleep(self) -> None:
        """Releases accelerator memory (weights and caches) while the trainer runs."""
        ...

    def wake_up(self) -> None:
        """Restores what ``sleep`` released."""
        ...

    def close(self) -> None:
        """Shuts the engine down (the backend is not used again)."""
        ...


def stop_reached(text: str, sampling: SamplingParams) -> bool:
    """Whether the generated text of a turn satisfies a stop-string rule of ``sampling``."""
    if any(s in text for s in sampling.stop):
        return True
    if sampling.stop_after_block is not None:
        open_marker, close_marker = sampling.stop_after_block
        start = text.find(open_marker)
        return start >= 0 and text.find(close_marker, start + len(open_marker)) >= 0
    return False


class StopWatcher:
    """Checks the stop-string rules of one turn as tokens arrive, decoding only a short tail per token.

    Decoding the whole turn after every token costs ``O(T^2)`` over a turn of ``T`` tokens. Instead the
    text is grown incrementally: with ``prefix`` and ``read`` token offsets, ``decode(ids[prefix:])``
    minus ``decode(ids[prefix:read])`` is the text the new token adds (``ids[prefix:read]`` gives the
    byte-level BPE decoder the context it needs); while that text ends in an incomplete character
    (``"\ufffd"``) or adds nothing (a skipped special token) it is held back until the next token.
    The grown text equals ``decode(ids)`` whenever a character is complete, so ``add`` reports the rule
    at the same token as ``stop_reached(decode(ids), sampling)`` would.

    Args:
        sampling: the stop rules.
        decode: ids -> text (special tokens skipped).
    """

    def __init__(self, sampling: SamplingParams, decode: Callable[[Sequence[int]], str]) -> None:
        self.sampling, self.decode = sampling, decode
        self.ids: list[int] = []
        self.text = ""
        self.prefix = self.read = 0

    def add(self, token_id: int) -> bool:
        """Appends one generated id; whether the turn's text now meets a stop-string rule."""
        self.ids.append(int(token_id))
        context = self.decode(self.ids[self.prefix : self.read])
        grown = self.decode(self.ids[self.prefix :])
        if len(grown) <= len(context) or grown.endswith("\ufffd"):
            return False
        self.text += grown[len(context) :]
        self.prefix, self.read = self.read, len(self.ids)
        # String search over the turn's text is cheap next to decoding it; the rule stays exact.
        return stop_reached(self.text, self.sampling)


def decode_text(adapter: Any, token_ids: Sequence[int]) -> str:
    """The text of generated ids as the env reads it (special tokens such as ``<|im_end|>`` dropped)."""
    return adapter.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def placeholder_ids(adapter: Any) -> tuple[int, ...]:
    """Ids the model may never emit: the image and video placeholders (``<|image_pad|>``, ``<|video_pad|>``)
    and the vision block markers (``<|vision_start|>``, ``<|vision_end|>``): only the env's turns hold
    images, and a sampled marker would open a vision block that rope indices keyed on it misread."""
    return (int(adapter.image_pad_id), int(adapter.video_pad_id), int(adapter.vision_start_id),
            int(adapter.vision_end_id))


def has_stop_strings(sampling: SamplingParams) -> bool:
    return bool(sampling.stop) or sampling.stop_after_block is not None


def finish(
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    sampling: SamplingParams,
    decode: Callable[[Sequence[int]], str],
) -> Generation:
    """Cuts a raw continuation at the first stop, keeping the stopping token whole.

    Backends that cannot evaluate our stop rules inside the engine (vLLM has no "after a block" rule)
    generate on and apply this afterwards. Cutting is exact: tokens before the cut were sampled from
    the same conditionals whether or not generation went on.

    Args:
        token_ids: sampled ids of one turn (possibly running past a stop).
        logprobs: their sampling log-probs, same length.
        sampling: the stop rules.
        decode: ids -> text (special tokens skipped), used on prefixes of ``token_ids``.
    """
    eos = set(sampling.stop_token_ids)
    cut = len(token_ids)
    reason: FinishReason = "length"
    for t, tok in enumerate(token_ids):
        if tok in eos:
            cut, reason = t + 1, "eos"
            break
    if has_stop_strings(sampling):
        # The rules are monotone in the prefix (once met, met for every longer prefix), so the
        # first token that meets them is found by bisection over prefix lengths: O(log T) decodes.
        if stop_reached(decode(token_ids[:cut]), sampling):
            lo, hi = 1, cut
            while lo < hi:
                mid = (lo + hi) // 2
                if stop_reached(decode(token_ids[:mid]), sampling):
                    hi = mid
                else:
                    lo = mid + 1
            if reason != "eos" or lo < cut:
                cut, reason = lo, "stop"
    return Generation(token_ids=list(token_ids[:cut]), logprobs=[float(x) for x in logprobs[:cut]], finish_reason=reason)
