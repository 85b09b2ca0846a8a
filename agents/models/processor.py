"""``load_processor`` (image + text processing for Qwen-VL checkpoints, with or without torchvision) and
``save_processor`` (which keeps every processor file the checkpoint came with).

Where torchvision imports, ``load_processor`` returns the stock ``Qwen2_5_VLProcessor``/``Qwen2VLProcessor``
of a checkpoint that has a video processor config. Elsewhere (CPU machines never install torchvision;
its only build there is a CUDA one whose import fails) it returns an image-only subclass: transformers'
stock processors also want a video processor, which needs torchvision, and ``AutoProcessor`` on such a
machine fails. Our subclasses drop the video processor and always use the PIL image processor
(``Qwen2VLImageProcessorPil``): no torchvision, and the same numerics on every machine. They keep
everything else of the upstream processors (image token expansion, ``mm_token_type_ids``, chat
templates, ``save_pretrained``) and save under the stock class name.

Checkpoints stay loadable by the ecosystem (``AutoProcessor``, ``vllm serve``, lmms-eval): the processor
remembers the processor files of the checkpoint it was loaded from (``source_files``), and
``save_processor`` writes those that ``save_pretrained`` did not (the video processor config above all),
so a checkpoint carries every processor file the source model had.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

PROCESSOR_CONFIG = "processor_config.json"
"""transformers >= 5 writes every sub-processor's config into this one file (nested by kind)."""

PROCESSOR_FILES = (
    PROCESSOR_CONFIG,
    "preprocessor_config.json",  # the image processor (older layout); the video processor's fallback too
    "video_preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",  # the older chat template file
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)
"""The processor files a released Qwen-VL checkpoint may have (transformers 4 and 5 layouts)."""


class _ImageOnly:
    """Mixin: a Qwen-VL processor made of an image processor and a tokenizer, loaded without Auto classes."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        # The upstream __init__ takes (image_processor, tokenizer, video_processor); ProcessorMixin only
        # keeps the attributes named in *this* signature, so the video processor slot is dropped.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path: Any, processor_dict: Any = None,
                                       **kwargs: Any) -> list[Any]:
        # Upstream picks the image processor class by the saved `image_processor_type` (which names the
        # torchvision class, or legacy names such as "Qwen2_5_VLImageProcessor"); we always want PIL.
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return [image_processor, tokenizer]

    @classmethod
    def stock_class_name(cls) -> str:
        """The name of the transformers processor this class derives from (e.g. ``"Qwen2_5_VLProcessor"``)."""
        return next(c for c in cls.__mro__ if c.__module__.startswith("transformers.")).__name__

    # Saved under the stock class name, so that AutoProcessor (and vLLM, lmms-eval) build the stock
    # processor from our checkpoints where torchvision exists, as they do from the model they came from.
    def to_dict(self) -> dict[str, Any]:
        config = super().to_dict()
        config["processor_class"] = self.stock_class_name()
        return config

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        files = super().save_pretrained(save_directory, *args, **kwargs)
        # ProcessorMixin stamped our class name into tokenizer_config.json; write the stock one instead.
        self.tokenizer._set_processor_class(self.stock_class_name())
        self.tokenizer.save_pretrained(save_directory)
        return files


class Qwen2_5_VLImageOnlyProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (no torchvision needed)."""


class Qwen2VLImageOnlyProcessor(_ImageOnly, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor (no torchvision needed)."""


PROCESSORS: dict[str, type] = {
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
}
"""Image-only processor class by ``config.model_type``."""

STOCK_PROCESSORS: dict[str, type] = {"qwen2_5_vl": Qwen2_5_VLProcessor, "qwen2_vl": Qwen2VLProcessor}
"""transformers' processor class by ``config.model_type`` (needs torchvision for its video processor)."""


@functools.cache
def torchvision_works() -> bool:
    """Whether ``import torchvision`` succeeds (a CUDA-only build fails in several ways, not only ImportError)."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def has_video_processor_config(files: dict[str, bytes]) -> bool:
    """Whether processor files (name -> content) hold a config the stock video processor loads from.

    transformers reads it from ``processor_config.json`` (key ``video_processor``), else from
    ``video_preprocessor_config.json``, else from ``preprocessor_config.json``.
    """
    if "video_preprocessor_config.json" in files or "preprocessor_config.json" in files:
        return True
    return PROCESSOR_CONFIG in files and "video_processor" in json.loads(files[PROCESSOR_CONFIG])


def read_processor_files(path_or_id: str, **hub_kwargs: Any) -> dict[str, bytes]:
    """The `PROCESSOR_FILES` a checkpoint (folder or hub id) has: name -> content (hub files go through the cache)."""
    from transformers.utils import cached_file

    found: dict[str, bytes] = {}
    for name in PROCESSOR_FILES:
        resolved = cached_file(path_or_id, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False, **hub_kwargs)
        if resolved is not None:
            found[name] = Path(resolved).read_bytes()
    return found


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub id (``"name"`` or ``"owner/name"``), not of a path."""
    parts = name.split("/")
    return not name.startswith((".", "/", "~")) and len(parts) <= 2 and all(parts) and not os.path.exists(name)


def _model_type(path_or_id: str, local: bool, hub_kwargs: dict[str, Any]) -> str:
    if local:
        config_file = Path(path_or_id) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"Expects a model folder with config.json, actual: {config_file} is missing")
        return json.loads(config_file.read_text(encoding="utf-8")).get("model_type", "")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path_or_id, **hub_kwargs).model_type


