"""Pre-flight: the peak memory one rank of a run will need, estimated from config.json alone.

``zoomgym preflight CONFIG [overrides] [--gpus N] [--gpu-mem GiB]`` prints the estimate and whether it
fits; ``zoomgym train`` runs it first and refuses a GPU run that cannot fit, naming the knobs. Nothing
here loads weights: the architecture comes from the model folder's ``config.json`` (or, for a hub id
without a local folder, from `KNOWN_ARCHITECTURES`), the workload from the config.

Everything is bytes per rank. Notation: ``P`` parameters of the model, ``P_a`` LoRA adapter parameters,
``b`` bytes per value of ``model.dtype`` (2 for bfloat16, 4 for float32), ``N`` the ranks the training
state is sharded over (FSDP full shard; 1 without), ``m`` episodes per micro-batch
(``trainer.micro_batch_size``), ``L`` the worst-case tokens of one episode, ``V`` the vocabulary, ``h`` /
``kv`` / ``I`` the language model's hidden, key-value and MLP widths and ``n_layers`` its depth.

Training state (`training_state`), resident through the whole step:

* full fine-tuning, one precision (the single-process trainer: AdamW keeps its states in the parameters'
  dtype): weights ``b P``, gradients ``b P``, AdamW ``2 b P``: 8 bytes/param in bfloat16;
* full fine-tuning with mixed precision (the FSDP path: bfloat16 compute, float32 master weights):
  weights ``2 P`` + gradients ``2 P`` + float32 master copy and AdamW moments ``12 P`` = ``16 P``, the
  usual arithmetic;
* LoRA: the frozen base ``b P`` and the adapters alone carry gradients and optimizer states, in float32
  (peft's default for a bfloat16 base): ``16 P_a``; the reference policy is the base with adapters off;
* full fine-tuning with ``algorithm.kl_coef > 0``: a frozen reference copy, ``b P``;
* every term divided by ``N`` under FSDP; with CPU offload the sharded terms live in host memory, and
  FSDP's all-gathered units remain: two decoder layers (one computing, one prefetched) and the root
  unit (embeddings, head, vision merger), ``b`` each.

Gradients stay allocated between updates (the optimizer clears them when the next mini-batch starts),
so they count in the rollout phase too.

Update phase (`update_activations`), one micro-batch forward and backward:

* per token and language-model layer, the tensors autograd saves in a Qwen2 decoder layer with SDPA
  attention: the two RMSNorms keep a float32 copy of their input and their output (``2 (4 h + b h)``),
  attention keeps q, its rotated half and its rotated form, k likewise, the repeated k and v, its output
  and o_proj's input (``b (7 h + 3 kv)``), the SwiGLU MLP its gate, activation, up and product
  (``4 b I``): ``A = 8 h + b (9 h + 3 kv + 4 I)``; the vision tower the same per patch with its widths;
* with gradient checkpointing only each layer's input is kept (``b h`` per layer) and one layer is
  recomputed at a time (``A`` once); with LoRA (language model only) the frozen vision tower keeps nothing;
* the log-probs and entropies of `agents.scoring.token_logprobs`: per token, float32 logits divided by
  T, their log-softmax, softmax, a mask and the masked logits are kept for backward: ``17 V`` bytes;
  the backward of one row adds ``8 V`` per token.

Rollout phase: the training state, plus the generation engine: vLLM's share
(``rollout.vllm.gpu_memory_utilization`` of the GPU, released during the update when it sleeps), or the
hf backend's KV cache ``2 n_layers kv b`` per token for every episode generated together, and one
layer's widest intermediate.

The worst-case episode: every turn of the env's turn budget writes ``rollout.max_new_tokens`` after a
prompt of ``prompt_tokens`` (system prompt, question, choices, the env's text), and every image the env
can show has the view budget's most visual tokens (``max_pixels / (patch * merge)**2``); capped by
``rollout.max_context_tokens`` (or the model's context). Real episodes are usually much shorter: the
estimate is what the run must survive, not what it typically uses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zoomgym.algorithms.config import Config

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
"""Bytes per value of each ``model.dtype``."""
LOGIT_BYTES_SAVED = 17
"""Bytes autograd keeps per token and vocabulary entry in `agents.scoring.token_logprobs` with entropy."""
LOGIT_BYTES_BACKWARD = 8
"""Bytes per token and vocabulary entry of one row's logit gradients during backward (float32, two)."""
DEFAULT_PROMPT_TOKENS = 256
"""Prompt tokens per turn assumed by default: a system prompt, the question, four choices, the env's text."""
FIT_FRACTION = 0.95
"""Share of a device's memory a run may plan to use: the rest is the CUDA context and fragmentation."""
QWEN_MAX_PIXELS = 12845056
"""Qwen2.5-VL's and Qwen2-VL's processor default ``max_pixels`` (16384 visual tokens at factor 28)."""


