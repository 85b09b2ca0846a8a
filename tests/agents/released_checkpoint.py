"""Test helper: lay a tiny model folder's processor files out as a released Qwen2.5-VL checkpoint has them.

A model saved by transformers' stock processor (which needs torchvision) carries the video processor's
config beside the image processor's; ``build_tiny_model`` saves the image-only processor, which has none.
`as_released_checkpoint` writes the files a released checkpoint has instead, in one of two layouts:

* ``"transformers4"`` (the hub's Qwen2.5-VL repos): ``preprocessor_config.json`` and
  ``video_preprocessor_config.json``, ``chat_template.json``, ``tokenizer.json`` + ``tokenizer_config.json``
  + ``vocab.json`` + ``merges.txt``;
* ``"transformers5"`` (what ``save_pretrained`` of a stock processor writes now): one ``processor_config.json``
  with ``image_processor`` and ``video_processor`` nested, ``chat_template.jinja``, ``tokenizer.json`` +
  ``tokenizer_config.json``.

Used by ``test_models_processor.py`` and by ``vllm_cpu_checks.py`` (which imports it from this folder).
"""

from __future__ import annotations

import json
from pathlib import Path

LAYOUTS = ("transformers4", "transformers5")
STOCK_CLASS = "Qwen2_5_VLProcessor"


def _video_processor_config(image: dict) -> dict:
    """The config of transformers' ``Qwen2VLVideoProcessor`` matching the image processor's geometry and budget."""
    size = image["size"]
    return {
        "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": STOCK_CLASS,
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
        "rescale_factor": image["rescale_factor"], "image_mean": image["image_mean"], "image_std": image["image_std"],
        "patch_size": image["patch_size"], "temporal_patch_size": image["temporal_patch_size"],
        "merge_size": image["merge_size"], "size": dict(size), "min_pixels": size["shortest_edge"],
        "max_pixels": size["longest_edge"], "min_frames": 4, "max_frames": 768, "do_sample_frames": False,
    }


def as_released_checkpoint(folder: Path, layout: str) -> Path:
    """Rewrites the processor files of ``folder`` (from ``build_tiny_model``, qwen2_5_vl) in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"Expects layout in {LAYOUTS}, actual: {layout!r}")
    processor_config = folder / "processor_config.json"
    image = json.loads(processor_config.read_text())["image_processor"]
    video = _video_processor_config(image)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["processor_class"] = STOCK_CLASS
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if layout == "transformers5":
        processor_config.write_text(json.dumps(
            {"image_processor": image, "video_processor": video, "processor_class": STOCK_CLASS}, indent=2))
        return folder
    processor_config.unlink()
    legacy_image = {**image, "processor_class": STOCK_CLASS, "min_pixels": image["size"]["shortest_edge"],
                    "max_pixels": image["size"]["longest_edge"]}
    (folder / "preprocessor_config.json").write_text(json.dumps(legacy_image, indent=2))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    template = folder / "chat_template.jinja"
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}))
    template.unlink()
    bpe = json.loads((folder / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder
