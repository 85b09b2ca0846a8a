"""One rank of tests/algorithms/test_distributed.py, started by torchrun (CPU, gloo, no mixed precision)::

    python -m torch.distributed.run --nproc_per_node=2 tests/algorithms/distributed_worker.py MODEL_DIR OUT ALONE

In order: the PPO update of a fixed batch for MGPO and GRPO (`fixed_batch_update`), one step with mixed
precision and activation checkpointing, a 2-step MGPO run checkpointing every step (`train_config`), a
single process's such run (ALONE) cut at step 1 and continued on 2 ranks, then the 2-rank run cut back to its step-1 checkpoint and resumed with ``zoomgym train --resume``. Rank 0 writes ``OUT/results.pt``: the updates' stats and full weights, the
straight run's final weights. The test runs the same functions in one process and compares.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from zoomgym.algorithms import distributed
from zoomgym.algorithms.build import build_agent
from zoomgym.algorithms.config import DistributedConfig

from tests.algorithms.conftest import tiny_run_config
from zoomgym import algorithms

EXACT = ["distributed.mixed_precision=false", "trainer.adam_eps=1.0", "trainer.lr=0.1"]
"""fp32 everywhere: the distributed update must equal the single process's to rounding. With AdamW's
usual eps (1e-8) a first step moves every weight by about lr * sign(gradient), so gradients that are 0 but
for rounding (the key biases': softmax ignores them) move by +-lr on a difference of 1e-9; an eps of 1
makes the first steps SGD-like (lr * gradient), whose rounding differences stay rounding differences."""

UPDATE = [*EXACT, "data.val=[]", "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=2",
          "trainer.micro_batch_size=1", "trainer.grad_clip=0"]
"""4 prompts x 2 rollouts, 2 mini-batches of 4 episodes drawn from the whole batch, micro-batches of one:
the ranks hold different numbers of episodes per mini-batch (zero-weight passes) and accumulate. Without
clipping: the clip factor would carry the fp32 norm's own rounding (~1e-5) into the second mini-batch
(the end-to-end run clips)."""

ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5, -1.0, 1.0, 0.25, -0.75])
"""Fixed advantages of the 8 episodes (the random tiny model's rewards are mostly equal: zero advantages)."""


CASES = {"mgpo": ["algorithm.name=mgpo"], "grpo": ["algorithm.name=grpo"],
         "grpo-seq-mean-token-mean": ["algorithm.name=grpo", "algorithm.loss_agg=seq-mean-token-mean"],
         "mgpo-shared-prompts": ["algorithm.name=mgpo", "trainer.micro_batch_size=4"]}
"""The fixed-batch updates compared: both algorithms (token-mean), a sequence-mean aggregation, and
micro-batches of whole groups: the scoring forwards (old and reference log-probs, on gathered weights) run
each group's prompt once (`agents.shared_prefix`); the sharded update's run whole rows (`GRPO._plan`)."""


def fixed_batch_update(model_dir: Path, run_dir: Path, case: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One `GRPO.update` of a fixed batch: every rank samples the whole batch (the same episodes: full
    weights, the same seeds), keeps its whole groups, scores them (reference log-probs for the KL term) and
    updates. Returns (the update's stats, the full updated weights; on ranks > 0 an empty dict)."""
    cfg = tiny_run_config(model_dir, run_dir, *UPDATE, *CASES[case])
    algo = algorithms.make(cfg.algorithm.name, agent=build_agent(cfg), config=cfg)
    samples = algo.train_samples[: cfg.trainer.prompts_per_step]
    everything = algo.rollout(samples, cfg.rollout.group_size, greedy=False, seed=0)
    mine = distributed.shard_range(len(samples))
    picked = [i for i, t in enumerate(everything) if t.group_id in mine]
    trajectories = [everything[i] for i in picked]
    masks = [algo.loss_mask(t).float() for t in trajectories]
    stats = algo.update(algo.make_batch(trajectories, ADVANTAGES[picked], masks))
    return stats, distributed.full_state_dict(algo.model)


def train_config(model_dir: Path, run_dir: Path, steps: int = 2) -> Any:
    """The end-to-end run: MGPO, 2 steps, validation before and after, a sharded checkpoint every step."""
    return tiny_run_config(model_dir, run_dir, *EXACT, f"trainer.steps={steps}", "trainer.save_every=1",
                           "trainer.keep_checkpoints=0")


def main() -> None:
    from zoomgym.algorithms import cli
    from zoomgym.algorithms.run import run

    model_dir, out, alone = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    distributed.init_from_env(DistributedConfig(mixed_precision=False))
    results: dict[str, Any] = {}
    for case in CASES:
        results[f"update/{case}"] = fixed_batch_update(model_dir, out / f"update-{case}", case)
    # bf16 compute with fp32 reduction and master weights, activations recomputed per layer and vision block
    mixed = run(tiny_run_config(model_dir, out / "mixed", "trainer.steps=1", "data.val=[]",
                                "model.gradient_checkpointing=true", "distributed.mixed_precision=true"))
    results["mixed/master_dtypes"] = sorted({str(p.dtype) for p in mixed.model.parameters()})
    straight = run(train_config(model_dir, out / "straight"))
    results["straight"] = distributed.full_state_dict(straight.model)
    # a single process's run, cut at its step-1 checkpoint, continued on 2 ranks
    widened = out / "widened"
    if distributed.is_main():
        shutil.copytree(alone, widened)
        shutil.rmtree(widened / "checkpoints" / "step_000002")
    distributed.barrier()
    cfg = train_config(model_dir, widened)
    results["widened"] = distributed.full_state_dict(run(cfg, resume=True).model)
    halves = out / "halves"
    if distributed.is_main():
        torch.save(results, out / "results.pt")
        shutil.copytree(straight.run_dir, halves)
        shutil.rmtree(halves / "checkpoints" / "step_000002")
    distributed.barrier()
    sys.exit(cli.main(["train", "--resume", str(halves)]))  # what a user runs; ends the process group


if __name__ == "__main__":
    main()
