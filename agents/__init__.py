"""zoomgym agents: who acts in the env.

Names are resolved lazily (PEP 562), so ``import agents`` stays light: the scripted agents need
no torch, and heavy agents import their dependencies only when first used.

>>> import agents
>>> agents.OracleAgent.__name__
'OracleAgent'
"""

from __future__ import annotations

from zoomgym.registry import lazy_exports

_EXPORTS: dict[str, str] = {
    "Agent": "agents.base",
    "split_infos": "agents.base",
    "OracleAgent": "agents.scripted",
    "RandomAgent": "agents.scripted",
    "ReplayAgent": "agents.scripted",
    "LMMAgent": "agents.lmm",
    "Trajectory": "agents.trajectory",
    "episode_metrics": "agents.metrics",
    "play_episodes": "agents.rollout",
}
"""Public name -> module that defines it."""

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
