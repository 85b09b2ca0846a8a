"""Weight export: the trainer's model as the state dict a separate rollout engine loads.

A backend that does not share the trainer's model object (vLLM) receives the weights under the
model's checkpoint names; LoRA adapters injected by ``peft`` are merged into their base layers on the
way out, so the engine needs to know nothing about them. Under FSDP2 the state dict holds each rank's
shards; `whole_tensors` all-gathers them one tensor at a time on the way into the engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

LORA_PARTS = ("lora_A.", "lora_B.", "lora_embedding_A.", "lora_embedding_B.", "lora_magnitude_vector.")
"""Name parts of ``peft`` LoRA parameters (left out of the merged state dict)."""


def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """``model``'s weights under its checkpoint names (what vLLM's ``load_weights`` reads).

    With LoRA adapters injected by ``peft`` (``get_peft_model``), each adapted linear layer is
    returned merged, ``W + sum_a scale_a * B_a @ A_a`` over its active, unmerged adapters, under the
    base name (``...q_proj.weight``, not ``...q_proj.base_layer.weight``); adapter tensors are left
    out. The model itself is not changed. DoRA adapters are rejected.
    """
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = model.state_dict()
    lora_layers = {name: module for name, module in model.named_modules() if _is_lora_layer(module)}
    if not lora_layers:
        return dict(state)
    merged = {key.replace(".base_layer.", "."): tensor for key, tensor in state.items()
              if not any(f".{part}" in key for part in LORA_PARTS)}
    with torch.no_grad():
        for name, layer in lora_layers.items():
            adapters = [a for a in layer.active_adapters if a in layer.lora_A]
            if any(layer.use_dora.get(a, False) for a in adapters):
                raise ValueError(f"Expects LoRA adapters without DoRA to merge, actual: DoRA in {name}")
            weight = layer.get_base_layer().weight.detach()
            if not layer.merged:  # a merged layer's base weight already holds the deltas
                weight = weight + sum(layer.get_delta_weight(a) for a in adapters).to(weight.dtype)
            merged[f"{name}.weight"] = weight
    return merged


def _is_lora_layer(module: Any) -> bool:
    """Whether ``module`` is a ``peft`` LoRA layer wrapping a base layer (duck-typed: peft stays optional)."""
    return all(hasattr(module, attr) for attr in ("lora_A", "get_delta_weight", "get_base_layer", "merged"))


def whole_tensors(state: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``state`` in order, each tensor whole and detached.

    A sharded tensor (FSDP2's ``DTensor``) is all-gathered when its turn comes, so a rank holds one whole
    tensor beyond its shards at a time, never a whole copy of the model; this is a collective: every rank
    must consume the whole stream, in the same order.
    """
    for name, tensor in state.items():
        whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        yield name, whole.detach()
