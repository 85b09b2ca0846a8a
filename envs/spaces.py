"""The spaces of the zoom envs: a chat in the Hugging Face multimodal format, and the model's text.

A chat is ``list[Message]`` with ``Message = {"role": "system" | "user" | "assistant", "content":
[Part, ...]}`` and ``Part = {"type": "text", "text": str}`` or ``{"type": "image", "image":
PIL.Image.Image, "view": ViewInfo}`` (the image already at ``view.shown_size``).

Batching (``gymnasium.make_vec``): like `gymnasium.spaces.Text`, a batch of ``n`` chats is a
``Tuple`` of ``n`` `ChatSpace` and a batched observation is a tuple of chats. We register
``batch_space``, ``concatenate`` and ``create_empty_array`` for `ChatSpace`. ``iterate`` is left to
the batched ``Tuple`` (it walks the tuple of chats); registering it for `ChatSpace` itself would make
Gymnasium's Tuple ``iterate`` descend into each chat's messages. A chat (PIL images, text of any
length) fits no fixed-size shared-memory buffer, so ``vectorization_mode="async"`` needs
``vector_kwargs={"shared_memory": False}`` (chats then travel through the workers' pipes); without
it ``create_shared_memory`` raises an error that says so.

The action space, `ActionText`, is a `gymnasium.spaces.Text` whose character tables are built once
per process: every env (one per episode in a trainer) gets its own at no cost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
from gymnasium.spaces import Space, Text, Tuple
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, create_shared_memory
from PIL import Image
from zoomgym.envs.geometry import Box
from zoomgym.envs.views import ViewBudget, ViewInfo

Part = dict[str, Any]
Message = dict[str, Any]
Chat = list[Message]

ROLES = ("system", "user", "assistant")


@functools.cache
def action_charset() -> frozenset[str]:
    """Every printable character of the Basic Multilingual Plane, plus newline and tab (about 60K).

    Astral-plane characters are left out only to keep the tables of `ActionText` small: the env
    accepts any ``str`` as an action.
    """
    printable = (chr(c) for c in range(0x20, 0x10000))
    return frozenset(ch for ch in printable if ch.isprintable()) | {"\n", "\t"}


@functools.cache
def _action_tables() -> dict[str, Any]:
    # `Text.__init__` sorts and indexes its characters: about 0.2 s for `action_charset()`. Its
    # state is built here once and shared, read-only, by every `ActionText`.
    return dict(vars(Text(1, min_length=0, charset=action_charset())))


class ActionText(Text):
    """The zoom envs' action space: text of 0 to ``max_length`` characters of `action_charset`.

    A `gymnasium.spaces.Text` in every respect (``sample``, ``contains``, equality, batching), except
    that building, copying and pickling one is cheap: a plain ``Text`` over these 60K characters
    costs about 0.2 s to build or deep-copy and pickles to 2 MB, every time an env is made. Here the
    character tables are built once per process and shared by every instance (nothing modifies
    them); each instance has its own random generator. Pickles carry the length and the generator.

    >>> space = ActionText(32, seed=0)
    >>> space == Text(32, min_length=0, charset=action_charset()), "Zoom: [1, 2, 3, 4]" in space
    (True, True)
    """

    def __init__(self, max_length: int, seed: int | np.random.Generator | None = None) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 0:
            raise ValueError(f"Expects max_length to be an int >= 0, actual: {max_length!r}")
        vars(self).update(_action_tables())
        self.min_length, self.max_length = 0, int(max_length)
        Space.__init__(self, dtype=str, seed=seed)

    def __deepcopy__(self, memo: dict[int, Any]) -> ActionText:
        return ActionText(self.max_length, seed=deepcopy(self._np_random, memo))

    def __reduce__(self) -> tuple[Any, ...]:
        return (ActionText, (self.max_length, self._np_random))

    def __repr__(self) -> str:
        return f"ActionText(max_length={self.max_length})"
def _image_parts(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    # Hugging Face also allows a plain string as a message's content: it holds no image.
    return [part for message in messages if not isinstance(message["content"], str)
            for part in message["content"] if part.get("type") == "image"]


def message_images(messages: Sequence[Mapping[str, Any]]) -> list[Image.Image]:
    """The images of ``messages``, in the order their placeholders appear."""
    return [part["image"] for part in _image_parts(messages)]


def message_views(messages: Sequence[Mapping[str, Any]]) -> list[ViewInfo]:
    """The `ViewInfo` of every image of ``messages``, in order."""
    return [part["view"] for part in _image_parts(messages)]


def last_view(chat: Sequence[Mapping[str, Any]]) -> ViewInfo:
    """Provenance of the image shown last in ``chat``: the frame the next box is written in."""
    views = message_views(chat)
    if not views:
        raise ValueError("Expects a chat with at least one image, actual: none")
    return views[-1]


def count_crops(chat: Sequence[Mapping[str, Any]]) -> int:
    """How many crops the env has shown in ``chat`` (zooms taken)."""
    return sum(1 for view in message_views(chat) if view.kind == "crop")


class ChatSpace(Space[Chat]):
    """All chats of at most ``max_messages`` messages in the multimodal chat format.

    ``sample()`` draws a random, well-formed chat (a system message, then user/assistant turns with
    small random images), for tests and checkers.

    >>> space = ChatSpace(max_messages=8, seed=0)
    >>> space.sample() in space, [{"role": "user", "content": "hi"}] in space
    (True, False)
    """

    def __init__(self, max_messages: int = 64, seed: int | np.random.Generator | None = None) -> None:
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise ValueError(f"Expects max_messages to be a positive int, actual: {max_messages!r}")
        self.max_messages = max_messages
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def contains(self, x: Any) -> bool:
        """Whether ``x`` is a chat: a list of well-formed messages, each image matching its view."""
        return isinstance(x, list) and len(x) <= self.max_messages and all(_is_message(m) for m in x)

    def sample(self, mask: Any = None, probability: Any = None) -> Chat:
        """A random chat: a system message, then alternating user (image + text) and assistant text."""
        if mask is not None or probability is not None:
            raise NotImplementedError("ChatSpace.sample does not support masks or probabilities")
        rng = self.np_random
        budget = ViewBudget()  # small images on the default patch grid
        n_turns = int(rng.integers(0, max(1, (self.max_messages - 1) // 2) + 1))
        chat: Chat = [{"role": "system", "content": [_text_part(rng)]}]
        for turn in range(n_turns):
            width, height = (int(v) for v in rng.integers(1, 5, size=2) * budget.factor)
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            view = ViewInfo(
                sample_id=f"random-{turn}",
                region=Box(0, 0, width, height),
                shown_size=(width, height),
                visual_tokens=budget.visual_tokens(width, height),
                grid_thw=budget.grid_thw(width, height),
                kind="original",
            )
            image_part = {"type": "image", "image": Image.fromarray(pixels, "RGB"), "view": view}
            chat.append({"role": "user", "content": [image_part, _text_part(rng)]})
            chat.append({"role": "assistant", "content": [_text_part(rng)]})
        return chat

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChatSpace) and other.max_messages == self.max_messages

    def __hash__(self) -> int:
        return hash(("ChatSpace", self.max_messages))

    def __repr__(self) -> str:
        return f"ChatSpace(max_messages={self.max_messages})"


def _text_part(rng: np.random.Generator) -> Part:
    words = ["zoom", "look", "closer", "red", "box", "left", "(A)", "\\boxed{B}", "[1, 2, 3, 4]"]
    return {"type": "text", "text": " ".join(rng.choice(words, size=int(rng.integers(1, 8))).tolist())}


def _is_part(part: Any) -> bool:
    if not isinstance(part, dict):
        return False
    if part.get("type") == "text":
        return set(part) == {"type", "text"} and isinstance(part["text"], str)
    if part.get("type") == "image":
        return (
            set(part) == {"type", "image", "view"}
            and isinstance(part["image"], Image.Image)
            and isinstance(part["view"], ViewInfo)
            and part["image"].size == tuple(part["view"].shown_size)
        )
    return False


def _is_message(message: Any) -> bool:
    return (
        isinstance(message, dict)
        and set(message) == {"role", "content"}
        and message["role"] in ROLES
        and isinstance(message["content"], list)
        and all(_is_part(p) for p in message["content"])
    )


@batch_space.register(ChatSpace)
def _batch_chat_space(space: ChatSpace, n: int = 1) -> Tuple:
    # Each copy gets its own generator, as Gymnasium does for Text, so sampling one does not
    # advance the others.
    batched = Tuple(tuple(deepcopy(space) for _ in range(n)), seed=deepcopy(space.np_random))
    batched.seed([int(s) for s in deepcopy(space.np_random).integers(0, 2**31 - 1, n)])
    return batched


@concatenate.register(ChatSpace)
def _concatenate_chats(space: ChatSpace, items: Iterable[Chat], out: Any) -> tuple[Chat, ...]:
    return tuple(items)


@create_empty_array.register(ChatSpace)
def _empty_chats(space: ChatSpace, n: int = 1, fn: Callable = np.zeros) -> tuple[Chat, ...]:
    return tuple([] for _ in range(n))


@create_shared_memory.register(ChatSpace)
def _no_shared_memory(space: ChatSpace, n: int = 1, ctx: Any = None) -> Any:
    raise ValueError(
        "Expects gymnasium.make_vec(..., vectorization_mode='async', vector_kwargs={'shared_memory': False}) "
        "(or AsyncVectorEnv(..., shared_memory=False)) for chat observations, actual: shared_memory=True. "
        "A chat holds PIL images and text of any length, which no fixed-size shared-memory buffer holds."
    )
