"""Run outputs: metrics.jsonl is append-only and survives kills."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from zoomgym.algorithms.logging import METRICS_FILE, RunLogger, read_metrics


def history(run_dir: Path, steps: int, torn: str = "") -> bytes:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"step": s, "train/reward": s / 10}) + "\n" for s in range(steps))
    (run_dir / METRICS_FILE).write_text(lines + torn)
    return lines.encode()


def test_a_resume_appends_and_never_rewrites(tmp_path: Path) -> None:
    """Issue 10: on resume metrics.jsonl was rewritten in place (a kill mid-rewrite left 0 bytes of it),
    and a torn last line made every later --resume fail with JSONDecodeError."""
    kept = history(tmp_path, 6, torn='{"step": 6, "train/rew')
    logger = RunLogger(tmp_path, tensorboard=False, purge_step=4)  # resumed from the step-3 checkpoint
    logger.log(4, {"train/reward": 0.9})
    logger.close()
    data = (tmp_path / METRICS_FILE).read_bytes()
    assert data.startswith(kept)  # every byte of every whole record is still there
    assert [(r["step"], r["train/reward"]) for r in read_metrics(tmp_path)] == [(0, 0.0), (1, 0.1), (2, 0.2),
                                                                                (3, 0.3), (4, 0.9)]
    again = RunLogger(tmp_path, tensorboard=False, purge_step=5)  # and once more: markers compose
    again.log(5, {"train/reward": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path: Path) -> None:
    history(tmp_path, 2, torn='{"step": 2, "train/reward": 0.2}')
    RunLogger(tmp_path, tensorboard=False, purge_step=3).log(3, {"train/reward": 0.3})
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def test_read_metrics_skips_a_torn_last_line_only(tmp_path: Path) -> None:
    history(tmp_path, 3, torn='{"step": 3, "tr')  # what a reader sees while a run is writing, or after a kill
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    (tmp_path / METRICS_FILE).write_text('{"step": 0}\n{"ste\n{"step": 1}\n')
    with pytest.raises(ValueError, match="line 2 is not one"):
        read_metrics(tmp_path)
