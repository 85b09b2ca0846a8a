"""zoomgym agents: who acts in the env.

Names are resolved lazily (PEP 562), so ``from zoomgym import agents`` stays light: the scripted agents need
no torch, and heavy agents import their dependencies only when first used.

>>> from zoomgym import agents
>>> agents.OracleAgent.__name__
'OracleAgent'
"""

from __future__ import annotations

from zoomgym.registry import lazy_exports

_EXPORTS: dict[str, str] = {
    "Agent": "zoomgym.agents.base",
    "split_infos": "zoomgym.agents.base",
    "OracleAgent": "zoomgym.agents.scripted",
    "RandomAgent": "zoomgym.agents.scripted",
    "ReplayAgent": "zoomgym.agents.scripted",
    "LMMAgent": "zoomgym.agents.lmm",
    "Trajectory": "zoomgym.agents.trajectory",
    "episode_metrics": "zoomgym.agents.metrics",
    "play_episodes": "zoomgym.agents.rollout",
}
"""Public name -> module that defines it."""

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
