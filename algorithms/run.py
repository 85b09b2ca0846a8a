"""What ``zoomgym train``, ``zoomgym sft`` and ``zoomgym eval`` do: validate the config, build, train or
evaluate.

    algo = run(load_config("configs/quickstart.yaml"))          # = zoomgym train configs/quickstart.yaml
    sft = run_sft(load_config("configs/toy_base.yaml"))         # = zoomgym sft configs/toy_base.yaml
    cfg = load_config("configs/quickstart.yaml", ["model.path=runs/x/checkpoints/step_000012"])
    metrics = evaluate_model(cfg, load_samples(cfg.data.val[0]), out_dir="runs/eval/step_12")   # = zoomgym eval
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zoomgym.algorithms import distributed
from zoomgym.algorithms.build import (
    build_agent,
    env_factory,
    env_id_of,
    env_kwargs,
    load_datasets,
    sampling_params,
)
from zoomgym.algorithms.checkpoint import CHECKPOINTS_DIR, latest_checkpoint
from zoomgym.algorithms.config import Config, check_run_dir, validate_sft
from zoomgym.algorithms.config import validate as validate_config
from zoomgym.algorithms.seeds import WARMUP_STREAM, derive_seed, seed_everything
from zoomgym.algorithms.trainer import UnreadableImages, validation_seed


def run(cfg: Config, resume: bool = False) -> Any:
    """Validate the config, load the datasets, build agent and algorithm, train to ``trainer.steps``; what
    ``zoomgym train`` does. Every check that can fail on the config or the data runs before the model loads.

    Args:
        cfg: the resolved config (its ``logging.run_dir`` is the run to resume when `resume`).
        resume: continue from the newest checkpoint in ``cfg.logging.run_dir``; a run killed before its
            first checkpoint starts again from step 0 in its folder (what it logged is superseded, not
            deleted: `algorithms.logging`).

    Under ``torchrun`` this process is one rank of the run (`algorithms.distributed`): the process group is
    started here, and the trainer shards, splits and reduces.

    Returns:
        The trained algorithm (``algo.run_dir``, ``algo.last_validation``, ...).
    """
    from zoomgym import algorithms

    validate_config(cfg)
    distributed.init_from_env(cfg.distributed)
    checkpoint = _resume_point(cfg, resume)
    datasets = load_datasets(cfg)  # every image header checked: a bad dataset fails before the model loads
    seed_everything(cfg.trainer.seed)
    agent = build_agent(cfg)
    warmup_stats: dict[str, float] = {}
    if cfg.warmup.enabled and checkpoint is None:
        # Before the algorithm is built, so the KL reference is the warmed-up policy, not the random one.
        from zoomgym.algorithms.warmup import format_warmup

        warmup_stats = format_warmup(agent, datasets.train, env_factory(cfg, env_id_of(cfg), agent), cfg.warmup,
                                     seed=derive_seed(cfg.trainer.seed, WARMUP_STREAM),
                                     on_image_error=UnreadableImages())
        seed_everything(cfg.trainer.seed)  # RL's draws do not depend on whether the warm-up ran
    algo = algorithms.make(cfg.algorithm.name, agent=agent, config=cfg, datasets=datasets)
    _continue(algo, resume, checkpoint)
    if warmup_stats:
        algo.logger.log(0, warmup_stats)
    return _learn(algo, cfg)


def run_sft(cfg: Config, resume: bool = False) -> Any:
    """Supervised fine-tuning to ``trainer.steps`` (`algorithms.sft.SFT`); what ``zoomgym sft`` does.

    Args:
        cfg: the resolved config; its ``sft`` section names the chats.
        resume: continue from the newest checkpoint in ``cfg.logging.run_dir``.

    Returns:
        The trained `SFT` (``sft.run_dir``, ``sft.last_validation``, ``sft.last_checkpoint``).
    """
    from zoomgym.algorithms.sft import SFT

    validate_config(cfg)
    validate_sft(cfg)
    checkpoint = _resume_point(cfg, resume)
    seed_everything(cfg.trainer.seed)
    sft = SFT(build_agent(cfg), cfg)
    _continue(sft, resume, checkpoint)
    return _learn(sft, cfg)


def _resume_point(cfg: Config, resume: bool) -> Any:
    """The checkpoint a resumed run continues from (None for a fresh run, or one killed before its first)."""
    check_run_dir(cfg, resume)
    checkpoint = latest_checkpoint(cfg.logging.run_dir or "") if resume else None
    distributed.barrier()  # every rank has looked at the run folder before rank 0 writes into it
    if resume and checkpoint is None and distributed.is_main():
        print(f"{cfg.logging.run_dir}: no checkpoint in {CHECKPOINTS_DIR}/ yet; starting the run again from step 0")
    return checkpoint


def _continue(algo: Any, resume: bool, checkpoint: Any) -> None:
    """Load the checkpoint to continue from; a resumed run without one starts over in its folder."""
    if resume and checkpoint is None:
        algo.log_from_step = 0
    if checkpoint is not None:
        algo.load_checkpoint(checkpoint)
        if distributed.is_main():
            print(f"resuming {algo.run_dir} from step {algo.step}")


def _learn(algo: Any, cfg: Config) -> Any:
    try:
        algo.learn(max(0, cfg.trainer.steps - algo.step))
    finally:
        algo.close()
    return algo


def model_identity(cfg: Config) -> dict[str, Any]:
    """What identifies ``cfg``'s model in an evaluation run: its name, the fingerprint of its folder (or its
    hub id), the backend and the dtype; computed without loading it."""
    from zoomgym.agents.evaluate.identity import model_fingerprint

    return {"name": Path(cfg.model.path).name or cfg.model.path, **model_fingerprint(cfg.model.path),
            "backend": cfg.rollout.backend, "dtype": cfg.model.dtype}


def evaluate_model(
    cfg: Config,
    samples: Sequence[Any],
    *,
    agent: Any = None,
    agent_identity: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    data: Mapping[str, Any] | None = None,
    counterfactual: bool = False,
    draws: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    n_trajectories: int = 24,
    progress: bool | None = None,
) -> dict[str, float]:
    """Evaluates ``cfg.model.path`` on ``samples`` with the config's protocol: what ``zoomgym eval`` runs.

    The env is ``cfg.env.id`` or the configured algorithm's own, with ``env.options`` (prompts, turns);
    the view budget, backend, token budgets and seed are the config's (the seed of the trainer's
    validation), so a base model and its trained checkpoint are measured the same way
    (``zoomgym eval CONFIG model.path=CKPT``). Decoding is greedy unless ``temperature > 0``.

    Args:
        cfg: the config (validated here).
        samples: the benchmark (``limit`` selects the first ones).
        agent: the agent to evaluate instead of building ``cfg``'s (a scripted one, or one already built).
        agent_identity: what identifies a scripted agent in the run (default `model_identity`: the model folder's fingerprint,
            backend and dtype).
        out_dir, limit, data, counterfactual, draws, batch_size, n_trajectories, progress: see
            `agents.evaluate.evaluate`.
        temperature, top_p: sampling of an LMM agent (``draws > 1`` needs ``temperature > 0``).

    Returns:
        `agents.evaluate.evaluate`'s numbers (``eval/accuracy``, ...).
    """
    import torch
    from zoomgym.agents.evaluate import evaluate
    from zoomgym.agents.lmm import LMMAgent
    from zoomgym.algorithms.evaluation import scripted_view_budget

    validate_config(cfg)
    if agent is None:
        agent = build_agent(cfg)
    lmm = isinstance(agent, LMMAgent)
    if agent_identity is None:
        agent_identity = model_identity(cfg)
    seed = validation_seed(cfg)  # the trainer's validation: greedy evaluation repeats its numbers
    sampling = dataclasses.replace(sampling_params(cfg, greedy=True, seed=seed), temperature=temperature, top_p=top_p)
    with torch.no_grad():
        return evaluate(agent, samples, env_id_of(cfg), env_kwargs=env_kwargs(cfg),
                        view_budget=None if lmm else scripted_view_budget(cfg, samples), counterfactual=counterfactual,
                        draws=draws, sampling=sampling if lmm else None, seed=seed,
                        context_budget=cfg.rollout.max_context_tokens, limit=limit, batch_size=batch_size,
                        out_dir=out_dir, n_trajectories=n_trajectories, model=agent_identity, data=data,
                        progress=progress)
