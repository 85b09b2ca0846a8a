"""From a config to objects: the agent, the env of every episode, the datasets, the sampling settings.

The one place a config is turned into what the trainers and ``zoomgym eval`` run with (the
composition root); ``run`` (`algorithms.run`) calls these, and so can any other trainer::

    cfg = load_config("configs/quickstart.yaml")
    agent = build_agent(cfg)                       # LMMAgent over cfg.model.path, its backend from cfg.rollout
    env_fn = env_factory(cfg, env_id_of(cfg), agent)
    samples = load_samples(cfg.data.train)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from zoomgym.algorithms.config import Config, DatasetConfig, builds_model

if TYPE_CHECKING:
    from zoomgym.agents.backends.base import SamplingParams
    from zoomgym.agents.lmm import LMMAgent
    from zoomgym.envs.data import Sample


def env_id_of(cfg: Config, trainer: type | None = None) -> str:
    """The env episodes run in: ``env.id``, else the trainer's own ``default_env_id`` (by default the
    class of the configured ``algorithm.name``)."""
    from zoomgym import algorithms

    return cfg.env.id or (trainer or algorithms.get(cfg.algorithm.name)).default_env_id


def env_kwargs(cfg: Config) -> dict[str, Any]:
    """The ``gymnasium.make`` options of the config (``env.options``, then ``env.max_turns`` if set)."""
    options = dict(cfg.env.options)
    if cfg.env.max_turns is not None:
        options["max_turns"] = cfg.env.max_turns
    return options


def env_factory(cfg: Config, env_id: str, agent: Any, render: bool = False) -> Callable[[Sample], Any]:
    """``sample -> env`` of `env_id` with the config's options and the agent's view budget and frame:
    what the rollout engine builds each episode with."""
    from zoomgym.agents.rollout import env_factory as make_factory

    return make_factory(env_id, env_kwargs(cfg), view_budget=agent.view_budget, coord_frame=agent.coord_frame,
                        render=render)


def loader_arguments(spec: DatasetConfig) -> dict[str, Any]:
    """The keyword arguments of a config entry's loader: its ``options``, and ``path`` passed as the
    loader's ``path`` or ``root``."""
    from zoomgym.envs.data import DATASETS

    kwargs = dict(spec.options)
    if spec.path is not None:
        params = inspect.signature(DATASETS[spec.name]).parameters
        kwargs["path" if "path" in params else "root"] = spec.path
    return kwargs


def load_samples(spec: DatasetConfig) -> list[Sample]:
    """``envs.data.load_dataset`` for a config entry (`loader_arguments`)."""
    from zoomgym.envs.data import load_dataset

    samples = load_dataset(spec.name, **loader_arguments(spec))
    return samples[: spec.limit] if spec.limit is not None else samples


@dataclasses.dataclass(frozen=True)
class Datasets:
    """A config's samples: the training set and the validation sets by label."""

    train: list[Sample]
    val: dict[str, list[Sample]]


def load_datasets(cfg: Config) -> Datasets:
    """``data.train`` and every ``data.val`` set, loaded (every image's header checked)."""
    train = load_samples(cfg.data.train)
    if not train:
        raise ValueError(f"config key 'data.train': expects a non-empty training set, actual: none from "
                         f"{cfg.data.train.name!r}")
    return Datasets(train, load_val_sets(cfg.data.val))


def load_val_sets(specs: Sequence[DatasetConfig]) -> dict[str, list[Sample]]:
    """Validation sets by label (default the loader name; a repeated one gets a numeric suffix)."""
    sets: dict[str, list[Sample]] = {}
    for spec in specs:
        base = spec.label or spec.name
        name, k = base, 2
        while name in sets:
            name, k = f"{base}{k}", k + 1
        sets[name] = load_samples(spec)
    return sets


def sampling_params(cfg: Config, *, greedy: bool, seed: int) -> SamplingParams:
    """The backend's ``SamplingParams``: the config's temperature/top-p, or greedy (evaluation)."""
    from zoomgym.agents.backends.base import SamplingParams

    r = cfg.rollout
    return SamplingParams(
        temperature=0.0 if greedy else r.temperature,
        top_p=1.0 if greedy else r.top_p,
        max_new_tokens=r.max_new_tokens,
        seed=seed,
    )


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; under torchrun ``"cuda"`` is the rank's own
    device (`algorithms.distributed.local_device`); anything else unchanged."""
    from zoomgym.algorithms.distributed import local_device

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return local_device(device)


def backend_settings(cfg: Config) -> dict[str, Any]:
    """The chosen backend's own section (``rollout.hf``, ``rollout.vllm``) as keyword arguments; a
    registered backend without a section takes none."""
    section = getattr(cfg.rollout, cfg.rollout.backend, None)
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else {}


def build_agent(cfg: Config) -> LMMAgent:
    """The LMM agent of a config: builds ``model.build`` first where ``model.path`` names its folder
    (`algorithms.config.builds_model`) and it is missing, then loads ``model.path``.

    The backend (``rollout.backend``) gets the model's dtype, the env's image budget per episode
    (`envs.episode_spec`), the context budget, the run's seed and its own config section.
    """
    from zoomgym.agents.lmm import LMMAgent
    from zoomgym.envs import episode_spec

    path = Path(cfg.model.path).expanduser()
    build = cfg.model.build
    if builds_model(cfg.model) and not path.exists():
        from zoomgym.agents.models import MODEL_BUILDERS

        print(f"building the model {build.builder!r} {build.options} into {path} ...")
        MODEL_BUILDERS[build.builder](path, **build.options)
    return LMMAgent.from_pretrained(
        str(path),
        cfg.rollout.backend,
        dtype=cfg.model.dtype,
        device=resolve_device(cfg.trainer.device),
        min_pixels=cfg.model.min_pixels,
        max_pixels=cfg.model.max_pixels,
        max_images=episode_spec(env_id_of(cfg), env_kwargs(cfg)).max_images,
        max_context_tokens=cfg.rollout.max_context_tokens,
        seed=cfg.trainer.seed,
        **backend_settings(cfg),
    )
