"""Memory of decoding and caching images, each case measured in a fresh process (Linux: /proc).

``decode``: peak RSS of one `load_image` of hostile-but-valid PNGs (a 16-bit PNG of 64 MP, a palette
PNG with transparency of 64 MP, a 16-bit PNG of 16000 x 16000) and of a photo-like 4K JPEG. The
files are generated here (kilobytes on disk: they compress to almost nothing) and deleted after.
Each child runs under an address-space limit (``--max-gib``), so a decode that would need more fails
there instead of pressing on the machine.

``envs``: RSS of ``--envs`` ZoomEnv instances, each on its own photo-like 4K JPEG, after every env
played ``--rounds`` oracle episodes (reset, zoom, answer), with ``ZOOMGYM_IMAGE_CACHE_MB`` set to
``--cache-mb``: what the caches keep beyond the budget shows as RSS above it.

``--root DIR`` measures the zoomgym checkout at DIR instead of this one (before/after comparisons).

Usage::

    .venv/bin/python benchmarks/memory.py decode
    .venv/bin/python benchmarks/memory.py envs --envs 32 --cache-mb 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from env_steps import photo_like_jpeg
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

_PREAMBLE = """
import json, os, resource, sys
def rss_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
limit = int(float(os.environ["BENCH_MAX_GIB"]) * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
"""

_DECODE_CHILD = _PREAMBLE + """
import time
from zoomgym.envs.data import Sample, load_image
before = rss_mib("VmRSS")
start = time.perf_counter()
try:
    image = load_image(Sample("bench", sys.argv[1], "q?", ("a", "b"), "A"))
    outcome = f"{image.mode} {image.width}x{image.height}"
except BaseException as error:
    outcome = f"{type(error).__name__}: {str(error)[:150]}"
seconds = time.perf_counter() - start
print(json.dumps({"peak_mib": rss_mib("VmHWM") - before, "seconds": seconds, "outcome": outcome}))
"""

_ENVS_CHILD = _PREAMBLE + """
import gymnasium
from zoomgym import envs
from zoomgym.agents.scripted import OracleAgent
from zoomgym.envs.data import Sample, image_cache_info
from zoomgym.envs.geometry import Box
paths, rounds = sys.argv[1:-1], int(sys.argv[-1])
agent = OracleAgent()
pool = []
for i, path in enumerate(paths):
    sample = Sample(f"s{i}", path, "q?", ("a", "b", "c", "d"), "C", boxes=(Box(2688, 1296, 2988, 1496),))
    pool.append(gymnasium.make("zoomgym/ZoomEnv-v0", dataset=[sample]))
before = rss_mib("VmRSS")
for _ in range(rounds):
    for env in pool:
        observation, info = env.reset(options={"index": 0})
        done = False
        while not done:
            (action,) = agent.act([observation], [info])
            observation, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
info = image_cache_info()
print(json.dumps({"rss_mib": rss_mib("VmRSS") - before, "peak_mib": rss_mib("VmHWM") - before,
                  "cache_mib": info.bytes / 2**20, "budget_mib": info.max_bytes / 2**20}))
"""


def run_child(code: str, args: list[str], root: Path, max_gib: float, cache_mb: float | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), BENCH_MAX_GIB=str(max_gib))
    if cache_mb is not None:
        env["ZOOMGYM_IMAGE_CACHE_MB"] = str(cache_mb)
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return {"outcome": f"child exited {result.returncode}: {result.stderr.strip()[-200:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_decode_cases(folder: Path) -> dict[str, Path]:
    """The issue's hostile PNGs and a 4K JPEG; returns name -> path."""
    cases = {}
    for name, side in (("16-bit grey PNG, 8000x8000 (64 MP)", 8000), ("16-bit grey PNG, 16000x16000 (256 MP)", 16000)):
        ramp = (np.arange(side, dtype=np.uint32) * 65535 // side).astype(np.uint16)
        path = folder / f"grey16-{side}.png"
        Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(path, compress_level=9)
        cases[name] = path
    palette = Image.new("P", (8000, 8000), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    path = folder / "palette-alpha.png"
    palette.save(path, transparency=0, optimize=True)
    cases["palette PNG + transparency, 8000x8000 (64 MP)"] = path
    path = folder / "photo-4k.jpg"
    photo_like_jpeg(path, (3840, 2160))
    cases["photo-like JPEG, 3840x2160"] = path
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["decode", "envs"])
    parser.add_argument("--root", type=Path, default=ROOT, help="the zoomgym checkout to measure")
    parser.add_argument("--max-gib", type=float, default=6.0, help="address-space limit of each child")
    parser.add_argument("--envs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-mb", type=float, default=128)
    args = parser.parse_args()
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"Pillow {Image.__version__}; checkout {args.root}; load average {os.getloadavg()[0]:.1f}\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.what == "decode":
            print("| image | file size | peak RSS of the decode | seconds | outcome |")
            print("|---|---|---|---|---|")
            for name, path in write_decode_cases(folder).items():
                result = run_child(_DECODE_CHILD, [str(path)], args.root, args.max_gib)
                peak = f"{result['peak_mib']:.0f} MiB" if "peak_mib" in result else "-"
                seconds = f"{result['seconds']:.2f}" if "seconds" in result else "-"
                print(f"| {name} | {path.stat().st_size / 1e3:.1f} KB | {peak} | {seconds} | {result['outcome']} |")
        else:
            paths = []
            for i in range(args.envs):
                paths.append(folder / f"photo-{i}.jpg")
                photo_like_jpeg(paths[-1], (3840, 2160), seed=i)
            result = run_child(_ENVS_CHILD, [*map(str, paths), str(args.rounds)], args.root, args.max_gib, args.cache_mb)
            print("| envs | cache budget | RSS growth | peak RSS growth | cache bytes |")
            print("|---|---|---|---|---|")
            print(f"| {args.envs} x 4K JPEG, {args.rounds} episodes each | {args.cache_mb:g} MiB | "
                  f"{result.get('rss_mib', float('nan')):.0f} MiB | {result.get('peak_mib', float('nan')):.0f} MiB | "
                  f"{result.get('cache_mib', float('nan')):.0f} MiB | {result.get('outcome', '')}")


if __name__ == "__main__":
    main()
