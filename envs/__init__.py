"""zoomgym environments, registered with Gymnasium when this package is imported.

>>> import gymnasium as gym
>>> from zoomgym import envs
>>> sorted(env_id for env_id in gym.registry if env_id.startswith("zoomgym/"))
['zoomgym/DirectVQA-v0', 'zoomgym/ZoomEnv-v0', 'zoomgym/ZoomEnvMultiTurn-v0']
"""

from __future__ import annotations

import zoomgym.envs.spaces  # noqa: F401  (registers ChatSpace batching for gymnasium.make_vec)
from gymnasium.envs.registration import register, registry

ENV_IDS = {
    "zoomgym/ZoomEnv-v0": {"protocol": "zoom", "max_turns": 2},
    "zoomgym/ZoomEnvMultiTurn-v0": {"protocol": "zoom", "max_turns": 4},
    "zoomgym/DirectVQA-v0": {"protocol": "direct", "max_turns": 1},
}
"""Registered ids and their default arguments (any can be overridden in ``gymnasium.make``)."""

for _env_id, _kwargs in ENV_IDS.items():
    if _env_id not in registry:  # importing twice (e.g. a reload) must not re-register
        register(id=_env_id, entry_point="zoomgym.envs.zoom_env:ZoomEnv", kwargs=dict(_kwargs))
