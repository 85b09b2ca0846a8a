"""The training loop around an algorithm: optimizer, schedule, validation, logging, checkpoints. No maths.

``Trainer`` is the base of every algorithm (SB3's ``OnPolicyAlgorithm`` in spirit). It owns what all of
them share; an algorithm (``algorithms/grpo.py``) implements ``train_step`` (one RL step: rollouts,
advantages, policy update) and inherits the rest::

    algo = algorithms.make("mgpo", agent=agent, config=cfg)   # env id from the algorithm unless given
    algo.learn(10)                                            # 10 RL steps; returns algo

``learn`` validates greedily before the first step (``trainer.val_before_train``), every
``trainer.val_every`` steps and after the last, logs every step to ``RUN_DIR/metrics.jsonl`` and
TensorBoard, renders a few trajectories every ``logging.render_every`` steps, and checkpoints every
``trainer.save_every`` steps and after the last. ``run(cfg)`` is what ``zoomgym train`` calls.

Determinism: every random draw of step ``s`` (prompt order, sampling, mini-batch shuffling) comes from
seeds derived from ``(trainer.seed, s)``, and a checkpoint holds optimizer, scheduler, RNG states and
counters, so N steps straight and N/2 + ``--resume`` + N/2 give identical weights on CPU.
"""

from __future__ import annotations

import copy
import inspect
import math
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
from zoomgym.algorithms.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from zoomgym.algorithms.config import RUN_CONFIG_FILE, Config, DatasetConfig, check_run_dir, save_config
from zoomgym.algorithms.config import validate as validate_config
from zoomgym.algorithms.logging import RunLogger

if TYPE_CHECKING:
    from zoomgym.agents.trajectory import Trajectory
    from zoomgym.envs.data import Sample

SelfTrainer = TypeVar("SelfTrainer", bound="Trainer")


# ----------------------------------------------------------------------------------------------------------
# Seeds, data, episode metrics
# ----------------------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (run seed, step, stream, ...), stable across runs and platforms."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def validation_seed(cfg: Config) -> int:
    """The seed of validation episodes (greedy: it only seeds env resets), the same in training and eval."""
    return derive_seed(cfg.trainer.seed, 1 << 20)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_samples(spec: DatasetConfig) -> list[Sample]:
    """``envs.data.load_dataset`` for a config entry (``path`` passed as the loader's path or root)."""
    from zoomgym.envs.data import DATASETS, load_dataset

    kwargs = dict(spec.options)
    if spec.path is not None:
        params = inspect.signature(DATASETS[spec.name]).parameters
        kwargs["path" if "path" in params else "root"] = spec.path
    samples = load_dataset(spec.name, **kwargs)
    return samples[: spec.limit] if spec.limit is not None else samples


def load_val_sets(specs: Sequence[DatasetConfig]) -> dict[str, list[Sample]]:
    """Validation sets by label (default the loader name; a repeated one gets a numeric suffix)."""
    sets: dict[str, list[Sample]] = {}
    for spec in specs:
        base = spec.label or spec.name
        name, k = base, 2
        while name in sets:
            name, k = f"{base}{k}", k + 1
        sets[name] = load_samples(spec)
    return sets


def make_env(cfg: Config, env_id: str, agent: Any, sample: Sample, render: bool = False) -> Any:
    """A fresh env of `env_id` showing `sample`, with the agent's view budget and coordinate frame."""
    import gymnasium
    from zoomgym import envs  # noqa: F401 - registers the zoomgym ids

    options = {"view_budget": agent.view_budget, "coord_frame": agent.coord_frame, **cfg.env.options}
    if cfg.env.max_turns is not None:
        options["max_turns"] = cfg.env.max_turns
    if render:
        options["render_mode"] = "rgb_array"
    return gymnasium.make(env_id, dataset=[sample], **options)


