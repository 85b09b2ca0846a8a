"""The loop around any trainer of an LMM agent: optimizer, schedule, validation, logging, checkpoints. No maths.

``Trainer`` is the base of every algorithm (SB3's ``OnPolicyAlgorithm`` in spirit) and of trainers that
are not RL (a supervised fine-tuning trainer implements ``train_step`` the same way). It owns what all
of them share; a subclass implements ``train_step`` (one step: data, loss, optimizer steps) and, when it
takes more than one optimizer step per step, ``updates_per_step``::

    algo = algorithms.make("mgpo", agent=agent, config=cfg)   # writes nothing yet
    algo.learn(10)                                            # 10 steps; returns algo

``learn`` validates greedily before the first step (``trainer.val_before_train``), every
``trainer.val_every`` steps and after the last (writing the first ``logging.render_count`` episodes of
each set in words to TensorBoard and ``RUN_DIR/samples.jsonl``), logs every step to
``RUN_DIR/metrics.jsonl`` and TensorBoard, renders trajectories of distinct samples every
``logging.render_every`` steps, and checkpoints every ``trainer.save_every`` steps and after the last.
The run directory is created (and the resolved config written into it) on the first log, not when the
trainer is built.

A sample whose image fails to decode during a rollout (`envs.data.ImageLoadError`) is skipped with its
whole group, counted (``train/skipped_samples``, ``val/<set>/skipped_samples``) and named on stderr
once (`UnreadableImages`); the run goes on, and a resumed run skips it the same way.

Determinism: every random draw of step ``s`` (prompt order, sampling, mini-batch shuffling) comes from
seeds derived from ``(trainer.seed, s)`` (`algorithms.seeds`), and a checkpoint holds optimizer,
scheduler, RNG states and counters, so N steps straight and N/2 + ``--resume`` + N/2 give identical
weights on CPU.

Under ``torchrun`` (`algorithms.distributed`) the model and the trainer's frozen copies are sharded with
FSDP2, rollouts and validation run on the weights gathered on every rank (hf) or on each rank's own vLLM
engine, which receives the gathered weights after every update, each rank plays its share of
the samples, metrics are reduced over ranks, checkpoints are sharded, and only rank 0 writes the run
folder. A trainer opts in with ``supports_distributed`` (its update must use global denominators).
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from zoomgym.algorithms import distributed
from zoomgym.algorithms.build import Datasets, env_factory, env_id_of, load_datasets, sampling_params
from zoomgym.algorithms.checkpoint import (
    is_sharded,
    load_sharded_state,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from zoomgym.algorithms.config import RUN_CONFIG_FILE, Config, LoraConfig, ModelConfig, save_config
from zoomgym.algorithms.logging import RunLogger
from zoomgym.algorithms.seeds import VALIDATION_STREAM, derive_seed, seed_everything
from zoomgym.envs import DEFAULT_ENV_ID

if TYPE_CHECKING:
    from zoomgym.agents.trajectory import Trajectory
    from zoomgym.envs.data import ImageLoadError, Sample

SelfTrainer = TypeVar("SelfTrainer", bound="Trainer")


def validation_seed(cfg: Config) -> int:
    """The seed of validation episodes (greedy: it only seeds env resets), the same in training and eval."""
    return derive_seed(cfg.trainer.seed, VALIDATION_STREAM)


def prepare_model(model: torch.nn.Module, cfg: ModelConfig) -> Any:
    """LoRA adapters (peft) and gradient checkpointing as configured, in place.

    Returns:
        The peft model when ``cfg.lora.enabled`` (its adapters live inside ``model``'s own modules, so a
        backend over ``model`` samples with them), else None.
    """
    peft_model = None
    if cfg.lora.enabled:
        peft_model = _inject_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            model.enable_input_require_grads()
    return peft_model


def _inject_lora(model: torch.nn.Module, lora_cfg: LoraConfig) -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError("model.lora.enabled needs peft: pip install 'zoomgym[lora]'") from err
    names = "|".join(lora_cfg.target_modules)
    lora = peft.LoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        # The language model's linear layers only: the vision tower has layers of the same names.
        target_modules=rf"^(?!.*visual).*\.({names})$",
    )
    return peft.get_peft_model(model, lora)


class UnreadableImages:
    """The rollout engine's ``on_image_error``: counts the samples skipped because their image failed to
    decode (``count``, reset by the caller) and names each one on stderr the first time only."""

    def __init__(self) -> None:
        self.count = 0
        self.named: set[str] = set()

    def __call__(self, error: ImageLoadError) -> None:
        self.count += 1
        if error.sample_id not in self.named:
            from tqdm.auto import tqdm

            self.named.add(error.sample_id)
            tqdm.write(f"zoomgym: skipping sample {error.sample_id!r} and its group, its image failed to decode "
                       f"(named once, counted in */skipped_samples): {error}", file=sys.stderr)


def progress_bar(total: int, *, enabled: bool, initial_step: int) -> Any:
    """The tqdm bar over a run's steps."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=f"steps from {initial_step}", unit="step", dynamic_ncols=True)


