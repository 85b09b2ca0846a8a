"""Token-exact multi-turn episodes and how they are batched for training.

A `Trajectory` is one episode as the model saw it: the whole multi-turn sequence of ids (system prompt,
user turns with their images' pad runs, the model's sampled turns, template tokens), a loss mask that
is 1 exactly on the tokens the model sampled, and each sampled token's log-prob at sampling time.

`collate` right-pads a list of trajectories into the model inputs of one training forward, with 3-D
M-RoPE positions from the model's own rope index over each whole sequence (never flat positions for
images after the first).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from zoomgym.agents.models.unique_images import image_key, unique_image_inputs

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class Trajectory:
    """One episode, token-exact.

    Attributes:
        input_ids: ``(L,)`` int64, the whole multi-turn sequence.
        loss_mask: ``(L,)`` int64, 1 exactly on sampled tokens (the sampled ``<|im_end|>`` included);
            0 on system/user/template/image tokens and on an end-of-turn token the template appended
            after a stop-string or length stop.
        sampling_logprobs: ``(L,)`` float32, ``log softmax(logits / T)`` of each sampled token at
            sampling time (``T = 1`` when greedy); 0 where ``loss_mask`` is 0.
        images: every image of the episode in sequence order, at its shown size.
        image_grid_thw: ``(n_images, 3)`` int64, the vision grid of each image.
        reward: the env's terminal reward (0 for an episode cut by the turn or context budget).
        infos: the env's info dicts, ``infos[0]`` from ``reset`` then one per ``step``.
        actions: the decoded text of each model turn, as given to the env.
        finish_reasons: per model turn, ``"eos"``, ``"stop"`` or ``"length"``.
        num_turns: model turns taken.
        terminated: the env ended the episode with an answer turn.
        truncated: the episode ended without an answer (turn budget or context budget).
        context_truncated: the env's next turn did not fit the context budget and was not appended.
        weight_version: version of the weights the tokens were sampled with.
        group_id: index of the sample in the rollout batch; the ``G`` rollouts of a sample share it.
        sample_id: the dataset sample's id.
        category: the sample's category.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    sampling_logprobs: torch.Tensor
    images: list[Image.Image]
    image_grid_thw: torch.Tensor
    reward: float
    infos: list[dict[str, Any]] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    num_turns: int = 0
    terminated: bool = False
    truncated: bool = False
    context_truncated: bool = False
    weight_version: int = 0
    group_id: int = 0
    sample_id: str = ""
    category: str = ""

    def __post_init__(self) -> None:
        length = self.input_ids.shape
        if self.input_ids.ndim != 1 or self.loss_mask.shape != length or self.sampling_logprobs.shape != length:
            raise ValueError(
                "Expects input_ids, loss_mask and sampling_logprobs of one shape (L,), actual: "
                f"{tuple(self.input_ids.shape)}, {tuple(self.loss_mask.shape)}, {tuple(self.sampling_logprobs.shape)}"
            )
        if self.image_grid_thw.shape != (len(self.images), 3):
            raise ValueError(
                f"Expects image_grid_thw of shape ({len(self.images)}, 3), actual: {tuple(self.image_grid_thw.shape)}"
            )

    @property
    def length(self) -> int:
        """``L``, the number of tokens of the whole sequence."""
        return int(self.input_ids.shape[0])

    @property
    def response_length(self) -> int:
        """Number of model-sampled tokens (what length penalties and token-mean losses count)."""
        return int(self.loss_mask.sum())


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                "image_index")
"""Keys of a collated batch that go into the model's forward, through
`agents.models.unique_images.with_image_features` (pixels of each distinct image once)."""


def prompt_key(trajectory: Trajectory) -> Hashable:
    """What identifies an episode's first prompt, for `length_sorted_batches`: the ids before its first
    sampled token and its first image's pixels (`agents.models.unique_images.image_key`). Episodes of
    one key begin with the same prompt (the ``G`` rollouts of a group); batching by it is only a
    matter of speed, since the forward finds what rows really share (`agents.shared_prefix`)."""
    sampled = trajectory.loss_mask.nonzero()
    first = int(sampled[0]) if sampled.numel() else trajectory.length
    image = trajectory.images[0] if trajectory.images else None
    return (trajectory.input_ids[:first].numpy().tobytes(),
            image_key(image, image.tobytes()) if image is not None else None)