# ----------------------------------------------------------------------------------------------------------
# The architecture
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """The numbers of a Qwen2.5-VL / Qwen2-VL model that its memory depends on (from ``config.json``).

    ``kind`` is ``"qwen2_5_vl"`` (RMSNorm, SwiGLU vision MLP with biases) or ``"qwen2_vl"`` (LayerNorm, GELU
    vision MLP); ``source`` says where the numbers came from.
    """

    kind: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    vision_out_hidden: int
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    source: str = ""

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection: kv heads times head size."""
        return self.num_kv_heads * (self.hidden_size // self.num_heads)

    @property
    def factor(self) -> int:
        """Shown pixels per visual token side (``patch * merge``)."""
        return self.patch_size * self.merge_size

    def decoder_layer_params(self) -> int:
        """One language-model layer: q, k, v with biases, o without, the SwiGLU MLP, two RMSNorms."""
        h, kv, i = self.hidden_size, self.kv_dim, self.intermediate_size
        return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h

    def language_params(self) -> int:
        """Embeddings, layers, final norm, and the head unless tied to the embeddings."""
        embeddings = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embeddings
        return embeddings + self.num_layers * self.decoder_layer_params() + self.hidden_size + head

    def vision_block_params(self) -> int:
        """One vision block: norms, fused qkv and proj with biases, the MLP with biases."""
        d, i = self.vision_hidden, self.vision_intermediate
        attention = (d * 3 * d + 3 * d) + (d * d + d)
        if self.kind == "qwen2_5_vl":  # two RMSNorms, gate/up/down
            return 2 * d + attention + 2 * (d * i + i) + (i * d + d)
        return 4 * d + attention + (d * i + i) + (i * d + d)  # two LayerNorms, fc1/fc2

    def vision_params(self) -> int:
        """Patch embedding (no bias), blocks, and the merger (norm, two linear layers with biases)."""
        d, merged = self.vision_hidden, self.vision_hidden * self.merge_size**2
        patch_embed = 3 * self.temporal_patch_size * self.patch_size**2 * d
        norm = d if self.kind == "qwen2_5_vl" else 2 * d
        merger = norm + (merged * merged + merged) + (merged * self.vision_out_hidden + self.vision_out_hidden)
        return patch_embed + self.vision_depth * self.vision_block_params() + merger

    def params(self) -> int:
        """``P``: every parameter of the model."""
        return self.language_params() + self.vision_params()

    def lora_params(self, rank: int, targets: Sequence[str]) -> int:
        """``P_a``: ``rank * (in + out)`` for every targeted linear layer of the language model (the
        trainer adapts the language model only, `algorithms.trainer.prepare_model`)."""
        h, kv, i = self.hidden_size, self.kv_dim, self.intermediate_size
        shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return self.num_layers * sum(rank * sum(shapes[t]) for t in targets if t in shapes)


def _qwen25(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool,
            name: str) -> Architecture:
    return Architecture("qwen2_5_vl", vocab, hidden, intermediate, layers, heads, kv_heads, tied, 128000,
                        vision_hidden=1280, vision_intermediate=3420, vision_depth=32, vision_out_hidden=hidden,
                        source=f"built-in table ({name}; no local config.json was read)")


def _qwen2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool,
           name: str) -> Architecture:
    return Architecture("qwen2_vl", vocab, hidden, intermediate, layers, heads, kv_heads, tied, 32768,
                        vision_hidden=1280, vision_intermediate=5120, vision_depth=32, vision_out_hidden=hidden,
                        source=f"built-in table ({name}; no local config.json was read)")


KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": _qwen25(2048, 11008, 36, 16, 2, 151936, True, "Qwen2.5-VL-3B"),
    "Qwen/Qwen2.5-VL-7B-Instruct": _qwen25(3584, 18944, 28, 28, 4, 152064, False, "Qwen2.5-VL-7B"),
    "Qwen/Qwen2.5-VL-32B-Instruct": _qwen25(5120, 27648, 64, 40, 8, 152064, False, "Qwen2.5-VL-32B"),
    "Qwen/Qwen2.5-VL-72B-Instruct": _qwen25(8192, 29568, 80, 64, 8, 152064, False, "Qwen2.5-VL-72B"),
    "Qwen/Qwen2-VL-2B-Instruct": _qwen2(1536, 8960, 28, 12, 2, 151936, True, "Qwen2-VL-2B"),
    "Qwen/Qwen2-VL-7B-Instruct": _qwen2(3584, 18944, 28, 28, 4, 152064, False, "Qwen2-VL-7B"),
    "Qwen/Qwen2-VL-72B-Instruct": _qwen2(8192, 29568, 80, 64, 8, 152064, False, "Qwen2-VL-72B"),
}
"""Hub ids -> the numbers of their published ``config.json`` (base and Instruct share them)."""


def read_architecture(path: str) -> Architecture:
    """The `Architecture` of a model folder's ``config.json``, else of a known hub id.

    Raises:
        ValueError: no ``config.json`` and an unknown id, or a config that is not Qwen2.5-VL / Qwen2-VL.
    """
    config_file = Path(path).expanduser() / "config.json"
    if not config_file.is_file():
        known = KNOWN_ARCHITECTURES.get(path) or KNOWN_ARCHITECTURES.get(f"{path}-Instruct")
        if known is None:
            raise ValueError(f"Expects a model folder holding config.json or a hub id among "
                             f"{sorted(KNOWN_ARCHITECTURES)}, actual: {path!r}")
        return known
    config = json.loads(config_file.read_text())
    kind = config.get("model_type")
    if kind not in ("qwen2_5_vl", "qwen2_vl"):
        raise ValueError(f"{config_file}: expects model_type qwen2_5_vl or qwen2_vl, actual: {kind!r}")
    text = {**config, **config.get("text_config", {})}  # released checkpoints are flat, newer saves nested
    vision = config["vision_config"]
    if kind == "qwen2_5_vl":
        vision_hidden, vision_intermediate = vision["hidden_size"], vision["intermediate_size"]
        out_hidden = vision["out_hidden_size"]
    else:
        vision_hidden = vision["embed_dim"]
        vision_intermediate, out_hidden = int(vision_hidden * vision["mlp_ratio"]), vision["hidden_size"]
    return Architecture(
        kind, text["vocab_size"], text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"],
        text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"],
        bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        text.get("max_position_embeddings", 32768), vision_hidden, vision_intermediate, vision["depth"], out_hidden,
        patch_size=vision.get("patch_size", 14), merge_size=vision.get("spatial_merge_size", 2),
        temporal_patch_size=vision.get("temporal_patch_size", 2), source=f"{config_file}",
    )


def processor_max_pixels(path: str) -> int:
    """The image processor's own ``max_pixels`` (``preprocessor_config.json``), Qwen's default without one."""
    config_file = Path(path).expanduser() / "preprocessor_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        return int(config.get("max_pixels") or config.get("size", {}).get("longest_edge") or QWEN_MAX_PIXELS)
    return QWEN_MAX_PIXELS


# ----------------------------------------------------------------------------------------------------------
# The plan of a run: plain inputs
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What one rank runs: the worst-case episode and the batches it is processed in."""

    tokens_per_episode: int
    """``L``: the worst-case tokens of one episode (module docstring)."""
    visual_tokens_per_image: int
    """The view budget's most visual tokens per image."""
    images_per_episode: int
    """Images one episode can show (the env's image budget)."""
    micro_batch_size: int
    """``m``: episodes per forward/backward pass."""
    generation_batch: int
    """Episodes the hf backend generates together (0 with an engine of its own, vLLM)."""


