"""Each distinct image of a batch through the image processor and the vision tower once.

The ``G`` rollouts of a GRPO/MGPO group show the same view of the same original, and two rollouts
that write the same box show the same crop, so a batch of sequences holds many copies of few images.
Here an image is preprocessed and encoded once, and its embeddings go to every sequence that shows it:

1. `unique_image_inputs` (where a batch is built, e.g. `agents.trajectory.collate`): the pixel
   patches of each distinct image once, every image's grid in sequence order (what the rope index
   reads), and ``image_index``, the distinct image each image is;
2. `with_image_features` (just before the forward): the vision tower over the distinct images, its
   per-image embeddings handed to the model in sequence order as ``mm_encoder_outputs`` (transformers'
   precomputed-encoder input of the Qwen-VL models), which scatters them onto the image pads as it
   does with embeddings it computes itself.

Identity is exact: two images are one when their mode, size and pixel bytes are equal, never on
provenance alone. They are looked up by a 128-bit digest of the bytes (a batch's keys stay small),
and a match is confirmed by comparing the bytes, so not even a digest collision merges two images.
An image object seen twice is read once. The vision tower treats every image on its own (attention
within an image, per-image windows), so the embeddings of an image do not depend on the others in
its batch, and gradients from every copy add up on the one computation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image


def image_key(image: Image.Image, data: bytes) -> Hashable:
    """The lookup key of an image whose pixel bytes are ``data``: mode, size and a BLAKE2b digest."""
    return image.mode, image.size, hashlib.blake2b(data, digest_size=16).digest()


def unique_images(images: Sequence[Image.Image]) -> tuple[list[Image.Image], list[int]]:
    """The distinct images among ``images`` in first-seen order, and for each image the position of
    its distinct image: ``images[i]`` has the pixels of ``distinct[index[i]]``."""
    positions_of: dict[Hashable, list[int]] = {}  # key -> the distinct images with that key
    by_object: dict[int, int] = {}  # id(image) -> position: an object shown again is not read again
    distinct: list[Image.Image] = []
    index: list[int] = []
    for image in images:
        position = by_object.get(id(image))
        if position is None:
            data = image.tobytes()
            candidates = positions_of.setdefault(image_key(image, data), [])
            position = next((j for j in candidates if distinct[j].tobytes() == data), None)
            if position is None:
                position = len(distinct)
                distinct.append(image)
                candidates.append(position)
            by_object[id(image)] = position
        index.append(position)
    return distinct, index


def unique_image_inputs(adapter: Any, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
    """Pixel inputs of ``images`` (shown images, in sequence order) with each distinct image once.

    Args:
        adapter: the model adapter (`agents.models.QwenVLAdapter`): its ``image_inputs`` preprocesses.
        images: every image of the batch, in the order of their placeholders.

    Returns:
        ``{"pixel_values": the patches of the distinct images, "image_grid_thw": (n_images, 3) every
        image's grid, "image_index": (n_images,) int64, the distinct image of each}``; ``{}`` for no
        images. `with_image_features` turns them into the model's image input.
    """
    import torch

    if not images:
        return {}
    distinct, index = unique_images(images)
    pixels = adapter.image_inputs(distinct)
    image_index = torch.tensor(index, dtype=torch.long)
    return {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"][image_index],
            "image_index": image_index}


def with_image_features(model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``inputs`` for ``model``'s forward with the vision tower run once per distinct image.

    Args:
        model: the Qwen-VL ``...ForConditionalGeneration`` or its inner ``...Model`` (or a wrapper).
        inputs: forward inputs holding `unique_image_inputs`' keys (e.g. from ``adapter.forward_kwargs``);
            inputs without ``image_index`` are returned as they are.

    Returns:
        The same inputs with ``pixel_values`` and ``image_index`` replaced by ``mm_encoder_outputs``:
        the distinct images' embeddings, one entry per image in sequence order.
    """
    if "image_index" not in inputs:
        return dict(inputs)
    from zoomgym.agents.models.qwen import _rope_index_owner

    out = {key: value for key, value in inputs.items() if key not in ("pixel_values", "image_index")}
    index, grids = inputs["image_index"], inputs["image_grid_thw"]
    distinct_grids = grids.new_zeros((int(index.max()) + 1, 3))
    distinct_grids[index] = grids
    features = _rope_index_owner(model).get_image_features(inputs["pixel_values"], distinct_grids, return_dict=True)
    per_distinct = features.pooler_output
    features.pooler_output = tuple(per_distinct[i] for i in index.tolist())
    out["mm_encoder_outputs"] = {"image": features}
    return out


__all__ = ["image_key", "unique_image_inputs", "unique_images", "with_image_features"]
