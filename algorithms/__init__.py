"""zoomgym algorithms: GRPO, MGPO and yours, behind one registry.

``algorithms.make(name, **kwargs)`` builds a registered algorithm; ``algorithms.register(name)`` adds
one. The built-ins are imported lazily (importing ``algorithms`` stays light: no torch):

    >>> from zoomgym import algorithms
    >>> sorted(algorithms.ALGORITHMS)
    ['grpo', 'mgpo']

Register your own by subclassing a built-in and overriding one hook (see ``algorithms/grpo.py``)::

    from zoomgym import algorithms
    from zoomgym.algorithms.grpo import GRPO

    @algorithms.register("grpo_pos_only")
    class PositiveOnlyGRPO(GRPO):
        \"\"\"GRPO that learns only from better-than-average episodes.\"\"\"

        def advantages(self, rewards, group_ids):
            return super().advantages(rewards, group_ids).clamp(min=0)

then select it with ``algorithm.name: grpo_pos_only`` in a config (after importing the module that
registers it, e.g. ``zoomgym train CONFIG --import my_algos``).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["ALGORITHMS", "get", "make", "register"]

# name -> class, or "module:Class" for the built-ins so that importing this package imports no torch.
ALGORITHMS: dict[str, type | str] = {
    "grpo": "zoomgym.algorithms.grpo:GRPO",
    "mgpo": "zoomgym.algorithms.mgpo:MGPO",
}


def register(name: str) -> Callable[[type], type]:
    """Class decorator adding an algorithm under ``name``; a taken name raises ``ValueError``.

    The class is built as ``cls(agent=..., config=..., env_id=...)`` by :func:`make` and must offer
    ``learn(num_steps) -> self``; subclassing :class:`algorithms.grpo.GRPO` gives both.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"Expects a non-empty string as algorithm name, actual: {name!r}")

    def decorator(cls: type) -> type:
        if name in ALGORITHMS:
            raise ValueError(f"Expects a new algorithm name, actual: {name!r} is already registered")
        ALGORITHMS[name] = cls
        return cls

    return decorator


def get(name: str) -> type:
    """The class registered as ``name`` (imports a built-in on first use)."""
    if name not in ALGORITHMS:
        known = sorted(ALGORITHMS)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Expects an algorithm name in {known}, actual: {name!r}.{hint}")
    entry = ALGORITHMS[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        ALGORITHMS[name] = entry
    return entry


def make(name: str, **kwargs: Any) -> Any:
    """Build the algorithm registered as ``name``: ``get(name)(**kwargs)``.

    Example:
        ``algo = algorithms.make("mgpo", agent=agent, config=cfg); algo.learn(10)``
    """
    return get(name)(**kwargs)
