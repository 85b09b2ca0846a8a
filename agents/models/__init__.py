"""Model-specific pieces behind one small adapter, and an offline tiny model.

- ``adapter_for(model_or_config, processor) -> QwenVLAdapter``: chat layout as ids, special ids,
  image placeholders, coordinate frame, view budget and M-RoPE positions (``agents.models.qwen``).
- ``load_processor(path_or_id)`` / ``save_processor(processor, folder)``: the image + text processor of a
  Qwen2.5-VL/Qwen2-VL checkpoint (image-only without torchvision), saved with every processor file the
  source had (``agents.models.processor``).
- ``build_tiny_model(out_dir, size="1m")`` / ``tiny_model_main(argv)``: a random tiny Qwen-VL folder
  (``agents.models.tiny``).
- ``MODEL_BUILDERS``: builders ``fn(out_dir, **options) -> Path`` a config's ``model.build`` names
  (``"tiny"``: `build_tiny_model`); a builder writes a loadable model folder into ``out_dir``.
- ``train_tiny_tokenizer()`` / ``load_qwen25_tokenizer()``: Qwen-layout tokenizers built offline
  (``agents.models.tokenizer``).

Names are imported lazily so ``import zoomgym.agents.models`` does not import torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from zoomgym.registry import Registry, lazy_exports

MODEL_BUILDERS: Registry[Callable[..., Path]] = Registry("model builder")
MODEL_BUILDERS.register("tiny", "zoomgym.agents.models.tiny:build_tiny_model")

_EXPORTS = {
    "ADAPTERS": "zoomgym.agents.models.qwen",
    "QwenVLAdapter": "zoomgym.agents.models.qwen",
    "adapter_for": "zoomgym.agents.models.qwen",
    "PROCESSORS": "zoomgym.agents.models.processor",
    "Qwen2_5_VLImageOnlyProcessor": "zoomgym.agents.models.processor",
    "Qwen2VLImageOnlyProcessor": "zoomgym.agents.models.processor",
    "load_processor": "zoomgym.agents.models.processor",
    "save_processor": "zoomgym.agents.models.processor",
    "TINY_SIZES": "zoomgym.agents.models.tiny",
    "build_tiny_model": "zoomgym.agents.models.tiny",
    "tiny_model_main": "zoomgym.agents.models.tiny",
    "QWEN_VL_CHAT_TEMPLATE": "zoomgym.agents.models.tokenizer",
    "load_qwen25_tokenizer": "zoomgym.agents.models.tokenizer",
    "train_tiny_tokenizer": "zoomgym.agents.models.tokenizer",
}

__all__ = sorted([*_EXPORTS, "MODEL_BUILDERS"])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
