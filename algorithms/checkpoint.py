"""Checkpoints: a ``from_pretrained`` folder plus everything needed to resume exactly.

Layout of ``RUN_DIR/checkpoints/step_000042/``::

    config.json, model.safetensors, ...     model.save_pretrained (with LoRA: the adapter, peft format)
    processor_config.json, tokenizer*, ...  agents.models.save_processor: every processor file the
                                            source model had (video processor config included)
    trainer_state.pt                        step, optimizer, scheduler, RNG states, extra counters

``AutoModelForImageTextToText.from_pretrained(ckpt)`` loads the model like any hub model, and
``agents.models.load_processor(ckpt)`` the processor; ``AutoProcessor.from_pretrained(ckpt)``, ``vllm serve``
and lmms-eval load the processor as they load the source model's (with a video processor config from the
source, where torchvision is installed). With LoRA the folder is a peft adapter over the base model.

A run under torchrun writes a **sharded** checkpoint instead (`save_sharded_checkpoint`): the same folder
names, but the weights and the optimizer state are one ``torch.distributed.checkpoint`` folder,
``sharded/`` (each rank writes its shards; resumable on any number of ranks, DCP reshards), next to the
model's ``config.json``, the processor and ``trainer_state.pt``; ``zoomgym export CKPT OUT``
(`export_checkpoint`) writes the plain ``from_pretrained`` folder from it. DCP's index,
``sharded/.metadata``, is a pickle: zoomgym reads it with an allow-list of DCP's own metadata classes,
torch sizes, dtypes and layouts and paths (`read_sharded_index`), so it runs nothing either.

Nothing in a checkpoint is executed: ``trainer_state.pt`` is read with ``torch.load(weights_only=True)``
and torch's own allow-list, no more (tensors, numbers, strings, bools, None, lists, tuples, dicts), so
every RNG state is stored as tensors and plain values; weights are safetensors, and the model folder's
``config.json`` never names remote code that zoomgym would run.

Nothing done is lost to a kill or a full disk: a checkpoint is written to ``step_N.tmp`` and renamed
into place, so ``--resume`` never picks up half a checkpoint; an old one is pruned by renaming it to
``step_N.deleting`` first, so a kill while deleting leaves no half checkpoint either; the next save
removes any ``.tmp`` or ``.deleting`` folder a kill left behind. A save first checks that the disk has
room for the checkpoint (`checkpoint_bytes`) and reports a failed write naming the folder and its size.
"""

from __future__ import annotations

import contextlib
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
SHARDED_DIR = "sharded"
"""The ``torch.distributed.checkpoint`` folder of a checkpoint written under torchrun."""
_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^step_\d+\.(tmp|deleting)$")
"""Folders a killed save (``.tmp``) or prune (``.deleting``) left behind."""


def rng_state() -> dict[str, Any]:
    """The global RNG states: python, numpy, torch CPU and (when present) every CUDA device.

    Tensors and plain values only, so that `load_trainer_state` reads them without unpickling objects.
    """
    numpy = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bit_generator": numpy["bit_generator"],
            "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
            "pos": int(numpy["state"]["pos"]),
            "has_gauss": int(numpy["has_gauss"]),
            "gauss": float(numpy["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss"]))
    np.random.set_state({
        "bit_generator": numpy["bit_generator"],
        "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
        "has_gauss": numpy["has_gauss"],
        "gauss": numpy["gauss"],
    })
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


def checkpoint_bytes(model: Any, trainer_state: dict[str, Any]) -> int:
    """About the bytes a checkpoint takes: the saved weights (with LoRA, the adapters) and the tensors of
    the trainer state (the optimizer's moments are twice the trained weights); the processor's files are
    a few MB at most and not counted."""
    if getattr(model, "peft_config", None) is not None:
        weights = [p for p in model.parameters() if p.requires_grad]  # a peft folder holds the adapters only
    else:
        weights = list(model.state_dict().values())
    return _tensor_bytes(weights) + _tensor_bytes(trainer_state)


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _remove_leftovers(root: Path) -> None:
    """Delete the ``.tmp`` and ``.deleting`` folders a killed save or prune left in ``root``."""
    for folder in root.iterdir():
        if _LEFTOVER.match(folder.name):
            shutil.rmtree(folder, ignore_errors=True)


