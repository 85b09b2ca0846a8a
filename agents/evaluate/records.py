"""Scored episodes as JSON lines: the `EpisodeRecord` and the append-only `EpisodeLog` (``episodes.jsonl``).

A record is what the metrics read of an episode (`agents.metrics.Episode`), its action texts and where it
belongs (arm, sample, draw); images and token ids are left out (an episode is replayed from its actions
when a report draws it). Infos keep their JSON-able values: numbers, strings, booleans and boxes (as
``[x1, y1, x2, y2]``); the `Sample` is attached again when a record is read, from the run's own data.

The log is written as episodes are scored: each batch's lines are appended, flushed and synced before
the next batch starts, so a killed run loses at most the batch in flight. A last line without its newline
(the kill came mid-write) is not a scored episode: `EpisodeLog.open` drops it before appending.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoomgym.envs.geometry import Box

BOX_KEYS = ("box_shown", "box_original")
"""Info keys whose value is a `Box` (stored as a list)."""


@dataclass
class EpisodeRecord:
    """One scored episode of an evaluation.

    Attributes:
        arm: the evaluation arm it was played in (``"eval"``, ``"direct"``, ``"oracle_crop"``).
        sample_id: the sample's id.
        index: the sample's position in its dataset (it seeds the episode with ``draw``).
        draw: which of the K draws of this sample (0 under greedy decoding).
        category: the sample's category.
        actions: the model's text of every turn.
        infos: the env's infos (reset, then one per step), JSON-able values only (plus ``"sample"``
            once attached).
        reward, num_turns, terminated, truncated, context_truncated: as in `agents.trajectory.Trajectory`.
        length: tokens of the whole sequence (0 for an agent without token ids).
        response_length: tokens the model generated.
        finish_reasons: per turn, why generation stopped (``"eos"``, ``"stop"``, ``"length"``).
    """

    arm: str
    sample_id: str
    index: int
    draw: int
    category: str
    actions: list[str]
    infos: list[dict[str, Any]]
    reward: float
    num_turns: int
    terminated: bool
    truncated: bool
    context_truncated: bool
    length: int = 0
    response_length: int = 0
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, int]:
        """``(arm, sample_id, draw)``: unique in a run."""
        return (self.arm, self.sample_id, self.draw)

    @property
    def correct(self) -> bool:
        return bool(self.infos[-1].get("correct")) if self.infos else False

    @classmethod
    def of(cls, trajectory: Any, arm: str, index: int, draw: int) -> EpisodeRecord:
        """The record of a `Trajectory` (infos reduced to their JSON-able values)."""
        return cls(
            arm=arm, sample_id=trajectory.sample_id, index=int(index), draw=int(draw), category=trajectory.category,
            actions=list(trajectory.actions), infos=[_plain_info(info) for info in trajectory.infos],
            reward=float(trajectory.reward), num_turns=int(trajectory.num_turns),
            terminated=bool(trajectory.terminated), truncated=bool(trajectory.truncated),
            context_truncated=bool(trajectory.context_truncated), length=int(trajectory.length),
            response_length=int(trajectory.response_length), finish_reasons=list(trajectory.finish_reasons),
        )

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object (boxes as lists, no sample)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["infos"] = [_plain_info(info) for info in self.infos]
        return out

    @classmethod
    def from_json(cls, record: Mapping[str, Any], sample: Any = None) -> EpisodeRecord:
        """A record read back; ``sample`` (the run's `Sample` of ``record["sample_id"]``) goes into every info."""
        values = dict(record)
        infos = []
        for info in values.pop("infos"):
            info = {key: Box(*value) if key in BOX_KEYS and value is not None else value for key, value in info.items()}
            if sample is not None:
                info["sample"] = sample
            infos.append(info)
        return cls(infos=infos, **values)


def _plain_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-able part of an env info: scalars, lists of them and boxes (the `Sample` and any other
    object are left out)."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, Box):
            out[key] = list(value.as_tuple())
        elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy scalar
            out[key] = value.item()
        elif _is_scalar(value) or (isinstance(value, (list, tuple)) and all(_is_scalar(v) for v in value)):
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


class EpisodeLog:
    """``episodes.jsonl``: one `EpisodeRecord` per line, appended as episodes are scored.

    >>> log = EpisodeLog(path)                         # doctest: +SKIP
    >>> done = log.open()                              # the records already there (a torn last line dropped)
    >>> log.append([record, ...])                      # written, flushed and synced
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """Every complete line as a JSON object; a torn last line (no newline) is skipped, any other
        line that is not a JSON object raises ValueError naming the file and line."""
        return self._scan()[0]

    def open(self) -> list[dict[str, Any]]:
        """`read`, after cutting a torn last line off the file, so appends start on a fresh line."""
        records, good_bytes = self._scan()
        if self.path.exists() and self.path.stat().st_size != good_bytes:
            with self.path.open("r+b") as handle:
                handle.truncate(good_bytes)
        return records

    def append(self, records: Iterable[EpisodeRecord]) -> None:
        lines = "".join(json.dumps(record.to_json(), allow_nan=False) + "\n" for record in records)
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def _scan(self) -> tuple[list[dict[str, Any]], int]:
        """(complete records, bytes they span from the start of the file)."""
        if not self.path.exists():
            return [], 0
        data = self.path.read_bytes()
        records, offset = [], 0
        lines = data.split(b"\n")
        for number, raw in enumerate(lines[:-1], start=1):  # the part after the last newline is torn (or empty)
            offset += len(raw) + 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{str(self.path)!r} line {number}: expects one JSON record of an episode, actual: "
                                 f"{error}. Move the file away to start the run afresh") from None
            if not isinstance(record, dict) or not {"arm", "sample_id", "draw", "infos"} <= set(record):
                raise ValueError(f"{str(self.path)!r} line {number}: expects an episode record with arm, sample_id, "
                                 f"draw and infos, actual: {raw[:80]!r}")
            records.append(record)
        return records, offset


def records_by_arm(records: Sequence[EpisodeRecord], arms: Sequence[str]) -> dict[str, list[EpisodeRecord]]:
    """The records of each arm in ``arms``, sorted by sample position and draw."""
    out: dict[str, list[EpisodeRecord]] = {arm: [] for arm in arms}
    for record in records:
        if record.arm in out:
            out[record.arm].append(record)
    return {arm: sorted(group, key=lambda r: (r.index, r.draw)) for arm, group in out.items()}
