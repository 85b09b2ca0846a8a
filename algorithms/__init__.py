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

from typing import Any

from zoomgym.agents.models import MODEL_BUILDERS

from zoomgym.registry import Registry

__all__ = ["ALGORITHMS", "get", "make", "register"]

ALGORITHMS: Registry[type] = Registry("algorithm")
"""Algorithm name -> class (``"module:Class"`` for the built-ins, so importing this package imports no torch)."""
ALGORITHMS.register("grpo", "zoomgym.algorithms.grpo:GRPO")
ALGORITHMS.register("mgpo", "zoomgym.algorithms.mgpo:MGPO")

# The toy base is a model a config can build (model.build.builder: toy_base): SFT of the tiny model.
MODEL_BUILDERS.register("toy_base", "zoomgym.algorithms.toy_base:build_toy_base_into")


def register(name: str) -> Any:
    """Class decorator adding an algorithm under ``name``; a taken name raises ``ValueError``.

    The class is built as ``cls(agent=..., config=..., env_id=...)`` by :func:`make` and must offer
    ``learn(num_steps) -> self``; subclassing :class:`algorithms.grpo.GRPO` gives both.
    """
    return ALGORITHMS.register(name)


def get(name: str) -> type:
    """The class registered as ``name`` (imports a built-in on first use)."""
    return ALGORITHMS.lookup(name)


def make(name: str, **kwargs: Any) -> Any:
    """Build the algorithm registered as ``name``: ``get(name)(**kwargs)``.

    Example:
        ``algo = algorithms.make("mgpo", agent=agent, config=cfg); algo.learn(10)``
    """
    return get(name)(**kwargs)