def _delete(folder: Path) -> None:
    """Remove a checkpoint: renamed away first (atomic), so a kill never leaves half of one under its name."""
    doomed = folder.with_name(folder.name + ".deleting")
    folder.rename(doomed)
    shutil.rmtree(doomed)


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


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
        trainer_state: optimizer/scheduler state dicts, RNG states, counters: tensors and plain values
            only (`load_trainer_state` refuses anything else).
        keep: keep only the newest ``keep`` checkpoints afterwards (0 keeps all).

    Returns:
        The checkpoint folder.

    Raises:
        OSError: the disk lacks room for the checkpoint, or writing it failed (naming the folder and the
            space it needs); the partial folder is removed and earlier checkpoints are untouched.
    """
    from safetensors import SafetensorError
    from zoomgym.agents.models import save_processor  # imports transformers: not at module import

    final = checkpoint_dir(run_dir, step)
    needed = checkpoint_bytes(model, trainer_state)
    tmp = _prepare(final, needed)
    try:
        tmp.mkdir()
        with _without_transformers_bars():
            model.save_pretrained(tmp)
        save_processor(processor, tmp)
        torch.save({"step": step, **trainer_state}, tmp / TRAINER_STATE)
    except (OSError, RuntimeError, SafetensorError) as error:  # torch and safetensors report a full disk their way
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(final.parent).free
        raise OSError(
            f"Expects to write checkpoint {str(final)!r} (about {_size(needed)}), actual: the write failed with "
            f"{_size(free)} free on its disk: {error}"
        ) from error
    _publish(tmp, final, keep)
    return final


def _prepare(final: Path, needed: int) -> Path:
    """The ``.tmp`` folder a checkpoint is written to (not created yet), after clearing a killed save's
    leftovers and checking that the disk has room for ``needed`` bytes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final.parent)
    free = shutil.disk_usage(final.parent).free
    if free < needed:
        raise OSError(
            f"Expects {_size(needed)} free to write checkpoint {str(final)!r}, actual: {_size(free)} free on its disk "
            "(free some space, or set trainer.keep_checkpoints to keep fewer checkpoints)"
        )
    return final.with_name(final.name + ".tmp")


def _publish(tmp: Path, final: Path, keep: int) -> None:
    """Rename a written checkpoint into place, then keep only the newest ``keep`` (0 keeps all)."""
    if final.exists():
        _delete(final)
    tmp.rename(final)
    if keep > 0:
        for _, old in list_checkpoints(final.parent.parent)[:-keep]:
            _delete(old)


