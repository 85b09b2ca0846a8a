"""Multimodal chats for supervised fine-tuning: the `ChatExample` type, the jsonl format and registered tasks.

A chat is a conversation whose assistant turns are the targets of teacher forcing (``zoomgym sft``).
It comes from a jsonl file (``load_chats``) or from a registered task that generates chats
(``CHAT_TASKS``, e.g. the toy base's grounding and reading tasks in `envs.data.toy_tasks`).

The jsonl format, one chat per line::

    {"id": "c1", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": "imgs/a.png"},
                                     {"type": "text", "text": "Where is the red frame? Box as JSON."}]},
        {"role": "assistant", "content": "[112, 56, 146, 90]"}]}

``content`` is a string or a list of ``text`` / ``image`` parts; an image is a path relative to the
jsonl file's folder and, like the datasets' images, must resolve inside that folder unless
``allow_outside_root=True``. Assistant turns are text, and a chat has at least one; ``id`` is
optional (default ``<file name>:<line>``). Every image's header is checked at load, so a bad file
fails before training with the file, the line and the chat named.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from zoomgym.envs.data.images import check_image, load_image
from zoomgym.envs.data.loaders import _image_path, _read_json_lines, _Where
from zoomgym.envs.data.sample import ImageSource, Sample

from zoomgym.registry import Registry

ROLES = ("system", "user", "assistant")

Message = dict[str, Any]


@dataclass(frozen=True, eq=False)
class ChatExample:
    """One conversation to imitate.

    Attributes:
        id: names the chat in every error message.
        messages: chat messages (``role``, ``content``); images in ``content`` parts are PIL images or
            `ImageSource` values (decoded with ``chat_image``). The assistant messages are the targets.
        category: what kind of chat it is (a task's kind, e.g. ``"grounding"``); metrics are split by it.
        token_labels: optional training-only targets per image of the chat, in order: ``{head: (T,)
            int64}`` with one class per visual token of the image as shown (row-major). An SFT run with
            ``sft.aux_weight > 0`` trains a linear head per name on the image tokens' hidden states.
        attend: optional per image, ``(T,)`` bool: the visual tokens the assistant's reply is about; with
            ``sft.attention_weight > 0`` the reply's positions are taught to attend to them.
    """

    id: str
    messages: tuple[Message, ...]
    category: str = ""
    token_labels: tuple[Mapping[str, np.ndarray], ...] = ()
    attend: tuple[np.ndarray, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> list[Any]:
        """Every image of the chat, in order."""
        return [part["image"] for m in self.messages if not isinstance(m["content"], str)
                for part in m["content"] if part.get("type") == "image"]

    @property
    def reply(self) -> str:
        """The last assistant message's text (what validation compares a generation against)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "assistant")

    def prompt(self) -> list[Message]:
        """The messages before the last assistant turn (what validation generates from)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return list(self.messages[:last])


def chat_image(chat_id: str, index: int, source: Any) -> Image.Image:
    """The RGB image of a chat's image part, decoded with the datasets' bounded, cached decoder (its
    errors name the chat and the image's index)."""
    if isinstance(source, Image.Image) and source.mode == "RGB":
        return source
    return load_image(_image_sample(chat_id, index, source))


def _image_sample(chat_id: str, index: int, source: ImageSource) -> Sample:
    # The image decoder names what it decodes by a sample: a chat image is a one-image sample.
    return Sample(id=f"{chat_id} image {index}", image=source, question="", options=("-",), answer="A")


def load_chats(path: str | Path, *, allow_outside_root: bool = False, limit: int | None = None) -> list[ChatExample]:
    """Chats from a jsonl file (module docstring); raises ValueError naming the file, line and key.

    Args:
        path: the jsonl file.
        allow_outside_root: follow image paths that resolve outside the file's folder.
        limit: keep the first ``limit`` chats.
    """
    path = Path(path)
    chats: list[ChatExample] = []
    seen: set[str] = set()
    for number, record, _ in _read_json_lines(path):
        where = _Where(path, "line", number)
        chat_id = record.get("id", f"{path.name}:{number}")
        if not isinstance(chat_id, str) or not chat_id:
            raise where.error("id", "a non-empty string", chat_id)
        if chat_id in seen:
            raise where.error("id", "an id not used on an earlier line", chat_id)
        seen.add(chat_id)
        messages = _messages(record.get("messages"), where, path.parent, chat_id, allow_outside_root)
        category = record.get("category", "")
        if not isinstance(category, str):
            raise where.error("category", "a string", category)
        chats.append(ChatExample(chat_id, tuple(messages), category))
        if limit is not None and len(chats) >= limit:
            break
    if not chats:
        raise ValueError(f"Expects at least one chat in {str(path)!r}, actual: none")
    return chats


def _messages(value: Any, where: _Where, folder: Path, chat_id: str, allow_outside_root: bool) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise where.error("messages", "a non-empty list of {role, content}", value)
    out: list[Message] = []
    for i, message in enumerate(value):
        key = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise where.error(key, f"an object with role in {ROLES}", message)
        content = message.get("content")
        if message["role"] == "assistant" and not isinstance(content, str):
            raise where.error(f"{key}.content", "the assistant's reply as a string", content)
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise where.error(f"{key}.content", "a string or a non-empty list of text/image parts", content)
        parts = []
        for j, part in enumerate(content):
            part_key = f"{key}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image" and isinstance(part.get("image"), str):
                image = _image_path(folder, part["image"], where, chat_id, allow_outside_root)
                check_image(_image_sample(chat_id, len(parts), image))
                parts.append({"type": "image", "image": image})
            else:
                raise where.error(part_key, '{"type": "text", "text": str} or {"type": "image", "image": path}', part)
        out.append({"role": message["role"], "content": parts})
    if not any(m["role"] == "assistant" for m in out):
        raise where.error("messages", "at least one assistant message (the target)", [m["role"] for m in out])
    if out[0]["role"] == "assistant":
        raise where.error("messages[0]", "a system or user message first", out[0]["role"])
    return out


ChatTask = Callable[..., list[ChatExample]]
"""``task(n, seed, view_budget, **options) -> list[ChatExample]``: ``n`` chats, a function of its arguments only,
with images already at their shown size under ``view_budget`` (the model's)."""

CHAT_TASKS: Registry[ChatTask] = Registry("chat task")
"""ChatExample generators by name (``sft.train[*].task`` in a config)."""

TOKEN_LABEL_CLASSES: dict[str, dict[str, int]] = {}
"""Per task, the class count of each ``ChatExample.token_labels`` head it writes (sizes the SFT's aux heads)."""


def register_chat_task(name: str, label_classes: Mapping[str, int] | None = None) -> Callable[[ChatTask], ChatTask]:
    """Decorator: register a chat generator under ``name``, with the class counts of its token labels."""

    def add(task: ChatTask) -> ChatTask:
        CHAT_TASKS.register(name, task)
        TOKEN_LABEL_CLASSES[name] = dict(label_classes or {})
        return task

    return add


def make_chats(task: str, n: int, seed: int, view_budget: Any, options: Mapping[str, Any] | None = None) -> list[ChatExample]:
    """``n`` chats of the registered ``task``."""
    return CHAT_TASKS.lookup(task)(n, seed, view_budget, **dict(options or {}))
