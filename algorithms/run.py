"""What ``zoomgym train`` and ``zoomgym eval CONFIG`` do: validate the config, build, train or evaluate.

    algo = run(load_config("configs/quickstart.yaml"))          # = zoomgym train configs/quickstart.yaml
    metrics = evaluate_model(load_config("configs/quickstart.yaml", ["model.path=runs/x/checkpoints/step_000012"]))
"""

from __future__ import annotations

from typing import Any

from zoomgym.algorithms.build import build_agent, env_factory, env_id_of, load_datasets, load_val_sets
from zoomgym.algorithms.checkpoint import CHECKPOINTS_DIR, latest_checkpoint
from zoomgym.algorithms.config import Config, check_run_dir
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

    Returns:
        The trained algorithm (``algo.run_dir``, ``algo.last_validation``, ...).
    """
    from zoomgym import algorithms

    validate_config(cfg)
    check_run_dir(cfg, resume)
    checkpoint = latest_checkpoint(cfg.logging.run_dir or "") if resume else None
    if resume and checkpoint is None:
        print(f"{cfg.logging.run_dir}: no checkpoint in {CHECKPOINTS_DIR}/ yet; starting the run again from step 0")
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
    if resume and checkpoint is None:
        algo.log_from_step = 0
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


def evaluate_model(cfg: Config) -> dict[str, float]:
    """Greedy episodes of ``cfg.model.path`` on every ``cfg.data.val`` set: the trainer's validation protocol.

    The env is ``cfg.env.id`` or the configured algorithm's own, so a base model and its trained
    checkpoint are measured the same way (``zoomgym eval CONFIG model.path=CKPT``).

    Returns:
        ``val/<set>/...`` metrics (`agents.metrics`).
    """
    import torch
    from zoomgym.agents.evaluate import play_greedy
    from zoomgym.agents.metrics import episode_metrics

    validate_config(cfg)
    agent = build_agent(cfg)
    env_fn = env_factory(cfg, env_id_of(cfg), agent)
    metrics: dict[str, float] = {}
    with torch.no_grad():
        for name, samples in load_val_sets(cfg.data.val).items():
            trajectories = play_greedy(agent, samples, env_fn, seed=validation_seed(cfg),
                                       context_budget=cfg.rollout.max_context_tokens,
                                       max_new_tokens=cfg.rollout.max_new_tokens)
            metrics.update(episode_metrics(trajectories, f"val/{name}"))
    return metrics
