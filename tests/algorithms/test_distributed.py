"""Two FSDP2 ranks (torchrun, gloo, CPU) take the step one process takes on the same global batch.

One torchrun launch of tests/algorithms/distributed_worker.py (2 processes, about a minute on 2 cores)
runs every distributed case; this module runs the same functions in one process and compares:

- the PPO update of a fixed batch, MGPO and GRPO (token-mean; GRPO also seq-mean-token-mean), with
  micro-batch accumulation and the KL reference: the same losses and the same updated weights;
- a 2-step MGPO run end to end (rollouts split by groups, validation split by samples, metrics reduced):
  the same rewards and losses, the same weights;
- sharded checkpoints: the 2-rank run cut at step 1 and resumed on 2 ranks ends bit for bit where it
  ended straight; resumed in one process (resharded 2 -> 1) it ends at the same weights to rounding, and
  so does the single process's run cut at step 1 and continued on 2 ranks (1 -> 2);
  ``zoomgym export`` writes a folder that ``AutoModelForImageTextToText.from_pretrained`` and the
  processor load, holding the trained weights.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from zoomgym.algorithms.config import load_config
from zoomgym.algorithms.logging import read_metrics

from tests.algorithms.distributed_worker import CASES, fixed_batch_update, train_config

REPO = Path(__file__).resolve().parents[2]
RTOL, ATOL = 1e-6, 1e-7
"""fp32 sums in another order: weights equal to ~1e-7 (relative 1e-6); losses likewise."""
NORM_RTOL = 3e-5
"""The gradient norm: the gradients agree to 1e-8, but torch's fp32 norm of the whole (1M-entry) embedding
gradient is itself off by ~1e-5 from the fp64 norm (measured: 1.7408719 alone, 1.7408882 over 2 shards,
1.7408968 in fp64)."""


@pytest.fixture(scope="module")
def alone(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The end-to-end run (`train_config`) in this one process, checkpointing every step."""
    from zoomgym.algorithms.run import run

    return run(train_config(tiny_model_dir, tmp_path_factory.mktemp("alone") / "run"))


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir: Path, alone: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The worker's folder and rank 0's results, after one torchrun launch of 2 processes."""
    out = tmp_path_factory.mktemp("two-ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests" / "algorithms" / "distributed_worker.py"), str(tiny_model_dir), str(out),
               str(alone.run_dir)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out, torch.load(out / "results.pt", weights_only=False)


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool = False) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        if exact:
            assert torch.equal(actual[name], tensor), name
        else:
            torch.testing.assert_close(actual[name], tensor, rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize(("count", "world"), [(8, 2), (5, 2), (3, 4), (512, 8)])
def test_each_rank_gets_whole_items_and_the_shares_tile_the_batch(count: int, world: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from zoomgym.algorithms import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: world)
    shares = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(distributed.shard_range(count))
    assert [i for share in shares for i in share] == list(range(count))  # contiguous, in rank order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_rank_trains_the_episodes_of_a_global_mini_batch_that_it_holds() -> None:
    from zoomgym.algorithms.distributed import BatchShard

    shard = BatchShard(offset=3, count=2, total=8)  # this rank holds global episodes 3 and 4
    assert shard.local([7, 4, 0, 3]) == [1, 0]  # in the mini-batch's shuffled order, as local positions
    assert shard.local([0, 1, 2]) == []


def initial_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_update_a_fixed_batch_as_one_process(case: str, two_ranks: tuple[Path, dict[str, Any]],
                                                        tiny_model_dir: Path, tmp_path: Path) -> None:
    _, results = two_ranks
    stats, weights = results[f"update/{case}"]
    alone_stats, alone_weights = fixed_batch_update(tiny_model_dir, tmp_path / "run", case)
    assert_same_weights(weights, alone_weights)
    for key in ("actor/pg_loss", "actor/kl", "actor/loss", "actor/entropy", "actor/clipfrac", "actor/ratio_max"):
        assert stats[key] == pytest.approx(alone_stats[key], rel=RTOL, abs=ATOL), key
    assert stats["actor/grad_norm"] == pytest.approx(alone_stats["actor/grad_norm"], rel=NORM_RTOL)
    if case == "mgpo-shared-prompts":  # alone the update's forwards split; sharded they run whole (GRPO._plan)
        assert alone_stats["perf/computed_ratio"] < 1 and stats["perf/computed_ratio"] == 1
    # the comparison is of a real step: most tensors moved
    initial = initial_weights(tiny_model_dir)
    moved = [k for k in initial if not torch.equal(initial[k], weights[k])]
    assert len(moved) > len(initial) // 2 and alone_stats["actor/grad_norm"] > 0


@pytest.mark.slow
def test_two_ranks_train_as_one_process_and_resume_exactly(two_ranks: tuple[Path, dict[str, Any]], alone: Any,
                                                           tmp_path: Path) -> None:
    from zoomgym.algorithms.checkpoint import is_sharded, list_checkpoints
    from zoomgym.algorithms.run import run

    out, results = two_ranks
    assert_same_weights(results["straight"], {k: v.detach() for k, v in alone.model.state_dict().items()})
    two = [r for r in read_metrics(out / "straight") if "train/reward" in r]
    one = [r for r in read_metrics(alone.run_dir) if "train/reward" in r]
    assert [r["step"] for r in two] == [1, 2]
    for key in ("train/reward", "train/generated_tokens", "train/trained_tokens", "train/valid_box_ratio"):
        assert [r[key] for r in two] == [r[key] for r in one], key
    for key in ("actor/pg_loss", "actor/kl", "actor/entropy", "train/advantage_abs_mean"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=RTOL, abs=ATOL), key
    assert [r["actor/grad_norm"] for r in two] == pytest.approx([r["actor/grad_norm"] for r in one], rel=NORM_RTOL)
    val_two = [r for r in read_metrics(out / "straight") if "val/synthetic/accuracy" in r]
    val_one = [r for r in read_metrics(alone.run_dir) if "val/synthetic/accuracy" in r]
    assert [(r["step"], r["val/synthetic/turns"]) for r in val_two] == [(r["step"], r["val/synthetic/turns"])
                                                                         for r in val_one]
    # only rank 0 wrote the run folder; every checkpoint is sharded
    assert [step for step, _ in list_checkpoints(out / "straight")] == [1, 2]
    assert (out / "straight" / "checkpoints" / "step_000001" / "sharded" / ".metadata").is_file()

    # cut at step 1, resumed on 2 ranks (`zoomgym train --resume`, in the worker): bit for bit
    resumed = out / "halves" / "checkpoints" / "step_000002"
    exported = tmp_path / "exported"
    from zoomgym.algorithms import cli

    assert cli.main(["export", str(resumed), str(exported)]) == 0
    assert_same_weights(initial_weights(exported), results["straight"], exact=True)
    halves = [r for r in read_metrics(out / "halves") if "train/reward" in r]
    assert [r["actor/pg_loss"] for r in halves] == [r["actor/pg_loss"] for r in two]

    # cut at step 1, resumed in one process: DCP reshards 2 -> 1
    single = tmp_path / "single"
    shutil.copytree(out / "straight", single)
    shutil.rmtree(single / "checkpoints" / "step_000002")
    cfg = load_config(single / "config.yaml", [f"logging.run_dir={single}"])
    continued = run(cfg, resume=True)
    assert continued.step == 2
    assert_same_weights({k: v.detach() for k, v in continued.model.state_dict().items()}, results["straight"])

    # the single process's run cut at step 1, continued on 2 ranks (in the worker): 1 -> 2, to rounding
    assert_same_weights(results["widened"], results["straight"])
    assert not is_sharded(alone.run_dir / "checkpoints" / "step_000001")
    assert is_sharded(out / "widened" / "checkpoints" / "step_000002")


@pytest.mark.slow
def test_mixed_precision_and_activation_checkpointing_train(two_ranks: tuple[Path, dict[str, Any]]) -> None:
    """bf16 compute, fp32 reduction and master weights, recomputation per decoder layer and vision block:
    a step runs and learns something (its numbers differ from fp32's: bf16 samples other tokens)."""
    out, results = two_ranks
    (record,) = [r for r in read_metrics(out / "mixed") if "actor/loss" in r]
    assert record["actor/grad_norm"] > 0 and all(v is None or v == v for v in record.values())  # no NaN
    assert results["mixed/master_dtypes"] == ["torch.float32"]


@pytest.mark.slow
def test_export_writes_a_plain_folder_the_processor_loads(two_ranks: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from zoomgym.agents.models import load_processor
    from zoomgym.algorithms import cli

    out, results = two_ranks
    exported = tmp_path / "step_2"
    assert cli.main(["export", str(out / "straight" / "checkpoints" / "step_000002"), str(exported)]) == 0
    assert (exported / "config.json").is_file() and not (exported / "sharded").exists()
    assert_same_weights(initial_weights(exported), results["straight"], exact=True)
    processor = load_processor(exported)
    assert processor.tokenizer("hello")["input_ids"]
    assert cli.main(["export", str(out / "straight" / "checkpoints" / "step_000002"), str(exported)]) == 2  # not empty


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo ran > /dev/null",))


def test_a_sharded_index_is_read_without_running_what_it_holds(tmp_path: Path) -> None:
    """DCP's index is a pickle; zoomgym's reader accepts DCP's metadata classes only (issue 10's rule)."""
    import pickle

    from zoomgym.algorithms.checkpoint import SHARDED_DIR, TRAINER_STATE, read_sharded_index

    (tmp_path / SHARDED_DIR).mkdir()
    (tmp_path / SHARDED_DIR / ".metadata").write_bytes(pickle.dumps(_Boom()))
    (tmp_path / TRAINER_STATE).write_bytes(b"")
    with pytest.raises(ValueError, match="refused global posix.system"):
        read_sharded_index(tmp_path)
    from zoomgym.algorithms import cli

    assert cli.main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