def length_sorted_batches(lengths: Sequence[int], size: int, indices: Sequence[int] | None = None,
                          keys: Sequence[Hashable] | None = None) -> list[list[int]]:
    """``indices`` (default all of ``lengths``) in batches of at most ``size``, shortest first.

    A collated batch is as long as its longest sequence, so batching sequences of similar length
    leaves the least padding: with batches of a fixed size, the sorted split pads least. The sort
    is stable (ties keep their order), so the split is a function of the lengths and the order given.

    With ``keys`` (e.g. `prompt_key`), episodes of one key stay together, so a forward can compute
    their shared prompt once (`agents.shared_prefix`): each key's episodes, sorted by length, are cut
    into units of at most ``size``; the units, sorted by their longest episode, fill the batches in
    that order, a unit never split (a batch may then hold fewer than ``size``). Distinct keys give the
    plain split.

    >>> length_sorted_batches([5, 1, 4, 1], 2)
    [[1, 3], [2, 0]]
    >>> length_sorted_batches([5, 1, 4, 1, 3], 2, keys="abaab")
    [[1, 4], [3, 2], [0]]
    """
    if size < 1:
        raise ValueError(f"Expects a batch size >= 1, actual: {size!r}")
    order = sorted(range(len(lengths)) if indices is None else indices, key=lambda i: lengths[i])
    if keys is None:
        return [order[start : start + size] for start in range(0, len(order), size)]
    by_key: dict[Hashable, list[int]] = {}
    for i in order:
        by_key.setdefault(keys[i], []).append(i)
    units = [rows[start : start + size] for rows in by_key.values() for start in range(0, len(rows), size)]
    batches: list[list[int]] = []
    for unit in sorted(units, key=lambda unit: lengths[unit[-1]]):
        if batches and len(batches[-1]) + len(unit) <= size:
            batches[-1] += unit
        else:
            batches.append(list(unit))
    return batches


def collate(trajectories: Sequence[Trajectory], adapter: Any, model: Any) -> dict[str, Any]:
    """Right-pads trajectories into one batch of model inputs plus training targets.

    Args:
        trajectories: ``N`` episodes.
        adapter: the model's adapter (``agents.models.QwenVLAdapter``): pad id, image tensors, rope index.
        model: the model whose rope index computes the positions.

    Returns:
        ``input_ids (N, L)``, ``attention_mask (N, L)``, ``position_ids (3, N, L)`` (the model's own
        M-RoPE index over each whole sequence), ``mm_token_type_ids (N, L)``, ``pixel_values``
        (patches of each distinct image once: a group's shared view is preprocessed and encoded once),
        ``image_grid_thw (n_images, 3)`` and ``image_index (n_images,)`` (every image, trajectory by
        trajectory, and its distinct image; `agents.models.unique_images`),
        ``loss_mask (N, L)`` float32, ``sampling_logprobs (N, L)`` float32, ``rewards (N,)``,
        ``group_ids (N,)`` int64, ``weight_versions (N,)`` int64. ``L`` is the longest sequence.
    """
    if not trajectories:
        raise ValueError("Expects at least one trajectory, actual: none")
    n = len(trajectories)
    max_len = max(t.length for t in trajectories)
    input_ids = torch.full((n, max_len), adapter.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, max_len), dtype=torch.long)
    loss_mask = torch.zeros((n, max_len), dtype=torch.float32)
    sampling_logprobs = torch.zeros((n, max_len), dtype=torch.float32)
    for i, traj in enumerate(trajectories):
        input_ids[i, : traj.length] = traj.input_ids
        attention_mask[i, : traj.length] = 1
        loss_mask[i, : traj.length] = traj.loss_mask.float()
        sampling_logprobs[i, : traj.length] = traj.sampling_logprobs.float()
    pixels = unique_image_inputs(adapter, [image for traj in trajectories for image in traj.images])
    if pixels:
        grid = torch.cat([t.image_grid_thw for t in trajectories])
        if not torch.equal(pixels["image_grid_thw"], grid):
            raise ValueError(
                "Expects the processor's image grids to equal the trajectories', actual: "
                f"{pixels['image_grid_thw'].tolist()} vs {grid.tolist()}"
            )
    batch = adapter.forward_kwargs(model, input_ids, attention_mask, **pixels)
    batch.update(
        loss_mask=loss_mask,
        sampling_logprobs=sampling_logprobs,
        rewards=torch.tensor([t.reward for t in trajectories], dtype=torch.float32),
        group_ids=torch.tensor([t.group_id for t in trajectories], dtype=torch.long),
        weight_versions=torch.tensor([t.weight_version for t in trajectories], dtype=torch.long),
    )
    return batch
