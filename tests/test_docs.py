"""The docs stay true: ARCHITECTURE.md's extension-point examples run, and every file a doc names exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "docs").glob("*.md"))]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_extension_point_examples_run(tmp_path: Path) -> None:
    """Each example in its own namespace, all in one fresh process (they register names globally), in a
    folder that has the repository's configs/ (the examples' working directory)."""
    section = (REPO / "ARCHITECTURE.md").read_text().split("## Extension points", 1)[1].split("\n## ", 1)[0]
    blocks = python_blocks(section)
    assert len(blocks) == 7  # algorithm, advantage, policy loss, frame, dataset, backend, env protocol
    (tmp_path / "configs").symlink_to(REPO / "configs")
    runner = "import sys\nfor i, code in enumerate(sys.argv[1:]):\n    exec(compile(code, f'example {i}', 'exec'), {})\n"
    result = subprocess.run([sys.executable, "-c", runner, *blocks], cwd=tmp_path, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_file_a_doc_names_exists_in_the_repository(doc: Path) -> None:
    text = doc.read_text()
    links = [target for target in re.findall(r"\]\(([^)#\s]+)", text) if not target.startswith(("http:", "https:"))]
    paths = re.findall(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|md|yaml|txt|toml))`", text)
    missing = [p for p in links if not (doc.parent / p).exists() or not (doc.parent / p).resolve().is_relative_to(REPO)]
    missing += [p for p in paths if not p.startswith(("RUN_DIR/", "runs/")) and not (REPO / p).exists()]
    assert not missing, missing
    assert "mgpo-facts" not in text  # the facts are restated in our docs; nothing points outside the repo


def test_the_metrics_glossary_is_the_glossary_module() -> None:
    """ARCHITECTURE.md's table and TensorBoard's descriptions come from one source, `algorithms.glossary`."""
    from zoomgym.algorithms.glossary import markdown_table

    text = (REPO / "ARCHITECTURE.md").read_text().split("## Metrics glossary", 1)[1]
    assert markdown_table() in text, "regenerate the table: python -m zoomgym.algorithms.glossary"
