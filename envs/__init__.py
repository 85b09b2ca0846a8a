"""zoomgym environments, registered with Gymnasium when this package is imported.

>>> import gymnasium as gym
>>> from zoomgym import envs
>>> sorted(env_id for env_id in gym.registry if env_id.startswith("zoomgym/"))
['zoomgym/DirectVQA-v0', 'zoomgym/ZoomEnv-v0', 'zoomgym/ZoomEnvMultiTurn-v0']
>>> envs.episode_spec("zoomgym/ZoomEnvMultiTurn-v0").max_images, envs.episode_spec("zoomgym/ZoomEnv-v0").max_images
(4, 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium
import zoomgym.envs.spaces  # noqa: F401  (registers ChatSpace batching for gymnasium.make_vec)
from gymnasium.envs.registration import register, registry

ENV_IDS = {
    "zoomgym/ZoomEnv-v0": {"protocol": "zoom", "max_turns": 2},
    "zoomgym/ZoomEnvMultiTurn-v0": {"protocol": "zoom", "max_turns": 4},
    "zoomgym/DirectVQA-v0": {"protocol": "direct", "max_turns": 1},
}
"""Registered ids and their default arguments (any can be overridden in ``gymnasium.make``)."""

DEFAULT_ENV_ID = "zoomgym/ZoomEnv-v0"
"""The MGPO protocol (box, crop, answer): what an agent plays when no env is named."""

for _env_id, _kwargs in ENV_IDS.items():
    if _env_id not in registry:  # importing twice (e.g. a reload) must not re-register
        register(id=_env_id, entry_point="zoomgym.envs.zoom_env:ZoomEnv", kwargs=dict(_kwargs))


@dataclass(frozen=True)
class EpisodeSpec:
    """What an episode of a registered id can hold: the one place a turn or image budget is read from.

    Attributes:
        env_id: the Gymnasium id.
        protocol: ``"zoom"`` or ``"direct"`` (`envs.zoom_env.ZoomEnv`).
        max_turns: model turns per episode.
        max_images: images one episode can show (`envs.zoom_env.ZoomEnv.episode_images`).
    """

    env_id: str
    protocol: str
    max_turns: int
    max_images: int


def episode_spec(env_id: str, make_kwargs: Mapping[str, Any] | None = None) -> EpisodeSpec:
    """The `EpisodeSpec` of ``gymnasium.make(env_id, **make_kwargs)``, read from Gymnasium's registry.

    Args:
        env_id: a registered id of a `ZoomEnv` or a subclass (an unknown id raises Gymnasium's error,
            with its suggestion).
        make_kwargs: the keyword arguments the env will be made with (e.g. ``{"max_turns": 3}``); they
            override the registered ones.

    Raises:
        ValueError: the id is not a `ZoomEnv`, or its turn budget is not a positive integer.
    """
    import inspect

    from gymnasium.envs.registration import load_env_creator
    from zoomgym.envs.zoom_env import ZoomEnv

    spec = gymnasium.spec(env_id)
    env_class = load_env_creator(spec.entry_point) if isinstance(spec.entry_point, str) else spec.entry_point
    if not (inspect.isclass(env_class) and issubclass(env_class, ZoomEnv)):
        raise ValueError(f"Expects an env id whose entry point is a ZoomEnv, actual: {env_id!r} -> {spec.entry_point}")
    defaults = {name: p.default for name, p in inspect.signature(env_class).parameters.items()}
    kwargs = {**defaults, **spec.kwargs, **(make_kwargs or {})}
    protocol, max_turns = kwargs["protocol"], kwargs["max_turns"]
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"Expects a positive integer max_turns for {env_id!r}, actual: {max_turns!r}")
    return EpisodeSpec(env_id, protocol, max_turns, env_class.episode_images(max_turns))
