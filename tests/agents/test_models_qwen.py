"""QwenVLAdapter on the tiny models: special ids, view budget, chat layout as ids and M-RoPE (pitfall 12)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from zoomgym.agents.models import adapter_for, build_tiny_model, load_processor
from zoomgym.envs.spaces import message_images

# Shown sizes (w, h) in the tiny test budget (4..64 visual tokens); no two share a merged grid.
SIZES = [(56, 84), (112, 56), (84, 140)]


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """Factory: arch -> (model, processor, adapter) of a tiny model whose budget admits small test images."""
    from transformers import AutoModelForImageTextToText

    built: dict[str, tuple] = {}

    def get(arch: str) -> tuple:
        if arch not in built:
            folder = build_tiny_model(tmp_path_factory.mktemp(arch) / "m", "1m", seed=0, arch=arch,
                                      min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
            model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
            processor = load_processor(folder)
            built[arch] = (model, processor, adapter_for(model, processor))
        return built[arch]

    return get


@pytest.fixture(params=["qwen2_5_vl", "qwen2_vl"])
def tiny(request: pytest.FixtureRequest, tiny_models):
    """Each architecture in turn."""
    return tiny_models(request.param)


@pytest.fixture()
def tiny25(tiny_models):
    """Qwen2.5-VL only (the slower tests)."""
    return tiny_models("qwen2_5_vl")


def _conversation(n_images: int, seed: int = 0) -> tuple[list[dict], list[Image.Image]]:
    """A system + user turn with the first image, then (assistant, user + next image) turns."""
    images = [_noise(*SIZES[i], seed=seed + i) for i in range(n_images)]
    chat = [
        {"role": "system", "content": [{"type": "text", "text": "Find the key area, then answer."}]},
        {"role": "user", "content": [{"type": "image", "image": images[0]},
                                     {"type": "text", "text": "What colour is the car?"}]},
    ]
    for i, image in enumerate(images[1:], start=1):
        chat += [
            {"role": "assistant", "content": [{"type": "text", "text": f'[{{"bbox_2d": [{i}, 2, 30, 40]}}]'}]},
            {"role": "user", "content": [{"type": "text", "text": "Here is the crop."}, {"type": "image", "image": image},
                                         {"type": "text", "text": "(A) red\n(B) blue"}]},
        ]
    return chat, images


def _incremental_ids(adapter, chat: list[dict], end_with_eos: bool) -> list[int]:
    """encode_prefix + generated ids (the assistant texts, encoded) + encode_env_turn ..."""
    ids = adapter.encode_prefix(chat[:2])
    for assistant, user in zip(chat[2::2], chat[3::2]):
        ids += adapter.tokenizer.encode(assistant["content"][0]["text"], add_special_tokens=False)
        ids += [adapter.end_of_turn_id] if end_with_eos else []
        ids += adapter.encode_env_turn(user, after_generation_ended_with_eos=end_with_eos)
    return ids


def _expected_positions(ids: list[int], grids: list[tuple[int, int, int]], image_pad_id: int,
                        merge: int) -> torch.Tensor:
    """M-RoPE by its definition: text counts up on all three axes; an image's merged token (r, c) sits at
    (start, start + r, start + c); text after it resumes at start + max(rows, cols)."""
    positions, grids_left, i, next_pos = [], iter(grids), 0, 0
    while i < len(ids):
        if ids[i] != image_pad_id:
            positions.append((next_pos,) * 3)
            next_pos, i = next_pos + 1, i + 1
            continue
        _, gh, gw = next(grids_left)
        rows, cols = gh // merge, gw // merge
        positions += [(next_pos, next_pos + r, next_pos + c) for r in range(rows) for c in range(cols)]
        next_pos, i = next_pos + max(rows, cols), i + rows * cols
    return torch.tensor(positions).T


def test_special_ids_come_from_the_tokenizer(tiny) -> None:
    _, processor, adapter = tiny
    tokenizer = processor.tokenizer
    for attribute, token in [("im_start_id", "<|im_start|>"), ("im_end_id", "<|im_end|>"),
                             ("image_pad_id", "<|image_pad|>"), ("video_pad_id", "<|video_pad|>"),
                             ("vision_start_id", "<|vision_start|>"), ("vision_end_id", "<|vision_end|>"),
                             ("endoftext_id", "<|endoftext|>")]:
        assert getattr(adapter, attribute) == tokenizer.convert_tokens_to_ids(token)
    assert adapter.end_of_turn_id == adapter.im_end_id == tokenizer.eos_token_id
    assert adapter.pad_id == tokenizer.pad_token_id
    assert set(adapter.eos_ids) == {adapter.im_end_id, adapter.endoftext_id}
    assert adapter.image_pad_id < 2048  # the tiny vocabulary, not Qwen's 151655


def test_coord_frame_and_view_budget_follow_the_processor(tiny) -> None:
    from zoomgym.envs.views import ViewBudget

    model, _, adapter = tiny
    assert adapter.coord_frame == {"qwen2_5_vl": "qwen25", "qwen2_vl": "norm1000"}[model.config.model_type]
    budget = adapter.view_budget()
    assert budget == ViewBudget(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28, patch_size=14, merge_size=2)
    for width, height in [(1000, 700), (30, 20), (90, 400), (56, 84)]:
        shown = budget.shown_size(width, height)
        image = _noise(*shown)
        assert adapter.token_count(image) == budget.visual_tokens(*shown)
        assert adapter.grid_thw(image) == budget.grid_thw(*shown)


@pytest.mark.parametrize("size", [(57, 84), (28, 28), (28 * 10, 28 * 10)])
def test_images_not_at_their_shown_size_are_rejected(tiny25, size: tuple[int, int]) -> None:
    _, _, adapter = tiny25
    with pytest.raises(ValueError, match=f"actual: {size[0]}x{size[1]}"):
        adapter.token_count(_noise(*size))
    with pytest.raises(ValueError, match="Expects an image at its shown size"):
        adapter.image_inputs([_noise(*size)])


def test_unknown_model_type_names_the_supported_ones(tiny25) -> None:
    from transformers import LlamaConfig

    _, processor, _ = tiny25
    with pytest.raises(ValueError, match=r"\['qwen2_5_vl', 'qwen2_vl'\].*'llama'"):
        adapter_for(LlamaConfig(), processor)


def test_image_pads_match_grid_tokens_and_mismatches_are_caught(tiny25) -> None:
    _, _, adapter = tiny25
    chat, images = _conversation(3)
    ids = _incremental_ids(adapter, chat, end_with_eos=True)
    grids = adapter.image_inputs(images)["image_grid_thw"]
    adapter.check_placeholders(ids, grids)
    runs = [adapter.token_count(image) for image in images]
    assert sum(i == adapter.image_pad_id for i in ids) == sum(runs) == int(grids.prod(-1).sum()) // 4
    assert ids.count(adapter.vision_start_id) == ids.count(adapter.vision_end_id) == 3
    with pytest.raises(ValueError, match="grid tokens"):
        adapter.check_placeholders(ids, grids[:2])
    dropped = list(ids)
    dropped.remove(adapter.image_pad_id)
    with pytest.raises(ValueError, match="grid tokens"):
        adapter.check_placeholders(dropped, grids)


@pytest.mark.parametrize("end_with_eos", [True, False])
def test_incremental_ids_equal_the_processor_on_the_whole_conversation(tiny, end_with_eos: bool) -> None:
    _, processor, adapter = tiny
    chat, images = _conversation(3)
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    whole = processor(text=[text], images=images, return_tensors="pt")
    assert _incremental_ids(adapter, chat, end_with_eos) == whole["input_ids"][0].tolist()
    assert torch.equal(adapter.mm_token_type_ids(whole["input_ids"]), whole["mm_token_type_ids"].to(torch.int32))
    ours = adapter.image_inputs(images)
    assert torch.equal(ours["image_grid_thw"], whole["image_grid_thw"])
    assert torch.equal(ours["pixel_values"], whole["pixel_values"])


def test_prefix_inserts_the_default_system_prompt_like_the_template(tiny25) -> None:
    _, processor, adapter = tiny25
    chat, images = _conversation(1)
    chat = chat[1:]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert adapter.encode_prefix(chat) == processor(text=[text], images=images)["input_ids"][0]
    with pytest.raises(ValueError, match="ending with a user message"):
        adapter.encode_prefix(chat + [{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_image_tokens_get_3d_positions_and_logits_match_the_models_own_forward(tiny, n_images: int) -> None:
    model, processor, adapter = tiny
    chat, images = _conversation(n_images)
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    whole = processor(text=[text], images=images, return_tensors="pt")
    ids = whole["input_ids"]
    grids = [tuple(g) for g in whole["image_grid_thw"].tolist()]

    kwargs = adapter.forward_kwargs(model, ids, whole["attention_mask"], **adapter.image_inputs(images))
    positions = kwargs["position_ids"]
    assert positions.shape == (3, 1, ids.shape[1])
    expected = _expected_positions(ids[0].tolist(), grids, adapter.image_pad_id, adapter.merge_size)
    assert torch.equal(positions[:, 0], expected)
    is_pad = ids[0] == adapter.image_pad_id
    assert not torch.equal(positions[1, 0, is_pad], positions[2, 0, is_pad])  # h and w differ
    start = 0
    for _, gh, gw in grids:  # every image spans its merged grid on the h and w axes
        start += int(torch.nonzero(is_pad[start:])[0])
        run = positions[:, 0, start:start + gh * gw // 4]
        assert run[0].unique().numel() == 1
        assert run[1].unique().numel() == gh // 2 and run[2].unique().numel() == gw // 2
        start += gh * gw // 4

    with torch.no_grad():
        ours = model(**kwargs).logits
        own = model(**whole).logits  # the model computes M-RoPE itself from mm_token_type_ids
        flat = model(**whole, position_ids=torch.arange(ids.shape[1])[None]).logits  # the reference's bug
    assert torch.allclose(ours, own, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, flat, atol=1e-3)  # 1-D positions for image tokens: a different model


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_padded_forward_equals_one_at_a_time(tiny25, side: str) -> None:
    model, _, adapter = tiny25
    sequences = [_conversation(1, seed=5), _conversation(3, seed=1)]
    rows = [_incremental_ids(adapter, chat, end_with_eos=True) for chat, _ in sequences]
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), adapter.pad_id)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[b, span], mask[b, span] = torch.tensor(row), 1
    images = [image for _, row_images in sequences for image in row_images]
    with torch.no_grad():
        batched = model(**adapter.forward_kwargs(model, ids, mask, **adapter.image_inputs(images))).logits
        for b, ((_, row_images), row) in enumerate(zip(sequences, rows)):
            one = torch.tensor([row])
            single = model(**adapter.forward_kwargs(model, one, torch.ones_like(one),
                                                    **adapter.image_inputs(row_images))).logits[0]
            assert torch.allclose(batched[b][mask[b].bool()], single, atol=1e-4, rtol=0)


def test_positions_are_found_through_wrappers(tiny25) -> None:
    model, _, adapter = tiny25
    chat, images = _conversation(2)
    ids = torch.tensor([adapter.encode_prefix(chat[:2])])
    grids = adapter.image_inputs(images[:1])["image_grid_thw"]

    class Wrapper(torch.nn.Module):  # DDP-style: the model under .module
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.module = inner

    direct = adapter.position_ids(ids, grids, None, model)
    assert torch.equal(adapter.position_ids(ids, grids, None, Wrapper(model)), direct)
    with pytest.raises(TypeError, match="get_rope_index"):
        adapter.position_ids(ids, grids, None, torch.nn.Linear(2, 2))


def test_env_turn_closes_the_turn_only_when_the_model_did_not(tiny25) -> None:
    _, _, adapter = tiny25
    reply = {"role": "user", "content": [{"type": "text", "text": "Answer now."}]}
    after_eos = adapter.encode_env_turn(reply, after_generation_ended_with_eos=True)
    after_stop = adapter.encode_env_turn(reply, after_generation_ended_with_eos=False)
    assert after_stop == [adapter.im_end_id, *after_eos]
    assert after_eos[0] != adapter.im_end_id and after_eos.count(adapter.im_start_id) == 2
    assert after_eos[-1] != adapter.im_start_id and after_eos.count(adapter.im_end_id) == 1
    with pytest.raises(ValueError, match="Expects the env's turn to be a user message"):
        adapter.encode_env_turn({"role": "assistant", "content": "x"}, True)


def test_images_of_messages_in_placeholder_order(tiny25) -> None:
    _, _, adapter = tiny25
    chat, images = _conversation(3)
    assert message_images(chat) == images
    assert message_images([{"role": "user", "content": "text only"}]) == []
    assert adapter.image_inputs([]) == {}
