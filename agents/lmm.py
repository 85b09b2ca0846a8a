"""`LMMAgent`: a Qwen-VL-family model that plays zoom envs and serves the trainer.

One object holds the training copy of the model (transformers), its processor, the model adapter
(chat layout as ids, special ids, rope index, view budget, coordinate frame) and a generation backend
(``hf``: the same model object; ``vllm``: a separate engine kept in sync with ``sync_weights``).

>>> agent = LMMAgent.from_pretrained("runs/tiny")                          # doctest: +SKIP
>>> env = gymnasium.make("zoomgym/ZoomEnv-v0", dataset=data,               # doctest: +SKIP
...                      view_budget=agent.view_budget, coord_frame=agent.coord_frame)
>>> trajectories = agent.rollout(data[:4], group_size=8,                  # doctest: +SKIP
...                              env="zoomgym/ZoomEnv-v0", sampling=SamplingParams(seed=0))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from zoomgym.agents.backends.base import (
    Backend,
    GenerationRequest,
    SamplingParams,
    decode_text,
    placeholder_ids,
)
from zoomgym.agents.backends.hf import next_token_logprobs
from zoomgym.agents.rollout import EnvSpec, run_rollouts
from zoomgym.agents.trajectory import MODEL_INPUTS, Trajectory, collate

GREEDY = SamplingParams(temperature=0.0)
"""Default sampling of `LMMAgent.act`: greedy decoding (the evaluation protocol)."""


class LMMAgent:
    """A multimodal policy: ``act`` for evaluation, ``rollout``/``collate``/``token_logprobs`` for training.

    Args:
        model: a transformers ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration``.
        processor: its image + text processor (``agents.models.load_processor``).
        adapter: the model adapter (``agents.models``).
        backend: a `Backend`; default: ``HFBackend`` over ``model``.
        sampling: how ``act`` samples (default greedy).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        adapter: Any,
        backend: Backend | None = None,
        sampling: SamplingParams = GREEDY,
    ) -> None:
        self.model = model
        self.processor = processor
        self.adapter = adapter
        self._view_budget = adapter.view_budget()
        if backend is None:
            from zoomgym.agents.backends.hf import HFBackend

            backend = HFBackend(model, adapter)
        self.backend = backend
        self.sampling = sampling
        self.weight_version = backend.weight_version

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike[str],
        backend: str = "hf",
        *,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        sampling: SamplingParams = GREEDY,
        **backend_kwargs: Any,
    ) -> LMMAgent:
        """Loads model, processor and adapter from a local folder (offline) or a hub id.

        Args:
            path_or_id: a ``save_pretrained`` folder (e.g. from ``zoomgym tiny-model``) or a hub id.
            backend: ``"hf"`` or ``"vllm"`` (the vLLM engine loads the same checkpoint; ``backend_kwargs``
                go to `agents.backends.vllm.VLLMBackend.from_pretrained`, e.g. ``max_turns=2``).
            dtype: the training copy's dtype (``"float32"``, ``"bfloat16"``, or a ``torch.dtype``).
            device: where the training copy lives.
            min_pixels, max_pixels: override the processor's view budget (then shared with the env
                through ``agent.view_budget``).
            sampling: how ``act`` samples.
        """
        from transformers import AutoModelForImageTextToText
        from zoomgym.agents.models import adapter_for, load_processor

        path = str(path_or_id)
        local = os.path.isdir(path)
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        try:
            # The processor first: it tells a missing folder from a hub id and reads the model type.
            processor = load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, local_files_only=local)
        except OSError as err:
            # transformers' message names neither the model nor the offline case (no network, no cache).
            raise OSError(
                f"Expects {path!r} to be a model folder or a hub id that is cached or downloadable, actual: "
                f"it could not be loaded ({err}). Offline (HF_HUB_OFFLINE=1, or no network), pass a local "
                "folder, e.g. one written by `zoomgym tiny-model OUT`."
            ) from err
        model = model.to(device).eval()
        adapter = adapter_for(model, processor)
        if backend == "hf":
            from zoomgym.agents.backends.hf import HFBackend

            engine: Backend = HFBackend(model, adapter, **backend_kwargs)
        elif backend == "vllm":
            from zoomgym.agents.backends.vllm import VLLMBackend

            engine = VLLMBackend.from_pretrained(path, adapter, **backend_kwargs)
        else:
            raise ValueError(f"Expects backend 'hf' or 'vllm', actual: {backend!r}")
        return cls(model, processor, adapter, engine, sampling)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Writes model and processor so that ``from_pretrained(path)`` rebuilds this agent."""
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    @property
    def view_budget(self) -> Any:
        """The `envs.views.ViewBudget` of the model's processor; build envs with ``view_budget=`` this."""
        return self._view_budget

    @property
    def coord_frame(self) -> str:
        """The coordinate frame the model writes boxes in (``"qwen25"`` for Qwen2.5-VL)."""
        return self.adapter.coord_frame

    def act(self, observations: Sequence[Any], infos: Sequence[Mapping[str, Any]]) -> list[str]:
        """One action text per observation (the whole conversation so far), sampled with ``self.sampling``.

        The `Agent` protocol is stateless, so earlier assistant turns are re-encoded from their text; use
        `rollout` for token-exact training data.
        """
        sampling = self.sampling
        if not sampling.stop_token_ids:
            sampling = dataclasses.replace(sampling, stop_token_ids=tuple(self.adapter.eos_ids))
        requests = [
            GenerationRequest(
                list(self.adapter.encode_prefix(chat)),
                self.adapter.message_images(chat),
                sampling.max_new_tokens,
                sampling.seed,
            )
            for chat in observations
        ]
        return [decode_text(self.adapter, g.token_ids) for g in self.backend.generate(requests, sampling)]

    def rollout(
        self,
        samples: Sequence[Any],
        group_size: int = 1,
        env: EnvSpec = "zoomgym/ZoomEnv-v0",
        sampling: SamplingParams | None = None,
        *,
        weight_version: int | None = None,
        context_budget: int | None = None,
        env_kwargs: Mapping[str, Any] | None = None,
        progress: bool | None = None,
    ) -> list[Trajectory]:
        """Plays ``group_size`` episodes per sample; see `agents.rollout.run_rollouts`.

        ``weight_version`` defaults to the version of the weights the backend holds.
        """
        return run_rollouts(
            self.backend,
            self.adapter,
            samples,
            group_size,
            env,
            sampling if sampling is not None else self.sampling,
            weight_version=self.backend.weight_version if weight_version is None else weight_version,
            context_budget=context_budget,
            env_kwargs=env_kwargs,
            progress=progress,
        )

    def collate(self, trajectories: Sequence[Trajectory]) -> dict[str, Any]:
        """Padded model inputs and targets of one training batch; see `agents.trajectory.collate`."""
        return collate(trajectories, self.adapter, self.model)

    def token_logprobs(
        self, batch: Mapping[str, Any], with_entropy: bool = False, temperature: float = 1.0, *, model: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs of a collated batch under the current weights (differentiable).

        ``logp[:, t] = log softmax(logits[:, t - 1] / temperature)[input_ids[:, t]]`` for ``t >= 1`` and 0
        at ``t = 0`` (placeholder ids excluded, exactly as at sampling: `agents.backends.base`);
        ``entropy[:, t]`` is the entropy of that same distribution. Use the sampling temperature (1 for
        greedy) so these match the rollout's ``sampling_logprobs``.

        Args:
            batch: from `collate`.
            with_entropy: also return the per-token entropy.
            temperature: ``T`` of the definition above.
            model: score with this model instead of ``self.model`` (same architecture and vocabulary,
                e.g. a frozen reference policy); the batch's positions and placeholders stay valid.

        Returns:
            ``(logp (N, L), entropy (N, L) or None)``, float32, on the model's device.
        """
        model = self.model if model is None else model
        device = next(model.parameters()).device
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
        hidden = model.model(**inputs, use_cache=False).last_hidden_state  # (N, L, H)
        input_ids = inputs["input_ids"]
        n, length = input_ids.shape
        logp = hidden.new_zeros((n, length), dtype=torch.float32)
        entropy = hidden.new_zeros((n, length), dtype=torch.float32) if with_entropy else None
        banned = placeholder_ids(self.adapter)
        for i in range(n):  # one row of (L, V) logits at a time bounds memory for 150K vocabularies
            row_logp = next_token_logprobs(model.lm_head(hidden[i, :-1]), temperature, banned)
            logp[i, 1:] = row_logp.gather(-1, input_ids[i, 1:, None])[:, 0]
            if entropy is not None:
                # Banned ids have p = 0 and logp = -inf; their term of -sum p log p is 0, not NaN.
                entropy[i, 1:] = -(row_logp.exp() * row_logp.masked_fill(row_logp.isinf(), 0.0)).sum(-1)
        return logp, entropy

    def state_dict_for_backend(self) -> dict[str, torch.Tensor]:
        """The training copy's weights under the model's checkpoint names (what vLLM's ``load_weights`` reads).

        With LoRA adapters injected by ``peft`` (``get_peft_model``), each adapted linear layer is
        returned merged, ``W + sum_a scale_a * B_a @ A_a`` over its active, unmerged adapters, under the
        base name (``...q_proj.weight``, not ``...q_proj.base_layer.weight``); adapter tensors are left
        out. The model itself is not changed. DoRA adapters are rejected.
        """
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        state = model.state_dict()
        lora_layers = {name: module for name, module in model.named_modules() if _is_lora_layer(module)}
        if not lora_layers:
            return dict(state)
        merged = {key.replace(".base_layer.", "."): tensor for key, tensor in state.items()
                  if not any(f".{part}" in key for part in _LORA_PARTS)}
        with torch.no_grad():
            for name, layer in lora_layers.items():
                adapters = [a for a in layer.active_adapters if a in layer.lora_A]
                if any(layer.use_dora.get(a, False) for a in adapters):
                    raise ValueError(f"Expects LoRA adapters without DoRA to merge, actual: DoRA in {name}")
                weight = layer.get_base_layer().weight.detach()
                if not layer.merged:  # a merged layer's base weight already holds the deltas
                    weight = weight + sum(layer.get_delta_weight(a) for a in adapters).to(weight.dtype)
                merged[f"{name}.weight"] = weight
        return merged

    def sync_weights(self, version: int) -> None:
        """Pushes the training weights into the backend and stamps them ``version`` (the trainer's step).

        An ``hf`` backend over this agent's own model already samples with the training weights
        (adapters included): only the version is stamped.
        """
        shared = getattr(self.backend, "model", None) is self.model
        self.backend.load_weights({} if shared else self.state_dict_for_backend(), version)
        self.weight_version = int(version)


_LORA_PARTS = ("lora_A.", "lora_B.", "lora_embedding_A.", "lora_embedding_B.", "lora_magnitude_vector.")
"""Name parts of ``peft`` LoRA parameters (left out of the merged state dict)."""


def _is_lora_layer(module: Any) -> bool:
    """Whether ``module`` is a ``peft`` LoRA layer wrapping a base layer (duck-typed: peft stays optional)."""
    return all(hasattr(module, attr) for attr in ("lora_A", "get_delta_weight", "get_base_layer", "merged"))