def load_processor(
    path_or_id: str | os.PathLike[str],
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    **hub_kwargs: Any,
) -> Any:
    """Load the image + text processor of a Qwen2.5-VL or Qwen2-VL checkpoint (local folder or hub id).

    Local folders load offline (``local_files_only=True``); hub ids go through the usual cache.

    Args:
        path_or_id: a folder written by ``save_pretrained`` (e.g. by ``build_tiny_model``) or a hub id
            such as ``"Qwen/Qwen2.5-VL-7B-Instruct"``.
        min_pixels, max_pixels: override the image processor's pixel budget (its ``size``
            ``shortest_edge``/``longest_edge``); this is the one view-budget setting the agent and the env
            share (see ``QwenVLAdapter.view_budget``).
        **hub_kwargs: passed to ``from_pretrained`` (``revision``, ``cache_dir``, ``token``, ...).

    Returns:
        The stock processor of the checkpoint's ``config.model_type`` (`STOCK_PROCESSORS`) where torchvision
        imports and the checkpoint has a video processor config, else its image-only processor
        (`PROCESSORS`). Either way ``processor.source_files`` holds the checkpoint's processor files
        (`read_processor_files`), which `save_processor` keeps.

    Raises:
        ValueError: the folder does not exist or has no config.json, or the model type is not supported.
    """
    path_or_id = str(path_or_id)
    local = os.path.isdir(path_or_id)
    if not local and not is_hub_id(path_or_id):
        raise ValueError(f"Expects a model folder or a hub id, actual: {path_or_id} is not a folder")
    if local:
        hub_kwargs.setdefault("local_files_only", True)
    model_type = _model_type(path_or_id, local, hub_kwargs)
    if model_type not in PROCESSORS:
        raise ValueError(
            f"Expects a model type in {sorted(PROCESSORS)} (config.model_type of {path_or_id}), actual: {model_type!r}"
        )
    source_files = read_processor_files(path_or_id, **hub_kwargs)
    stock = torchvision_works() and has_video_processor_config(source_files)
    processor_class = STOCK_PROCESSORS[model_type] if stock else PROCESSORS[model_type]
    processor = processor_class.from_pretrained(path_or_id, **hub_kwargs)
    processor.source_files = source_files
    if min_pixels is not None or max_pixels is not None:
        size = processor.image_processor.size
        processor.image_processor.size = type(size)(
            shortest_edge=min_pixels if min_pixels is not None else size.shortest_edge,
            longest_edge=max_pixels if max_pixels is not None else size.longest_edge,
        )
    return processor


def save_processor(processor: Any, folder: str | os.PathLike[str]) -> None:
    """``processor.save_pretrained(folder)``, plus the source checkpoint's processor files that it did not write.

    A file the save wrote wins over the source's (it holds the processor as it is now, e.g. an
    overridden pixel budget), except that top-level entries of the source's ``processor_config.json``
    that the save left out (such as an image-only processor's missing ``video_processor``) are merged in.
    Source files come from ``processor.source_files`` (set by `load_processor`; none otherwise).
    """
    folder = Path(folder)
    processor.save_pretrained(folder)
    for name, data in getattr(processor, "source_files", {}).items():
        target = folder / name
        if not target.exists():
            target.write_bytes(data)
        elif name == PROCESSOR_CONFIG:
            merged = {**json.loads(data), **json.loads(target.read_text(encoding="utf-8"))}
            target.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n", encoding="utf-8")
