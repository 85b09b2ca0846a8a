"""load_processor/save_processor: image + text processors of tiny folders and released checkpoints, offline,
and checkpoints that keep every processor file of the model they came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from released_checkpoint import LAYOUTS, as_released_checkpoint
from zoomgym.agents.models import build_tiny_model, load_processor, save_processor
from zoomgym.agents.models.processor import (
    PROCESSOR_FILES,
    Qwen2_5_VLImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
    is_hub_id,
)
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


def _processor_outcome(folder: Path) -> tuple[str, str]:
    """What ``AutoProcessor.from_pretrained`` gives for ``folder``: its class, or the error it raises."""
    from transformers import AutoProcessor

    try:
        return "built", type(AutoProcessor.from_pretrained(folder)).__name__
    except Exception as err:  # e.g. the stock video processor needs torchvision
        return type(err).__name__, str(err).strip().splitlines()[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoints_keep_every_processor_file_of_a_released_model(tmp_path: Path, layout: str) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    from transformers.video_processing_utils import BaseVideoProcessor
    from zoomgym.algorithms.checkpoint import save_checkpoint

    source = as_released_checkpoint(build_tiny_model(tmp_path / "released", "1m", seed=0), layout)
    source_files = {p.name for p in source.iterdir()}
    processor = load_processor(source)
    assert set(processor.source_files) == source_files & set(PROCESSOR_FILES)
    model = AutoModelForImageTextToText.from_pretrained(source)
    ckpt = save_checkpoint(tmp_path / "run", 1, model=model, processor=processor, trainer_state={})

    assert source_files - {p.name for p in ckpt.iterdir()} == set()
    video = BaseVideoProcessor.get_video_processor_dict(ckpt)[0]
    assert video == BaseVideoProcessor.get_video_processor_dict(source)[0]
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert _processor_outcome(ckpt) == _processor_outcome(source)
    assert AutoImageProcessor.from_pretrained(ckpt).to_dict() == AutoImageProcessor.from_pretrained(source).to_dict()
    text = "<|im_start|>user\nHello<|im_end|>"
    assert AutoTokenizer.from_pretrained(ckpt)(text).input_ids == AutoTokenizer.from_pretrained(source)(text).input_ids
    again = load_processor(ckpt)
    image = _noise((300, 200))
    prompt = "<|vision_start|><|image_pad|><|vision_end|>What is it?"
    ours, theirs = again(text=[prompt], images=[image]), processor(text=[prompt], images=[image])
    assert ours.input_ids == theirs.input_ids
    assert (ours.pixel_values == theirs.pixel_values).all()


def test_image_only_processors_save_under_the_stock_class_name(tiny_dir: Path, tmp_path: Path) -> None:
    save_processor(load_processor(tiny_dir), tmp_path / "copy")
    for name in ("processor_config.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / "copy" / name).read_text())["processor_class"] == "Qwen2_5_VLProcessor", name


def test_an_overridden_pixel_budget_is_what_the_checkpoint_says(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor

    source = as_released_checkpoint(build_tiny_model(tmp_path / "released", "1m", seed=0), "transformers4")
    save_processor(load_processor(source, max_pixels=32 * 28 * 28), tmp_path / "copy")
    (tmp_path / "copy" / "config.json").write_bytes((source / "config.json").read_bytes())
    assert AutoImageProcessor.from_pretrained(tmp_path / "copy").size["longest_edge"] == 32 * 28 * 28
    assert load_processor(tmp_path / "copy").image_processor.size["longest_edge"] == 32 * 28 * 28


def test_the_stock_processor_where_torchvision_works(tiny_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With torchvision, a checkpoint with a video processor config gets transformers' own processor."""
    from zoomgym.agents.models import processor as module

    class Stock:
        @classmethod
        def from_pretrained(cls, path: str, **kwargs: object) -> Stock:
            return cls()

    released = as_released_checkpoint(build_tiny_model(tmp_path / "released", "1m", seed=0), "transformers5")
    monkeypatch.setitem(module.STOCK_PROCESSORS, "qwen2_5_vl", Stock)
    assert type(load_processor(released)) is Qwen2_5_VLImageOnlyProcessor  # no torchvision here
    monkeypatch.setattr(module, "torchvision_works", lambda: True)
    assert type(load_processor(released)) is Stock
    assert type(load_processor(tiny_dir)) is Qwen2_5_VLImageOnlyProcessor  # no video processor config


def _noise(size: tuple[int, int]):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
