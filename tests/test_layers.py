"""The one-way dependency of the layers: envs -> agents -> algorithms (and the shared registry beneath)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("zoomgym", "envs", "agents", "algorithms")
"""Bottom to top: a layer may import only the ones before it (``zoomgym`` is the shared registry)."""


def layer_of(module: str) -> str | None:
    """The layer a module name belongs to (``zoomgym.envs.geometry`` and ``envs.geometry`` -> envs)."""
    parts = module.split(".")
    if parts[0] == "zoomgym" and len(parts) > 1 and parts[1] in LAYERS:
        parts = parts[1:]
    return parts[0] if parts[0] in LAYERS else None


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    folder = REPO / layer
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    files = sorted(folder.rglob("*.py"))
    assert files, f"no sources under {folder}"
    upward = {f"{path.relative_to(REPO)} imports {name}" for path in files for name in imported_modules(path)
              if (target := layer_of(name)) is not None and target not in allowed}
    assert not upward, sorted(upward)
