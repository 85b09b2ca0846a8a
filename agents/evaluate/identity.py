"""What makes two evaluations the same run: the model, the data and the protocol, each as a fingerprint.

An output folder holds one run (``run.json``). Rerunning the same command in it resumes; a different
model, data or protocol is refused by `check_manifest`, naming what differs, so two runs never mix in one
``episodes.jsonl``.

* Data: `data_fingerprint` hashes, per sample, its id, question, options, answer, category, boxes and meta,
  and its image: the content of an image file (each distinct file once), of a table file holding the
  image cell (each table once) plus the cell's row and column, encoded bytes, a decoded image's pixels, or
  a drawn image's description. Files are hashed as model files are (below): a benchmark table of many
  gigabytes is identified by its size and sampled blocks rather than read whole at every run.
* Model: `model_fingerprint` of a local folder hashes every file's name and size, the whole content of
  files up to `FULL_HASH_BYTES` and, of larger files (the weights), `SAMPLED_BLOCKS` evenly spaced blocks
  of `BLOCK_BYTES`; a hub id is recorded as given. The training state of a checkpoint
  (``trainer_state.pt``) is not part of the model.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from zoomgym.envs.data.sample import ImageRef, RenderedImage

FULL_HASH_BYTES = 64 << 20
SAMPLED_BLOCKS = 16
BLOCK_BYTES = 1 << 20
NOT_MODEL_FILES = ("trainer_state.pt",)
VERSIONED_PACKAGES = ("zoomgym", "torch", "transformers", "vllm", "gymnasium", "pillow", "numpy")


def _file_digest(path: Path) -> str:
    """sha256 of a file's size and content: all of it up to `FULL_HASH_BYTES`, else `SAMPLED_BLOCKS` evenly
    spaced blocks of `BLOCK_BYTES`."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
                digest.update(block)
        else:
            for i in range(SAMPLED_BLOCKS):
                handle.seek((size - BLOCK_BYTES) * i // (SAMPLED_BLOCKS - 1))
                digest.update(handle.read(BLOCK_BYTES))
    return digest.hexdigest()


def data_fingerprint(samples: Sequence[Any]) -> str:
    """sha256 of the samples in order: every field and their images' content (see the module docstring)."""
    files: dict[str, str] = {}

    def file_hash(path: str | Path) -> str:
        key = str(Path(path).resolve())
        if key not in files:
            files[key] = _file_digest(Path(key))
        return files[key]

    digest = hashlib.sha256()
    for sample in samples:
        image = sample.image
        if isinstance(image, ImageRef):
            source: Any = ["cell", file_hash(image.path), image.row, image.column]
        elif isinstance(image, RenderedImage):
            source = ["drawn", repr(image)]
        elif isinstance(image, bytes):
            source = ["bytes", hashlib.sha256(image).hexdigest()]
        elif isinstance(image, (str, Path)):
            source = ["file", file_hash(image)]
        else:  # a decoded PIL image
            source = ["pixels", image.mode, list(image.size), hashlib.sha256(np.asarray(image).tobytes()).hexdigest()]
        fields = [sample.id, sample.question, list(sample.options), sample.answer, sample.category,
                  [list(box.as_tuple()) for box in sample.boxes], dict(sample.meta), source]
        digest.update(json.dumps(fields, sort_keys=True, default=repr).encode())
    return digest.hexdigest()


def model_fingerprint(path_or_id: str) -> dict[str, Any]:
    """``{"path": ..., "sha256": ...}`` of a local model folder, or ``{"hub_id": ...}`` of anything else."""
    path = Path(path_or_id).expanduser()
    if not path.is_dir():
        return {"hub_id": str(path_or_id)}
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in NOT_MODEL_FILES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)):
        digest.update(f"{file.relative_to(path)}\0{_file_digest(file)}\n".encode())
    return {"path": str(path.resolve()), "sha256": digest.hexdigest()}


def versions() -> dict[str, str | None]:
    """Python, the packages that decide the numbers (None when not installed) and the git commit of the
    checkout zoomgym runs from (None outside a git checkout; ``+dirty`` with uncommitted changes)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["git_commit"] = _git_commit(Path(__file__).resolve().parent)
    return out


def _git_commit(folder: Path) -> str | None:
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def differences(stored: Any, current: Any, where: str = "") -> list[str]:
    """Dotted paths where two JSON values differ, each as ``path: stored -> current``."""
    if isinstance(stored, Mapping) and isinstance(current, Mapping):
        out = []
        for key in sorted(set(stored) | set(current), key=str):
            out += differences(stored.get(key), current.get(key), f"{where}.{key}" if where else str(key))
        return out
    return [] if stored == current else [f"{where}: {_short(stored)} -> {_short(current)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


def check_manifest(path: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest to keep in ``path`` (an output folder's ``run.json``) for this run.

    A new folder gets ``manifest``. An existing one must hold the same model and data, and the same
    protocol for every arm both define; arms new to the folder are added (a run may gain its
    counterfactual arms later).

    Raises:
        ValueError: the folder holds another run, or files but no ``run.json``.
    """
    folder = path.parent
    if not path.exists():
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"Expects --out {str(folder)!r} to be a new folder or one of zoomgym eval's, actual: it "
                             f"holds files but no {path.name}")
        return dict(manifest)
    stored = json.loads(path.read_text())
    shared = {arm: stored["protocol"][arm] for arm in manifest["protocol"] if arm in stored["protocol"]}
    diff = differences({"model": stored["model"], "data": stored["data"], "protocol": shared},
                       {"model": manifest["model"], "data": manifest["data"],
                        "protocol": {arm: manifest["protocol"][arm] for arm in shared}})
    if diff:
        raise ValueError(f"Expects --out {str(folder)!r} to hold this run (same model, data and protocol) to resume "
                         f"it, actual: it holds another; stored -> now: " + "; ".join(diff[:8])
                         + (f" (and {len(diff) - 8} more)" if len(diff) > 8 else "") + ". Use another --out")
    return {**stored, "protocol": {**stored["protocol"], **manifest["protocol"]}}
