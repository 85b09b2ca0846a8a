"""The composition root: a config becomes an agent with the backend, limits and settings it names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from zoomgym.algorithms.build import build_agent, env_id_of
from zoomgym.algorithms.config import Config


@pytest.mark.parametrize(
    ("overrides", "images"),
    [
        (["algorithm.name=mgpo"], 2),  # zoomgym/ZoomEnv-v0: the view and one crop
        (["algorithm.name=grpo"], 1),  # zoomgym/DirectVQA-v0: the view
        (["env.id=zoomgym/ZoomEnvMultiTurn-v0"], 4),  # its registered budget of 4 turns (was 2)
        (["env.id=zoomgym/ZoomEnvMultiTurn-v0", "env.max_turns=3"], 3),
    ],
)
def test_a_vllm_agent_builds_from_a_config(tiny_config: Callable[..., Config], fake_vllm, overrides: list[str],
                                           images: int) -> None:
    """Issue 9, bug 3: build_agent passed dtype twice ("got multiple values for keyword argument 'dtype'")."""
    cfg = tiny_config("rollout.backend=vllm", "rollout.max_context_tokens=4096", "trainer.seed=7",
                      "rollout.vllm={gpu_memory_utilization: 0.3, tensor_parallel_size: 2}", *overrides)
    agent = build_agent(cfg)
    (engine,) = fake_vllm.built
    assert engine["dtype"] == cfg.model.dtype == "float32"
    assert engine["limit_mm_per_prompt"] == {"image": images, "video": 0}
    assert (engine["gpu_memory_utilization"], engine["tensor_parallel_size"]) == (0.3, 2)
    assert engine["enable_sleep_mode"] and agent.backend.can_sleep  # rollout.vllm.enable_sleep_mode, default true
    assert (engine["max_model_len"], engine["seed"]) == (4096, 7)
    assert engine["mm_processor_kwargs"] == {"min_pixels": agent.view_budget.min_pixels,
                                             "max_pixels": agent.view_budget.max_pixels}


def test_the_hf_backend_gets_its_own_section(tiny_config: Callable[..., Config]) -> None:
    agent = build_agent(tiny_config("rollout.hf.max_batch_size=3"))
    assert agent.backend.max_batch_size == 3 and agent.backend.model is agent.model


def test_env_id_comes_from_the_config_or_the_algorithm(tiny_config: Callable[..., Config]) -> None:
    assert env_id_of(tiny_config("algorithm.name=mgpo")) == "zoomgym/ZoomEnv-v0"
    assert env_id_of(tiny_config("algorithm.name=grpo")) == "zoomgym/DirectVQA-v0"
    assert env_id_of(tiny_config("env.id=zoomgym/ZoomEnvMultiTurn-v0")) == "zoomgym/ZoomEnvMultiTurn-v0"


def test_building_an_algorithm_writes_nothing(tiny_config: Callable[..., Config], tmp_path: Path) -> None:
    from zoomgym import algorithms

    cfg = tiny_config("data.val=[]")
    algo = algorithms.make("mgpo", agent=build_agent(cfg), config=cfg)
    assert not algo.run_dir.exists()  # created by the first log, in learn()
    algo.learn(0)
    assert (algo.run_dir / "config.yaml").is_file()
    algo.close()
