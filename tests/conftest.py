"""Shared fixtures: small in-memory samples, CPU-sized synthetic data and its view budget."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from zoomgym.envs.data import Sample, synthetic
from zoomgym.envs.geometry import Box

CPU_PRESET = "cpu"


def pytest_configure(config: pytest.Config) -> None:
    """Under ``pytest -n N`` (`make test`) each worker gets its share of the CPUs as torch threads: N workers
    with a thread per core each would wait on each other (unless ``OMP_NUM_THREADS`` says otherwise)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


MARKER_BOX = Box(1200, 300, 1240, 340)


def marker_sample(
    sample_id: str = "marker",
    size: tuple[int, int] = (1600, 1200),
    target: Box = MARKER_BOX,
    answer: str = "B",
) -> Sample:
    """A grey image with one red square at ``target`` (its ground-truth box) and 4 options."""
    pixels = np.full((size[1], size[0], 3), 128, dtype=np.uint8)
    x1, y1, x2, y2 = (int(v) for v in target.as_tuple())
    pixels[y1:y2, x1:x2] = (255, 0, 0)
    return Sample(
        id=sample_id,
        image=Image.fromarray(pixels, "RGB"),
        question="What colour is the square?",
        options=("blue", "red", "green", "white"),
        answer=answer,
        category="attribute",
        boxes=(target,),
    )


@pytest.fixture
def marker() -> Sample:
    return marker_sample()


@pytest.fixture(scope="session")
def synthetic_cpu() -> list[Sample]:
    """Eight CPU-scale synthetic samples (both categories) and, in ``meta``, their view budget."""
    return synthetic(8, seed=0, preset=CPU_PRESET)


@pytest.fixture(scope="session")
def synthetic_budget(synthetic_cpu: list[Sample]) -> dict[str, int]:
    """The view budget the CPU synthetic samples were made for, as ``view_budget=`` options."""
    meta = synthetic_cpu[0].meta
    return {
        "min_pixels": meta["view_min_pixels"],
        "max_pixels": meta["view_max_pixels"],
        "patch_size": meta["patch_size"],
        "merge_size": meta["merge_size"],
    }


class FakeLLM:
    """Stands in for ``vllm.LLM`` where vLLM is absent: records how the engine was built, and answers every
    prompt with ``FakeLLM.reply`` (token ids a test sets; log-prob -0.5 each), shaped like vLLM's outputs."""

    built: list[dict] = []
    reply: list[int] = []
    prompts: list[dict] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        FakeLLM.built.append(kwargs)

    def generate(self, prompts, params, use_tqdm=True):
        from types import SimpleNamespace

        FakeLLM.prompts += prompts
        ids = tuple(FakeLLM.reply)
        completion = SimpleNamespace(token_ids=ids, logprobs=[{t: SimpleNamespace(logprob=-0.5)} for t in ids])
        return [SimpleNamespace(outputs=[completion]) for _ in prompts]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    """A stub ``vllm`` module whose ``LLM`` records its arguments (``FakeLLM.built``, newest last)."""
    import sys
    import types

    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = dict
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the backend's setdefault leaves it as it was
    FakeLLM.built, FakeLLM.reply, FakeLLM.prompts = [], [], []
    return FakeLLM
