"""Datasets: the `Sample` type, image loading and the loaders.

`envs.data.chats` holds the chats of supervised fine-tuning (a jsonl format and registered chat
tasks such as the toy base's, `envs.data.toy_tasks`). See `envs.data.loaders` for the formats each loader reads, `envs.data.synthetic` for the embedded
synthetic benchmark, `envs.data.images` for decoding and caching and `envs.data.tables` for reading
an `ImageRef` (an image stored in a cell of a parquet/TSV/jsonl file, read on demand). A
`RenderedImage` is an image drawn on demand from a small description (the synthetic canvases).
"""

from zoomgym.envs.data import toy_tasks  # noqa: E402, F401, I001 - registers the toy base's chat tasks
from zoomgym.envs.data.chats import CHAT_TASKS, ChatExample, load_chats, make_chats, register_chat_task
from zoomgym.envs.data.images import (
    MAX_IMAGE_PIXELS,
    SUPPORTED_MODES,
    CacheInfo,
    ImageLoadError,
    ViewSource,
    check_image,
    clear_image_cache,
    image_cache_info,
    image_size,
    load_image,
    load_view_source,
    set_image_cache_capacity,
)
from zoomgym.envs.data.loaders import (
    DATASETS,
    load_dataset,
    load_hrbench,
    load_jsonl,
    load_mme_realworld,
    load_vstar,
)
from zoomgym.envs.data.sample import LETTERS, ImageRef, ImageSource, RenderedImage, Sample
from zoomgym.envs.data.synthetic import SYNTHETIC_PRESETS, synthetic

__all__ = [
    "CHAT_TASKS",
    "DATASETS",
    "LETTERS",
    "MAX_IMAGE_PIXELS",
    "SUPPORTED_MODES",
    "SYNTHETIC_PRESETS",
    "CacheInfo",
    "ChatExample",
    "ImageLoadError",
    "ImageRef",
    "ImageSource",
    "RenderedImage",
    "Sample",
    "ViewSource",
    "check_image",
    "clear_image_cache",
    "image_cache_info",
    "image_size",
    "load_dataset",
    "load_hrbench",
    "load_chats",
    "load_image",
    "load_jsonl",
    "load_mme_realworld",
    "load_view_source",
    "load_vstar",
    "make_chats",
    "register_chat_task",
    "set_image_cache_capacity",
    "synthetic",
]
