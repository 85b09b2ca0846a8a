"""Training configuration: dataclasses are the schema and the defaults.

A run is configured in three layers, each overriding the one before:

1. the dataclass defaults below (every field's attribute docstring is its help text),
2. a YAML file (``configs/*.yaml``) that sets only the fields it changes,
3. dotted command-line overrides: ``zoomgym train configs/quickstart.yaml trainer.lr=2e-6``.

Parsing is strict: an unknown key fails with a "did you mean" suggestion and a value of the wrong type
fails naming the key, both before anything heavy is imported or loaded. ``validate`` then checks the
values against each other and that every local path (model folder, dataset files) exists.

Example:
    >>> cfg = load_config(None, ["algorithm.name=grpo", "trainer.lr=2e-6"])
    >>> cfg.algorithm.name, cfg.trainer.lr
    ('grpo', 2e-06)
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import re
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from zoomgym.registry import suggest

# ----------------------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """Low-rank adapters through ``peft`` (optional dependency: ``pip install zoomgym[lora]``)."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights; the reference policy is then the base model itself."""
    rank: int = 16
    """Adapter rank r."""
    alpha: int = 32
    """Adapter scale numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter input (keep 0 for exact resume and on-policy log-probs)."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module-name suffixes that receive adapters (the language model's linear layers)."""


@dataclass
class ModelBuildConfig:
    """A model built offline into a cache folder on first use (the quickstart's tiny model).

    It is built only when ``model.path`` names that very folder and it does not exist yet: a
    ``model.path`` naming anything else (a checkpoint, a typo) is loaded or refused, never built over."""

    builder: str | None = None
    """A name in agents.models.MODEL_BUILDERS ("tiny": the offline tiny Qwen2.5-VL); null builds nothing."""
    into: str | None = None
    """The cache folder the builder writes (e.g. .cache/tiny-qwen-1m); model.path must name it to use it."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the builder (tiny: size "1m", "10m" or "50m"; seed)."""


@dataclass
class ModelConfig:
    """The policy: a Qwen2.5-VL-family checkpoint."""

    path: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """Local folder (saved with save_pretrained) or a hub id such as "Qwen/Qwen2.5-VL-7B-Instruct"."""
    build: ModelBuildConfig = field(default_factory=ModelBuildConfig)
    """Build an offline model into a cache folder first (only where model.path names build.into)."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Parameter and compute dtype of the trained model (fp32 on CPU for exact log-probs)."""
    min_pixels: int | None = None
    """View budget, lower bound on the pixels of every image shown (small crops are enlarged);
    None keeps the processor's own (Qwen2.5-VL: 3136; the paper: 256*28*28)."""
    max_pixels: int | None = None
    """View budget, upper bound on the pixels of every image shown (one visual token per 28x28 for
    Qwen2.5-VL); None keeps the processor's own (the paper: 1280*28*28)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about 30% more time)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters (off by default: full fine-tuning)."""


@dataclass
class DatasetConfig:
    """One dataset, loaded with ``envs.data.load_dataset(name, **options)``."""

    name: str = "synthetic"
    """A key of ``envs.data.DATASETS`` (e.g. "synthetic", "vstar", "mme_realworld", "hrbench", "jsonl")."""
    path: str | None = None
    """File or folder for file-based loaders (checked to exist before the model loads); None for synthetic."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the loader, e.g. {n: 64, seed: 1} for synthetic."""
    limit: int | None = None
    """Keep only the first `limit` samples (quick validation); None keeps all."""
    label: str | None = None
    """Name in the logs (val/<label>/accuracy); None uses `name` (numbered when two sets share it)."""


@dataclass
class DataConfig:
    """Training prompts and the held-out validation sets."""

    train: DatasetConfig = field(default_factory=lambda: DatasetConfig(options={"n": 256, "seed": 0}))
    """The training set; prompts are drawn without replacement, reshuffled every epoch."""
    val: list[DatasetConfig] = field(default_factory=lambda: [DatasetConfig(options={"n": 32, "seed": 1})])
    """Validation sets, each logged under its label (default its name; a repeated one gets a numeric suffix)."""


@dataclass
class EnvConfig:
    """The Gymnasium environment the episodes run in."""

    id: str | None = None
    """A registered id; None uses the algorithm's own (mgpo: zoomgym/ZoomEnv-v0, grpo: zoomgym/DirectVQA-v0)."""
    max_turns: int | None = None
    """Turn budget for zoomgym/ZoomEnvMultiTurn-v0; None keeps the env's default."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``gymnasium.make`` (coord_frame, clamp, prompts, resample, ...)."""


@dataclass
class HFBackendConfig:
    """Settings of the "hf" backend (``agents.backends.hf.HFBackend``)."""

    max_batch_size: int | None = None
    """Episodes per generation forward; None generates every running episode in one batch."""