@dataclass(frozen=True)
class Layout:
    """How the training state is held: the parallelism, precision and memory options, as plain values."""

    world_size: int = 1
    """Ranks (GPUs) of the run."""
    shard: bool = False
    """FSDP full shard: weights, gradients and optimizer states split over ``world_size`` ranks."""
    cpu_offload: bool = False
    """The sharded state lives in host memory (FSDP CPU offload)."""
    mixed_precision: bool = False
    """float32 master weights and AdamW moments next to compute-dtype weights and gradients."""
    dtype_bytes: int = 2
    """``b``: bytes per value of the compute dtype."""
    gradient_checkpointing: bool = False
    """Recompute each layer in backward instead of keeping its activations."""
    lora_rank: int = 0
    """LoRA rank; 0 trains every weight."""
    lora_targets: tuple[str, ...] = ()
    """The language model's linear layers that get adapters."""
    reference_copy: bool = False
    """A frozen copy of the initial weights for the KL loss (full fine-tuning with kl_coef > 0)."""
    rollout_share_bytes: int = 0
    """Memory a separate generation engine (vLLM) holds while awake."""
    rollout_sleeps: bool = False
    """The engine hands its memory back during the update."""


@dataclass(frozen=True)
class Estimate:
    """Peak bytes per rank: each phase's terms, the peak, the capacity it is compared with."""

    architecture: Architecture
    workload: Workload
    layout: Layout
    rollout: dict[str, int]
    update: dict[str, int]
    capacity: int
    device: str
    """``"cuda"`` (capacity: one GPU's memory) or ``"cpu"`` (capacity: host RAM; never blocks a run)."""

    @property
    def peak(self) -> int:
        return max(sum(self.rollout.values()), sum(self.update.values()))

    @property
    def fits(self) -> bool:
        return self.peak <= FIT_FRACTION * self.capacity


