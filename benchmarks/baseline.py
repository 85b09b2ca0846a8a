"""The code of a git ref as an importable ``zoomgym`` tree, for side-by-side benchmarks.

The editable install maps ``zoomgym.envs``, ``zoomgym.agents`` and ``zoomgym.algorithms`` onto this
checkout's ``envs/``, ``agents/`` and ``algorithms/`` folders (pyproject's ``package-dir``) through an
import finder that Python consults after ``PYTHONPATH``. A bare export of a ref on ``PYTHONPATH``
therefore still imports those three packages from this checkout (its ``zoomgym/`` has no such
subfolders, so the lookup falls through to the install's finder). `export_ref` lays the ref's
folders out as the installed package tree instead (``ROOT/zoomgym/envs`` is the ref's ``envs/``,
...), read from the ref's own pyproject, so that ``PYTHONPATH=ROOT`` imports the ref's code only;
`check_imported_from` proves it in the measuring process.
"""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def package_dirs(pyproject: str) -> dict[str, str]:
    """The ``[tool.setuptools] package-dir`` table of a pyproject's text (one inline table; Python 3.10
    has no TOML reader)."""
    line = re.search(r"^package-dir\s*=\s*\{(.*)\}\s*$", pyproject, re.MULTILINE)
    if line is None:
        raise ValueError("Expects a package-dir = {...} line in pyproject.toml, actual: none")
    return dict(re.findall(r'"([^"]+)"\s*=\s*"([^"]+)"', line.group(1)))


def export_ref(ref: str, folder: Path) -> Path:
    """The code of git ``ref`` as a ``zoomgym`` package tree under ``folder``; put the result on PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    source = folder / "source"
    source.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    mapping = package_dirs((source / "pyproject.toml").read_text())
    root = folder / "importable"
    for package, directory in sorted(mapping.items()):  # "zoomgym" before "zoomgym.envs"
        target = root.joinpath(*package.split("."))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to((source / directory).resolve(), target_is_directory=True)
    return root


def check_imported_from(root: str | Path) -> None:
    """Raises unless every zoomgym package this process imports was found under ``root`` (as a path on
    PYTHONPATH: the links are not resolved, a package from the install's finder is not under it)."""
    import zoomgym.agents
    import zoomgym.algorithms
    import zoomgym.envs

    import zoomgym

    base = Path(root).absolute()
    for module in (zoomgym, zoomgym.envs, zoomgym.agents, zoomgym.algorithms):
        where = Path(module.__file__).absolute()
        if not where.is_relative_to(base):
            raise RuntimeError(f"Expects {module.__name__} imported from {base}, actual: {where}")