@dataclass
class VLLMBackendConfig:
    """Settings of the "vllm" backend (``agents.backends.vllm.VLLMBackend``); its image limit is the env's
    image budget and its context rollout.max_context_tokens."""

    engine_dtype: Literal["float32", "bfloat16"] | None = None
    """The engine's dtype; None: model.dtype. bfloat16 beside float32 master weights (the sharded trainer):
    the pushed weights are cast as the engine copies them."""
    gpu_memory_utilization: float = 0.6
    """Fraction of GPU memory for weights and KV cache (the rest is left to training)."""
    tensor_parallel_size: int = 1
    """GPUs per engine; 1 under torchrun, where every rank runs its own engine."""
    enable_sleep_mode: bool = True
    """Let the engine hand its GPU memory to the trainer during each update (colocated training)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of prompt prefixes already computed: a group's shared image and prompt, an
    episode's earlier turns (reset at every weight sync)."""
    engine_options: dict[str, Any] = field(default_factory=dict)
    """Further ``vllm.LLM`` arguments, such as enforce_eager or kv_cache_memory_bytes (the CPU build's KV
    cache); those set from the keys above and the model's are refused."""


@dataclass
class RolloutConfig:
    """Sampling of training episodes."""

    backend: str = "hf"
    """Generation engine, a name in agents.backends.BACKENDS: "hf" (transformers, CPU or GPU, shares the
    trained model) or "vllm" (GPU); its settings are the section of the same name below."""
    group_size: int = 8
    """G: rollouts per prompt; advantages are normalised within each group."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts (validation is always greedy)."""
    top_p: float = 1.0
    """Nucleus sampling threshold of training rollouts."""
    max_new_tokens: int = 8192
    """Maximum tokens the model may generate in one turn."""
    max_context_tokens: int | None = None
    """Context budget of a whole episode; whole turns are dropped beyond it. None: the model's limit."""
    hf: HFBackendConfig = field(default_factory=HFBackendConfig)
    """The "hf" backend's settings."""
    vllm: VLLMBackendConfig = field(default_factory=VLLMBackendConfig)
    """The "vllm" backend's settings."""


@dataclass
class AlgorithmConfig:
    """The RL objective. Defaults are the paper's MGPO setup; every option beyond it is off."""

    name: str = "mgpo"
    """A registered algorithm: "mgpo" (multi-turn grounding), "grpo" (single-turn answers) or your own."""
    advantage: str = "grpo"
    """Advantage estimator, a name in algorithms.core.ADVANTAGES ("grpo": group-normalised rewards, or
    one registered with @register_advantage)."""
    policy_loss: str = "ppo_clip"
    """Policy loss, a name in algorithms.core.POLICY_LOSSES ("ppo_clip", or one registered with
    @register_policy_loss)."""
    ppo_epochs: int = 1
    """Passes over each step's batch."""
    clip_low: float = 0.2
    """PPO clip: ratio lower bound 1 - clip_low."""
    clip_high: float = 0.2
    """PPO clip: ratio upper bound 1 + clip_high. DAPO's clip-higher: 0.28."""
    clip_ratio_c: float | None = None
    """Dual-clip bound for negative advantages (e.g. 3.0); None disables it."""
    loss_agg: str = "token-mean"
    """Loss aggregation: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum" or
    "seq-mean-token-sum-norm" (Dr.GRPO: use it with norm_adv_by_std=false)."""
    norm_adv_by_std: bool = True
    """Divide group-centred rewards by the group std (GRPO); false gives Dr.GRPO's mean-centring (passed
    to the advantage estimator as norm_by_std)."""
    kl_coef: float = 0.01
    """Coefficient of the KL loss to the frozen reference policy (the paper: 0.01); 0 skips the reference."""
    kl_kind: str = "low_var_kl"
    """KL estimator: "k1", "k2" or "low_var_kl" (k3, clamped to +-10)."""
    entropy_coef: float = 0.001
    """Entropy bonus coefficient, the loss subtracts entropy_coef * entropy (the paper: 0.001)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal (zero advantage) and top up with fresh prompts."""
    dynamic_sampling_max_rounds: int = 3
    """DAPO: at most this many rollout rounds per step to fill the batch with informative groups."""
    mask_truncated: bool = False
    """Over-turn masking: episodes cut by the turn budget (or context budget) get zero loss weight."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight tokens by min(exp(old_logp - sampler_logp), tis_cap) to
    correct the sampler/trainer mismatch (e.g. 2.0 with vLLM); None disables it."""


@dataclass
class TrainerConfig:
    """The optimisation loop."""

    steps: int = 100
    """RL steps of the whole run (the schedule's horizon); a resumed run continues up to it."""
    prompts_per_step: int = 512
    """B: prompts sampled per step (the batch is B * G episodes)."""
    mini_batch_prompts: int = 128
    """Prompts per optimizer step; B / mini_batch_prompts optimizer steps per epoch."""
    micro_batch_size: int = 8
    """Episodes per forward/backward pass (gradient accumulation inside a mini-batch)."""
    share_prompts: bool = True
    """Keep a prompt's episodes in one micro-batch and compute the prompt they share once per forward
    (agents.shared_prefix; exact to float rounding); false runs every episode whole, batched by length only."""
    lr: float = 1e-6
    """AdamW learning rate."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warmup, over the optimizer steps of `steps` RL steps."""
    warmup_steps: int = 0
    """Linear warmup, in optimizer steps."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value before each optimizer step; 0 does not clip."""
    seed: int = 0
    """Seeds prompt order, rollouts and every other random draw (re-seeded per step: exact resume)."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda[:i]"."""
    val_every: int = 10
    """Validate every this many steps (and after the last); 0 disables periodic validation."""
    val_before_train: bool = True
    """Validate the initial model before step 1 (the baseline every curve is read against)."""
    save_every: int = 50
    """Checkpoint every this many steps (and after the last); 0 saves only the last."""
    keep_checkpoints: int = 2
    """Keep only the newest this many checkpoints; 0 keeps all."""


