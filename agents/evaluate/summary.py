"""An evaluation's numbers (all from `agents.metrics`) and the tables that show them.

`score` turns every arm's records into one flat ``{key: value}``: each arm's `episode_metrics` under its
name (``eval/accuracy``, ``direct/accuracy``, ``oracle_crop/accuracy``) with ``<arm>/episodes``, each
arm's `repeat_metrics` when a sample is drawn K > 1 times, and `counterfactual_metrics` under
``counterfactual/`` when both ``direct`` and ``eval`` ran. `tables` lays them out for ``results.md`` and
the HTML report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zoomgym.agents.evaluate.records import EpisodeRecord
from zoomgym.agents.evaluate.runner import DIRECT_ARM, MAIN_ARM, ORACLE_ARM
from zoomgym.agents.metrics import UNCATEGORISED, counterfactual_metrics, episode_metrics, repeat_metrics

COUNTERFACTUAL = "counterfactual"
"""Prefix of the paired without-zoom / with-zoom numbers."""

SUMMARY_COLUMNS = (
    ("episodes", "episodes"), ("accuracy", "accuracy"), ("valid_box_ratio", "valid box"),
    ("fallback_ratio", "fallback"), ("target_hit_ratio", "target hit"), ("iou", "IoU"),
    ("crop_useful_ratio", "useful crop"),
    ("zoom_rate", "zoomed"), ("accuracy_zoomed", "acc. zoomed"), ("accuracy_not_zoomed", "acc. not zoomed"),
    ("turns", "turns"), ("visual_tokens", "visual tokens"), ("generated_tokens", "generated tokens"),
    ("truncated_ratio", "truncated"),
)
COUNTERFACTUAL_COLUMNS = (
    ("pairs", "pairs"), ("tool_gain", "tool gain"), ("tool_harm", "tool harm"), ("net_gain", "net gain"),
    ("both_right", "both right"), ("both_wrong", "both wrong"), ("oracle_crop_headroom", "oracle-crop headroom"),
)


def score(records: Mapping[str, Sequence[EpisodeRecord]], draws: int = 1) -> dict[str, float]:
    """Every number of an evaluation, from its records per arm (see the module docstring)."""
    metrics: dict[str, float] = {}
    for arm, episodes in records.items():
        if episodes:
            metrics[f"{arm}/episodes"] = float(len(episodes))
            metrics.update(episode_metrics(episodes, arm))
            if draws > 1:
                metrics.update(repeat_metrics(episodes, arm))
    if records.get(DIRECT_ARM) and records.get(MAIN_ARM):
        metrics.update(counterfactual_metrics(records[DIRECT_ARM], records[MAIN_ARM], COUNTERFACTUAL,
                                              oracle=records.get(ORACLE_ARM, ())))
    return metrics


@dataclass(frozen=True)
class Table:
    """A titled table of formatted cells (the first column names the row)."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines += ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def cell(key: str, value: float | None) -> str:
    """A value as shown: counts as integers, token counts and turns with one decimal, the rest with three."""
    if value is None:
        return "-"
    if key.endswith(("episodes", "pairs")):
        return str(int(value))
    if key.endswith(("tokens", "turns")):
        return f"{value:.1f}"
    return f"{value:+.3f}" if key.endswith(("net_gain", "headroom")) else f"{value:.3f}"


def tables(metrics: Mapping[str, float], records: Mapping[str, Sequence[EpisodeRecord]], draws: int = 1) -> list[Table]:
    """The tables of ``results.md`` and the report: summary, counterfactual, per category, per
    MME-RealWorld l2-category, HR-Bench rotations and repeated draws (each only where it has numbers)."""
    arms = [arm for arm in records if records[arm]]
    out = [Table("Summary", ("arm", *(label for _, label in SUMMARY_COLUMNS)),
                 tuple((arm, *(cell(key, metrics.get(f"{arm}/{key}")) for key, _ in SUMMARY_COLUMNS)) for arm in arms),
                 "Accuracy and grounding per arm; tokens and turns are means per episode.")]
    if f"{COUNTERFACTUAL}/pairs" in metrics:
        out.append(Table("Zoom counterfactual", tuple(label for _, label in COUNTERFACTUAL_COLUMNS),
                         ((*(cell(key, metrics.get(f"{COUNTERFACTUAL}/{key}")) for key, _ in COUNTERFACTUAL_COLUMNS),),),
                         "The same questions without zoom (direct) and with it (eval): tool gain = wrong without, "
                         "right with; tool harm = right without, wrong with; net gain = gain - harm. Oracle-crop "
                         "headroom = oracle_crop accuracy - eval accuracy on the questions with ground-truth boxes."))
    out += [t for t in (_per_category(metrics, records, arms), _by_prefix(metrics, arms, "l2_accuracy",
            "Per l2-category (MME-RealWorld)", "l2-category"), _rotations(metrics, arms), _repeats(metrics, arms, draws)) if t]
    return out


