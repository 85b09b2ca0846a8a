"""What a run pays before and around its env steps: building envs and generating synthetic data.

Measures, in a fresh process per variant:

* **env build**: ``gymnasium.make("zoomgym/ZoomEnv-v0", ...)``, once per episode in a trainer, and
  build + ``reset`` (with the image and its view already cached, as for rollouts 2..G of a group);
* **synthetic generation** (seconds per item): ``synthetic(n, preset=...)`` alone, generation plus
  the first ``load_image`` of every item (what an env's first reset of each sample needs), and
  ``images="pil"`` (rendered at once, where the code has it), and the toy base's reading chats
  (`envs.data.toy_tasks.toy_reading`: canvases, views, close-ups and token labels);
* **memory**: bytes a 64-item train set plus a 256-item validation set of the ``cpu`` preset hold
  (``tracemalloc``, before any image is used).

``--baseline REF`` also times the code at git ``REF`` (exported as an importable package tree by
`baseline.export_ref`; the worker checks that it imports that code), alternating the two variants
round by round so that both see the same load on a shared machine.

Usage::

    .venv/bin/python benchmarks/env_setup.py                      # this checkout
    .venv/bin/python benchmarks/env_setup.py --baseline main      # side by side with main

Prints a Markdown table (median over rounds) and the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from baseline import REPO, check_imported_from, export_ref

CPU_BUDGET = {"min_pixels": 168 * 168, "max_pixels": 224 * 224}  # the `cpu` preset's view budget


def measure(builds: int, cpu_items: int, default_items: int, toy_chats: int) -> dict[str, float]:
    """One variant's numbers (seconds per env or per item; bytes)."""
    import gymnasium
    from zoomgym.envs.data import clear_image_cache, load_image, synthetic

    from zoomgym import envs  # noqa: F401  (registers the ids)

    samples = synthetic(2, seed=0, preset="cpu")
    gymnasium.make("zoomgym/ZoomEnv-v0", dataset=samples, view_budget=CPU_BUDGET).reset(seed=0)  # warm-up
    result: dict[str, float] = {}

    start = time.perf_counter()
    for _ in range(builds):
        gymnasium.make("zoomgym/ZoomEnv-v0", dataset=samples, view_budget=CPU_BUDGET)
    result["env build (s)"] = (time.perf_counter() - start) / builds
    start = time.perf_counter()
    for _ in range(builds):
        gymnasium.make("zoomgym/ZoomEnv-v0", dataset=samples, view_budget=CPU_BUDGET).reset(options={"index": 0})
    result["env build + reset (s)"] = (time.perf_counter() - start) / builds

    for preset, n in (("cpu", cpu_items), ("default", default_items)):
        clear_image_cache()
        start = time.perf_counter()
        items = synthetic(n, seed=1, preset=preset)
        generated = time.perf_counter() - start
        for sample in items:
            load_image(sample)
        result[f"{preset}: generate (s/item)"] = generated / n
        result[f"{preset}: generate + first decode (s/item)"] = (time.perf_counter() - start) / n
        clear_image_cache()
        start = time.perf_counter()
        try:
            synthetic(n, seed=1, preset=preset, images="pil")
            result[f"{preset}: generate images='pil' (s/item)"] = (time.perf_counter() - start) / n
        except TypeError:  # code from before the option
            result[f"{preset}: generate images='pil' (s/item)"] = math.nan

    from zoomgym.envs.data.toy_tasks import toy_reading
    from zoomgym.envs.views import ViewBudget

    start = time.perf_counter()
    toy_reading(toy_chats, seed=1000, view_budget=ViewBudget(**CPU_BUDGET))
    result["toy_reading chats (s/chat)"] = (time.perf_counter() - start) / toy_chats

    tracemalloc.start()
    held = synthetic(64, seed=0, preset="cpu") + synthetic(256, seed=1, preset="cpu")
    result["cpu 64 + 256 items held (bytes)"] = float(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    del held
    return result


def _run_variant(code_root: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", "--root", str(code_root), "--builds", str(args.builds),
               "--cpu-items", str(args.cpu_items), "--default-items", str(args.default_items),
               "--toy-chats", str(args.toy_chats)]
    environment = {**os.environ, "PYTHONPATH": str(code_root)}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment, cwd=code_root)
    return json.loads(output.stdout.splitlines()[-1])


def _format(key: str, value: float) -> str:
    if math.isnan(value):
        return "-"
    if key.endswith("(bytes)"):
        return f"{value / 1e6:.1f} MB"
    return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="git ref to time side by side (its envs/ package)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant (median reported)")
    parser.add_argument("--builds", type=int, default=20, help="envs built per measurement")
    parser.add_argument("--cpu-items", type=int, default=32, help="synthetic items of the cpu preset")
    parser.add_argument("--default-items", type=int, default=2, help="synthetic items of the default preset")
    parser.add_argument("--toy-chats", type=int, default=16, help="toy reading chats")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if Path(args.root) != REPO:
            check_imported_from(args.root)
        print(json.dumps(measure(args.builds, args.cpu_items, args.default_items, args.toy_chats)))
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        variants = {"this checkout": REPO}
        if args.baseline:
            variants = {args.baseline: export_ref(args.baseline, Path(folder)), **variants}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, root in variants.items():
                runs[name].append(_run_variant(root, args))
    load_after = os.getloadavg()

    names = list(variants)
    medians = {name: {key: statistics.median(r[key] for r in runs[name]) for key in runs[name][0]} for name in names}
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; load average "
        f"(1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after; median of {args.rounds} rounds\n"
    )
    ratio = ["old / new"] if len(names) == 2 else []
    print("| measure | " + " | ".join(names + ratio) + " |")
    print("|---" * (1 + len(names) + len(ratio)) + "|")
    for key in medians[names[-1]]:
        cells = [_format(key, medians[name][key]) for name in names]
        if ratio:
            old, new = medians[names[0]][key], medians[names[1]][key]
            cells.append("-" if math.isnan(old) else f"{old / new:.1f}x")
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