@dataclass
class WarmupConfig:
    """Format warm-up before RL (``algorithms/warmup.py``): the cold-start remedy for a model that cannot
    yet write a box or a ``\\boxed{}`` letter. Scripted boxes are random and letters uniform, so it teaches
    the format only, never an answer."""

    enabled: bool = False
    """Run the warm-up before the first RL step (never on --resume)."""
    steps: int = 40
    """Optimizer steps of teacher forcing."""
    batch_size: int = 8
    """Scripted episodes per step."""
    lr: float = 1.0e-3
    """AdamW learning rate of the warm-up (its own optimizer; RL starts with a fresh one)."""
    box_grid: int = 3
    """Scripted boxes are drawn uniformly from box_grid x box_grid windows spread over the image."""
    box_side: float = 0.4
    """Side of each scripted window, as a fraction of the image's shorter side."""


@dataclass
class ChatSetConfig:
    """One set of chats for ``zoomgym sft``: generated by a registered task, or read from a jsonl file."""

    task: str | None = None
    """A name in envs.data.CHAT_TASKS (e.g. "toy_grounding", "toy_reading"); or set `path`."""
    path: str | None = None
    """A chats jsonl file (format: envs/data/chats.py); images relative to it."""
    n: int = 256
    """Chats a task generates (a file gives all its chats, or its first `limit`)."""
    seed: int = 0
    """Seeds a task's chats (disjoint seeds give disjoint images)."""
    options: dict[str, Any] = field(default_factory=dict)
    """A task's keyword options (e.g. {history_ratio: 0.5}); for a file: {allow_outside_root: true}."""
    limit: int | None = None
    """Keep only the first `limit` chats."""
    label: str | None = None
    """Name in the logs (val/<label>/...); None uses the task's name or the file's stem."""


@dataclass
class SFTConfig:
    """Supervised fine-tuning (``zoomgym sft``, algorithms/sft.py): teacher forcing on chats, the loss on
    assistant tokens only. Uses model, trainer (steps, lr, schedule, micro_batch_size, seed, validation,
    checkpoints) and logging; the RL sections are ignored."""

    train: list[ChatSetConfig] = field(default_factory=list)
    """Training chats: every set's chats in one pool, drawn without replacement, reshuffled every epoch."""
    val: list[ChatSetConfig] = field(default_factory=list)
    """Held-out chats, each set scored by greedy generation against its last reply."""
    batch_size: int = 32
    """Chats per optimizer step (split into trainer.micro_batch_size chats of similar length)."""
    max_new_tokens: int = 32
    """Tokens generated per validation chat."""
    aux_weight: float = 0.0
    """Weight of the training-only token heads (a linear classifier per `Chat.token_labels` name on the
    image tokens' hidden states); 0 disables them. Dropped at save: checkpoints stay stock folders."""
    aux_layer: int = 0
    """Decoder layer whose output the token heads read (0: the first)."""
    attention_weight: float = 0.0
    """Weight of the attention loss: -log of the attention mass that the reply's positions give the
    `Chat.attend` tokens, in the first `attention_heads` heads of the last decoder layer (eager
    attention while training); 0 disables it."""
    attention_heads: int = 2
    """Heads of the last decoder layer the attention loss supervises."""


@dataclass
class DistributedConfig:
    """Training on several processes under ``torchrun`` (algorithms/distributed.py): the policy and the
    reference are sharded with FSDP2, each rank plays whole groups of the global batch and the update
    equals one process's on that batch. Ignored without torchrun. Activation checkpointing (per decoder
    layer and vision block) is model.gradient_checkpointing."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: "auto" is nccl with CUDA, else gloo (CPU)."""
    mixed_precision: bool = True
    """FSDP2 mixed precision: bf16 compute and all-gathers, fp32 gradient reduction and master weights
    (keep model.dtype=float32 for fp32 master weights; false computes in model.dtype)."""
    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in CPU memory (FSDP2 CPUOffloadPolicy):
    less accelerator memory, slower steps."""
    timeout_minutes: int = 30
    """How long a collective may wait for the other ranks before the run fails."""


@dataclass
class LoggingConfig:
    """Where the run writes and what it shows."""

    run_dir: str | None = None
    """Output folder; None gives runs/<name>-<YYYYmmdd-HHMMSS>."""
    tensorboard: bool = True
    """Write TensorBoard events (metrics.jsonl is always written)."""
    render_every: int = 10
    """Log rendered trajectories (env.render()) as images every this many steps; 0 disables."""
    render_count: int = 2
    """Trajectories rendered each time."""
    progress_bar: bool = True
    """Show a progress bar over steps."""


@dataclass
class Config:
    """A whole training run."""

    name: str = "zoomgym"
    """Run name, used in the default run directory."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The environment."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Episode sampling."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """The RL objective."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The optimisation loop."""
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    """Format warm-up before RL (off by default)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning (``zoomgym sft`` only)."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Several processes under torchrun (FSDP2); ignored in a single process."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Outputs."""


