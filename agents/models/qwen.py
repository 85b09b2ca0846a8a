"""Everything model-specific about a Qwen-VL family member, in one small class: ``QwenVLAdapter``.

The rollout engine and the trainer never build chat text, special ids, image placeholders or M-RoPE
positions themselves; they ask the adapter. Adding a family (Qwen3-VL) means one ``ADAPTERS`` entry,
and a subclass only where that family's layout or rope index differs.

Chat layout (Qwen2-VL and Qwen2.5-VL; ``n`` = the image's visual tokens)::

    <|im_start|>system\\n{text}<|im_end|>\\n
    <|im_start|>user\\n{text}<|vision_start|><|image_pad|> * n<|vision_end|>{text}<|im_end|>\\n
    <|im_start|>assistant\\n{generated ids, ending with <|im_end|> if the model stopped by itself}
    [<|im_end|> if it did not]\\n<|im_start|>user\\n ... <|im_end|>\\n<|im_start|>assistant\\n ...

Everything is produced as token ids: model output is never decoded and re-encoded. Texts between
special tokens are encoded as whole segments, which is exactly how the tokenizer splits a rendered
conversation (added tokens first, then each text segment on its own), so an incremental encoding
equals the chat template's rendering of the whole conversation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from zoomgym.envs.views import ViewBudget

Message = Mapping[str, Any]
"""One chat message: ``{"role": str, "content": str | [{"type": "text", "text": str} | {"type": "image",
"image": PIL.Image.Image, ...}]}`` (Hugging Face multimodal chat format)."""


class QwenVLAdapter:
    """Chat layout, special ids, image placeholders, coordinate frame and M-RoPE of a Qwen-VL model.

    Build it with ``adapter_for(model_or_config, processor)``.

    Attributes:
        model_type: ``config.model_type`` (``"qwen2_5_vl"``, ``"qwen2_vl"``).
        coord_frame: the frame the model writes boxes in (``envs.geometry.FRAMES`` key): ``"qwen25"``
            (absolute pixels of the image as shown) for Qwen2.5-VL, ``"norm1000"`` for Qwen2-VL.
        default_system_prompt: what the family's chat template inserts when there is no system message.
        im_start_id, im_end_id, image_pad_id, video_pad_id, vision_start_id, vision_end_id,
        endoftext_id: special token ids, read from the tokenizer.
        pad_id: the tokenizer's padding id. end_of_turn_id: ``im_end_id``, the token that ends a turn.
        eos_ids: ids that end generation (``<|im_end|>``, ``<|endoftext|>``).
        patch_size, merge_size: from the image processor; ``factor = patch_size * merge_size``.
    """

    def __init__(self, processor: Any, *, model_type: str, coord_frame: str,
                 default_system_prompt: str | None = "You are a helpful assistant.") -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.model_type = model_type
        self.coord_frame = coord_frame
        self.default_system_prompt = default_system_prompt

        def token_id(token: str) -> int:
            ids = self.tokenizer.convert_tokens_to_ids([token])
            if not ids or ids[0] is None or self.tokenizer.convert_ids_to_tokens(ids[0]) != token:
                raise ValueError(f"Expects the tokenizer to have the special token {token}, actual: missing")
            return int(ids[0])

        self.im_start_id = token_id("<|im_start|>")
        self.im_end_id = token_id("<|im_end|>")
        self.endoftext_id = token_id("<|endoftext|>")
        self.image_pad_id = token_id(processor.image_token)
        self.video_pad_id = token_id(processor.video_token)
        self.vision_start_id = token_id("<|vision_start|>")
        self.vision_end_id = token_id("<|vision_end|>")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.endoftext_id
        self.end_of_turn_id = self.im_end_id
        self.eos_ids = (self.im_end_id, self.endoftext_id)
        self.patch_size = int(self.image_processor.patch_size)
        self.merge_size = int(self.image_processor.merge_size)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model_type={self.model_type!r}, coord_frame={self.coord_frame!r}, "
                f"factor={self.factor}, budget={self.min_pixels}..{self.max_pixels} px)")

    # ---- images -------------------------------------------------------------------------------------

    @property
    def factor(self) -> int:
        """Shown pixels per visual token side: ``patch_size * merge_size`` (28 for Qwen2.5-VL)."""
        return self.patch_size * self.merge_size

    @property
    def min_pixels(self) -> int:
        """The image processor's smallest shown area (``size["shortest_edge"]``)."""
        return int(self.image_processor.size["shortest_edge"])

    @property
    def max_pixels(self) -> int:
        """The image processor's largest shown area (``size["longest_edge"]``)."""
        return int(self.image_processor.size["longest_edge"])

    def view_budget(self) -> ViewBudget:
        """The processor's budget as the env's ``ViewBudget``: one setting shared by agent and env."""
        from zoomgym.envs.views import ViewBudget

        return ViewBudget(min_pixels=self.min_pixels, max_pixels=self.max_pixels, patch_size=self.patch_size,
                          merge_size=self.merge_size)

    def check_shown_size(self, image: Image.Image) -> None:
        """Raise unless the processor would leave ``image`` unresized (sides multiples of ``factor``,
        area within budget: a fixed point of Qwen's smart resize)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        width, height = image.size
        if width % self.factor or height % self.factor:
            resized = None
        else:
            resized = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)[::-1]
        if resized != (width, height):
            raise ValueError(
                f"Expects an image at its shown size (sides multiples of {self.factor}, area in "
                f"[{self.min_pixels}, {self.max_pixels}] px, unchanged by smart resize), actual: "
                f"{width}x{height}" + (f" would be resized to {resized[0]}x{resized[1]}" if resized else "")
            )

    def grid_thw(self, image: Image.Image) -> tuple[int, int, int]:
        """The processor's ``image_grid_thw`` row for a shown image: ``(1, h / patch, w / patch)``."""
        self.check_shown_size(image)
        width, height = image.size
        return (1, height // self.patch_size, width // self.patch_size)

    def token_count(self, image: Image.Image) -> int:
        """Image pads a shown image costs: ``grid_t * grid_h * grid_w / merge**2 = (w/factor)*(h/factor)``."""
        t, h, w = self.grid_thw(image)
        return t * h * w // self.merge_size**2

    def image_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Pixel inputs of shown images, in order, through the image processor without resizing.

        Returns:
            ``{"pixel_values": (sum_i h_i*w_i/patch**2, 3*temporal_patch*patch**2) float32,
            "image_grid_thw": (n_images, 3) int64}``, or ``{}`` for no images.
        """
        if not images:
            return {}
        for image in images:
            self.check_shown_size(image)
        out = self.image_processor(images=list(images), do_resize=False, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    # ---- chat layout as ids -------------------------------------------------------------------------

    def _encode_pieces(self, pieces: Sequence[str | list[int]]) -> list[int]:
        """Concatenate id lists and encode each maximal run of text as one segment."""
        ids: list[int] = []
        text: list[str] = []
        for piece in [*pieces, []]:
            if isinstance(piece, str):
                text.append(piece)
                continue
            if text and "".join(text):
                ids.extend(self.tokenizer.encode("".join(text), add_special_tokens=False))
            text = []
            ids.extend(piece)
        return ids

    def _message_pieces(self, message: Message) -> list[str | list[int]]:
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"Expects a message role in system/user/assistant, actual: {role!r}")
        pieces: list[str | list[int]] = [[self.im_start_id], f"{role}\n"]
        if isinstance(content, str):
            pieces.append(content)
        else:
            for part in content:
                kind = part.get("type")
                if kind == "text":
                    pieces.append(part["text"])
                elif kind == "image":
                    pieces.append([self.vision_start_id, *[self.image_pad_id] * self.token_count(part["image"]),
                                   self.vision_end_id])
                else:
                    raise ValueError(f"Expects message parts of type text or image, actual: {kind!r}")
        pieces += [[self.im_end_id], "\n"]
        return pieces

    def encode_prefix(self, messages: Sequence[Message]) -> list[int]:
        """Ids of the conversation so far plus the assistant header ``<|im_start|>assistant\\n``.

        For the first turn: the system message (the family's default one is inserted when the first
        message is not a system message, as the chat template does) and the user turn. Each image
        becomes ``<|vision_start|>`` + ``token_count(image)`` image pads + ``<|vision_end|>``.

        Args:
            messages: chat messages ending with a user message; images at their shown size.
        """
        if not messages or messages[-1].get("role") != "user":
            raise ValueError(
                f"Expects messages ending with a user message, actual: roles {[m.get('role') for m in messages]}"
            )
        pieces: list[str | list[int]] = []
        if messages[0].get("role") != "system" and self.default_system_prompt is not None:
            pieces += self._message_pieces({"role": "system", "content": self.default_system_prompt})
        for message in messages:
            pieces += self._message_pieces(message)
        return self._encode_pieces([*pieces, [self.im_start_id], "assistant\n"])

    def encode_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """Ids of a conversation with assistant replies, and the mask of the replies.

        Laid out exactly as a rollout lays out the same turns: `encode_prefix` up to the first reply,
        each reply as ``tokenizer.encode(text) + [<|im_end|>]``, and after each reply the env-turn
        layout of `encode_env_turn` (so supervised and RL sequences of one conversation are the same
        ids). The mask is 1 on every reply's tokens and its ``<|im_end|>``, 0 elsewhere. A conversation
        ending with a user message ends with the assistant header (a prompt to generate from).

        Args:
            messages: system/user/assistant messages; every assistant message is text and follows a
                user message.
        """
        replies = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        for i in replies:
            if i == 0 or messages[i - 1].get("role") != "user" or not isinstance(messages[i].get("content"), str):
                raise ValueError(
                    f"Expects every assistant message to be text after a user message, actual: message {i} "
                    f"after {messages[i - 1].get('role') if i else 'nothing'!r}"
                )
        ends = replies if replies and replies[-1] == len(messages) - 1 else [*replies, len(messages)]
        ids: list[int] = []
        mask: list[int] = []
        start = 0  # first message not yet encoded
        for end in ends:
            if start == 0:
                context = self.encode_prefix(messages[:end])
            else:
                pieces: list[str | list[int]] = ["\n"]
                for message in messages[start:end]:
                    pieces += self._message_pieces(message)
                context = self._encode_pieces([*pieces, [self.im_start_id], "assistant\n"])
            ids += context
            mask += [0] * len(context)
            if end < len(messages):
                reply = [*self.tokenizer.encode(messages[end]["content"], add_special_tokens=False), self.im_end_id]
                ids += reply
                mask += [1] * len(reply)
            start = end + 1
        return ids, mask

    def encode_env_turn(self, user_message: Message, after_generation_ended_with_eos: bool) -> list[int]:
        """Ids that follow the model's generated ids: close its turn, the env's user turn, a new header.

        ``[<|im_end|>]`` (only if the model did not emit it: stopped by a stop string or a length
        limit) ``+ "\\n<|im_start|>user\\n" + content + "<|im_end|>\\n<|im_start|>assistant\\n"``.

        Args:
            user_message: the env's new user message; images at their shown size.
            after_generation_ended_with_eos: whether the generated ids end with ``end_of_turn_id``.
        """
        if user_message.get("role") != "user":
            raise ValueError(f"Expects the env's turn to be a user message, actual: {user_message.get('role')!r}")
        close: list[str | list[int]] = [] if after_generation_ended_with_eos else [[self.im_end_id]]
        return self._encode_pieces([*close, "\n", *self._message_pieces(user_message), [self.im_start_id],
                                    "assistant\n"])

    def check_placeholders(self, input_ids: torch.Tensor | Sequence[int],
                           image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None) -> None:
        """Raise unless the image-pad runs of ``input_ids`` match the images' grid tokens one to one.

        Args:
            input_ids: ``(L,)`` or ``(B, L)``; runs are read row by row, left to right.
            image_grid_thw: ``(n_images, 3)`` for all rows, in the same order (or None without images).
        """
        import torch

        ids = torch.as_tensor(input_ids)
        rows = ids.view(1, -1) if ids.dim() == 1 else ids
        runs: list[int] = []
        for row in rows:
            is_pad = torch.cat([torch.zeros(1, dtype=torch.int8), (row == self.image_pad_id).to(torch.int8),
                                torch.zeros(1, dtype=torch.int8)])
            edges = torch.diff(is_pad).nonzero().flatten().tolist()
            runs += [end - start for start, end in zip(edges[0::2], edges[1::2])]
        grids = torch.as_tensor(image_grid_thw).view(-1, 3) if image_grid_thw is not None else torch.zeros(0, 3)
        expected = (grids.prod(-1) // self.merge_size**2).tolist()
        if runs != expected:
            raise ValueError(
                f"Expects one run of image pads per image with grid_t*grid_h*grid_w/merge**2 pads each, "
                f"actual: runs {runs} vs grid tokens {expected}"
            )

    # ---- model inputs -------------------------------------------------------------------------------

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Modality per token, as the processor returns it: 0 text, 1 image pad, 2 video pad."""
        import torch

        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == self.image_pad_id] = 1
        types[input_ids == self.video_pad_id] = 2
        return types

    def position_ids(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                     attention_mask: torch.Tensor | None, model: Any) -> torch.Tensor:
        """3-D M-RoPE positions ``(3, B, L)`` from the model's own rope index over the whole sequence.

        Text tokens get equal (t, h, w) positions counting up; the tokens of an image get
        ``(start, start + row, start + col)`` over its merged grid, and text after it resumes at
        ``start + max(grid_h, grid_w) / merge``. Padding (``attention_mask == 0``) gets position 0.

        Args:
            input_ids: ``(B, L)``.
            image_grid_thw: ``(n_images, 3)``: all images of row 0, then row 1, ...; None without images.
            attention_mask: ``(B, L)`` (left or right padding) or None.
            model: the ``...ForConditionalGeneration`` (or a wrapper of it, e.g. PEFT/DDP).
        """
        self.check_placeholders(input_ids, image_grid_thw)
        position_ids, _ = _rope_index_owner(model).get_rope_index(
            input_ids,
            mm_token_type_ids=self.mm_token_type_ids(input_ids),
            image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
        )
        return position_ids

    def forward_kwargs(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       pixel_values: torch.Tensor | None = None,
                       image_grid_thw: torch.Tensor | None = None,
                       image_index: torch.Tensor | None = None) -> dict[str, Any]:
        """Every input the model's forward needs, positions included, so that training and sampling
        forwards see identical inputs: ``model(**adapter.forward_kwargs(model, ...))``.

        ``image_index`` comes with pixels of each distinct image once (`agents.models.unique_images`):
        such inputs go through ``with_image_features(model, inputs)`` before the forward.

        Returns:
            ``input_ids``, ``attention_mask``, ``position_ids (3, B, L)``, ``mm_token_type_ids (B, L)``
            and, with images, ``pixel_values`` and ``image_grid_thw`` (and ``image_index`` when given).
        """
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": self.position_ids(input_ids, image_grid_thw, attention_mask, model),
            "mm_token_type_ids": self.mm_token_type_ids(input_ids),
        }
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values
            kwargs["image_grid_thw"] = image_grid_thw
        if image_index is not None:
            kwargs["image_index"] = image_index
        return kwargs