class Trainer:
    """Shared machinery of the trainers; subclasses implement :meth:`train_step`.

    Args:
        agent: an ``agents.LMMAgent`` (its model is trained in place; its backend samples).
        config: the whole run config (``algorithms.config.Config``).
        env_id: the Gymnasium id episodes run in; default ``config.env.id``, else the trainer's
            ``default_env_id``.
        datasets: the config's training and validation samples, when loaded already (`zoomgym train`
            loads them before the model); default `algorithms.build.load_datasets`.

    Attributes:
        step: steps completed (also the weight version the backend samples with).
        run_dir: where config, metrics, TensorBoard events and checkpoints go (created on the first log).
        model: the module the optimizer trains (the agent's model, LoRA adapters injected if configured).
        peft_model: the peft wrapper of ``model`` with LoRA, else None.
        first_validation, last_validation: validation metrics before the first step (empty unless it
            ran: ``trainer.val_before_train``) and after the latest step.
        log_from_step: set when this process continues an interrupted run: the first step it logs (what
            the interrupted run logged from there on is superseded, `algorithms.logging`).
        unreadable: the samples skipped for an image that failed to decode (`UnreadableImages`).
    """

    default_env_id: ClassVar[str] = DEFAULT_ENV_ID
    renders_episodes: ClassVar[bool] = True
    """Whether ``logging.render_every`` replays the step's trajectories in envs (not for chats)."""
    progress_metrics: ClassVar[dict[str, str]] = {"reward": "train/reward", "loss": "actor/loss"}
    """Shown on the progress bar: label -> metric key."""
    supports_distributed: ClassVar[bool] = False
    """Whether the trainer trains under torchrun: its step splits the batch and reduces its losses over
    ranks (`algorithms.distributed`)."""

    def __init__(self, agent: Any, config: Config, env_id: str | None = None, *,
                 datasets: Datasets | None = None) -> None:
        self.agent = agent
        self.cfg = config
        self.env_id = env_id or env_id_of(config, type(self))
        self.step = 0
        self.prompts_drawn = 0
        self.first_validation: dict[str, float] = {}
        self.last_validation: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self._validated_step: int | None = None
        self._logger: RunLogger | SilentLogger | None = None
        self.log_from_step: int | None = None
        self.unreadable = UnreadableImages()
        self.env_clock = EnvClock()  # wall time inside env reset/step, kept by the envs of `env_fn`

        datasets = datasets if datasets is not None else load_datasets(config)
        self.train_samples, self.val_sets = datasets.train, datasets.val
        self.run_dir = Path(distributed.from_main(config.logging.run_dir or default_run_dir(config)))

        self.model = agent.model
        self.peft_model = prepare_model(self.model, config.model)
        frozen = self.make_frozen_models()
        if distributed.is_distributed():
            if not self.supports_distributed:
                raise RuntimeError(f"Expects a trainer that supports torchrun (supports_distributed), actual: "
                                   f"{type(self).__name__} trains in a single process only")
            for module in (self.model, *frozen):
                distributed.shard_model(module, config.distributed)
        trainable = [p for p in self.model.parameters() if p.requires_grad] + self.extra_parameters()
        t = config.trainer
        self.optimizer = torch.optim.AdamW(
            trainable, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps, weight_decay=t.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    # -- what a trainer implements ------------------------------------------------------------------------

    def make_frozen_models(self) -> list[torch.nn.Module]:
        """Frozen copies of the initial model the trainer keeps (GRPO: its KL reference), made before the
        model is sharded and sharded like it; none by default."""
        return []

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        """Trained parameters outside the model (e.g. SFT's training-only heads); none by default."""
        return []

    def train_step(self) -> tuple[dict[str, float], list[Trajectory]]:
        """One step at ``self.step``: returns (metrics, the step's trajectories). Subclasses implement it."""
        raise NotImplementedError

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps per step (the lr schedule's horizon is ``trainer.steps`` times this)."""
        return 1

    # -- set-up ------------------------------------------------------------------------------------------

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
    def logger(self) -> RunLogger | SilentLogger:
        """The run's logger; the first use creates the run directory and writes the resolved config (on rank
        0 only: the other ranks of a distributed run get a logger that writes nothing)."""
        if self._logger is None and not distributed.is_main():
            self._logger = SilentLogger()
        if self._logger is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / RUN_CONFIG_FILE)
            self._logger = RunLogger(self.run_dir, tensorboard=self.cfg.logging.tensorboard,
                                     purge_step=self.log_from_step)
        return self._logger

    # -- the loop -------------------------------------------------------------------------------------------

    def learn(self: SelfTrainer, num_steps: int) -> SelfTrainer:
        """Run `num_steps` more steps (validating, logging and checkpointing on the way); returns self."""
        if num_steps < 0:
            raise ValueError(f"Expects num_steps >= 0, actual: {num_steps}")
        t, log = self.cfg.trainer, self.cfg.logging
        logger = self.logger  # opened at the step the run (re)starts from: a resumed log drops what came later
        if self.step == 0 and t.val_before_train and self.val_sets and self._validated_step != 0:
            self.validate()
        last = self.step + num_steps
        bar = progress_bar(num_steps, enabled=log.progress_bar and distributed.is_main(), initial_step=self.step)
        for _ in range(num_steps):
            seed_everything(derive_seed(t.seed, self.step, 0))
            lr = self.scheduler.get_last_lr()[0]  # the rate of this step's first optimizer step
            self.unreadable.count = 0
            metrics, trajectories = self.train_step()
            self.step += 1
            metrics["train/weight_version"] = float(self.step)
            metrics["train/lr"] = lr
            metrics["train/skipped_samples"] = float(self.unreadable.count)
            logger.log(self.step, metrics)
            bar.update(1)
            bar.set_postfix({label: f"{metrics.get(key, float('nan')):.4f}" for label, key in self.progress_metrics.items()})
            if (self.renders_episodes and log.render_every and self.step % log.render_every == 0
                    and distributed.is_main()):  # rank 0's own episodes: distinct samples enough to show
                self.render(distinct_samples(trajectories, log.render_count))
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
        """A fresh env of ``self.env_id`` showing `sample` (`algorithms.build.env_factory`), timed by
        ``env_clock``."""
        return _TimedEnv(env_factory(self.cfg, self.env_id, self.agent, render=render)(sample), self)

    def rollout(self, samples: Sequence[Sample], group_size: int, *, greedy: bool, seed: int,
                first_episode: int = 0) -> list[Trajectory]:
        """``group_size`` episodes of every sample through the agent's backend (group_id = sample index).

        Episodes are seeded by their index ``first_episode + b * G + g``: a rank playing its share of a
        global batch passes the position of its first episode in it, and samples what one process would.
        """
        self.model.eval()
        episode_ids = range(first_episode, first_episode + len(samples) * group_size)
        # A backend that samples with the model itself needs its whole weights; a separate engine has its own.
        with torch.no_grad(), distributed.gathered(self.model if self.agent.backend.shares_model else None):
            return self.agent.rollout(
                samples, group_size, env=self.env_fn, sampling=sampling_params(self.cfg, greedy=greedy, seed=seed),
                context_budget=self.cfg.rollout.max_context_tokens, on_image_error=self.unreadable,
                episode_ids=episode_ids,
            )

    def validate(self) -> dict[str, float]:
        """Greedy episodes on every validation set; logs ``val/<set>/...`` at the current step, and the
        first ``logging.render_count`` episodes of each set in words (`algorithms.logging.RunLogger.log_samples`).
        Under torchrun each rank plays its share of every set and the metrics are of all of them."""
        from zoomgym.agents.metrics import episode_metrics
        from zoomgym.envs.render import episode_text

        metrics: dict[str, float] = {}
        start = time.perf_counter()
        for name, samples in self.val_sets.items():
            self.unreadable.count = 0
            mine = distributed.shard_range(len(samples))
            played = self.rollout([samples[i] for i in mine], 1, greedy=True, seed=validation_seed(self.cfg),
                                  first_episode=mine.start)
            trajectories = distributed.gather_episodes(played)
            metrics.update(episode_metrics(trajectories, f"val/{name}"))
            metrics[f"val/{name}/skipped_samples"] = float(distributed.all_sum(self.unreadable.count))
            by_id = {sample.id: sample for sample in samples}
            records = [{"sample_id": t.sample_id, "reward": t.reward, "answer": t.infos[-1].get("answer"),
                        "truth": by_id[t.sample_id].answer, "turns": list(t.actions),
                        "text": episode_text(by_id[t.sample_id], t.actions, t.infos, t.reward)}
                       for t in trajectories[: self.cfg.logging.render_count]]
            self.logger.log_samples(self.step, f"val/{name}/samples", records)
        metrics["time/validation_s"] = time.perf_counter() - start
        self.logger.log(self.step, metrics)
        if self.step == 0:
            self.first_validation = metrics  # "before training": only a validation of the initial model
        self.last_validation = metrics
        self._validated_step = self.step
        return metrics

    def render(self, trajectories: Sequence[Trajectory]) -> None:
        """Replay episodes in fresh envs (their action texts are exact) and log ``env.render()`` images."""
        from zoomgym.agents.evaluate import render_episode

        by_id = {sample.id: sample for sample in self.train_samples}
        images = [render_episode(traj, by_id[traj.sample_id], lambda s: self.env_fn(s, render=True))
                  for traj in trajectories]
        self.logger.log_images(self.step, "train/trajectories", images)

    # -- checkpoints ---------------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the weights (and, when sharded, the optimizer state)."""
        return {
            **({} if distributed.is_distributed() else {"optimizer": self.optimizer.state_dict()}),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "prompts_drawn": self.prompts_drawn,
            "sampler_seed": derive_seed(self.cfg.trainer.seed, self.step, 1),
            "algorithm": type(self).__name__,
        }

    def save(self) -> Path:
        """Checkpoint the current step (``from_pretrained``-loadable model and processor + trainer state;
        under torchrun sharded, every rank writing its shards: `algorithms.checkpoint.save_sharded_checkpoint`)."""
        if distributed.is_distributed():
            self.last_checkpoint = save_sharded_checkpoint(
                self.run_dir, self.step, model=self.model, optimizer=self.optimizer, processor=self.agent.processor,
                trainer_state=self.trainer_state(), keep=self.cfg.trainer.keep_checkpoints,
            )
            return self.last_checkpoint
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
        """Continue from a checkpoint of this run: weights, optimizer, scheduler, RNG, counters.

        A sharded checkpoint loads on any number of ranks, one process included; a single process's
        checkpoint loads under torchrun too (each rank reads it whole and keeps its shards)."""
        checkpoint = Path(checkpoint)
        state = load_trainer_state(checkpoint)
        if is_sharded(checkpoint):
            load_sharded_state(checkpoint, self.model, self.optimizer)  # weights and optimizer state
        elif distributed.is_distributed():
            self._load_whole_into_shards(checkpoint, state["optimizer"])
        else:
            self._load_weights(checkpoint)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.prompts_drawn = int(state["prompts_drawn"])
        self.last_checkpoint = checkpoint
        self._validated_step = self.step  # the interrupted run validated here already if it was due
        self.log_from_step = self.step + 1
        self.agent.sync_weights(self.step)


    def _load_whole_into_shards(self, checkpoint: Path, optimizer_state: dict[str, Any]) -> None:
        """A single process's checkpoint into the sharded model and optimizer (a run that goes distributed)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        from transformers import AutoModelForImageTextToText

        if self.peft_model is not None:
            raise ValueError(f"Expects a sharded checkpoint to resume a LoRA run under torchrun, actual: "
                             f"{str(checkpoint)!r} was written by a single process")
        whole = StateDictOptions(full_state_dict=True)
        loaded = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=next(self.model.parameters()).dtype)
        set_model_state_dict(self.model, loaded.state_dict(), options=whole)
        del loaded
        # A single process's optimizer state is keyed by the position of each trained parameter; DCP's by name.
        names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        by_name = {"state": {names[i]: value for i, value in optimizer_state["state"].items()},
                   "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                    for group in optimizer_state["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=whole)

    def _load_weights(self, checkpoint: Path) -> None:
        """The weights of a single process's checkpoint (a ``from_pretrained`` folder, or peft's with LoRA)."""
        if self.peft_model is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.peft_model, load_file(checkpoint / "adapter_model.safetensors"))
            return
        # A fresh from_pretrained load maps the saved names back onto the model's own (transformers may
        # rename keys on save); copying its state keeps the agent's and backend's references valid.
        loaded = type(self.model).from_pretrained(checkpoint, dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(loaded.state_dict())
        del loaded


def default_run_dir(cfg: Config) -> str:
    """``runs/<algorithm>-<name>-<YYYYmmdd-HHMMSS>``, e.g. ``runs/mgpo-quickstart-20260101-120000``."""
    return f"runs/{cfg.algorithm.name}-{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"


def distinct_samples(trajectories: Sequence[Trajectory], count: int) -> list[Trajectory]:
    """The first trajectory of each of the first `count` samples (a group's rollouts share one image)."""
    seen: set[str] = set()
    picked = []
    for trajectory in trajectories:
        if trajectory.sample_id not in seen and len(picked) < count:
            seen.add(trajectory.sample_id)
            picked.append(trajectory)
    return picked


class SilentLogger:
    """The logger of the ranks other than 0: the run folder is rank 0's alone."""

    def log(self, step: int, metrics: Any) -> None:
        """Nothing: rank 0 logs the (reduced) metrics."""

    def log_images(self, step: int, tag: str, images: Any) -> None:
        """Nothing."""

    def log_samples(self, step: int, tag: str, records: Any) -> None:
        """Nothing."""

    def close(self) -> None:
        """Nothing to close."""


class EnvClock:
    """Wall-clock seconds during which at least one env is inside ``reset``/``step``.

    The rollout engine resets and steps envs a group per thread, so their own times overlap: their sum
    could exceed the rollout. This counts the union of those intervals, and the rest of a rollout is the
    backend's (``time/generation_s``).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._inside = 0
        self._since = 0.0
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Back to zero (at the start of a step)."""
        with self._lock:
            self.seconds = 0.0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """Counts the block's wall time, once however many threads are inside."""
        with self._lock:
            if self._inside == 0:
                self._since = time.perf_counter()
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0:
                    self.seconds += time.perf_counter() - self._since


class _TimedEnv:
    """Wraps an env so that its ``reset``/``step`` run under ``trainer.env_clock``."""

    def __init__(self, env: Any, trainer: Trainer) -> None:
        self.env, self._trainer = env, trainer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def reset(self, **kwargs: Any) -> Any:
        with self._trainer.env_clock.timing():
            return self.env.reset(**kwargs)

    def step(self, action: Any) -> Any:
        with self._trainer.env_clock.timing():
            return self.env.step(action)