# ----------------------------------------------------------------------------------------------------------
# Parsing: dict -> dataclass with type checking
# ----------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML, and two changes: scientific notation is a float (YAML 1.1 reads ``1e-6`` as a string:
    its float needs a dot), and aliases (``*name``) are refused: a few hundred bytes of nested aliases
    expand to gigabytes when the resolved config is written out, and a config never needs one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} (write each value out: nested aliases expand to gigabytes)",
                event.start_mark,
            )
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and build nested dataclasses; raise naming `key`."""
    if tp is Any:
        return value
    if _is_union(tp):
        return _convert_union(value, tp, key)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"config key {key!r}: expects one of {list(typing.get_args(tp))}, actual: {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"config key {key!r}: expects a mapping of {tp.__name__} fields, actual: {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        return _convert_sequence(value, tp, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"config key {key!r}: expects a mapping, actual: {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_convert(k, key_tp, key): _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    return _convert_scalar(value, tp, key)


def _convert_union(value: Any, tp: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, key)
        except (TypeError, ValueError):
            continue  # try the union's next member; the error below names them all
    raise TypeError(f"config key {key!r}: expects {_type_name(tp)}, actual: {value!r}")


def _convert_sequence(value: Any, tp: Any, key: str) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"config key {key!r}: expects {_type_name(tp)}, actual: {value!r}")
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise TypeError(f"config key {key!r}: expects {len(args)} values, actual: {value!r}")
    return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _convert_scalar(value: Any, tp: Any, key: str) -> Any:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)  # a bool is no number here
    if tp is float and is_number:
        return float(value)  # an int is a float for config purposes (`lr: 1` is fine)
    if tp is int and is_number and isinstance(value, int):
        return value
    if tp not in (int, float) and isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeError(f"config key {key!r}: expects {_type_name(tp)}, actual: {value!r} ({type(value).__name__})")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ValueError(
                f"Expects a known config key, actual: unknown key {dotted!r}.{suggest(str(key), names)} "
                f"Keys of {prefix or 'the config'}: {', '.join(names)}"
            )
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def _set(values: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of nested `values` with the key `dotted` set to `value`, replacing what was there (so
    ``env.options={}`` clears the options and ``data.train={name: jsonl, path: f}`` drops the file's
    synthetic options)."""
    head, _, rest = dotted.partition(".")
    out = dict(values)
    if not rest:
        out[head] = value
    else:
        below = out.get(head)
        out[head] = _set(below if isinstance(below, dict) else {}, rest, value)
    return out


def _field_type(dotted: str) -> Any:
    """The annotation of a dotted key (``trainer.lr`` -> float); raises on unknown keys."""
    tp: Any = Config
    walked = []
    for part in dotted.split("."):
        while _is_union(tp):  # `X | None` sections: walk into X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if not dataclasses.is_dataclass(tp):
            if typing.get_origin(tp) is dict:  # free-form options: any sub-key is allowed
                return typing.get_args(tp)[1]
            raise ValueError(f"Expects a known config key, actual: {dotted!r} ({'.'.join(walked)} has no fields)")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            where = ".".join(walked) or "the config"
            raise ValueError(
                f"Expects a known config key, actual: unknown key {dotted!r}.{suggest(part, list(hints))} "
                f"Keys of {where}: {', '.join(hints)}"
            )
        walked.append(part)
        tp = hints[part]
    return tp


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``dotted.key=value`` command-line override.

    The value is read as YAML (``true``, ``3``, ``2e-6``, ``[a, b]``, ``{n: 8}``, ``null``), except that a
    field typed ``str`` keeps the raw text, so ``name=007`` stays the string "007".

    Returns:
        (dotted key, value) with the key checked against the schema.
    """
    if "=" not in text:
        raise ValueError(f"Expects an override of the form key.sub=value, actual: {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    tp = _field_type(key)
    stringy = tp is str or (_is_union(tp) and str in typing.get_args(tp) and raw.strip() not in ("null", "~"))
    if stringy:
        return key, raw
    try:
        return key, yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ValueError(
            f"override {text!r}: expects a YAML value without aliases after '=', actual: {_yaml_problem(error)}"
        ) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (line and column, 1-based)."""
    problem = getattr(error, "problem", None) or str(error)
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-ready data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def from_dict(values: dict[str, Any]) -> Config:
    """Build a `Config` from nested mappings, checking every key and type."""
    if not isinstance(values, dict):
        raise TypeError(f"Expects the config to be a mapping, actual: {type(values).__name__}")
    return _build(Config, values, "")


