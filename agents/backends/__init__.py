"""Generation engines behind one interface (`Backend`): ``hf`` (transformers) and ``vllm``.

Importing this package imports neither torch nor vllm; the engines load on first use.
"""

from __future__ import annotations

from typing import Any

from zoomgym.agents.backends.base import Backend, FinishReason, Generation, GenerationRequest, SamplingParams

BACKENDS: dict[str, str] = {
    "hf": "zoomgym.agents.backends.hf:HFBackend",
    "vllm": "zoomgym.agents.backends.vllm:VLLMBackend",
}
"""Backend name -> ``module:class``."""

__all__ = ["BACKENDS", "Backend", "FinishReason", "Generation", "GenerationRequest", "HFBackend", "SamplingParams",
           "VLLMBackend"]


def __getattr__(name: str) -> Any:
    if name in ("HFBackend", "VLLMBackend"):
        import importlib

        module, cls = BACKENDS["hf" if name == "HFBackend" else "vllm"].split(":")
        return getattr(importlib.import_module(module), cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
