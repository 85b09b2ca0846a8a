"""Checkpoints: exact resume, pruning, RNG state round trip, atomic layout, no code from a checkpoint."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from zoomgym.algorithms import checkpoint
from zoomgym.algorithms.checkpoint import (
    TRAINER_STATE,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from zoomgym.algorithms.config import load_config
from zoomgym.algorithms.logging import read_metrics
from zoomgym.algorithms.run import run


def test_rng_state_round_trip() -> None:
    state = rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


class _Payload:
    """What an attacker pickles into a trainer_state.pt: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_runs_code_from_a_trainer_state(tmp_path: Path) -> None:
    """Issue 10: `--resume` unpickled trainer_state.pt with weights_only=False and ran the payload."""
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "rng": _Payload(marker)}, tmp_path / TRAINER_STATE)
    with pytest.raises(ValueError, match=r"trainer_state\.pt' to hold only tensors and plain values.*posix\.system"):
        load_trainer_state(tmp_path)
    assert not marker.exists()


class _Module(torch.nn.Linear):
    """A model with ``save_pretrained``: 1000 float32 weights (4000 bytes) and a bias of 1."""

    def __init__(self) -> None:
        super().__init__(1000, 1)

    def save_pretrained(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(Path(folder) / "model.safetensors"))


def _save(run_dir: Path, step: int, keep: int = 0) -> Path:
    model = _Module()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1000)).sum().backward()
    optimizer.step()
    processor = SimpleNamespace(save_pretrained=lambda folder: (Path(folder) / "processor_config.json").write_text("{}"))
    return save_checkpoint(run_dir, step, model=model, processor=processor, keep=keep,
                           trainer_state={"optimizer": optimizer.state_dict(), "rng": rng_state(), "prompts_drawn": 4})


def test_a_trainer_state_holds_only_tensors_and_plain_values(tmp_path: Path) -> None:
    """What a trainer saves loads back under torch's weights-only allow-list and restores every RNG."""
    folder = _save(tmp_path, 3)
    expected = (random.random(), float(np.random.rand()), float(np.random.randn()), float(torch.rand(1)))
    state = load_trainer_state(folder)  # weights_only=True: torch's allow-list, nothing added
    set_rng_state(state["rng"])  # the draws after the save come again
    assert (random.random(), float(np.random.rand()), float(np.random.randn()), float(torch.rand(1))) == expected
    assert state["step"] == 3 and state["prompts_drawn"] == 4 and "exp_avg" in state["optimizer"]["state"][0]


def test_a_save_keeps_transformers_bars_out_of_the_runs_own(
    tiny_model_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Issue 10: each checkpoint printed transformers' 'Writing model shards' bar through the step bar."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as transformers_logging

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = SimpleNamespace(save_pretrained=lambda folder: (Path(folder) / "processor_config.json").write_text("{}"))
    transformers_logging.enable_progress_bar()
    capfd.readouterr()
    save_checkpoint(tmp_path, 1, model=model, processor=processor, trainer_state={"rng": rng_state()})
    assert "Writing model shards" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()  # a library caller's setting is left as it was


def test_a_kill_while_pruning_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10: a kill inside shutil.rmtree left a half-deleted step_* folder that was never removed."""
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    real_rmtree = shutil.rmtree

    def killed(path: Path, *args: Any, **kwargs: Any) -> None:
        (Path(path) / TRAINER_STATE).unlink()  # part of the folder is gone ...
        raise KeyboardInterrupt  # ... when the kill arrives

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3, keep=2)  # prunes step 1
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 3]
    _save(tmp_path, 4, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004"]


def test_a_full_disk_is_an_error_naming_the_folder_and_the_space_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10: a full disk gave torch's raw RuntimeError; now the folder and the size are named."""
    first = _save(tmp_path, 1)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(OSError, match=r"Expects 0\.0 MiB free to write checkpoint '.*step_000002', actual: 0\.0 MiB"):
        _save(tmp_path, 2)
    monkeypatch.undo()

    def full(*args: Any, **kwargs: Any) -> None:  # what torch raises when the disk fills up mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError, match=r"write checkpoint '.*step_000002' \(about 0\.0 MiB\).*PytorchStreamWriter"):
        _save(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]  # no partial folder
    assert load_trainer_state(first)["step"] == 1


def test_checkpoint_bytes_count_weights_and_optimizer_state() -> None:
    model = _Module()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1000)).sum().backward()
    optimizer.step()
    # weights 1001 floats; AdamW's two moments per weight, plus one step counter per tensor
    assert checkpoint.checkpoint_bytes(model, {"optimizer": optimizer.state_dict()}) == 4 * 1001 * 3 + 2 * 4


def test_missing_trainer_state_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=TRAINER_STATE):
        load_trainer_state(tmp_path)
    assert latest_checkpoint(tmp_path) is None


def test_resume_continues_exactly(mgpo_run: tuple[Any, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """N steps straight == N/2 steps, then --resume, then the rest: identical weights, bit for bit.

    The shared MGPO run went 1 -> 2 -> 3 in one process, checkpointing each step; a copy of its folder
    cut back to the step-1 checkpoint is resumed in a fresh agent and algorithm and must land on the
    same step-3 weights, optimizer state and per-step numbers.
    """
    straight, _ = mgpo_run
    assert [step for step, _ in list_checkpoints(straight.run_dir)] == [1, 2, 3]
    halves_dir = tmp_path / "halves"
    shutil.copytree(straight.run_dir, halves_dir)
    for step in (2, 3):
        shutil.rmtree(halves_dir / "checkpoints" / f"step_{step:06d}")
    assert latest_checkpoint(halves_dir).name == "step_000001"
    logged = (halves_dir / "metrics.jsonl").read_bytes()
    with (halves_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "train/rew')  # the interrupted run was killed mid-line (issue 10: JSONDecodeError)
    # what `zoomgym train --resume RUN_DIR` does: the run's own config (validation and images off: they
    # draw no training randomness), the run's own folder
    cfg = load_config(halves_dir / "config.yaml", [f"logging.run_dir={halves_dir}", "trainer.val_every=0",
                                                   "logging.render_every=0", "data.val=[]", "trainer.keep_checkpoints=1"])
    resumed = run(cfg, resume=True)

    assert resumed.step == 3 and resumed.run_dir == halves_dir
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), f"{name} differs after resume"
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"]) for k in opt_a)
    # the log continues without duplicates, and the resumed steps saw the same rollouts and losses
    train_a = [r for r in read_metrics(straight.run_dir) if "train/reward" in r]
    train_b = [r for r in read_metrics(halves_dir) if "train/reward" in r]
    assert [r["step"] for r in train_b] == [1, 2, 3]
    assert (halves_dir / "metrics.jsonl").read_bytes().startswith(logged)  # appended to, never rewritten
    for key in ("train/reward", "actor/pg_loss", "actor/kl", "actor/entropy", "train/generated_tokens"):
        assert [r[key] for r in train_a] == [r[key] for r in train_b], key
    assert [step for step, _ in list_checkpoints(halves_dir)] == [3]  # keep_checkpoints=1 pruned step 1
