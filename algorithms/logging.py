"""Run outputs: ``metrics.jsonl`` (always), TensorBoard events (scalars, rendered trajectories, episode
texts) and ``samples.jsonl`` (validation episodes in words).

One call per step, ``logger.log(step, metrics)``, writes the same numbers to both, so a plot in
TensorBoard and a line in ``metrics.jsonl`` never disagree. Keys are namespaced (``train/reward``,
``val/vstar/accuracy``, ``actor/clipfrac``, ``time/generation_s``); `algorithms.glossary` defines each
one, and TensorBoard shows that definition as the scalar's description.

``metrics.jsonl`` is append-only: nothing a run logged is ever rewritten. A resumed run appends a marker
line ``{"purge_step": N}`` (TensorBoard's word, and its ``purge_step``): the records above it with
``step >= N`` were logged by the interrupted run after its last checkpoint, and the records below it
supersede them; `read_metrics` applies that. A line cut off by a kill is dropped when the run resumes,
and skipped by `read_metrics`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from zoomgym.algorithms.glossary import describe

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"
PURGE_KEY = "purge_step"


class RunLogger:
    """Writes scalars to ``RUN_DIR/metrics.jsonl`` and ``RUN_DIR/tensorboard/``.

    Args:
        run_dir: the run's folder (created if missing).
        tensorboard: also write TensorBoard events.
        purge_step: when this process continues an interrupted run, the first step it logs: what the
            interrupted run logged at or after it is superseded (the marker line in ``metrics.jsonl``,
            TensorBoard's ``purge_step``), so the resumed curves continue without duplicates.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        if purge_step is not None and self.metrics_path.exists():
            _end_with_a_whole_line(self.metrics_path)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps({PURGE_KEY: purge_step}) + "\n")
        self._described: set[str] = set()
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step)

    @property
    def tensorboard_dir(self) -> Path:
        """Where the events go: ``tensorboard --logdir <this>``."""
        return self.run_dir / TENSORBOARD_DIR

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one ``{"step": step, key: value, ...}`` line and write each value as a scalar.

        Values are converted with ``float()`` (0-d tensors included); NaN is written as null in JSON. A
        key's first scalar carries its glossary definition as TensorBoard's description.
        """
        values = {key: float(value) for key, value in metrics.items()}
        record = {"step": step, **{k: (None if math.isnan(v) else v) for k, v in values.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            from torch.utils.tensorboard.summary import scalar

            for key, value in values.items():
                summary = scalar(key, value)
                if key not in self._described:
                    self._described.add(key)
                    summary.value[0].metadata.summary_description = describe(key) or ""
                self._writer._get_file_writer().add_summary(summary, step)  # add_scalar, with a description
            self._writer.flush()

    def log_images(self, step: int, tag: str, images: Sequence[np.ndarray]) -> None:
        """Write RGB ``(H, W, 3)`` uint8 arrays (e.g. ``env.render()``) as ``tag/0``, ``tag/1``, ..."""
        if self._writer is None:
            return
        for i, image in enumerate(images):
            self._writer.add_image(f"{tag}/{i}", np.asarray(image), global_step=step, dataformats="HWC")
        self._writer.flush()

    def log_samples(self, step: int, tag: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Append each record (with ``"step"`` and ``"tag"``) to ``RUN_DIR/samples.jsonl`` and its
        ``"text"`` to TensorBoard's text plugin under ``tag``: the same words in both."""
        with (self.run_dir / SAMPLES_FILE).open("a") as f:
            for record in records:
                f.write(json.dumps({"step": step, "tag": tag, **record}) + "\n")
        if self._writer is not None and records:
            # Preformatted: TensorBoard renders text as Markdown, and model output is no Markdown.
            text = "\n\n".join("\n".join("    " + line for line in r["text"].splitlines()) for r in records)
            self._writer.add_text(tag, text, global_step=step)
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _end_with_a_whole_line(path: Path) -> None:
    """Drop a last line a kill cut off (keep it, ended, if it is a whole record): appends stay whole lines."""
    with path.open("rb+") as f:
        end = f.seek(0, os.SEEK_END)
        start = end
        while start > 0:  # back to the last newline, a block at a time (the file may be hundreds of MB)
            block = max(0, start - (1 << 16))
            f.seek(block)
            newline = f.read(start - block).rfind(b"\n")
            if newline >= 0:
                start = block + newline + 1
                break
            start = block
        if start == end:
            return
        f.seek(start)
        if _record(f.read()) is not None:
            f.write(b"\n")
        else:
            f.truncate(start)


def _record(line: bytes | str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl`` in order, as the run stands: a resume's marker drops the
    interrupted run's records it supersedes (see the module docstring); a cut-off last line is skipped."""
    lines = (Path(run_dir) / METRICS_FILE).read_bytes().split(b"\n")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None:
            if number == len(lines):
                break  # the line a kill (or a run still writing) cut off
            raise ValueError(f"Expects a JSON record on every line of {METRICS_FILE}, actual: line {number} is not one")
        if PURGE_KEY in record:
            records = [r for r in records if r["step"] < record[PURGE_KEY]]
        else:
            records.append(record)
    return records