def _rope_index_owner(model: Any) -> Any:
    """The module holding ``get_rope_index`` (``model.model`` of a ForConditionalGeneration), found
    through wrappers (PEFT, DDP, torch.compile) by following ``.model``/``.module``/``._orig_mod``."""
    module, seen = model, set()
    while module is not None and id(module) not in seen:
        if callable(getattr(type(module), "get_rope_index", None)):
            return module
        seen.add(id(module))
        module = next((inner for name in ("model", "module", "_orig_mod")
                       if (inner := getattr(module, name, None)) is not None), None)
    raise TypeError(f"Expects a Qwen-VL model with a get_rope_index method, actual: {type(model).__name__}")


ADAPTERS: dict[str, tuple[type[QwenVLAdapter], dict[str, Any]]] = {
    "qwen2_5_vl": (QwenVLAdapter, {"coord_frame": "qwen25"}),
    "qwen2_vl": (QwenVLAdapter, {"coord_frame": "norm1000"}),
}
"""Adapter class and keyword arguments by ``config.model_type``. Qwen3-VL: add ``"qwen3_vl"`` (frame
``"norm1000"``) with a subclass where its layout or rope index differs."""


def adapter_for(model_or_config: Any, processor: Any) -> QwenVLAdapter:
    """The adapter for a model (or its config) and its processor, chosen by ``config.model_type``.

    Raises:
        ValueError: unsupported model type, or processor and config disagree on the image token id.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"Expects a model type in {sorted(ADAPTERS)}, actual: {model_type!r}")
    adapter_class, kwargs = ADAPTERS[model_type]
    adapter = adapter_class(processor, model_type=model_type, **kwargs)
    for name, ours in (("image_token_id", adapter.image_pad_id), ("vision_start_token_id", adapter.vision_start_id)):
        theirs = getattr(config, name, None)
        if theirs is not None and theirs != ours:
            raise ValueError(f"Expects config.{name} == the processor's id {ours}, actual: {theirs}")
    vision = getattr(config, "vision_config", None)
    for name, ours, theirs in (("merge_size", adapter.merge_size, getattr(vision, "spatial_merge_size", None)),
                               ("patch_size", adapter.patch_size, getattr(vision, "patch_size", None))):
        if theirs is not None and theirs != ours:
            raise ValueError(f"Expects the processor's {name} == the vision config's {theirs}, actual: {ours}")
    return adapter


__all__ = ["ADAPTERS", "Message", "QwenVLAdapter", "adapter_for"]
