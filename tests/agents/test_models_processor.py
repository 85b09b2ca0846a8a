"""load_processor: the full image + text processor for tiny folders and hub-layout checkpoints, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from zoomgym.agents.models import build_tiny_model, load_processor
from zoomgym.agents.models.processor import Qwen2_5_VLImageOnlyProcessor, Qwen2VLImageOnlyProcessor, is_hub_id
from zoomgym.agents.models.tokenizer import QWEN_VL_CHAT_TEMPLATE, train_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("processor") / "m", "1m", seed=0)


def _hub_layout(folder: Path, model_type: str, image_processor_type: str) -> Path:
    """A folder laid out like a released Qwen-VL checkpoint (minus weights): config.json, a legacy
    preprocessor_config.json naming upstream classes and min/max pixels, tokenizer files and a legacy
    chat_template.json."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    folder.mkdir(parents=True)
    config_class = {"qwen2_5_vl": Qwen2_5_VLConfig, "qwen2_vl": Qwen2VLConfig}[model_type]
    config_class().save_pretrained(folder)
    processor_class = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor"}[model_type]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": image_processor_type, "processor_class": processor_class,
    }))
    tokenizer = train_tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_VL_CHAT_TEMPLATE}))
    return folder


def test_tiny_folder_loads_the_image_only_processor_and_round_trips(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import Qwen2VLImageProcessorPil

    processor = load_processor(tiny_dir)
    assert type(processor) is Qwen2_5_VLImageOnlyProcessor
    assert type(processor.image_processor) is Qwen2VLImageProcessorPil
    assert not hasattr(processor, "video_processor")
    assert processor.chat_template == QWEN_VL_CHAT_TEMPLATE
    assert processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    processor.save_pretrained(tmp_path / "copy")
    (tmp_path / "copy" / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    again = load_processor(tmp_path / "copy")
    assert type(again) is type(processor)
    assert again.image_processor.to_dict() == processor.image_processor.to_dict()
    assert again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert again.chat_template == processor.chat_template


@pytest.mark.parametrize(("model_type", "image_processor_type", "expected"), [
    ("qwen2_5_vl", "Qwen2VLImageProcessor", Qwen2_5_VLImageOnlyProcessor),
    ("qwen2_5_vl", "Qwen2_5_VLImageProcessor", Qwen2_5_VLImageOnlyProcessor),  # a legacy class name
    ("qwen2_vl", "Qwen2VLImageProcessor", Qwen2VLImageOnlyProcessor),
])
def test_hub_layout_checkpoints_load_with_their_pixel_budget(tmp_path: Path, model_type: str,
                                                            image_processor_type: str, expected: type) -> None:
    folder = _hub_layout(tmp_path / "ckpt", model_type, image_processor_type)
    processor = load_processor(folder)
    assert type(processor) is expected
    size = processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (3136, 12845056)
    assert processor.chat_template == QWEN_VL_CHAT_TEMPLATE
    overridden = load_processor(folder, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    size = overridden.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (256 * 28 * 28, 1280 * 28 * 28)


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=str(tmp_path / "nope")):
        load_processor(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "empty" / "config.json")):
        load_processor(tmp_path / "empty")


def test_unsupported_model_type_lists_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match=r"\['qwen2_5_vl', 'qwen2_vl'\].*'llava'"):
        load_processor(tmp_path / "llava")


def test_hub_ids_are_told_apart_from_paths(tmp_path: Path) -> None:
    assert is_hub_id("Qwen/Qwen2.5-VL-7B-Instruct") and is_hub_id("gpt2")
    assert not any(is_hub_id(name) for name in ["./model", "/abs/model", "~/model", "a/b/c", "a//b"])
    assert not is_hub_id(str(tmp_path))
