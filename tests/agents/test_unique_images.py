"""Each distinct image once per batch: exact identity, and the same numbers as encoding every image.

The reference is the per-image path: the model's own forward with the patches of every image in
sequence order (what collate and the sampler did before), on the same padded batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from zoomgym.agents.backends.base import GenerationRequest, SamplingParams
from zoomgym.agents.models.unique_images import unique_image_inputs, unique_images
from zoomgym.agents.rollout import run_rollouts

TOL = 1e-6
ZOOM = '```json\n[{"bbox_2d": [12, 20, 150, 100], "label": "key area"}]\n```'


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def one_pixel_off(image: Image.Image) -> Image.Image:
    pixels = np.array(image)
    pixels[0, 0, 0] ^= 1
    return Image.fromarray(pixels)


def test_equal_pixels_are_one_image_and_one_pixel_apart_are_two():
    a = noise(56, 84, 0)
    copy = Image.fromarray(np.array(a))  # another object, the same pixels
    other = one_pixel_off(a)
    distinct, index = unique_images([a, copy, other, a, other])
    assert index == [0, 0, 1, 0, 1]
    assert distinct[0] is a and distinct[1] is other
    # Same bytes, another size or mode: not the same image.
    flat = Image.frombytes("RGB", (84, 56), a.tobytes())
    grey = Image.frombytes("L", (56 * 3, 84), a.tobytes())
    assert unique_images([a, flat, grey])[1] == [0, 1, 2]


def test_a_digest_collision_merges_nothing(monkeypatch):
    import zoomgym.agents.models.unique_images as unique

    monkeypatch.setattr(unique, "image_key", lambda image, data: "every image collides")
    a = noise(28, 28, 3)
    images = [a, one_pixel_off(a), noise(28, 28, 4), Image.fromarray(np.array(a)), one_pixel_off(a)]
    assert unique.unique_images(images)[1] == [0, 1, 2, 0, 1]


def test_unique_inputs_hold_each_distinct_image_once(tiny_agent):
    adapter = tiny_agent.adapter
    a, b = noise(112, 112, 1), noise(224, 112, 2)
    images = [a, b, Image.fromarray(np.array(a)), one_pixel_off(a), b]
    ours = unique_image_inputs(adapter, images)
    assert ours["image_index"].tolist() == [0, 1, 0, 2, 1]
    each = adapter.image_inputs(images)
    assert torch.equal(ours["image_grid_thw"], each["image_grid_thw"])  # every image, in order
    distinct = adapter.image_inputs([a, b, images[3]])
    assert torch.equal(ours["pixel_values"], distinct["pixel_values"])
    assert unique_image_inputs(adapter, []) == {}


@pytest.fixture(scope="module")
def group_trajectories(tiny_agent, samples):
    """Two groups of three zoom episodes: within a group, the same view and the same crop."""
    from tests.agents.conftest import ScriptedBackend

    backend = ScriptedBackend(tiny_agent.backend, tiny_agent.adapter, [ZOOM, "\\boxed{B}"])
    return run_rollouts(backend, tiny_agent.adapter, samples[:2], 3, "zoomgym/ZoomEnv-v0", SamplingParams())


def every_image_batch(agent, trajectories):
    """The collated batch with the patches of every image (the per-image path the model runs itself)."""
    batch = dict(agent.collate(trajectories))
    del batch["image_index"]
    batch["pixel_values"] = agent.adapter.image_inputs([im for t in trajectories for im in t.images])["pixel_values"]
    return batch


def test_training_forward_equals_the_per_image_path(tiny_agent, group_trajectories):
    trajectories = group_trajectories
    batch = tiny_agent.collate(trajectories)
    assert len(batch["image_index"]) == 12 and int(batch["image_index"].max()) + 1 == 4  # 2 views + 2 crops
    reference = every_image_batch(tiny_agent, trajectories)
    params = [p for p in tiny_agent.model.parameters() if p.requires_grad]

    def logprobs_and_grads(collated):
        tiny_agent.model.zero_grad(set_to_none=True)
        logp, entropy = tiny_agent.token_logprobs(collated, with_entropy=True)
        mask = collated["loss_mask"] > 0
        (logp[mask].sum() + entropy[mask].sum()).backward()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        tiny_agent.model.zero_grad(set_to_none=True)
        return logp.detach(), entropy.detach(), grads

    ours, theirs = logprobs_and_grads(batch), logprobs_and_grads(reference)
    # Every position (image pads score -inf on both sides: the model never emits them).
    torch.testing.assert_close(ours[0], theirs[0], atol=TOL, rtol=0)
    torch.testing.assert_close(ours[1], theirs[1], atol=TOL, rtol=0)
    names = [name for name, p in tiny_agent.model.named_parameters() if p.requires_grad]
    visual = [i for i, name in enumerate(names) if "visual" in name]
    assert visual and any(float(theirs[2][i].abs().sum()) > 0 for i in visual)  # the vision tower is trained
    for a, b in zip(ours[2], theirs[2]):  # the copies' gradients are summed in another order: float rounding
        assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-9


def test_an_image_one_pixel_apart_is_encoded_on_its_own(tiny_agent, group_trajectories):
    """A trajectory whose view differs from its group's in one pixel gets its own embeddings."""
    first = group_trajectories[0]
    changed = dataclasses.replace(first, images=[one_pixel_off(first.images[0]), *first.images[1:]])
    batch = tiny_agent.collate([first, changed])
    assert batch["image_index"].tolist() == [0, 1, 2, 1]
    with torch.no_grad():
        logp, _ = tiny_agent.token_logprobs(batch)
        alone, _ = tiny_agent.token_logprobs(every_image_batch(tiny_agent, [changed]))
    torch.testing.assert_close(logp[1, : changed.length], alone[0, : changed.length], atol=TOL, rtol=0)
    # The model does see the pixel: a view merged with the unchanged one would score like row 0.
    sampled = changed.loss_mask.bool()
    assert (logp[1, : changed.length][sampled] - logp[0, : changed.length][sampled]).abs().max() > 0


def test_sampling_encodes_each_distinct_image_once_with_the_same_draws(tiny_agent, group_trajectories, monkeypatch):
    import zoomgym.agents.backends.hf as hf

    trajectories = group_trajectories
    cut = [int(t.loss_mask.nonzero()[-1]) for t in trajectories]  # prompts up to the last turn's final token
    requests = [GenerationRequest(t.input_ids[:c].tolist(), t.images, 6, seed=i)
                for i, (t, c) in enumerate(zip(trajectories, cut))]
    sampling = SamplingParams(temperature=1.0, stop_token_ids=tuple(tiny_agent.adapter.eos_ids))
    patches: list[int] = []
    hook = tiny_agent.model.model.visual.register_forward_hook(lambda m, args, out: patches.append(args[0].shape[0]))
    try:
        ours = tiny_agent.backend.generate(requests, sampling)
        deduped_patches = patches.pop()

        def every_image(adapter, images):
            pixels = adapter.image_inputs(images)
            return {**pixels, "image_index": torch.arange(len(images))}

        monkeypatch.setattr(hf, "unique_image_inputs", every_image)
        theirs = tiny_agent.backend.generate(requests, sampling)
        all_patches = patches.pop()
    finally:
        hook.remove()
    assert all_patches == 3 * deduped_patches  # each distinct image (a view, a crop) is in 3 rollouts
    for a, b in zip(ours, theirs):
        assert a.token_ids == b.token_ids
        assert np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max() < TOL
