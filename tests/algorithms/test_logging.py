"""Run outputs: metrics.jsonl is append-only and survives kills; TensorBoard carries the glossary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from zoomgym.algorithms.glossary import GLOSSARY, describe, markdown_table
from zoomgym.algorithms.logging import METRICS_FILE, SAMPLES_FILE, RunLogger, read_metrics


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


def test_tensorboard_scalars_carry_their_glossary_description(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = RunLogger(tmp_path)
    for step in (1, 2):
        logger.log(step, {"train/reward": 0.5, "val/vstar/accuracy": 0.25, "my/own_metric": 1.0})
    logger.log_samples(2, "val/vstar/samples", [{"sample_id": "a", "text": "sample a: q?\nparsed answer: A"}])
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert events.SummaryMetadata("train/reward").summary_description == describe("train/reward")
    accuracy = events.SummaryMetadata("val/vstar/accuracy").summary_description
    assert accuracy == describe("val/vstar/accuracy") and accuracy.startswith("share of episodes whose final answer")
    assert events.SummaryMetadata("my/own_metric").summary_description == ""  # a key the glossary lacks
    assert [e.value for e in events.Scalars("train/reward")] == [0.5, 0.5]
    assert "val/vstar/samples/text_summary" in events.Tags()["tensors"]
    # What TensorBoard's web app reads: the scalars plugin lists the keys, with the descriptions.
    from tensorboard.backend.event_processing import plugin_event_accumulator

    served = plugin_event_accumulator.EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"train/reward", "val/vstar/accuracy", "my/own_metric"} <= set(served.PluginTagToContent("scalars"))
    assert served.SummaryMetadata("train/reward").summary_description == describe("train/reward")
    (record,) = [json.loads(line) for line in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
    assert record == {"step": 2, "tag": "val/vstar/samples", "sample_id": "a", "text": "sample a: q?\nparsed answer: A"}


def test_the_glossary_matches_the_keys_it_defines() -> None:
    assert describe("train/accuracy/attribute").startswith("accuracy over the episodes of one sample category")
    assert describe("val/hrbench4k/accuracy_not_zoomed") == describe("train/accuracy_zoomed")
    assert describe("actor/clipfrac_dual") == describe("actor/clipfrac")
    assert describe("train/reward_typo") is None
    assert markdown_table().count("\n") == len(GLOSSARY) + 2
