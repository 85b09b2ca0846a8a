"""Two evaluations of the same questions, sample by sample: ``zoomgym eval --compare OUT_A OUT_B``.

For every arm both runs played, each question's score is its mean correctness over its draws; the
delta is the mean of ``score_B - score_A`` over the questions both runs evaluated, with a 95% paired
bootstrap interval (the questions resampled with replacement, the pairs kept together). A question
*flipped* when it is right in every draw of one run and wrong in every draw of the other.

An output folder is one benchmark (it holds ``results.json``), or a folder of them (``zoomgym eval
CONFIG`` writes one per validation set); two such folders are compared benchmark by benchmark
(subfolders of the same name).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from zoomgym.agents.evaluate import EPISODES_FILE, RESULTS_FILE
from zoomgym.agents.evaluate.identity import differences
from zoomgym.agents.evaluate.records import EpisodeLog


@dataclass(frozen=True)
class Comparison:
    """One benchmark and arm of two runs.

    Attributes:
        benchmark: the benchmark's name (the subfolder, or the data's name).
        arm: ``eval``, ``direct`` or ``oracle_crop``.
        questions: questions both runs evaluated.
        accuracy_a, accuracy_b: mean score over those questions.
        ci: the 95% paired bootstrap interval of ``accuracy_b - accuracy_a``.
        right_in_b_only, right_in_a_only: the questions that flipped, by sample id.
    """

    benchmark: str
    arm: str
    questions: int
    accuracy_a: float
    accuracy_b: float
    ci: tuple[float, float]
    right_in_b_only: tuple[str, ...]
    right_in_a_only: tuple[str, ...]

    @property
    def delta(self) -> float:
        return self.accuracy_b - self.accuracy_a


def paired_bootstrap(deltas: Sequence[float], n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` percentile interval of the mean of ``deltas`` over ``n_boot`` resamples."""
    values = np.asarray(deltas, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.concatenate([values[rng.integers(0, len(values), (min(1000, n_boot - start), len(values)))].mean(axis=1)
                            for start in range(0, n_boot, 1000)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def find_runs(out: str | Path) -> dict[str, Path]:
    """The runs of an output folder by benchmark name: itself, or its subfolders holding ``results.json``.

    Raises:
        ValueError: no run there.
    """
    folder = Path(out)
    if (folder / RESULTS_FILE).is_file():
        return {json.loads((folder / RESULTS_FILE).read_text())["data"]["name"]: folder}
    runs = {sub.name: sub for sub in sorted(folder.iterdir()) if (sub / RESULTS_FILE).is_file()} if folder.is_dir() else {}
    if not runs:
        raise ValueError(f"Expects an output folder of zoomgym eval (holding {RESULTS_FILE}, or subfolders that "
                         f"do), actual: {str(folder)!r} holds none")
    return runs


def scores(run: Path) -> dict[str, dict[str, list[float]]]:
    """Per arm, per sample id, the correctness of each draw, over the samples the run evaluated."""
    results = json.loads((run / RESULTS_FILE).read_text())
    evaluated, seen = results["data"]["evaluated"], set()
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in EpisodeLog(run / EPISODES_FILE).read():
        key = (record["arm"], record["sample_id"], record["draw"])
        if record["index"] < evaluated and record["arm"] in results["protocol"] and key not in seen:
            seen.add(key)
            out[record["arm"]][record["sample_id"]].append(float(bool(record["infos"][-1].get("correct"))))
    return out


def compare_runs(out_a: str | Path, out_b: str | Path, n_boot: int = 10_000, seed: int = 0) -> tuple[list[Comparison], list[str]]:
    """Every benchmark and arm both runs hold, and warnings (different data, protocols or models named).

    Raises:
        ValueError: a folder holds no run, or the two hold no benchmark in common.
    """
    runs_a, runs_b = find_runs(out_a), find_runs(out_b)
    if len(runs_a) == len(runs_b) == 1:
        names = {next(iter(runs_a)): (next(iter(runs_a.values())), next(iter(runs_b.values())))}
    else:
        names = {name: (runs_a[name], runs_b[name]) for name in runs_a if name in runs_b}
    if not names:
        raise ValueError(f"Expects benchmarks in common, actual: {sorted(runs_a)} vs {sorted(runs_b)}")
    comparisons, warnings = [], []
    for name, (run_a, run_b) in names.items():
        results = [json.loads((run / RESULTS_FILE).read_text()) for run in (run_a, run_b)]
        if results[0]["data"]["sha256"] != results[1]["data"]["sha256"]:
            warnings.append(f"{name}: the two runs read different data (sha256 {results[0]['data']['sha256'][:12]} vs "
                            f"{results[1]['data']['sha256'][:12]}); only sample ids are paired")
        diff = differences(results[0]["protocol"], results[1]["protocol"])
        if diff:
            warnings.append(f"{name}: the protocols differ, so the delta mixes model and protocol: " + "; ".join(diff[:6]))
        score_a, score_b = scores(run_a), scores(run_b)
        for arm in [arm for arm in score_a if arm in score_b]:
            common = sorted(set(score_a[arm]) & set(score_b[arm]))
            if not common:
                continue
            a = np.array([np.mean(score_a[arm][s]) for s in common])
            b = np.array([np.mean(score_b[arm][s]) for s in common])
            comparisons.append(Comparison(
                name, arm, len(common), float(a.mean()), float(b.mean()), paired_bootstrap(b - a, n_boot, seed),
                tuple(s for s, x, y in zip(common, a, b) if x == 0 and y == 1),
                tuple(s for s, x, y in zip(common, a, b) if x == 1 and y == 0)))
    return comparisons, warnings


def format_comparison(comparisons: Sequence[Comparison], warnings: Sequence[str], labels: Mapping[str, Any]) -> str:
    """The text ``zoomgym eval --compare`` prints: a table of deltas, then the flipped samples."""
    lines = [f"A: {labels['a']}", f"B: {labels['b']}", *(f"warning: {w}" for w in warnings), "",
             f"{'benchmark':<20} {'arm':<12} {'n':>6} {'A':>7} {'B':>7} {'B - A':>8}  95% CI (paired bootstrap)"]
    for c in comparisons:
        lines.append(f"{c.benchmark:<20} {c.arm:<12} {c.questions:>6} {c.accuracy_a:>7.3f} {c.accuracy_b:>7.3f} "
                     f"{c.delta:>+8.3f}  [{c.ci[0]:+.3f}, {c.ci[1]:+.3f}]")
    for c in comparisons:
        lines += ["", f"flipped in {c.benchmark}/{c.arm}: {len(c.right_in_b_only)} right only in B, "
                      f"{len(c.right_in_a_only)} right only in A"]
        for label, ids in (("right only in B", c.right_in_b_only), ("right only in A", c.right_in_a_only)):
            if ids:
                lines.append(f"  {label}: " + ", ".join(ids))
    return "\n".join(lines)