def is_sharded(checkpoint: str | Path) -> bool:
    """Whether a checkpoint was written by a run under torchrun (`save_sharded_checkpoint`)."""
    return (Path(checkpoint) / SHARDED_DIR).is_dir()


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    processor: Any,
    trainer_state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Every rank of a distributed run calls it: the sharded model and optimizer state with
    ``torch.distributed.checkpoint`` (each rank writes its own shards into ``sharded/``), and from rank 0
    the model's ``config.json``, the processor and ``trainer_state.pt`` (without the optimizer).

    `load_sharded_state` reads it back on any number of ranks (DCP reshards), a single process included;
    ``zoomgym export`` turns it into a plain ``from_pretrained`` folder (`export_checkpoint`).

    Returns:
        The checkpoint folder (the same layout of names as `save_checkpoint`'s).
    """
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from zoomgym.agents.models import save_processor
    from zoomgym.algorithms import distributed

    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if distributed.is_main():
        needed = _tensor_bytes(model_state) + _tensor_bytes(optimizer_state)  # global sizes: DTensors count whole
        _prepare(final, needed).mkdir()
    distributed.barrier()
    save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / SHARDED_DIR)
    if distributed.is_main():
        model.config.save_pretrained(tmp)
        save_processor(processor, tmp)
        torch.save({"step": step, "world_size": distributed.world_size(), **trainer_state}, tmp / TRAINER_STATE)
        _publish(tmp, final, keep)
    distributed.barrier()
    return final


def load_sharded_state(checkpoint: str | Path, model: Any, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a `save_sharded_checkpoint`'s weights (and optimizer state) into ``model`` in place, on however
    many ranks this run has (sharded or not: DCP reshards)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    reader = _safe_reader(Path(checkpoint) / SHARDED_DIR)
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        load(state, storage_reader=reader)
        set_model_state_dict(model, state["model"])
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)  # materialises an empty optimizer's state
    state = {"model": model_state, "optimizer": optimizer_state}
    load(state, storage_reader=reader)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles DCP's index and nothing else: its own metadata classes (dataclasses and enums), torch sizes,
    dtypes and layouts, and paths. Anything else (a function to call, another class) is refused."""

    _CLASS_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name) if module in (*self._CLASS_MODULES, "torch", "pathlib") else None
        allowed = (
            (module in self._CLASS_MODULES and isinstance(found, type))
            or (module == "torch" and (found is torch.Size or isinstance(found, torch.dtype)))
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return found if found is not None else super().find_class(module, name)


def read_sharded_index(checkpoint: str | Path) -> Any:
    """DCP's index (``Metadata``) of a sharded checkpoint, read with `_IndexUnpickler`.

    Raises:
        ValueError: the index holds something other than DCP's metadata (refused, never run).
    """
    path = Path(checkpoint) / SHARDED_DIR / ".metadata"
    try:
        with path.open("rb") as f:
            return _IndexUnpickler(f).load()
    except pickle.UnpicklingError as error:
        raise ValueError(f"Expects {str(path)!r} to hold only DCP's checkpoint metadata (zoomgym never runs code "
                         f"from a checkpoint), actual: {error}") from None


def _safe_reader(folder: Path) -> Any:
    """torch's DCP file reader of ``folder``, its index read by `read_sharded_index` (torch's own reader
    unpickles it with no restriction)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_sharded_index(folder.parent)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(folder)


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """``zoomgym export``: a plain ``from_pretrained`` folder (model and the full processor) from a checkpoint
    of a run, sharded (`save_sharded_checkpoint`) or not, read in this one process.

    Raises:
        ValueError: ``checkpoint`` is no checkpoint folder, ``out`` holds files already, or the sharded
            checkpoint holds LoRA adapters (not exported yet).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText
    from zoomgym.agents.models import load_processor, save_processor

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / TRAINER_STATE).is_file():
        raise ValueError(f"Expects a checkpoint folder holding {TRAINER_STATE} (RUN_DIR/checkpoints/step_N), "
                         f"actual: {str(checkpoint)!r} has none")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"Expects OUT to be a new or empty folder, actual: {str(out)!r} holds files")
    if is_sharded(checkpoint):
        names = read_sharded_index(checkpoint).state_dict_metadata
        if any("lora_" in name for name in names):
            raise ValueError(f"Expects a sharded checkpoint without LoRA adapters, actual: {str(checkpoint)!r} "
                             "holds adapters (exporting them is not supported yet)")
        config = AutoConfig.from_pretrained(checkpoint)
        model = AutoModelForImageTextToText.from_config(config, dtype=config.dtype)
        load_sharded_state(checkpoint, model)
    else:
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype="auto")
    out.mkdir(parents=True, exist_ok=True)
    with _without_transformers_bars():
        model.save_pretrained(out)
    save_processor(load_processor(checkpoint), out)
    return out


@contextlib.contextmanager
def _without_transformers_bars() -> Iterator[None]:
    """transformers' bar for writing shards would cut through the run's step bar (then restored as it was)."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.pt`` of a checkpoint, read without executing anything it holds.

    Raises:
        ValueError: the folder has no trainer state, or it holds something other than tensors and plain
            values (a pickled object: refused, never run).
    """
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise ValueError(f"Expects a checkpoint folder holding {TRAINER_STATE}, actual: {str(checkpoint)!r} has none")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()
        refused = next((line.strip() for line in reason if "GLOBAL" in line), reason[0] if reason else "")
        raise ValueError(
            f"Expects {str(path)!r} to hold only tensors and plain values (zoomgym never runs code from a "
            f"checkpoint; one written before zoomgym stored RNG states as tensors cannot be resumed, its "
            f"weights still load with from_pretrained), actual: {refused}"
        ) from None