def sampling_params(cfg: Config, *, greedy: bool, seed: int) -> Any:
    """The backend's ``SamplingParams``: the config's temperature/top-p, or greedy (evaluation)."""
    from zoomgym.agents.backends.base import SamplingParams

    r = cfg.rollout
    return SamplingParams(
        temperature=0.0 if greedy else r.temperature,
        top_p=1.0 if greedy else r.top_p,
        max_new_tokens=r.max_new_tokens,
        seed=seed,
    )


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def episode_metrics(trajectories: Sequence[Trajectory], prefix: str) -> dict[str, float]:
    """Scalars describing a batch of episodes (see ARCHITECTURE.md, metrics glossary).

    ``{prefix}/reward``, ``{prefix}/accuracy`` and ``{prefix}/accuracy/<category>``; grounding health
    (``valid_box_ratio``, ``fallback_ratio``, ``iou``, ``zoom_rate``, ``accuracy_zoomed``,
    ``accuracy_not_zoomed``; only when there were grounding turns); episode shape (``turns``,
    ``generated_tokens``, ``visual_tokens``, ``truncated_ratio``, ``context_truncated_ratio``).
    Keys whose value is undefined for this batch (no grounding turn, no known box) are left out.
    """
    out: dict[str, float | None] = {}
    correct = [float(bool(t.infos[-1].get("correct"))) for t in trajectories]
    out[f"{prefix}/reward"] = _mean([t.reward for t in trajectories])
    out[f"{prefix}/accuracy"] = _mean(correct)
    by_category: dict[str, list[float]] = defaultdict(list)
    for traj, ok in zip(trajectories, correct):
        by_category[traj.category or "none"].append(ok)
    if len(by_category) > 1 or "none" not in by_category:
        for category, values in sorted(by_category.items()):
            out[f"{prefix}/accuracy/{category}"] = _mean(values)

    grounding = [(traj, info) for traj in trajectories for info in traj.infos[1:] if info.get("action") != "answer"
                 and "box_valid" in info and info.get("turn") is not None and _was_grounding_turn(traj, info)]
    if grounding:
        out[f"{prefix}/valid_box_ratio"] = _mean([float(bool(info["box_valid"])) for _, info in grounding])
        out[f"{prefix}/fallback_ratio"] = _mean([float(bool(info.get("fallback"))) for _, info in grounding])
        out[f"{prefix}/iou"] = _mean([float(info["iou"]) for _, info in grounding
                                      if info.get("iou") is not None and info["box_valid"]])
        zoomed = [any(info.get("box_valid") for info in t.infos[1:]) for t in trajectories]
        out[f"{prefix}/zoom_rate"] = _mean([float(z) for z in zoomed])
        out[f"{prefix}/accuracy_zoomed"] = _mean([c for c, z in zip(correct, zoomed) if z])
        out[f"{prefix}/accuracy_not_zoomed"] = _mean([c for c, z in zip(correct, zoomed) if not z])
    out[f"{prefix}/turns"] = _mean([t.num_turns for t in trajectories])
    out[f"{prefix}/generated_tokens"] = _mean([t.response_length for t in trajectories])
    out[f"{prefix}/visual_tokens"] = _mean([float(t.infos[-1].get("visual_tokens") or 0) for t in trajectories])
    out[f"{prefix}/truncated_ratio"] = _mean([float(t.truncated) for t in trajectories])
    out[f"{prefix}/context_truncated_ratio"] = _mean([float(t.context_truncated) for t in trajectories])
    return {k: v for k, v in out.items() if v is not None}


def _was_grounding_turn(traj: Trajectory, info: dict[str, Any]) -> bool:
    """Whether the turn that produced `info` was one where the env asked for (or allowed) a box."""
    index = next(i for i, candidate in enumerate(traj.infos) if candidate is info)
    return traj.infos[index - 1].get("next_turn") in ("ground", "ground_or_answer")


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------


