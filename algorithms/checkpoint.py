"""Checkpoints: a ``from_pretrained`` folder plus everything needed to resume exactly.

Layout of ``RUN_DIR/checkpoints/step_000042/``::

    config.json, model.safetensors, ...     model.save_pretrained (with LoRA: the adapter, peft format)
    processor_config.json, tokenizer*, ...  agents.models.save_processor: every processor file the
                                            source model had (video processor config included)
    trainer_state.pt                        step, optimizer, scheduler, RNG states, extra counters

``AutoModelForImageTextToText.from_pretrained(ckpt)`` loads the model like any hub model, and
``agents.models.load_processor(ckpt)`` the processor; ``AutoProcessor.from_pretrained(ckpt)``, ``vllm serve``
and lmms-eval load the processor as they load the source model's (with a video processor config from the
source, where torchvision is installed). With LoRA the folder is a peft adapter over the base model. A checkpoint is written to a temporary folder and renamed into place, so an interrupted save
never leaves a half checkpoint that ``--resume`` would pick up.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    """The global RNG states: python, numpy, torch CPU and (when present) every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """``RUN_DIR/checkpoints/step_{step:06d}``."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, folder)``, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = _STEP_DIR.match(folder.name)
        if match and (folder / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: Any,
    processor: Any,
    trainer_state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Save model, processor and trainer state as ``RUN_DIR/checkpoints/step_{step:06d}``.

    Args:
        run_dir: the run's folder.
        step: RL steps completed.
        model: a transformers (or peft) model; saved with ``save_pretrained`` (safetensors).
        processor: its processor; saved with `agents.models.save_processor` (keeps the source's files).
        trainer_state: optimizer/scheduler state dicts, RNG states, counters (``torch.save``-able).
        keep: keep only the newest ``keep`` checkpoints afterwards (0 keeps all).

    Returns:
        The checkpoint folder.
    """
    from zoomgym.agents.models import save_processor  # imports transformers: not at module import

    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    save_processor(processor, tmp)
    torch.save({"step": step, **trainer_state}, tmp / TRAINER_STATE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.pt`` of a checkpoint (it holds python/numpy RNG objects: trusted files only)."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise ValueError(f"Expects a checkpoint folder holding {TRAINER_STATE}, actual: {str(checkpoint)!r} has none")
    return torch.load(path, map_location="cpu", weights_only=False)