def training_state(arch: Architecture, layout: Layout) -> dict[str, int]:
    """Bytes per rank of weights, gradients, optimizer states and the reference copy (module docstring)."""
    b, p = layout.dtype_bytes, arch.params()
    shards = layout.world_size if layout.shard else 1
    on_device = 0 if layout.cpu_offload else 1  # offloaded shards live in host memory
    if layout.lora_rank:
        adapters = arch.lora_params(layout.lora_rank, layout.lora_targets)
        terms = {"weights": b * p, "adapters (weights, gradients, AdamW; float32)": 16 * adapters}
    elif layout.mixed_precision:
        terms = {"weights": 2 * p, "gradients": 2 * p, "float32 master weights and AdamW": 12 * p}
    else:
        terms = {"weights": b * p, "gradients": b * p, "AdamW states": 2 * b * p}
    if layout.reference_copy and not layout.lora_rank:
        terms["reference model"] = b * p
    terms = {name: math.ceil(value * on_device / shards) for name, value in terms.items()}
    if layout.shard:
        layers = arch.num_layers * arch.decoder_layer_params() + arch.vision_depth * arch.vision_block_params()
        largest = max(arch.decoder_layer_params(), arch.vision_block_params())
        terms["FSDP all-gathered units"] = b * (2 * largest + (p - layers))
    return terms


def layer_activation_bytes(width: int, kv: int, intermediate: int, b: int) -> int:
    """``A``: bytes autograd keeps per token for one transformer layer (module docstring)."""
    return 8 * width + b * (9 * width + 3 * kv + 4 * intermediate)


def update_activations(arch: Architecture, workload: Workload, layout: Layout) -> dict[str, int]:
    """Bytes of one micro-batch's forward and backward (module docstring)."""
    b, m, length = layout.dtype_bytes, workload.micro_batch_size, workload.tokens_per_episode
    h, v = arch.hidden_size, arch.vocab_size
    # LoRA adapts the language model only: the frozen vision tower, whose input needs no gradient, keeps nothing.
    patches = 0 if layout.lora_rank else workload.images_per_episode * workload.visual_tokens_per_image * arch.merge_size**2
    text_layer = layer_activation_bytes(h, arch.kv_dim, arch.intermediate_size, b)
    vision_layer = layer_activation_bytes(arch.vision_hidden, arch.vision_hidden, arch.vision_intermediate, b)
    if layout.gradient_checkpointing:
        layers = m * (length * (arch.num_layers * b * h + text_layer)
                      + patches * (arch.vision_depth * b * arch.vision_hidden + vision_layer))
    else:
        layers = m * (length * arch.num_layers * text_layer + patches * arch.vision_depth * vision_layer)
    embeddings = m * length * (3 * b * h + 4 * h)  # inputs with the image features, final norm, head input
    return {"activations": layers + embeddings,
            "log-probs and entropies (float32 logits)": m * length * v * LOGIT_BYTES_SAVED,
            "backward of one row's logits": length * v * LOGIT_BYTES_BACKWARD}


