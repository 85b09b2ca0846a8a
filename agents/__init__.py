"""zoomgym agents: who acts in the env.

Names are resolved lazily (PEP 562), so ``from zoomgym import agents`` stays light: the scripted agents need
no torch, and heavy agents (added to `_EXPORTS`) import their dependencies only when first used.

>>> from zoomgym import agents
>>> agents.OracleAgent.__name__
'OracleAgent'
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "Agent": "zoomgym.agents.base",
    "split_infos": "zoomgym.agents.base",
    "OracleAgent": "zoomgym.agents.scripted",
    "RandomAgent": "zoomgym.agents.scripted",
    "ReplayAgent": "zoomgym.agents.scripted",
    "LMMAgent": "zoomgym.agents.lmm",
    "Trajectory": "zoomgym.agents.trajectory",
}
"""Public name -> module that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'agents' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
