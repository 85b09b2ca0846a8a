"""The agent protocol: a batch of observations in, one text per observation out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from zoomgym.envs.spaces import Chat


@runtime_checkable
class Agent(Protocol):
    """Anything that acts in a zoom env.

    ``act(observations, infos)`` gets the chats of ``B`` envs and their infos (one dict per env) and
    returns ``B`` texts, the actions. Scripted agents may read ``info["sample"]``; model agents only
    look at the chat. An agent whose model fixes the view (``LMMAgent``) also has ``view_budget`` and
    ``coord_frame``, and envs are made with them. Any agent plays through the rollout engine
    (`agents.rollout.play_episodes`) and is evaluated by `agents.evaluate.evaluate`.
    """

    def act(self, observations: Sequence[Chat], infos: Sequence[Mapping[str, Any]]) -> list[str]: ...


def split_infos(infos: Mapping[str, Any], num_envs: int) -> list[dict[str, Any]]:
    """A vector env's info (a dict of per-env arrays) as one dict per env.

    Gymnasium's ``_key`` masks are dropped; a key an env did not report is left out of its dict.

    >>> import numpy as np
    >>> split_infos({"turn": np.array([1, 2]), "_turn": np.array([True, True])}, 2)
    [{'turn': 1}, {'turn': 2}]
    """
    per_env: list[dict[str, Any]] = [{} for _ in range(num_envs)]
    for key, values in infos.items():
        if key.startswith("_"):
            continue
        if isinstance(values, Mapping):  # e.g. "final_info" under SAME_STEP autoreset
            for i, nested in enumerate(split_infos(values, num_envs)):
                if nested:
                    per_env[i][key] = nested
            continue
        mask = infos.get(f"_{key}")
        for i in range(num_envs):
            if mask is None or mask[i]:
                value = values[i]
                per_env[i][key] = value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value
    return per_env
