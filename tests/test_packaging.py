"""The installed names: one top-level package, `zoomgym`, never the generic `envs`, `agents`, `algorithms`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"zoomgym": "zoomgym", "zoomgym.envs": "envs", "zoomgym.agents": "agents", "zoomgym.algorithms": "algorithms"}


def test_every_package_folder_is_installed_under_zoomgym() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == FOLDERS
    found = set()
    for package, folder in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((package, *parts)))
    assert set(tool["packages"]) == found


def test_outside_the_repository_only_zoomgym_is_importable(tmp_path: Path) -> None:
    code = ("import importlib.util as u; import zoomgym.envs, zoomgym.agents, zoomgym.algorithms; "
            "print([name for name in ('envs', 'agents', 'algorithms') if u.find_spec(name)]); "
            "print(zoomgym.envs.episode_spec('zoomgym/ZoomEnv-v0').max_images)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "2"]
