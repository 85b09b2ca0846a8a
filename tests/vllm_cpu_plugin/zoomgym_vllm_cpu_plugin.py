"""A vLLM general plugin that lets the CPU build of vLLM run Qwen2.5-VL / Qwen2-VL without torchvision.

A test aid for CPU machines, installed by ``make test-vllm-cpu`` into the vLLM venv only; GPU machines
(where torchvision imports) never need it, and there it does nothing.

Why a plugin: vLLM loads every entry point of the group ``vllm.general_plugins`` in each of its
processes (the engine, the engine core process, the workers, and the subprocess that inspects model
architectures) before it imports a model module, so a fix made here holds in all of them; patching
the caller's own process would miss the subprocesses.

What it changes, only when ``import torchvision`` fails:

* vLLM's ``qwen2_vl`` model module imports ``smart_resize`` from transformers' torchvision image
  processor module. The plugin registers a stand-in for that module exporting the same function from
  the PIL image processor module (the two definitions are identical).
* vLLM asks for the stock ``Qwen2_5_VLProcessor``/``Qwen2VLProcessor``, whose video processor needs
  torchvision. The plugin registers vLLM's own Qwen-VL multimodal processors again with processing
  infos that ask for zoomgym's image-only processors (``agents.models.processor``: PIL image processor
  + tokenizer) instead. vLLM reads ``video_processor.valid_kwargs`` even when no video is sent, so these
  processors carry a video processor stand-in that names the video kwargs and refuses videos.

zoomgym must be importable in vLLM's processes (``PYTHONPATH`` = the repository root, as the tests set it).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

TORCHVISION_IMAGE_PROCESSOR_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
PIL_IMAGE_PROCESSOR_MODULE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"

_registered = False


def torchvision_works() -> bool:
    """Whether ``import torchvision`` succeeds (a CUDA-only build fails in several ways, not only ImportError)."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def register() -> None:
    """The entry point vLLM calls in each process; safe to call more than once."""
    global _registered
    if _registered or torchvision_works():
        return
    _provide_smart_resize()
    _use_image_only_processors()
    _registered = True


def _provide_smart_resize() -> None:
    if TORCHVISION_IMAGE_PROCESSOR_MODULE in sys.modules:
        return
    pil = importlib.import_module(PIL_IMAGE_PROCESSOR_MODULE)
    stand_in = types.ModuleType(
        TORCHVISION_IMAGE_PROCESSOR_MODULE,
        f"Stand-in (zoomgym CPU plugin): only smart_resize, from {PIL_IMAGE_PROCESSOR_MODULE}.",
    )
    stand_in.smart_resize = pil.smart_resize
    sys.modules[TORCHVISION_IMAGE_PROCESSOR_MODULE] = stand_in


class NoVideoProcessor:
    """Stands in for a Qwen-VL video processor: names the accepted video kwargs, refuses videos."""

    def __init__(self) -> None:
        from transformers.processing_utils import VideosKwargs

        self.valid_kwargs = VideosKwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("Expects images only (the zoomgym CPU plugin has no video processor), actual: videos")


def _with_video_stand_in(processor_cls: type) -> type:
    """A subclass of an image-only processor whose ``video_processor`` is a `NoVideoProcessor`."""

    class Processor(processor_cls):
        video_processor = NoVideoProcessor()

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
            # vLLM hands over the tokenizer it already loaded; ours is loaded from the same folder.
            kwargs.pop("tokenizer", None)
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    Processor.__name__ = Processor.__qualname__ = f"{processor_cls.__name__}ForVLLM"
    return Processor


def _use_image_only_processors() -> None:
    try:
        from zoomgym.agents.models.processor import PROCESSORS
    except ImportError as err:
        raise ImportError(
            "Expects zoomgym to be importable in vLLM's processes (PYTHONPATH = the repository root), actual: "
            f"{err}"
        ) from err
    from vllm.model_executor.models import qwen2_5_vl, qwen2_vl
    from vllm.multimodal import MULTIMODAL_REGISTRY

    models = (
        (qwen2_5_vl.Qwen2_5_VLForConditionalGeneration, qwen2_5_vl.Qwen2_5_VLMultiModalProcessor,
         qwen2_5_vl.Qwen2_5_VLProcessingInfo, qwen2_5_vl.Qwen2_5_VLDummyInputsBuilder, PROCESSORS["qwen2_5_vl"]),
        (qwen2_vl.Qwen2VLForConditionalGeneration, qwen2_vl.Qwen2VLMultiModalProcessor,
         qwen2_vl.Qwen2VLProcessingInfo, qwen2_vl.Qwen2VLDummyInputsBuilder, PROCESSORS["qwen2_vl"]),
    )
    for model_cls, mm_processor, info_cls, dummy_inputs, image_only in models:
        info = _asking_for(info_cls, _with_video_stand_in(image_only))
        MULTIMODAL_REGISTRY.register_processor(mm_processor, info=info, dummy_inputs=dummy_inputs)(model_cls)


def _asking_for(info_cls: type, hf_processor_cls: type) -> type:
    """A subclass of vLLM's processing info ``info_cls`` that builds ``hf_processor_cls``."""

    class Info(info_cls):
        def get_hf_processor(self, **kwargs: object) -> Any:
            return self.ctx.get_hf_processor(hf_processor_cls, **kwargs)

    Info.__name__ = Info.__qualname__ = f"{info_cls.__name__}ImageOnly"
    return Info