INCLUDE_KEY = "include"
"""Top-level key of a config file naming the file it builds on (relative to the including file)."""


def read_yaml(path: str | Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping (scientific notation such as ``1e-6`` is a float), resolving ``include``.

    ``include: base.yaml`` at the top of a file reads that file (relative to this one) first; this file's
    values then merge into it key by key: a mapping merges into the included mapping, any other value
    (a list, a scalar) replaces it. So a variant of a setup states only what differs
    (``configs/mgpo_qwen2_5_vl_7b_1gpu_lora.yaml`` includes the paper's ``mgpo_qwen2_5_vl_7b.yaml``).
    Includes may nest; a cycle is refused.
    """
    path = Path(path)
    if not path.is_file():
        where = f" (included by {str(_including[-1])!r})" if _including else ""
        raise ValueError(f"Expects an existing config file, actual: {str(path)!r} does not exist{where}")
    if path.resolve() in _including:
        chain = " -> ".join(str(p) for p in (*_including, path.resolve()))
        raise ValueError(f"config file {str(path)!r}: expects includes without a cycle, actual: {chain}")
    data = _read_mapping(path)
    base = data.pop(INCLUDE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ValueError(f"config file {str(path)!r}: expects '{INCLUDE_KEY}' to be a file name, actual: {base!r}")
    return _merge(read_yaml(path.parent / base, (*_including, path.resolve())), data)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        below = out.get(key)
        out[key] = _merge(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return out


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        with path.open() as f:
            data = yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ValueError(
            f"config file {str(path)!r}: expects valid YAML without aliases, actual: {_yaml_problem(error)}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TypeError(f"Expects a mapping at the top of {str(path)!r}, actual: {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, type-checked.

    Args:
        path: a YAML file, or None for the defaults.
        overrides: ``["trainer.lr=2e-6", "algorithm.name=grpo"]``.

    Raises:
        ValueError / TypeError naming the offending key before anything is loaded.
    """
    values = read_yaml(path) if path is not None else {}
    from_dict(values)  # report errors against the file before the overrides mix in
    for text in overrides:
        key, value = parse_override(text)
        values = _set(values, key, value)
    return from_dict(values)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (readable back with `load_config`), atomically: a kill mid-write
    leaves the previous file, never half of one that ``--resume`` could not read."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, default_flow_style=None, width=110)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# Validation: values against each other, and local paths
# ----------------------------------------------------------------------------------------------------------

RUN_CONFIG_FILE = "config.yaml"
"""The resolved config's file name inside a run directory."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def validate(cfg: Config, *, check_data: bool = True) -> None:
    """Check value ranges, names and local paths; call before loading any model.

    Args:
        cfg: the config.
        check_data: also check the datasets (their files exist, their options bind); ``zoomgym
            preflight`` plans a run on a machine that need not hold its data.

    Raises:
        ValueError naming the key and what it expects.
    """
    _check_finite(cfg)
    _validate_ranges(cfg)
    _validate_device(cfg.trainer.device)
    _validate_lora(cfg)
    _validate_distributed(cfg)
    _validate_names(cfg)
    _validate_env_options(cfg)
    _validate_view_budget(cfg.model)
    _validate_model_path(cfg.model)
    if check_data:
        _validate_datasets(cfg.data)


def _validate_view_budget(model: ModelConfig) -> None:
    for key in ("min_pixels", "max_pixels"):
        value = getattr(model, key)
        if value is not None and value <= 0:
            raise ValueError(f"config key 'model.{key}': expects a positive value or null, actual: {value}")
    if None not in (model.min_pixels, model.max_pixels) and model.min_pixels > model.max_pixels:
        raise ValueError(
            f"config keys 'model.min_pixels' <= 'model.max_pixels': expects min <= max, actual: "
            f"{model.min_pixels} > {model.max_pixels}"
        )


def _validate_ranges(cfg: Config) -> None:
    t, r, a = cfg.trainer, cfg.rollout, cfg.algorithm
    positive = {
        "trainer.steps": t.steps,
        "trainer.prompts_per_step": t.prompts_per_step,
        "trainer.mini_batch_prompts": t.mini_batch_prompts,
        "trainer.micro_batch_size": t.micro_batch_size,
        "rollout.group_size": r.group_size,
        "rollout.max_new_tokens": r.max_new_tokens,
        "algorithm.ppo_epochs": a.ppo_epochs,
        "algorithm.dynamic_sampling_max_rounds": a.dynamic_sampling_max_rounds,
        "warmup.steps": cfg.warmup.steps,
        "warmup.batch_size": cfg.warmup.batch_size,
        "warmup.box_grid": cfg.warmup.box_grid,
        "trainer.adam_eps": t.adam_eps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ValueError(f"config key {key!r}: expects a positive value, actual: {value}")
    non_negative = {
        "trainer.lr": t.lr,
        "warmup.lr": cfg.warmup.lr,
        "trainer.warmup_steps": t.warmup_steps,
        "trainer.val_every": t.val_every,
        "trainer.save_every": t.save_every,
        "trainer.keep_checkpoints": t.keep_checkpoints,
        "trainer.weight_decay": t.weight_decay,
        "trainer.grad_clip": t.grad_clip,
        "algorithm.kl_coef": a.kl_coef,
        "algorithm.entropy_coef": a.entropy_coef,
        "algorithm.clip_high": a.clip_high,
        "rollout.temperature": r.temperature,
        "logging.render_every": cfg.logging.render_every,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ValueError(f"config key {key!r}: expects a value >= 0, actual: {value}")
    if t.prompts_per_step % t.mini_batch_prompts:
        raise ValueError(
            "config keys 'trainer.prompts_per_step' and 'trainer.mini_batch_prompts': expects the first to be a "
            f"multiple of the second, actual: {t.prompts_per_step} and {t.mini_batch_prompts}"
        )
    fractions = {
        "algorithm.clip_low": (a.clip_low, "[0, 1)"),  # the ratio's lower bound 1 - clip_low stays positive
        "trainer.adam_betas[0]": (t.adam_betas[0], "[0, 1)"),
        "trainer.adam_betas[1]": (t.adam_betas[1], "[0, 1)"),
        "model.lora.dropout": (cfg.model.lora.dropout, "[0, 1)"),
        "warmup.box_side": (cfg.warmup.box_side, "(0, 1]"),
        "rollout.top_p": (r.top_p, "(0, 1]"),
    }
    for key, (value, interval) in fractions.items():
        if not (0 <= value < 1 if interval == "[0, 1)" else 0 < value <= 1):
            raise ValueError(f"config key {key!r}: expects a value in {interval}, actual: {value}")
    if a.tis_cap is not None and a.tis_cap < 1:
        raise ValueError(f"config key 'algorithm.tis_cap': expects a cap >= 1 or null, actual: {a.tis_cap}")
    if a.clip_ratio_c is not None and a.clip_ratio_c <= 1:
        raise ValueError(f"config key 'algorithm.clip_ratio_c': expects a bound > 1 or null, actual: {a.clip_ratio_c}")
    if r.group_size < 2 and a.norm_adv_by_std:
        raise ValueError(
            "config key 'rollout.group_size': expects >= 2 (a group std needs two rollouts), actual: 1"
        )


def _check_finite(cfg: Any, prefix: str = "") -> None:
    """No NaN or infinity in any float of the config (where a number is optional, null switches it off)."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
            continue
        values = value if isinstance(value, tuple) else (value,)
        for i, v in enumerate(values):
            if isinstance(v, float) and not math.isfinite(v):
                where = f"{key}[{i}]" if isinstance(value, tuple) else key
                raise ValueError(f"config key {where!r}: expects a finite number, actual: {v}")


def _validate_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    import torch

    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"config key 'trainer.device': expects 'auto', 'cpu', 'cuda' or 'cuda:<index>', actual: {device!r}")
    if not torch.cuda.is_available():
        why = "was built without CUDA" if torch.version.cuda is None else "sees no CUDA device"
        raise ValueError(
            f"config key 'trainer.device': expects a device this torch can use, actual: {device!r}, but torch "
            f"{torch.__version__} {why} (use trainer.device=cpu or auto)"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"config key 'trainer.device': expects a visible CUDA device (0..{torch.cuda.device_count() - 1}), "
                         f"actual: {device!r}")


def _validate_lora(cfg: Config) -> None:
    # Any backend: one that shares the model samples with the adapters in place, any other receives the
    # weights with the adapters merged in (`agents.weights.merged_state_dict`) at every sync.
    if not cfg.model.lora.enabled:
        return
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ValueError(
            "config key 'model.lora.enabled': expects the peft package (pip install 'zoomgym[lora]'), "
            "actual: peft is not installed"
        )


def _validate_distributed(cfg: Config) -> None:
    """The ``distributed`` section, and under torchrun what the sharded trainer supports."""
    d = cfg.distributed
    if d.timeout_minutes <= 0:
        raise ValueError(f"config key 'distributed.timeout_minutes': expects a positive value, actual: {d.timeout_minutes}")
    from zoomgym.algorithms.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return
    import torch

    world = int(os.environ["WORLD_SIZE"])
    if d.backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("config key 'distributed.backend': expects gloo (or auto) without CUDA, actual: nccl")
    if d.cpu_offload and not torch.cuda.is_available():
        raise ValueError("config key 'distributed.cpu_offload': expects false without CUDA (FSDP2 offloads from an "
                         "accelerator to the CPU; here everything is on the CPU already), actual: true")
    if cfg.trainer.prompts_per_step < world:
        raise ValueError(
            f"config key 'trainer.prompts_per_step': expects at least one prompt per rank under torchrun "
            f"({world} ranks), actual: {cfg.trainer.prompts_per_step}"
        )
    if cfg.algorithm.dynamic_sampling:
        raise ValueError("config key 'algorithm.dynamic_sampling': expects false under torchrun (the ranks would "
                         "need to agree on which groups to keep), actual: true")
    if cfg.rollout.backend == "vllm" and cfg.rollout.vllm.tensor_parallel_size != 1:
        raise ValueError(
            "config key 'rollout.vllm.tensor_parallel_size': expects 1 under torchrun (one engine per rank, each "
            f"playing its own share of the prompts), actual: {cfg.rollout.vllm.tensor_parallel_size}"
        )


def _validate_names(cfg: Config) -> None:
    from zoomgym.agents.backends import BACKENDS
    from zoomgym.algorithms import core

    from zoomgym import algorithms

    a = cfg.algorithm
    _check_name("algorithm.name", a.name, algorithms.ALGORITHMS)
    _check_name("algorithm.advantage", a.advantage, core.ADVANTAGES)
    _check_name("algorithm.policy_loss", a.policy_loss, core.POLICY_LOSSES)
    _check_name("algorithm.loss_agg", a.loss_agg, core.AGGREGATIONS)
    _check_name("algorithm.kl_kind", a.kl_kind, core.KL_ESTIMATORS)
    _check_name("rollout.backend", cfg.rollout.backend, BACKENDS)
    if cfg.env.id is not None:
        import gymnasium

        from zoomgym import envs  # noqa: F401 - registers the zoomgym ids

        if cfg.env.id not in gymnasium.registry:
            ids = sorted(k for k in gymnasium.registry if k.startswith("zoomgym/"))
            raise ValueError(
                f"config key 'env.id': expects a registered id such as {ids}, actual: {cfg.env.id!r}."
                f"{suggest(cfg.env.id, ids)}"
            )


def _check_name(key: str, value: str, registry: Mapping[str, Any]) -> None:
    if value not in registry:
        names = sorted(registry)
        raise ValueError(f"config key {key!r}: expects one of {names}, actual: {value!r}.{suggest(value, names)}")


def builds_model(model: ModelConfig) -> bool:
    """Whether ``model.path`` names the folder ``model.build`` makes (the one place a model is built)."""
    build = model.build
    return (build.builder is not None and build.into is not None
            and Path(build.into).expanduser().resolve() == Path(model.path).expanduser().resolve())


def _check_arguments(key: str, fn: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """``fn(*args, **kwargs)`` would bind: every keyword is a parameter of `fn`, none required is missing."""
    signature = inspect.signature(fn)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        names = [name for name, p in signature.parameters.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][len(args):]
        unknown = sorted(set(kwargs) - set(names))
        raise ValueError(
            f"config key {key!r}: expects options among {names} ({getattr(fn, '__qualname__', fn)}), actual: "
            f"{error}.{suggest(unknown[0], names) if unknown else ''}"
        ) from None


def _validate_env_options(cfg: Config) -> None:
    """``env.options`` (and ``env.max_turns``) against the env's constructor, then by building one env:
    an error names the option, never the dataset (Gymnasium's own message prints every argument)."""
    import gymnasium
    from PIL import Image
    from zoomgym.algorithms.build import env_id_of, env_kwargs
    from zoomgym.envs.data import Sample

    from zoomgym import envs  # noqa: F401 - registers the zoomgym ids

    env_id, options = env_id_of(cfg), env_kwargs(cfg)
    key = "env.options"
    if "dataset" in options:
        raise ValueError(f"config key {key!r}: expects no 'dataset' (each episode's env gets its sample), actual: one")
    spec = gymnasium.spec(env_id)
    creator = spec.entry_point
    if isinstance(creator, str):
        creator = gymnasium.envs.registration.load_env_creator(creator)
    own = {k: v for k, v in options.items() if k not in ("max_episode_steps", "disable_env_checker")}  # make()'s
    _check_arguments(key, creator, (), {**spec.kwargs, **own, "dataset": []})
    stand_in = Sample("config-check", Image.new("RGB", (28, 28)), "?", ("a", "b"), "A")
    try:
        gymnasium.make(env_id, dataset=[stand_in], **options).close()
    except (TypeError, ValueError) as error:
        cause = error.__cause__ if isinstance(error.__cause__, (TypeError, ValueError)) else error
        raise ValueError(f"config key {key!r}: expects options {env_id} accepts, actual: {cause}") from None


def _validate_model_path(model: ModelConfig) -> None:
    build = model.build
    if build.builder is not None:
        from zoomgym.agents.models import MODEL_BUILDERS

        _check_name("model.build.builder", build.builder, MODEL_BUILDERS)
        if build.into is None:
            raise ValueError("config key 'model.build.into': expects the cache folder to build into, actual: null")
        _check_arguments("model.build.options", MODEL_BUILDERS[build.builder], (build.into,), build.options)
    path = Path(model.path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"config key 'model.path': expects a model folder holding config.json, actual: {str(path)!r} has none"
            )
        return
    if builds_model(model):
        return  # built on first use
    looks_local = model.path.startswith(".") or Path(Path(model.path).parts[0]).exists()  # "runs/step_1": a folder
    if _HUB_ID.match(model.path) and not looks_local:
        return  # a hub id: transformers resolves it (from the local cache when offline)
    hint = (f" (model.build builds {build.into!r} only; model.path={build.into} uses it)" if build.builder
            else "")
    raise ValueError(
        f"config key 'model.path': expects an existing model folder or a hub id 'org/name', actual: "
        f"{model.path!r} does not exist{hint}"
    )


def _validate_datasets(data: DataConfig) -> None:
    from zoomgym.algorithms.build import loader_arguments
    from zoomgym.envs.data import DATASETS

    specs = [("data.train", data.train)] + [(f"data.val[{i}]", d) for i, d in enumerate(data.val)]
    for key, spec in specs:
        if spec.name not in DATASETS:
            names = sorted(DATASETS)
            raise ValueError(
                f"config key '{key}.name': expects one of {names}, actual: {spec.name!r}.{suggest(spec.name, names)}"
            )
        if spec.path is not None and not Path(spec.path).expanduser().exists():
            raise ValueError(f"config key '{key}.path': expects an existing file or folder, actual: {spec.path!r} does not exist")
        if spec.limit is not None and spec.limit <= 0:
            raise ValueError(f"config key '{key}.limit': expects a positive number or null, actual: {spec.limit}")
        _check_arguments(f"{key}.options", DATASETS[spec.name], (), loader_arguments(spec))


def validate_sft(cfg: Config) -> None:
    """The checks of ``zoomgym sft`` beyond `validate`: the ``sft`` section's chat sets and weights.

    Raises:
        ValueError naming the key.
    """
    from zoomgym.algorithms.distributed import launched_by_torchrun
    from zoomgym.envs.data import CHAT_TASKS

    if launched_by_torchrun():
        raise ValueError("zoomgym sft: expects a single process, actual: started by torchrun (sharded training "
                         "is zoomgym train's)")
    s = cfg.sft
    if not s.train:
        raise ValueError("config key 'sft.train': expects at least one chat set ({task: NAME} or {path: FILE}), actual: none")
    sets = [(f"sft.train[{i}]", c) for i, c in enumerate(s.train)] + [(f"sft.val[{i}]", c) for i, c in enumerate(s.val)]
    for key, chats in sets:
        if (chats.task is None) == (chats.path is None):
            raise ValueError(f"config key {key!r}: expects exactly one of task and path, actual: task={chats.task!r}, "
                             f"path={chats.path!r}")
        if chats.task is not None:
            _check_name(f"{key}.task", chats.task, CHAT_TASKS)
        elif not Path(chats.path).expanduser().is_file():  # type: ignore[arg-type]
            raise ValueError(f"config key '{key}.path': expects an existing chats jsonl file, actual: {chats.path!r}")
        if chats.n <= 0 or (chats.limit is not None and chats.limit <= 0):
            raise ValueError(f"config keys '{key}.n' and '{key}.limit': expects positive values, actual: "
                             f"{chats.n} and {chats.limit}")
    for key, value in (("sft.batch_size", s.batch_size), ("sft.max_new_tokens", s.max_new_tokens),
                       ("sft.attention_heads", s.attention_heads)):
        if value <= 0:
            raise ValueError(f"config key {key!r}: expects a positive value, actual: {value}")
    for key, value in (("sft.aux_weight", s.aux_weight), ("sft.attention_weight", s.attention_weight),
                       ("sft.aux_layer", s.aux_layer)):
        if not value >= 0:  # also refuses NaN
            raise ValueError(f"config key {key!r}: expects a value >= 0, actual: {value}")


def check_run_dir(cfg: Config, resume: bool) -> None:
    """A fresh run must not write into another run's folder; a resumed one needs it.

    Raises:
        ValueError naming ``logging.run_dir``.
    """
    if cfg.logging.run_dir is None:
        if resume:
            raise ValueError("config key 'logging.run_dir': expects the run directory to resume, actual: null")
        return
    run_dir = Path(cfg.logging.run_dir)
    existing = next(folder for folder in (run_dir, *run_dir.parents) if folder.exists())
    if not existing.is_dir():
        raise ValueError(
            f"config key 'logging.run_dir': expects a folder (or a path where one can be made), actual: "
            f"{str(existing)!r} is a file"
        )
    holds_run = (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()
    if holds_run and not resume:
        raise ValueError(
            f"config key 'logging.run_dir': expects a new or empty folder, actual: {str(run_dir)!r} holds a run "
            "(continue it with --resume: from its newest checkpoint, or from step 0 if it has none; or choose "
            "another logging.run_dir)"
        )


# ----------------------------------------------------------------------------------------------------------
# Help text from the attribute docstrings
# ----------------------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstring of every field of a dataclass (the string literal under it)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe(cfg: Any = None, prefix: str = "") -> list[str]:
    """One line per leaf key: ``dotted.key = value  # help``; the listing behind ``zoomgym train --help``."""
    cfg = Config() if cfg is None else cfg
    lines = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.extend(describe(value, key + "."))
        else:
            shown = yaml.safe_dump(to_dict(value) if not isinstance(value, tuple) else list(value),
                                   default_flow_style=True, width=10_000).strip()
            shown = shown.removesuffix("\n...").removesuffix(" ...").strip()
            lines.append(f"{key} = {shown}  # {docs.get(f.name, '')}")
    return lines
