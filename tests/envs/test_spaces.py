"""Chat helpers beside the `Chat` type: images, views, the frame of the next box, zooms taken."""

from __future__ import annotations

import pytest
from PIL import Image
from zoomgym.envs.geometry import Box
from zoomgym.envs.spaces import ChatSpace, count_crops, last_view, message_images, message_views
from zoomgym.envs.views import ViewInfo


def view(kind: str, size: tuple[int, int]) -> ViewInfo:
    w, h = size
    return ViewInfo("s", Box(0, 0, w, h), size, (w // 28) * (h // 28), (1, h // 14, w // 14), kind)


def test_images_views_last_view_and_crops_in_order() -> None:
    original, crop = Image.new("RGB", (56, 28)), Image.new("RGB", (28, 28))
    chat = [
        {"role": "system", "content": "plain text content holds no image"},
        {"role": "user", "content": [{"type": "image", "image": original, "view": view("original", (56, 28))},
                                     {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "[1, 2, 3, 4]"}]},
        {"role": "user", "content": [{"type": "text", "text": "crop:"},
                                     {"type": "image", "image": crop, "view": view("crop", (28, 28))}]},
    ]
    assert message_images(chat) == [original, crop]
    assert [v.kind for v in message_views(chat)] == ["original", "crop"]
    assert last_view(chat).shown_size == (28, 28) and last_view(chat[:2]).kind == "original"
    assert count_crops(chat) == 1 and count_crops(chat[:3]) == 0
    with pytest.raises(ValueError, match="at least one image"):
        last_view(chat[:1])


def test_sampled_chats_use_the_default_patch_grid() -> None:
    space = ChatSpace(max_messages=9, seed=3)
    for _ in range(5):
        chat = space.sample()
        assert chat in space
        for v in message_views(chat):
            w, h = v.shown_size
            assert w % 28 == 0 and h % 28 == 0 and v.visual_tokens == (w // 28) * (h // 28)