class Trainer:
    """Shared machinery of the algorithms; subclasses implement :meth:`train_step`.

    Args:
        agent: an ``agents.LMMAgent`` (its model is trained in place; its backend samples).
        config: the whole run config (``algorithms.config.Config``).
        env_id: the Gymnasium id episodes run in; default ``config.env.id``, else the algorithm's
            ``default_env_id``.

    Attributes:
        step: RL steps completed (also the weight version the backend samples with).
        run_dir: where config, metrics, TensorBoard events and checkpoints go.
        first_validation, last_validation: validation metrics before the first and after the latest step.
    """

    default_env_id: ClassVar[str] = "zoomgym/ZoomEnv-v0"

    def __init__(self, agent: Any, config: Config, env_id: str | None = None) -> None:
        self.agent = agent
        self.cfg = config
        self.env_id = env_id or config.env.id or self.default_env_id
        self.step = 0
        self.prompts_drawn = 0
        self.first_validation: dict[str, float] = {}
        self.last_validation: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self._validated_step: int | None = None
        self._logger: RunLogger | None = None
        self.env_seconds = 0.0  # time spent inside env reset/step, accumulated by the envs of `env_fn`

        self.train_samples = load_samples(config.data.train)
        if not self.train_samples:
            raise ValueError(f"Expects a non-empty training set, actual: none from {config.data.train}")
        self.val_sets = load_val_sets(config.data.val)
        self.run_dir = Path(config.logging.run_dir or f"runs/{config.name}-{datetime.now():%Y%m%d-%H%M%S}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, self.run_dir / RUN_CONFIG_FILE)

        self.model = self._prepare_model(agent.model)
        self.reference_agent = self._make_reference()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        t = config.trainer
        self.optimizer = torch.optim.AdamW(
            trainable, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps, weight_decay=t.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    # -- set-up ------------------------------------------------------------------------------------------

    def _prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """LoRA adapters (peft) and gradient checkpointing as configured; returns the module to train."""
        mcfg = self.cfg.model
        self.peft_model = None
        if mcfg.lora.enabled:
            try:
                import peft
            except ImportError as err:
                raise ImportError("model.lora.enabled needs peft: pip install 'zoomgym[lora]'") from err
            names = "|".join(mcfg.lora.target_modules)
            lora = peft.LoraConfig(
                r=mcfg.lora.rank,
                lora_alpha=mcfg.lora.alpha,
                lora_dropout=mcfg.lora.dropout,
                # The language model's linear layers only: the vision tower has layers of the same names.
                target_modules=rf"^(?!.*visual).*\.({names})$",
            )
            # peft injects the adapters into `model`'s own modules, so the agent's backend samples with them.
            self.peft_model = peft.get_peft_model(model, lora)
        if mcfg.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if mcfg.lora.enabled:
                model.enable_input_require_grads()
        return model

    def _make_reference(self) -> Any:
        """An agent over a frozen copy of the initial policy, for the KL loss; None when kl_coef is 0.

        It shares processor, adapter and backend with the policy's agent (it never samples), so its
        ``token_logprobs`` are the policy's function on the reference weights. With LoRA the reference is
        the base model itself (adapters disabled), so nothing is copied.
        """
        if self.cfg.algorithm.kl_coef == 0 or self.peft_model is not None:
            return None
        reference = copy.deepcopy(self.model).eval()
        reference.requires_grad_(False)
        return type(self.agent)(reference, self.agent.processor, self.agent.adapter, backend=self.agent.backend)

    def _lr_factor(self, update: int) -> float:
        """Multiplier of the base lr after `update` optimizer steps: linear warmup, then the schedule."""
        t = self.cfg.trainer
        total = t.steps * self.updates_per_step
        if update < t.warmup_steps:
            return (update + 1) / (t.warmup_steps + 1)
        progress = min(1.0, (update - t.warmup_steps) / max(1, total - t.warmup_steps))
        if t.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if t.lr_schedule == "linear":
            return 1.0 - progress
        return 1.0

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps per RL step: epochs x (prompts per step / prompts per mini-batch)."""
        t = self.cfg.trainer
        return self.cfg.algorithm.ppo_epochs * (t.prompts_per_step // t.mini_batch_prompts)

    @property
    def logger(self) -> RunLogger:
        if self._logger is None:
            self._logger = RunLogger(
                self.run_dir, tensorboard=self.cfg.logging.tensorboard, resume_step=self.step if self.step else None
            )
        return self._logger

    # -- what an algorithm implements ---------------------------------------------------------------------

    def train_step(self) -> tuple[dict[str, float], list[Trajectory]]:
        """One RL step at ``self.step``: returns (metrics, the step's trajectories). Subclasses implement it."""
        raise NotImplementedError

    # -- the loop -------------------------------------------------------------------------------------------

    def learn(self: SelfTrainer, num_steps: int) -> SelfTrainer:
        """Run `num_steps` more RL steps (validating, logging and checkpointing on the way); returns self."""
        if num_steps < 0:
            raise ValueError(f"Expects num_steps >= 0, actual: {num_steps}")
        t, log = self.cfg.trainer, self.cfg.logging
        logger = self.logger  # opened at the step the run (re)starts from: a resumed log drops what came later
        if self.step == 0 and t.val_before_train and self.val_sets and self._validated_step != 0:
            self.validate()
        last = self.step + num_steps
        bar = _progress(num_steps, enabled=log.progress_bar, initial_step=self.step)
        for _ in range(num_steps):
            seed_everything(derive_seed(t.seed, self.step, 0))
            lr = self.scheduler.get_last_lr()[0]  # the rate of this step's first optimizer step
            metrics, trajectories = self.train_step()
            self.step += 1
            metrics["train/weight_version"] = float(self.step)
            metrics["train/lr"] = lr
            logger.log(self.step, metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics.get('train/reward', float('nan')):.3f}",
                            loss=f"{metrics.get('actor/loss', float('nan')):.4f}")
            if log.render_every and self.step % log.render_every == 0:
                self.render(trajectories[: log.render_count])
            if self.val_sets and (self.step == last or (t.val_every and self.step % t.val_every == 0)):
                self.validate()
            if self.step == last or (t.save_every and self.step % t.save_every == 0):
                self.save()
        bar.close()
        return self

    def close(self) -> None:
        """Flush and close the logs."""
        if self._logger is not None:
            self._logger.close()
            self._logger = None

    # -- rollouts shared by training and validation ----------------------------------------------------

    def env_fn(self, sample: Sample, render: bool = False) -> Any:
        """A fresh env of ``self.env_id`` showing `sample` (see `make_env`), timed into ``env_seconds``."""
        return _TimedEnv(make_env(self.cfg, self.env_id, self.agent, sample, render=render), self)

    def rollout(self, samples: Sequence[Sample], group_size: int, *, greedy: bool, seed: int) -> list[Trajectory]:
        """``group_size`` episodes of every sample through the agent's backend (group_id = sample index)."""
        self.model.eval()
        with torch.no_grad():
            return self.agent.rollout(
                samples, group_size, env=self.env_fn, sampling=sampling_params(self.cfg, greedy=greedy, seed=seed),
                context_budget=self.cfg.rollout.max_context_tokens,
            )

    @property
    def logprob_temperature(self) -> float:
        """The temperature training log-probs are taken at: the sampling one (the backend's definition)."""
        return self.cfg.rollout.temperature if self.cfg.rollout.temperature > 0 else 1.0

    def validate(self) -> dict[str, float]:
        """Greedy episodes on every validation set; logs ``val/<set>/...`` at the current step."""
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        for name, samples in self.val_sets.items():
            trajectories = self.rollout(samples, 1, greedy=True, seed=validation_seed(self.cfg))
            metrics.update(episode_metrics(trajectories, f"val/{name}"))
        metrics["time/validation_s"] = time.perf_counter() - start
        self.logger.log(self.step, metrics)
        if self.step == 0 or not self.first_validation:
            self.first_validation = metrics
        self.last_validation = metrics
        self._validated_step = self.step
        return metrics

    def render(self, trajectories: Sequence[Trajectory]) -> None:
        """Replay episodes in fresh envs (their action texts are exact) and log ``env.render()`` images."""
        by_id = {sample.id: sample for sample in self.train_samples}
        images = []
        for traj in trajectories:
            sample = by_id[traj.sample_id]
            env = self.env_fn(sample, render=True)
            env.reset(options={"sample": sample})
            for action in traj.actions:
                env.step(action)
            images.append(env.render())
            env.close()
        self.logger.log_images(self.step, "train/trajectories", images)

    # -- checkpoints ---------------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the weights."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "prompts_drawn": self.prompts_drawn,
            "sampler_seed": derive_seed(self.cfg.trainer.seed, self.step, 1),
            "algorithm": type(self).__name__,
        }

    def save(self) -> Path:
        """Checkpoint the current step (``from_pretrained``-loadable model and processor + trainer state)."""
        self.last_checkpoint = save_checkpoint(
            self.run_dir,
            self.step,
            model=self.peft_model if self.peft_model is not None else self.model,
            processor=self.agent.processor,
            trainer_state=self.trainer_state(),
            keep=self.cfg.trainer.keep_checkpoints,
        )
        return self.last_checkpoint

    def load_checkpoint(self, checkpoint: str | Path) -> None:
        """Continue from a checkpoint of this run: weights, optimizer, scheduler, RNG, counters."""
        checkpoint = Path(checkpoint)
        state = load_trainer_state(checkpoint)
        if self.peft_model is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.peft_model, load_file(checkpoint / "adapter_model.safetensors"))
        else:
            # A fresh from_pretrained load maps the saved names back onto the model's own (transformers may
            # rename keys on save); copying its state keeps the agent's and backend's references valid.
            loaded = type(self.model).from_pretrained(checkpoint, dtype=next(self.model.parameters()).dtype)
            self.model.load_state_dict(loaded.state_dict())
            del loaded
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.prompts_drawn = int(state["prompts_drawn"])
        self.last_checkpoint = checkpoint
        self._validated_step = self.step  # the interrupted run validated here already if it was due
        self.agent.sync_weights(self.step)


