from __future__ import annotations

import json
import subprocess
import sys

import gymnasium as gym
import pytest
from zoomgym.agents import Agent, OracleAgent, RandomAgent, ReplayAgent, split_infos
from zoomgym.agents.evaluate import evaluate
from zoomgym.envs.data import Sample

from tests.conftest import marker_sample
from zoomgym import envs  # noqa: F401


def play(env: gym.Env, agent: Agent, sample: Sample) -> tuple[float, list[dict]]:
    chat, info = env.reset(options={"sample": sample})
    infos = [info]
    while True:
        (action,) = agent.act([chat], [info])
        chat, reward, terminated, truncated, info = env.step(action)
        infos.append(info)
        if terminated or truncated:
            return reward, infos


def test_agents_import_without_torch() -> None:
    code = "import sys, agents, envs; agents.OracleAgent; agents.RandomAgent; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("frame", ["qwen25", "norm1000", "relative"])
def test_oracle_is_perfect_on_synthetic_data_and_boxes_the_target(
    frame: str, synthetic_cpu: list[Sample], synthetic_budget: dict
) -> None:
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=synthetic_cpu, view_budget=synthetic_budget, coord_frame=frame)
    categories = set()
    for sample in synthetic_cpu:
        reward, infos = play(env, OracleAgent(), sample)
        assert reward == 1.0
        zoom = infos[1]
        assert zoom["action"] == "zoom" and zoom["box_valid"] and not zoom["fallback"]
        for truth in sample.boxes:  # the crop holds every ground-truth box
            assert zoom["box_original"].intersection(truth) == pytest.approx(truth.area)
        categories.add(sample.category)
    assert categories == {"attribute", "relative_position"}


def test_oracle_zooms_into_crops_of_crops_and_answers_direct_vqa(synthetic_cpu, synthetic_budget) -> None:
    env = gym.make("zoomgym/ZoomEnvMultiTurn-v0", dataset=synthetic_cpu, view_budget=synthetic_budget)
    for sample in synthetic_cpu[:2]:
        reward, infos = play(env, OracleAgent(zooms=2), sample)
        assert reward == 1.0 and [i["action"] for i in infos[1:]] == ["zoom", "zoom", "answer"]
        first, second = infos[1]["box_original"], infos[2]["box_original"]
        assert first.intersection(second) == pytest.approx(second.area)  # the second zoom is inside the first
    direct = gym.make("zoomgym/DirectVQA-v0", dataset=synthetic_cpu, view_budget=synthetic_budget)
    assert all(play(direct, OracleAgent(), s)[0] == 1.0 for s in synthetic_cpu)


def test_random_agent_is_near_chance() -> None:
    samples = [marker_sample(f"m{i}", answer="ABCD"[i % 4]) for i in range(4)]
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=samples, resample="nearest")
    agent = RandomAgent(seed=0)
    rewards, valid = [], []
    for episode in range(300):
        reward, infos = play(env, agent, samples[episode % 4])
        rewards.append(reward)
        valid.append(infos[1]["box_valid"])
    accuracy = sum(rewards) / len(rewards)
    assert 0.17 < accuracy < 0.33  # chance is 0.25; 300 episodes give a standard error of 0.025
    assert 0.3 < sum(valid) / len(valid) < 1.0  # random corners: mostly valid, some too thin


def test_replay_agent_and_vector_infos(marker: Sample) -> None:
    vec = gym.make_vec("zoomgym/ZoomEnv-v0", num_envs=2, vectorization_mode="sync", dataset=[marker])
    agent = ReplayAgent([["[0, 0, 10, 10]", "\\boxed{A}"], ["[800, 150, 950, 300]", "\\boxed{red}"]])
    chats, infos = vec.reset(seed=0)
    for _ in range(2):
        per_env = split_infos(infos, 2)
        chats, rewards, terminated, _, infos = vec.step(agent.act(list(chats), per_env))
    assert terminated.all() and list(rewards) == [0.0, 1.0]
    with pytest.raises(ValueError, match="script"):
        ReplayAgent(["only one"]).act([[]], [{"turn": 1}])


def test_evaluate_reports_metrics_and_writes_the_run(tmp_path, synthetic_cpu, synthetic_budget) -> None:
    metrics = evaluate(OracleAgent(), synthetic_cpu[:4], "zoomgym/ZoomEnv-v0", view_budget=synthetic_budget,
                       out_dir=tmp_path, n_trajectories=2)
    assert metrics["eval/episodes"] == 4 and metrics["eval/accuracy"] == 1.0
    assert metrics["eval/valid_box_ratio"] == 1.0 and metrics["eval/fallback_ratio"] == 0.0
    assert metrics["eval/zoom_rate"] == 1.0 and metrics["eval/iou"] > 0.2
    assert metrics["eval/target_hit_ratio"] == 1.0  # the oracle's box is on the target and small
    categories = {key for key in metrics if key.startswith("eval/accuracy/")}
    assert categories == {"eval/accuracy/attribute", "eval/accuracy/relative_position"}
    assert (tmp_path / "report.html").read_text().count('<div class="card"') == 2
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["eval/accuracy"] == 1.0
    assert len((tmp_path / "episodes.jsonl").read_text().splitlines()) == 4
