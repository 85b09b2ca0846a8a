"""The offline tiny model: deterministic builds, save -> reload -> identical outputs, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from zoomgym.agents.models import adapter_for, build_tiny_model, load_processor, tiny_model_main
from zoomgym.agents.models.tiny import TINY_SIZES, mrope_section


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _load(folder: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()


def _logits(folder: Path) -> torch.Tensor:
    model, processor = _load(folder), load_processor(folder)
    adapter = adapter_for(model, processor)
    image = _noise(*adapter.view_budget().shown_size(200, 150))
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Where?"}]}]
    ids = torch.tensor([adapter.encode_prefix(chat)])
    with torch.no_grad():
        return model(**adapter.forward_kwargs(model, ids, torch.ones_like(ids), **adapter.image_inputs([image]))).logits


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_same_seed_builds_byte_identical_folders_and_another_seed_differs(tmp_path: Path, arch: str) -> None:
    a = build_tiny_model(tmp_path / "a", "1m", seed=3, arch=arch)
    b = build_tiny_model(tmp_path / "b", "1m", seed=3, arch=arch)
    c = build_tiny_model(tmp_path / "c", "1m", seed=4, arch=arch)
    names = sorted(p.name for p in a.iterdir())
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "processor_config.json", "chat_template.jinja"} <= set(names)
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_build_leaves_the_callers_torch_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", "1m", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_save_reload_gives_identical_logits_and_processor(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "m", "1m", seed=0)
    model, processor = _load(folder), load_processor(folder)
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    reloaded = load_processor(tmp_path / "copy")
    assert type(reloaded) is type(processor)
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert reloaded.chat_template == processor.chat_template
    first, second = _logits(folder), _logits(tmp_path / "copy")
    assert first.abs().sum() > 0
    assert torch.equal(first, second)


@pytest.mark.parametrize(("arch", "merge_size", "patch_size"), [("qwen2_5_vl", 2, 14), ("qwen2_vl", 1, 14),
                                                                ("qwen2_5_vl", 2, 8)])
def test_architecture_knobs_reach_config_processor_and_adapter(tmp_path: Path, arch: str, merge_size: int,
                                                               patch_size: int) -> None:
    folder = build_tiny_model(tmp_path / "m", "1m", merge_size=merge_size, patch_size=patch_size, arch=arch)
    model, processor = _load(folder), load_processor(folder)
    adapter = adapter_for(model, processor)
    factor = patch_size * merge_size
    assert model.config.model_type == arch
    assert model.config.vision_config.spatial_merge_size == merge_size
    assert model.config.vision_config.patch_size == patch_size
    assert (adapter.factor, adapter.min_pixels, adapter.max_pixels) == (factor, 64 * factor**2, 256 * factor**2)
    assert adapter.coord_frame == {"qwen2_5_vl": "qwen25", "qwen2_vl": "norm1000"}[arch]
    tokens = (model.config.image_token_id, model.config.vision_start_token_id, model.config.vision_end_token_id)
    assert tokens == (adapter.image_pad_id, adapter.vision_start_id, adapter.vision_end_id)
    assert 5e5 < sum(p.numel() for p in model.parameters()) < 2e6  # the "1m" preset
    assert len(processor.tokenizer) <= model.config.text_config.vocab_size
    assert _logits(folder).isfinite().all()


def test_mrope_section_scales_qwens_split() -> None:
    assert mrope_section(128) == [16, 24, 24]
    for size in TINY_SIZES.values():
        section = mrope_section(size.text_hidden // size.text_heads)
        assert sum(section) == size.text_hidden // size.text_heads // 2 and min(section) > 0


def test_cli_writes_a_loadable_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / "cli"), "--seed", "1", "--merge-size", "1", "--arch", "qwen2_vl", "--max-pixels", "40000"]
    assert tiny_model_main(argv) == 0
    assert str(tmp_path / "cli") in capsys.readouterr().out
    image_processor = load_processor(tmp_path / "cli").image_processor
    assert (image_processor.merge_size, image_processor.size["longest_edge"]) == (1, 40000)
    assert _load(tmp_path / "cli").config.model_type == "qwen2_vl"


@pytest.mark.parametrize("argv", [["out", "--size", "3m"], ["out", "--merge-size", "0"],
                                  ["out", "--min-pixels", "10", "--max-pixels", "5"]])
def test_cli_rejects_bad_arguments(tmp_path: Path, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tiny_model_main([str(tmp_path / argv[0]), *argv[1:]])
    assert exit_info.value.code == 2


def test_build_rejects_unknown_size_and_arch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Expects size in"):
        build_tiny_model(tmp_path, "2m")
    with pytest.raises(ValueError, match="Expects arch in"):
        build_tiny_model(tmp_path, arch="llava")
