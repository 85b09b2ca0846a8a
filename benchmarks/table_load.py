"""Loading a large MME-RealWorld-format parquet: time and memory of `load_mme_realworld`.

Writes ``--rows`` rows (default 20,000) of base64 JPEGs of about 50 KB each (1.3 GB of parquet, row
groups of 16, uncompressed, as image datasets are stored) to a temp dir, then loads it in a fresh
process and reports the wall time, the RSS growth and the image bytes the samples hold. Loading
reads every image cell once to check its header (one row group at a time) and keeps only an
`ImageRef` per sample.

Usage::

    .venv/bin/python benchmarks/table_load.py               # 20,000 rows
    .venv/bin/python benchmarks/table_load.py --rows 2000 --root /path/to/other/checkout
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import json, sys, time
def rss_mib():
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
from zoomgym.envs.data import load_mme_realworld
before = rss_mib()
start = time.perf_counter()
samples = load_mme_realworld(sys.argv[1])
seconds = time.perf_counter() - start
held = sum(len(s.image) for s in samples if isinstance(s.image, (bytes, bytearray)))
print(json.dumps({"rows": len(samples), "seconds": seconds, "rss_mib": rss_mib() - before, "held_bytes": held}))
"""


def jpegs(count: int, side: int = 160) -> list[str]:
    """``count`` distinct noise JPEGs (about 50 KB each at 160 px, quality 95), base64-encoded."""
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def write_table(path: Path, rows: int, batch: int = 1000) -> None:
    images = jpegs(64)
    writer = None
    for start in range(0, rows, batch):
        indices = range(start, min(start + batch, rows))
        table = pa.table({
            "index": list(indices),
            "question": [f"Question {i}?" for i in indices],
            "multi-choice options": [["(A) yes", "(B) no", "(C) maybe", "(D) never"]] * len(indices),
            "answer": ["ABCD"[i % 4] for i in indices],
            "category": ["Perception/Monitoring"] * len(indices),
            "l2-category": ["counting"] * len(indices),
            "bytes": [images[i % len(images)] for i in indices],
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="none", use_dictionary=False)
        writer.write_table(table, row_group_size=16)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--root", type=Path, default=ROOT, help="the zoomgym checkout to measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mme.parquet"
        write_table(path, args.rows)
        env = dict(os.environ, PYTHONPATH=str(args.root))
        done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], cwd=args.root, env=env,
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"pyarrow {pa.__version__}; checkout {args.root}; load average {os.getloadavg()[0]:.1f}\n")
        print("| rows | parquet | load time | RSS growth | image bytes held |")
        print("|---|---|---|---|---|")
        print(f"| {result['rows']:,} | {path.stat().st_size / 1e9:.2f} GB | {result['seconds']:.1f} s | "
              f"{result['rss_mib']:.0f} MiB | {result['held_bytes']} |")


if __name__ == "__main__":
    main()
