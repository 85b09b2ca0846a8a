"""`LMMAgent`: a Qwen-VL-family model that acts in zoom envs and plays rollouts for the trainer.

One object holds the training copy of the model (transformers), its processor, the model adapter
(chat layout as ids, special ids, rope index, view budget, coordinate frame) and a generation backend
(``hf``: the same model object; ``vllm``: a separate engine kept in sync with ``sync_weights``), chosen
by name from `agents.backends.BACKENDS`. Scoring lives in `agents.scoring`, weight export in
`agents.weights`.

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
from zoomgym.agents.backends import BACKENDS
from zoomgym.agents.backends.base import Backend, GenerationRequest, SamplingParams, decode_text
from zoomgym.agents.rollout import EnvSpec, ImageErrorHandler, run_rollouts
from zoomgym.agents.scoring import token_logprobs
from zoomgym.agents.shared_prefix import PrefixPlan
from zoomgym.agents.trajectory import Trajectory, collate
from zoomgym.agents.weights import merged_state_dict
from zoomgym.envs import DEFAULT_ENV_ID, episode_spec
from zoomgym.envs.spaces import message_images

GREEDY = SamplingParams(temperature=0.0)
"""Default sampling of `LMMAgent.act`: greedy decoding (the evaluation protocol)."""


class LMMAgent:
    """A multimodal policy: ``act`` for evaluation, ``rollout`` for training data.

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
        max_images: int | None = None,
        max_context_tokens: int | None = None,
        seed: int = 0,
        **backend_settings: Any,
    ) -> LMMAgent:
        """Loads model, processor and adapter from a local folder (offline) or a hub id, then the backend.

        Args:
            path_or_id: a ``save_pretrained`` folder (e.g. from ``zoomgym tiny-model``) or a hub id.
            backend: a name in `agents.backends.BACKENDS` (``"hf"``, ``"vllm"``); the engine is built by
                its ``from_pretrained`` with the same checkpoint and ``dtype``.
            dtype: the training copy's dtype (``"float32"``, ``"bfloat16"``, or a ``torch.dtype``), and
                the backend's.
            device: where the training copy lives.
            min_pixels, max_pixels: override the processor's view budget (then shared with the env
                through ``agent.view_budget``).
            sampling: how ``act`` samples.
            max_images: images one episode may show, for engines that reserve memory per prompt (vLLM);
                default: the image budget of the default env (`envs.DEFAULT_ENV_ID`).
            max_context_tokens: an episode's token budget, for engines that size their context (None:
                the model's).
            seed: the engine's seed (requests carry their own seeds).
            **backend_settings: the backend's own settings (``rollout.<backend>`` in a config), e.g.
                ``gpu_memory_utilization=0.6`` for vLLM.
        """
        from transformers import AutoModelForImageTextToText
        from zoomgym.agents.models import adapter_for, load_processor

        engine_cls = BACKENDS.lookup(backend)  # an unknown name fails before anything loads
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
        engine = engine_cls.from_pretrained(
            path, model=model, adapter=adapter, dtype=str(torch_dtype).removeprefix("torch."),
            max_images=max_images if max_images is not None else episode_spec(DEFAULT_ENV_ID).max_images,
            max_context_tokens=max_context_tokens, seed=seed, **backend_settings,
        )
        return cls(model, processor, adapter, engine, sampling)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Writes model and processor so that ``from_pretrained(path)`` rebuilds this agent."""
        from zoomgym.agents.models import save_processor

        self.model.save_pretrained(path)
        save_processor(self.processor, path)  # with every processor file of the source model

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
            GenerationRequest(list(self.adapter.encode_prefix(chat)), message_images(chat), sampling.max_new_tokens,
                              sampling.seed)
            for chat in observations
        ]
        return [decode_text(self.adapter, g.token_ids) for g in self.backend.generate(requests, sampling)]

    def rollout(
        self,
        samples: Sequence[Any],
        group_size: int = 1,
        env: EnvSpec = DEFAULT_ENV_ID,
        sampling: SamplingParams | None = None,
        *,
        weight_version: int | None = None,
        context_budget: int | None = None,
        env_kwargs: Mapping[str, Any] | None = None,
        progress: bool | None = None,
        on_image_error: ImageErrorHandler | None = None,
        episode_ids: Sequence[int] | None = None,
    ) -> list[Trajectory]:
        """Plays ``group_size`` episodes per sample; see `agents.rollout.run_rollouts`.

        ``weight_version`` defaults to the version of the weights the backend holds; ``on_image_error``
        skips the groups of samples whose image fails to decode (`agents.rollout`).
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
            on_image_error=on_image_error,
            episode_ids=episode_ids,
        )

    def collate(self, trajectories: Sequence[Trajectory]) -> dict[str, Any]:
        """Padded model inputs and targets of one training batch; see `agents.trajectory.collate`."""
        return collate(trajectories, self.adapter, self.model)

    def token_logprobs(
        self, batch: Mapping[str, Any], with_entropy: bool = False, temperature: float = 1.0, *, model: Any = None,
        plan: PrefixPlan | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`agents.scoring.token_logprobs` of a collated batch under ``model`` (default this agent's)."""
        return token_logprobs(self.model if model is None else model, self.adapter, batch,
                              with_entropy=with_entropy, temperature=temperature, plan=plan)

    def sync_weights(self, version: int) -> None:
        """Pushes the training weights into the backend and stamps them ``version`` (the trainer's step).

        A backend that shares this agent's model (``hf``) already samples with the training weights
        (adapters included): only the version is stamped. Others get `agents.weights.merged_state_dict`.
        """
        self.backend.load_weights({} if self.backend.shares_model else merged_state_dict(self.model), version)
        self.weight_version = int(version)

    def sleep(self) -> None:
        """Lets the backend release its accelerator memory while the trainer updates (if it can sleep)."""
        if self.backend.can_sleep:
            self.backend.sleep()

    def wake_up(self) -> None:
        """Restores what `sleep` released."""
        if self.backend.can_sleep:
            self.backend.wake_up()

    def close(self) -> None:
        """Shuts the backend's engine down (the agent does not generate again)."""
        self.backend.close()