class _TimedEnv:
    """Wraps an env to add the seconds spent in ``reset``/``step`` to ``trainer.env_seconds``."""

    def __init__(self, env: Any, trainer: Trainer) -> None:
        self.env, self._trainer = env, trainer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def reset(self, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.env.reset(**kwargs)
        finally:
            self._trainer.env_seconds += time.perf_counter() - start

    def step(self, action: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.env.step(action)
        finally:
            self._trainer.env_seconds += time.perf_counter() - start


def _progress(total: int, *, enabled: bool, initial_step: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=f"steps from {initial_step}", unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------
# zoomgym train
# ----------------------------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_agent(cfg: Config) -> Any:
    """The LMM agent of a config: builds the offline tiny model on first use, then loads it."""
    from zoomgym import algorithms
    from zoomgym.agents.lmm import LMMAgent

    path = Path(cfg.model.path).expanduser()
    if cfg.model.build_tiny is not None and not path.exists():
        from zoomgym.agents.models import build_tiny_model

        print(f"building the offline tiny model ({cfg.model.build_tiny}) in {path} ...")
        build_tiny_model(path, size=cfg.model.build_tiny, seed=cfg.trainer.seed)
    backend_kwargs: dict[str, Any] = {}
    if cfg.rollout.backend == "vllm":
        env_id = cfg.env.id or algorithms.get(cfg.algorithm.name).default_env_id
        max_turns = cfg.env.max_turns or {"zoomgym/DirectVQA-v0": 1, "zoomgym/ZoomEnv-v0": 2}.get(env_id, 2)
        backend_kwargs = {
            "max_turns": max_turns,
            "dtype": cfg.model.dtype,
            "gpu_memory_utilization": cfg.rollout.vllm_gpu_memory_utilization,
            "tensor_parallel_size": cfg.rollout.vllm_tensor_parallel_size,
            "max_model_len": cfg.rollout.max_context_tokens,
            "enable_sleep_mode": True,  # the engine sleeps while the trainer updates on the same GPU
            "seed": cfg.trainer.seed,
        }
    return LMMAgent.from_pretrained(
        str(path),
        cfg.rollout.backend,
        dtype=cfg.model.dtype,
        device=resolve_device(cfg.trainer.device),
        min_pixels=cfg.model.min_pixels,
        max_pixels=cfg.model.max_pixels,
        **backend_kwargs,
    )


def evaluate_model(cfg: Config) -> dict[str, float]:
    """Greedy episodes of ``cfg.model.path`` on every ``cfg.data.val`` set: the trainer's validation protocol.

    The env is ``cfg.env.id`` or the configured algorithm's own, so a base model and its trained
    checkpoint are measured the same way (``zoomgym eval CONFIG model.path=CKPT``).

    Returns:
        ``val/<set>/...`` metrics (see ``episode_metrics``).
    """
    from zoomgym import algorithms

    validate_config(cfg)
    env_id = cfg.env.id or algorithms.get(cfg.algorithm.name).default_env_id
    agent = build_agent(cfg)
    metrics: dict[str, float] = {}
    with torch.no_grad():
        for name, samples in load_val_sets(cfg.data.val).items():
            trajectories = agent.rollout(
                samples, 1, env=lambda sample: make_env(cfg, env_id, agent, sample),
                sampling=sampling_params(cfg, greedy=True, seed=validation_seed(cfg)),
                context_budget=cfg.rollout.max_context_tokens,
            )
            metrics.update(episode_metrics(trajectories, f"val/{name}"))
    return metrics


def run(cfg: Config, resume: bool = False) -> Trainer:
    """Validate the config, build agent and algorithm, train to ``trainer.steps``; what ``zoomgym train`` does.

    Args:
        cfg: the resolved config (its ``logging.run_dir`` is the run to resume when `resume`).
        resume: continue from the newest checkpoint in ``cfg.logging.run_dir``.

    Returns:
        The trained algorithm (``algo.run_dir``, ``algo.last_validation``, ...).
    """
    from zoomgym import algorithms

    validate_config(cfg)
    check_run_dir(cfg, resume)
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(cfg.logging.run_dir or "")
        if checkpoint is None:
            raise ValueError(f"Expects a checkpoint to resume in {cfg.logging.run_dir!r}/checkpoints, actual: none")
    seed_everything(cfg.trainer.seed)
    agent = build_agent(cfg)
    warmup_stats: dict[str, float] = {}
    if cfg.warmup.enabled and checkpoint is None:
        # Before the algorithm is built, so the KL reference is the warmed-up policy, not the random one.
        from zoomgym.algorithms.warmup import format_warmup

        env_id = cfg.env.id or algorithms.get(cfg.algorithm.name).default_env_id
        warmup_stats = format_warmup(agent, load_samples(cfg.data.train),
                                     lambda sample: make_env(cfg, env_id, agent, sample), cfg.warmup,
                                     seed=derive_seed(cfg.trainer.seed, 1 << 21))
        seed_everything(cfg.trainer.seed)  # RL's draws do not depend on whether the warm-up ran
    algo = algorithms.make(cfg.algorithm.name, agent=agent, config=cfg)
    if warmup_stats:
        algo.logger.log(0, warmup_stats)
    if checkpoint is not None:
        algo.load_checkpoint(checkpoint)
        print(f"resuming {algo.run_dir} from step {algo.step}")
    try:
        algo.learn(max(0, cfg.trainer.steps - algo.step))
    finally:
        algo.close()
    return algo