def rollout_memory(arch: Architecture, workload: Workload, layout: Layout) -> dict[str, int]:
    """The generation engine's bytes while it samples (module docstring)."""
    if workload.generation_batch == 0:
        return {"vLLM share (rollout.vllm.gpu_memory_utilization)": layout.rollout_share_bytes}
    b, n, length = layout.dtype_bytes, workload.generation_batch, workload.tokens_per_episode
    return {"hf KV cache": n * length * 2 * arch.num_layers * arch.kv_dim * b,
            "hf forward workspace": n * length * (4 * arch.hidden_size + 3 * arch.intermediate_size) * b}


def estimate(arch: Architecture, workload: Workload, layout: Layout, *, capacity: int, device: str) -> Estimate:
    """The peak memory per rank of both phases of a step, compared with ``capacity`` bytes."""
    state = training_state(arch, layout)
    rollout = {**state, **rollout_memory(arch, workload, layout)}
    update = {**state, **update_activations(arch, workload, layout)}
    if workload.generation_batch == 0 and not layout.rollout_sleeps:
        update.update(rollout_memory(arch, workload, layout))
    return Estimate(arch, workload, layout, rollout, update, capacity, device)


# ----------------------------------------------------------------------------------------------------------
# From a config
# ----------------------------------------------------------------------------------------------------------


