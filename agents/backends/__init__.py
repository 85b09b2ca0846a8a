"""Generation engines behind one interface (`Backend`): ``hf`` (transformers) and ``vllm``.

``BACKENDS`` maps a name (``rollout.backend`` in a config, ``backend=`` of ``LMMAgent.from_pretrained``)
to its class, imported on first use: importing this package imports neither torch nor vllm. Add one
with ``register_backend("name", "my_package.my_backend:MyBackend")`` (see ARCHITECTURE.md).
"""

from __future__ import annotations

from zoomgym.agents.backends.base import Backend, FinishReason, Generation, GenerationRequest, SamplingParams

from zoomgym.registry import Registry, lazy_exports

BACKENDS: Registry[type] = Registry("rollout backend")
"""Backend name -> class (``"module:Class"`` until first use)."""
register_backend = BACKENDS.register
BACKENDS.register("hf", "zoomgym.agents.backends.hf:HFBackend")
BACKENDS.register("vllm", "zoomgym.agents.backends.vllm:VLLMBackend")

__all__ = ["BACKENDS", "Backend", "FinishReason", "Generation", "GenerationRequest", "HFBackend", "SamplingParams",
           "VLLMBackend", "register_backend"]

__getattr__, __dir__ = lazy_exports(__name__, {"HFBackend": "zoomgym.agents.backends.hf", "VLLMBackend": "zoomgym.agents.backends.vllm"})