def _per_category(metrics: Mapping[str, float], records: Mapping[str, Sequence[EpisodeRecord]],
                  arms: Sequence[str]) -> Table | None:
    categories = sorted({key.split("/", 2)[2] for key in metrics if key.startswith(f"{MAIN_ARM}/accuracy/")})
    if not categories:
        return None
    counts = Counter(r.category or UNCATEGORISED for r in records.get(MAIN_ARM, ()))
    columns = [(f"{arm}/accuracy", f"{arm} acc.") for arm in arms]
    columns += [(f"{COUNTERFACTUAL}/{key}", label) for key, label in (("tool_gain", "tool gain"), ("tool_harm", "tool harm"),
                                                                       ("net_gain", "net gain"))
                if any(k.startswith(f"{COUNTERFACTUAL}/{key}/") for k in metrics)]
    columns += [(f"{MAIN_ARM}/{key}", label) for key, label in (("target_hit_ratio", "target hit"),
                                                                  ("crop_useful_ratio", "useful crop"))
                if any(k.startswith(f"{MAIN_ARM}/{key}/") for k in metrics)]
    rows = tuple((category, str(counts[category]), *(cell(key, metrics.get(f"{key}/{category}")) for key, _ in columns))
                 for category in categories)
    return Table("Per category", ("category", "episodes", *(label for _, label in columns)), rows,
                 "The samples' category (V*: the folder; MME-RealWorld: the task).")


def _by_prefix(metrics: Mapping[str, float], arms: Sequence[str], key: str, title: str, name: str) -> Table | None:
    labels = sorted({k.split("/", 2)[2] for k in metrics if k.startswith(f"{MAIN_ARM}/{key}/")})
    if not labels:
        return None
    rows = tuple((label, *(cell(key, metrics.get(f"{arm}/{key}/{label}")) for arm in arms)) for label in labels)
    return Table(title, (name, *(f"{arm} acc." for arm in arms)), rows)


def _rotations(metrics: Mapping[str, float], arms: Sequence[str]) -> Table | None:
    if f"{MAIN_ARM}/rotation_accuracy" not in metrics:
        return None
    rows = tuple((arm, cell("rotation_accuracy", metrics.get(f"{arm}/rotation_accuracy")),
                  cell("all_rotations_accuracy", metrics.get(f"{arm}/all_rotations_accuracy"))) for arm in arms)
    return Table("HR-Bench option rotations", ("arm", "mean over rotations", "right in all rotations"), rows,
                 "Each question is asked four times with its options rotated.")


def _repeats(metrics: Mapping[str, float], arms: Sequence[str], draws: int) -> Table | None:
    if draws < 2 or f"{MAIN_ARM}/avg@{draws}" not in metrics:
        return None
    k = draws

    def pm(arm: str, key: str, spread: str) -> str:
        value, error = metrics.get(f"{arm}/{key}"), metrics.get(f"{arm}/{key}_{spread}")
        return "-" if value is None else f"{value:.3f} ± {error:.3f}"

    rows = tuple((arm, pm(arm, f"avg@{k}", "std"), pm(arm, f"pass@{k}", "se")) for arm in arms)
    return Table(f"Repeated draws (K = {k})", ("arm", f"avg@{k} ± std over draws", f"pass@{k} ± s.e."), rows)


def results_markdown(results: Mapping[str, Any], table_list: Sequence[Table]) -> str:
    """``results.md``: what was evaluated, how, and the tables."""
    model, data = results["model"], results["data"]
    head = [f"# zoomgym eval: {model.get('name', '?')} on {data.get('source') or data['name']}", "",
            f"- model: `{model.get('name')}`{_identity(model)}",
            f"- data: `{data.get('source') or data['name']}`: {data['evaluated']} of {data['samples']} samples, sha256 {data['sha256'][:16]}",
            "- arms: " + "; ".join(f"`{arm}` = {_arm_line(protocol)}" for arm, protocol in results["protocol"].items()),
            f"- decoding: {_decoding(next(iter(results['protocol'].values())))}",
            f"- zoomgym {results['versions'].get('zoomgym')} ({results['versions'].get('git_commit')})", ""]
    return "\n".join(head) + "\n" + "\n".join(t.markdown() for t in table_list)


def _identity(model: Mapping[str, Any]) -> str:
    shown = ", ".join(f"{k} {str(v)[:16]}" for k, v in model.items() if k not in ("name", "path"))
    return f" ({shown})" if shown else ""


def _arm_line(protocol: Mapping[str, Any]) -> str:
    turns, images = protocol["max_turns"], protocol["max_images"]
    line = f"{protocol['env_id']}, {turns} turn{'s' * (turns != 1)}, <= {images} image{'s' * (images != 1)}"
    return line + (", first turn played by the oracle" if protocol.get("oracle_crop") else "")


def _decoding(protocol: Mapping[str, Any]) -> str:
    sampling = protocol.get("sampling")
    if not sampling:
        return "scripted agent"
    how = "greedy" if sampling["temperature"] == 0 else f"T = {sampling['temperature']}, top-p {sampling['top_p']}"
    return f"{how}, {protocol['draws']} draw(s) per sample, <= {sampling['max_new_tokens']} new tokens per turn"