def worst_case_workload(cfg: Config, arch: Architecture, world_size: int,
                        prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> Workload:
    """The config's worst-case episode (module docstring) and its batches on one of ``world_size`` ranks."""
    from zoomgym.algorithms.build import env_id_of, env_kwargs
    from zoomgym.envs import episode_spec

    spec = episode_spec(env_id_of(cfg), env_kwargs(cfg))
    max_pixels = cfg.model.max_pixels or processor_max_pixels(cfg.model.path)
    visual = max_pixels // arch.factor**2
    r = cfg.rollout
    length = spec.max_turns * (prompt_tokens + r.max_new_tokens) + spec.max_images * (visual + 2)  # + vision markers
    length = min(length, r.max_context_tokens or arch.max_position_embeddings)
    from zoomgym.agents.backends import BACKENDS

    episodes = -(-cfg.trainer.prompts_per_step * r.group_size // world_size)
    generation = (min(episodes, r.hf.max_batch_size or episodes) if BACKENDS.lookup(r.backend).shares_model else 0)
    return Workload(length, visual, spec.max_images, cfg.trainer.micro_batch_size, generation)


def config_layout(cfg: Config, world_size: int, capacity: int) -> Layout:
    """The `Layout` a config runs with on ``world_size`` ranks of ``capacity`` bytes each.

    More than one rank means FSDP (the only multi-process path): the state is fully sharded, with
    mixed precision (float32 master weights, bfloat16 compute) when ``distributed.mixed_precision`` is on
    and ``model.dtype`` is float32, and in host memory with ``distributed.cpu_offload``.
    """
    lora = cfg.model.lora
    shard = world_size > 1
    mixed_precision = shard and cfg.distributed.mixed_precision and cfg.model.dtype == "float32"
    vllm = cfg.rollout.vllm
    uses_vllm = cfg.rollout.backend == "vllm"
    return Layout(
        world_size=world_size, shard=shard, cpu_offload=shard and cfg.distributed.cpu_offload,
        mixed_precision=mixed_precision, dtype_bytes=2 if mixed_precision else DTYPE_BYTES[cfg.model.dtype], gradient_checkpointing=cfg.model.gradient_checkpointing,
        lora_rank=lora.rank if lora.enabled else 0, lora_targets=tuple(lora.target_modules),
        reference_copy=cfg.algorithm.kl_coef > 0,
        rollout_share_bytes=int(vllm.gpu_memory_utilization * capacity) if uses_vllm else 0,
        rollout_sleeps=uses_vllm and vllm.enable_sleep_mode,
    )


def host_memory() -> int:
    """Bytes of RAM of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_capacity(cfg: Config, gpu_mem_gib: float | None) -> tuple[int, str]:
    """(bytes, ``"cuda"`` or ``"cpu"``): ``--gpu-mem`` GiB when given, else the configured device's memory
    (a CUDA device's total, or host RAM on CPU)."""
    if gpu_mem_gib is not None:
        return int(gpu_mem_gib * GIB), "cuda"
    from zoomgym.algorithms.build import resolve_device

    device = resolve_device(cfg.trainer.device)
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory), "cuda"
    return host_memory(), "cpu"


def preflight(cfg: Config, *, world_size: int = 1, gpu_mem_gib: float | None = None,
              prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> Estimate:
    """The estimate of a validated config on ``world_size`` ranks (reads config.json, loads nothing).

    Raises:
        ValueError: the model's architecture is unknown (`read_architecture`).
    """
    if world_size < 1:
        raise ValueError(f"Expects --gpus >= 1, actual: {world_size}")
    arch = read_architecture(cfg.model.path)
    capacity, device = device_capacity(cfg, gpu_mem_gib)
    workload = worst_case_workload(cfg, arch, world_size, prompt_tokens)
    return estimate(arch, workload, config_layout(cfg, world_size, capacity), capacity=capacity, device=device)


def knobs(result: Estimate) -> list[str]:
    """What to change, largest saving first, for an estimate that does not fit."""
    update, layout = result.update, result.layout
    hints: list[tuple[int, str]] = []
    per_episode = sum(v for k, v in update.items() if k.startswith(("activations", "log-probs")))
    if result.workload.micro_batch_size > 1:
        hints.append((per_episode - per_episode // result.workload.micro_batch_size,
                      "trainer.micro_batch_size=1 (gradient accumulation keeps the update the same)"))
    if per_episode:
        hints.append((per_episode // 2, "rollout.max_context_tokens (or rollout.max_new_tokens) lower: the worst-case "
                                        f"episode is {result.workload.tokens_per_episode} tokens"))
    if not layout.gradient_checkpointing:
        hints.append((update["activations"] // 2, "model.gradient_checkpointing=true"))
    if not layout.lora_rank:
        hints.append((sum(v for k, v in update.items() if k in ("gradients", "AdamW states", "reference model",
                                                              "float32 master weights and AdamW")),
                      "model.lora.enabled=true (only adapters carry gradients and optimizer states)"))
        hints.append((0, "more GPUs: FSDP shards weights, gradients and optimizer states over the ranks "
                         "(torchrun --nproc_per_node N)"))
        if layout.shard and not layout.cpu_offload:
            hints.append((0, "FSDP CPU offload of the sharded state"))
    if layout.rollout_share_bytes:
        hints.append((layout.rollout_share_bytes // 3, "rollout.vllm.gpu_memory_utilization lower (a smaller KV cache)"))
        if not layout.rollout_sleeps:
            hints.append((layout.rollout_share_bytes, "rollout.vllm.enable_sleep_mode=true"))
    if result.workload.generation_batch > 1:
        hints.append((result.rollout.get("hf KV cache", 0) // 2, "rollout.hf.max_batch_size lower"))
    return [text for _, text in sorted(hints, key=lambda hint: -hint[0])]


def _size(value: int, unit: int) -> str:
    return f"{value / unit:9.2f} {'GiB' if unit == GIB else 'MiB'}"


def describe(result: Estimate) -> str:
    """The estimate as a table, the verdict, and the knobs when it does not fit."""
    a, w, lay = result.architecture, result.workload, result.layout
    sharding = f"FSDP over {lay.world_size} ranks" if lay.shard else "one process"
    training = f"LoRA rank {lay.lora_rank}" if lay.lora_rank else "full fine-tuning"
    precision = "mixed precision" if lay.mixed_precision else f"{lay.dtype_bytes}-byte values"
    lines = [
        f"model: {a.kind}, {a.params() / 1e9:.3f}B parameters ({a.source})",
        f"layout: {sharding}, {training}, {precision}, gradient checkpointing "
        f"{'on' if lay.gradient_checkpointing else 'off'}",
        f"worst-case episode: {w.tokens_per_episode} tokens ({w.images_per_episode} images x "
        f"{w.visual_tokens_per_image} visual tokens), micro-batch {w.micro_batch_size}"
        + (f", {w.generation_batch} episodes generated together" if w.generation_batch else ""),
    ]
    unit = GIB if result.peak >= GIB else 2**20  # a tiny model's terms in MiB
    for phase, terms in (("rollout", result.rollout), ("update", result.update)):
        lines.append(f"{phase} phase, per rank:")
        lines += [f"  {name:<52}{_size(value, unit)}" for name, value in terms.items()]
        lines.append(f"  {'total':<52}{_size(sum(terms.values()), unit)}")
    where = "one GPU" if result.device == "cuda" else "host RAM (CPU run)"
    verdict = "fits" if result.fits else "does NOT fit"
    lines.append(f"peak per rank {_size(result.peak, unit).strip()} vs {_size(result.capacity, GIB).strip()} of {where} "
                 f"({FIT_FRACTION:.0%} usable): {verdict}")
    if not result.fits:
        lines.append("knobs, largest saving first: " + "; ".join(knobs(result)))
    return "\n".join(lines)


def world_size_from_env() -> int:
    """The ranks of a torchrun launch (``WORLD_SIZE``), 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def as_dict(result: Estimate) -> dict[str, Any]:
    """The estimate as plain data (``zoomgym preflight --json``; scripts/gpu_check.sh reads it)."""
    return {"peak_bytes": result.peak, "capacity_bytes": result.capacity, "fits": result.fits, "device": result.device,
            "rollout": result.rollout, "update": result.update, "workload": dataclasses.asdict(result.workload),
            "layout": dataclasses.asdict(result.layout), "params": result.architecture.params()}


def train_gate(cfg: Config) -> tuple[bool, str]:
    """What ``zoomgym train`` checks before anything heavy starts: (may it start, what to print).

    A GPU run whose estimate does not fit is refused with the table and the knobs. A CPU run is never
    refused (host RAM is shared and swappable; tests and the quickstart run there): it gets one line.
    A model built on first use, or an architecture this module does not know, skips the check.
    """
    from zoomgym.algorithms.config import builds_model

    if builds_model(cfg.model) and not Path(cfg.model.path).expanduser().exists():
        return True, "preflight: skipped (the model is built on first use)"
    try:
        result = preflight(cfg, world_size=world_size_from_env())
    except ValueError as error:
        return True, f"preflight: skipped ({error})"
    if result.device == "cpu":
        return True, (f"preflight: peak about {result.peak / GIB:.2f} GiB per process of {result.capacity / GIB:.1f} "
                      "GiB host RAM (CPU run: not enforced)")
    if result.fits:
        return True, f"preflight: peak about {result.peak / GIB:.1f} GiB per rank of {result.capacity / GIB:.1f} GiB: fits"
    return False, (f"{describe(result)}\nthe config cannot fit (zoomgym preflight CONFIG shows the estimate; "
                   "--skip-preflight starts anyway)")


# ----------------------------------------------------------------------------------------------------------
# Measuring what the estimate predicts
# ----------------------------------------------------------------------------------------------------------


def trainer_tensors(trainer: Any) -> list[Any]:
    """The tensors a trainer holds between steps: its model's and reference model's parameters and
    gradients, and the optimizer's states (what `measure_peak` counts as resident on CPU)."""
    tensors = []
    for model in (trainer.model, getattr(trainer, "reference_model", None)):
        if model is not None:
            for p in model.parameters():
                tensors += [p] if p.grad is None else [p, p.grad]
    for state in trainer.optimizer.state.values():
        tensors += [value for value in state.values() if hasattr(value, "untyped_storage")]
    return tensors


def storage_bytes(tensors: Sequence[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measure_peak(fn: Any, device: str, resident: Sequence[Any] = ()) -> tuple[Any, int]:
    """Runs ``fn()`` and returns (its result, the peak bytes of torch tensors while it ran).

    On CUDA: ``torch.cuda.max_memory_allocated`` after a reset (everything allocated on the device). On
    CPU torch keeps no such counter, so the peak is ``resident``'s storage bytes plus the highest running
    sum of the CPU allocator's allocations and frees that torch's profiler records during ``fn``
    (``profile_memory=True``): every tensor allocated or freed, in order, nothing sampled.
    """
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return result, int(torch.cuda.max_memory_allocated())
    from torch.profiler import ProfilerActivity, profile

    before = storage_bytes(resident)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda event: event[0])  # stable: same-time events keep the order they were recorded in
    live = highest = 0
    for _, nbytes in events:
        live += nbytes
        highest = max(highest, live)
    return result, before + highest


def observed_prompt_tokens(trajectories: Sequence[Any], arch: Architecture) -> int:
    """The most prompt tokens per turn among played episodes: all but the sampled tokens and the images'
    (visual tokens and their two markers), per model turn. What ``prompt_tokens`` was for them, so an
    estimate can be compared with a measured run on the memory model alone."""
    worst = 0
    for t in trajectories:
        visual = int(t.image_grid_thw.prod(dim=1).sum()) // arch.merge_size**2 + 2 * len(t.images)
        worst = max(worst, math.ceil((t.length - t.response_length - visual) / max(t.num_turns, 1)))
    return worst
