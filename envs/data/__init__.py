"""Datasets: the `Sample` type, image loading and the loaders.

See `envs.data.loaders` for the formats each loader reads, `envs.data.synthetic` for the embedded
synthetic benchmark, `envs.data.images` for decoding and caching and `envs.data.tables` for reading
an `ImageRef` (an image stored in a cell of a parquet/TSV/jsonl file, read on demand).
"""

from zoomgym.envs.data.images import (
    MAX_IMAGE_PIXELS,
    CacheInfo,
    ImageLoadError,
    ViewSource,
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
from zoomgym.envs.data.sample import LETTERS, ImageRef, ImageSource, Sample
from zoomgym.envs.data.synthetic import SYNTHETIC_PRESETS, synthetic

__all__ = [
    "DATASETS",
    "LETTERS",
    "MAX_IMAGE_PIXELS",
    "SYNTHETIC_PRESETS",
    "CacheInfo",
    "ImageLoadError",
    "ImageRef",
    "ImageSource",
    "Sample",
    "ViewSource",
    "clear_image_cache",
    "image_cache_info",
    "image_size",
    "load_dataset",
    "load_hrbench",
    "load_image",
    "load_jsonl",
    "load_mme_realworld",
    "load_view_source",
    "load_vstar",
    "set_image_cache_capacity",
    "synthetic",
]
