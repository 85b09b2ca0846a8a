"""A few real training steps of the tiny model: GRPO and MGPO learn, log and checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from zoomgym.algorithms.build import build_agent
from zoomgym.algorithms.config import Config
from zoomgym.algorithms.glossary import describe
from zoomgym.algorithms.grpo import GRPO
from zoomgym.algorithms.logging import read_metrics
from zoomgym.algorithms.run import run

from zoomgym import algorithms


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def check_finished_run(algo: Any, initial: dict[str, torch.Tensor], env_id: str, turns: int) -> None:
    """Weights moved, every step logged to metrics.jsonl and TensorBoard, the checkpoint reloads."""
    assert algo.env_id == env_id
    after = snapshot(algo.model)
    changed = [n for n in initial if not torch.equal(initial[n], after[n])]
    assert any("language_model" in n for n in changed), "the language model's weights did not move"
    assert algo.step == 3 and algo.agent.weight_version == 3

    run_dir = algo.run_dir
    records = read_metrics(run_dir)
    train = [r for r in records if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for record in train:
        assert record["train/weight_version"] == record["step"]
        assert record["train/turns"] == turns
        for key in ("actor/pg_loss", "actor/kl", "actor/entropy", "actor/clipfrac", "actor/grad_norm", "train/lr",
                    "rollout/logprob_gap_abs_mean", "time/generation_s", "time/env_s", "time/training_s",
                    "perf/generated_tokens_per_s", "train/generated_tokens", "train/visual_tokens"):
            assert key in record, key
        assert all(value is not None for value in record.values()), "NaN logged"  # NaN is written as null
        # hf backend on the same fp32 model: sampler and trainer agree on every sampled token
        assert record["rollout/logprob_gap_abs_max"] < 1e-4
    val = [r for r in records if "val/synthetic/accuracy" in r]
    assert [r["step"] for r in val] == [0, 3]  # before training and after the last step
    assert (turns == 2) == ("val/synthetic/valid_box_ratio" in val[0])  # grounding stats only with a zoom turn
    undefined = sorted({key for r in records for key in r if key != "step" and describe(key) is None})
    assert not undefined, f"keys missing from algorithms/glossary.py: {undefined}"

    # Each validation's first episodes in words, the same text in samples.jsonl and TensorBoard.
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["tag"]) for s in samples] == [(0, "val/synthetic/samples"), (3, "val/synthetic/samples")]
    assert samples[0]["text"].startswith(f"sample {samples[0]['sample_id']}: ") and "turn 1 model: " in samples[0]["text"]
    assert "parsed answer: " in samples[0]["text"] and len(samples[0]["turns"]) == turns

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert {"train/reward", "val/synthetic/accuracy", "actor/clipfrac"} <= set(events.Tags()["scalars"])
    assert events.SummaryMetadata("actor/clipfrac").summary_description == describe("actor/clipfrac")
    assert "train/trajectories/0" in events.Tags()["images"]
    assert "val/synthetic/samples/text_summary" in events.Tags()["tensors"]
    assert (run_dir / "config.yaml").is_file()

    from transformers import AutoModelForImageTextToText
    from zoomgym.agents.models import load_processor

    reloaded = AutoModelForImageTextToText.from_pretrained(algo.last_checkpoint)
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, after[n]), n
    assert load_processor(str(algo.last_checkpoint)) is not None


def test_mgpo_three_steps(mgpo_run: tuple[Any, dict[str, torch.Tensor]]) -> None:
    check_finished_run(*mgpo_run, env_id="zoomgym/ZoomEnv-v0", turns=2)


def test_grpo_three_steps(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config("algorithm.name=grpo", "trainer.val_every=3", "logging.render_every=3",
                      "logging.render_count=1")
    agent = build_agent(cfg)
    initial = snapshot(agent.model)
    algo = algorithms.make("grpo", agent=agent, config=cfg)
    assert algo.learn(3) is algo
    algo.close()
    check_finished_run(algo, initial, env_id="zoomgym/DirectVQA-v0", turns=1)


def test_user_registered_algorithm_runs(tiny_config: Callable[..., Config]) -> None:
    calls = []

    @algorithms.register("test_positive_only")
    class PositiveOnly(GRPO):
        def advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
            calls.append(len(rewards))
            return super().advantages(rewards, group_ids).clamp(min=0)

    try:
        with pytest.raises(ValueError, match="already registered"):
            algorithms.register("test_positive_only")(PositiveOnly)
        algo = run(tiny_config("algorithm.name=test_positive_only", "trainer.steps=1",
                               "trainer.val_before_train=false", "data.val=[]"))
        assert isinstance(algo, PositiveOnly) and algo.env_id == "zoomgym/DirectVQA-v0"
        assert calls == [4]  # B * G trajectories, once
    finally:
        algorithms.ALGORITHMS.pop("test_positive_only")


def test_unknown_algorithm_suggests() -> None:
    with pytest.raises(ValueError, match="Did you mean 'mgpo'"):
        algorithms.make("mgp")


def test_options_lora_checkpointing_bf16_tis_drgrpo(tiny_config: Callable[..., Config]) -> None:
    """The off-by-default options together: only adapters train, log-probs are recomputed in bf16."""
    pytest.importorskip("peft")
    cfg = tiny_config("algorithm.name=mgpo", "trainer.steps=1", "trainer.val_before_train=false", "data.val=[]",
                      "model.lora.enabled=true", "model.lora.rank=4", "model.gradient_checkpointing=true",
                      "model.dtype=bfloat16", "algorithm.tis_cap=2.0", "algorithm.norm_adv_by_std=false",
                      "algorithm.loss_agg=seq-mean-token-sum-norm", "algorithm.clip_high=0.28",
                      "algorithm.mask_truncated=true")
    algo = run(cfg)
    assert not algo.reuses_sampling_logprobs()  # bf16: the sampler's numbers are not the trainer's
    trainable = {n for n, p in algo.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("visual" in n for n in trainable)  # adapters on the language model only
    assert algo.reference_model is None  # the reference is the base model with adapters disabled
    record = next(r for r in read_metrics(algo.run_dir) if "train/reward" in r)
    assert all(value is not None for value in record.values())
    assert "actor/is_weight_mean" in record and record["rollout/logprob_gap_abs_mean"] >= 0
    assert (algo.last_checkpoint / "adapter_model.safetensors").is_file()


def test_lora_mgpo_step_trains_only_adapters_against_the_base_as_reference(tiny_config: Callable[..., Config]) -> None:
    """The one-GPU 7B path on the tiny model: a LoRA MGPO step moves adapter weights only, and the KL
    reference (the same model with its adapters disabled) scores exactly as the untouched base model."""
    pytest.importorskip("peft")
    from transformers import AutoModelForImageTextToText

    cfg = tiny_config("algorithm.name=mgpo", "model.lora.enabled=true", "model.lora.rank=4", "trainer.lr=1e-2",
                      "trainer.val_before_train=false", "data.val=[]")
    algo = algorithms.make("mgpo", agent=build_agent(cfg), config=cfg)
    before = snapshot(algo.model)
    _, trajectories = algo.train_step()
    after = snapshot(algo.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at 0: the adapters now change the policy
    assert algo.reference_model is None  # no second copy of the weights

    base = AutoModelForImageTextToText.from_pretrained(cfg.model.path, dtype=torch.float32).eval()
    batch = algo.agent.collate(trajectories)
    with torch.no_grad():
        reference = algo._reference_logprobs(batch)
        expected = algo.agent.token_logprobs(batch, temperature=algo.logprob_temperature, model=base)[0]
        policy = algo.agent.token_logprobs(batch, temperature=algo.logprob_temperature)[0]
    mask = batch["loss_mask"].bool()
    assert torch.allclose(reference[mask], expected[mask], atol=1e-6)
    assert (policy[mask] - expected[mask]).abs().max() > 1e-4  # the trained adapters are on outside the reference


def test_lora_with_a_separate_engine_samples_with_merged_weights(tiny_config: Callable[..., Config]) -> None:
    """LoRA with a backend that does not share the model (vLLM's case, played by the hf engine over its own
    copy): each sync hands it the weights with the adapters merged in, and it samples what the trainer scores."""
    pytest.importorskip("peft")
    import copy

    from zoomgym.agents.backends import BACKENDS
    from zoomgym.agents.backends.hf import HFBackend
    from zoomgym.agents.weights import merged_state_dict

    class SeparateHF(HFBackend):
        shares_model = False
        logprobs_match_trainer = False  # the trainer recomputes old log-probs, as with vLLM

        @classmethod
        def from_pretrained(cls, path: str, *, model: Any, adapter: Any, **settings: Any) -> HFBackend:
            return super().from_pretrained(path, model=copy.deepcopy(model), adapter=adapter, **settings)

    BACKENDS.register("test_separate_hf", SeparateHF)
    try:
        cfg = tiny_config("algorithm.name=mgpo", "rollout.backend=test_separate_hf", "model.lora.enabled=true",
                          "model.lora.rank=4", "trainer.lr=1e-2", "trainer.val_before_train=false", "data.val=[]")
        algo = algorithms.make("mgpo", agent=build_agent(cfg), config=cfg)
        engine = algo.agent.backend.model
        assert engine is not algo.model
        initial = {k: v.clone() for k, v in engine.state_dict().items()}
        algo.train_step()
        algo.step += 1
        merged, held = merged_state_dict(algo.model), engine.state_dict()
        assert set(merged) == set(held) and all(torch.equal(merged[k], held[k]) for k in held)
        moved = [k for k in held if not torch.equal(initial[k], held[k])]
        assert moved and all("language_model" in k for k in moved)  # the adapters' deltas, nothing else
        metrics, _ = algo.train_step()  # sampled by the engine with version 1, scored by the trainer's adapters
        assert algo.agent.weight_version == 2 and metrics["rollout/logprob_gap_abs_max"] < 1e-4
    finally:
        BACKENDS.pop("test_separate_hf")


def test_dynamic_sampling_keeps_informative_groups(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Groups with equal rewards are dropped and fresh prompts top the batch up, whole groups only."""
    from zoomgym.agents.trajectory import Trajectory

    cfg = tiny_config("algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling_max_rounds=3",
                      "data.val=[]")
    algo = algorithms.make("mgpo", agent=build_agent(cfg), config=cfg)
    rounds = iter([[1, 1, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0]])  # rewards of 2 groups x 2 rollouts per round

    def fake_rollout(samples, group_size, *, greedy, seed, first_episode):
        assert first_episode == 0  # one process plays the whole batch
        rewards = next(rounds)
        return [Trajectory(torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 1]), torch.zeros(3), [],
                           torch.zeros((0, 3), dtype=torch.long), reward=float(rewards[i]), group_id=i // group_size,
                           infos=[{}, {"correct": bool(rewards[i])}])
                for i in range(len(samples) * group_size)]

    monkeypatch.setattr(algo, "rollout", fake_rollout)
    kept, sampled = algo.collect()
    assert len(sampled) == 8  # two rounds were needed to find two informative groups
    assert [t.reward for t in kept] == [0, 1, 1, 0]  # group 1 of round 0 and group 1 of round 1
    assert len({t.group_id for t in kept}) == 2 and algo.prompts_drawn == 4


def test_prompts_cover_each_epoch_once_in_a_fresh_order() -> None:
    from types import SimpleNamespace

    from zoomgym.algorithms.config import Config as Cfg

    stub = SimpleNamespace(train_samples=list(range(5)), cfg=Cfg(), prompts_drawn=0)
    drawn = [GRPO.next_prompts(stub, 2) for _ in range(5)]  # 10 prompts = 2 epochs of 5
    flat = [s for batch in drawn for s in batch]
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5))
    assert flat[:5] != flat[5:] and stub.prompts_drawn == 10
    stub.prompts_drawn = 4  # resumed: the same draws follow from the counter alone
    assert GRPO.next_prompts(stub, 2) == flat[4:6]


def test_an_update_moves_log_probs_the_way_of_the_advantages(tiny_config: Callable[..., Config]) -> None:
    """One PPO update: episodes with A > 0 become more likely, those with A < 0 less likely."""
    from zoomgym.algorithms.ppo import right_pad

    cfg = tiny_config("algorithm.kl_coef=0", "algorithm.entropy_coef=0", "trainer.mini_batch_prompts=2",
                      "trainer.lr=1e-4", "data.val=[]")
    algo = algorithms.make("mgpo", agent=build_agent(cfg), config=cfg)
    trajectories = algo.rollout(algo.train_samples[:2], 2, greedy=False, seed=0)
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    masks = [algo.loss_mask(t).float() for t in trajectories]

    def sequence_logp() -> torch.Tensor:
        batch = algo.agent.collate(trajectories)
        with torch.no_grad():
            logp, _ = algo.agent.token_logprobs(batch)
        mask = right_pad(masks, logp.shape[1], logp.device)
        return (torch.where(mask > 0, logp, 0.0)).sum(-1)  # (N,) log-prob of each episode's trained tokens

    before = sequence_logp()
    stats = algo.update(algo.make_batch(trajectories, advantages, masks))
    change = sequence_logp() - before
    assert stats["actor/grad_norm"] > 0
    assert torch.equal(torch.sign(change), torch.sign(advantages)), change  # each episode moves its own way


def test_validation_is_greedy_on_every_held_out_set() -> None:
    """The reference meant greedy validation and sampled at T=1: ours passes greedy settings to the backend."""
    from types import SimpleNamespace

    from zoomgym.algorithms.build import sampling_params
    from zoomgym.algorithms.config import Config as Cfg
    from zoomgym.algorithms.trainer import Trainer, UnreadableImages

    calls = []
    logger = SimpleNamespace(log=lambda step, m: None, log_samples=lambda step, tag, records: None)
    s1, s2, s3 = (SimpleNamespace(id=name) for name in ("s1", "s2", "s3"))
    stub = SimpleNamespace(cfg=Cfg(), val_sets={"a": [s1, s2], "b": [s3]}, step=4, first_validation={},
                           last_validation={}, _validated_step=None, logger=logger, unreadable=UnreadableImages())
    stub.rollout = lambda samples, group_size, *, greedy, seed, first_episode: calls.append(
        (samples, group_size, greedy, first_episode)) or []
    metrics = Trainer.validate(stub)
    assert calls == [([s1, s2], 1, True, 0), ([s3], 1, True, 0)]  # one greedy episode per held-out sample
    assert "time/validation_s" in metrics and stub._validated_step == 4
    # Issue 10: with trainer.val_before_train=false the first validation (step 4) was printed as "before training".
    assert stub.first_validation == {} and stub.last_validation is metrics
    greedy = sampling_params(stub.cfg, greedy=True, seed=0)
    assert greedy.temperature == 0.0 and greedy.top_p == 1.0 and greedy.greedy
    assert sampling_params(stub.cfg, greedy=False, seed=0).temperature == stub.cfg.rollout.temperature == 1.0


def test_episode_metrics_grounding_health_from_real_env_episodes() -> None:
    """Valid-box ratio, IoU and accuracy split by zoomed / not zoomed, from ZoomEnv infos of scripted agents."""
    import gymnasium
    from zoomgym.agents.metrics import episode_metrics
    from zoomgym.agents.scripted import OracleAgent, ReplayAgent
    from zoomgym.agents.trajectory import Trajectory
    from zoomgym.envs.data import synthetic

    from zoomgym import envs  # noqa: F401 - registers the zoomgym ids

    def play(agent: Any, sample: Any) -> Trajectory:
        # The default budget shows the 672 px canvas whole (the oracle's box is then exact: IoU 1), not
        # at the 224 px it was made for: no model reads this view, so the env's budget check is off.
        env = gymnasium.make("zoomgym/ZoomEnv-v0", dataset=[sample], check_view_budget=False)
        obs, info = env.reset(seed=0)
        infos, done, reward, turns = [info], False, 0.0, 0
        while not done:
            obs, reward, terminated, truncated, info = env.step(agent.act([obs], [info])[0])
            infos.append(info)
            done, turns = terminated or truncated, turns + 1
        return Trajectory(torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 1]), torch.zeros(3), [],
                          torch.zeros((0, 3), dtype=torch.long), reward=float(reward), infos=infos, num_turns=turns,
                          category=sample.category)

    samples = synthetic(3, seed=0, preset="cpu")
    # oracle: valid box (IoU 1), right answer; replay: no box (fallback), then a wrong letter
    wrong = next(letter for letter in "ABCD" if letter != samples[2].answer)
    trajectories = [play(OracleAgent(), samples[0]), play(OracleAgent(), samples[1]),
                    play(ReplayAgent(["no box here", f"\\boxed{{{wrong}}}"]), samples[2])]
    m = episode_metrics(trajectories, "train")
    assert m["train/accuracy"] == m["train/reward"] == 2 / 3
    assert m["train/valid_box_ratio"] == 2 / 3 and m["train/fallback_ratio"] == 1 / 3
    assert m["train/zoom_rate"] == 2 / 3 and m["train/iou"] == 1.0  # IoU over valid boxes only
    assert m["train/accuracy_zoomed"] == 1.0 and m["train/accuracy_not_zoomed"] == 0.0
    assert m["train/turns"] == 2.0 and m["train/visual_tokens"] > 0
    categories = {s.category for s in samples}
    assert {f"train/accuracy/{c}" for c in categories} <= set(m)


def test_a_registered_advantage_and_policy_loss_selected_by_config_change_the_update(
    tiny_config: Callable[..., Config],
) -> None:
    """`algorithm.advantage` / `algorithm.policy_loss` pick registry entries; the built-ins are not hard-wired."""
    from zoomgym.algorithms import core

    calls: dict[str, int] = {"advantage": 0, "loss": 0}

    @core.register_advantage("test_alternating")
    def alternating(rewards: torch.Tensor, group_ids: torch.Tensor, *, norm_by_std: bool) -> torch.Tensor:
        calls["advantage"] += 1
        return torch.tensor([1.0, -1.0] * (len(rewards) // 2))  # whatever the rewards

    @core.register_policy_loss("test_counted")
    def counted(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        calls["loss"] += 1
        return core.policy_loss(*args, **kwargs)

    try:
        base = ("algorithm.kl_coef=0", "algorithm.entropy_coef=0", "trainer.mini_batch_prompts=2", "data.val=[]")
        default = algorithms.make("mgpo", agent=build_agent(cfg := tiny_config(*base)), config=cfg)
        trajectories = default.rollout(default.train_samples[:2], 2, greedy=False, seed=0)
        rewards = torch.zeros(4)  # the random tiny model answers nothing right: GRPO's advantages are all 0
        group_ids = torch.tensor([0, 0, 1, 1])
        masks = [default.loss_mask(t).float() for t in trajectories]
        assert torch.equal(default.advantages(rewards, group_ids), torch.zeros(4))
        stats = default.update(default.make_batch(trajectories, torch.zeros(4), masks))
        assert stats["actor/grad_norm"] == 0.0  # no advantage, no KL, no entropy: nothing to learn

        cfg = tiny_config(*base, "algorithm.advantage=test_alternating", "algorithm.policy_loss=test_counted")
        custom = algorithms.make("mgpo", agent=build_agent(cfg), config=cfg)
        before = snapshot(custom.model)
        advantages = custom.advantages(rewards, group_ids)
        assert advantages.tolist() == [1.0, -1.0, 1.0, -1.0] and calls["advantage"] == 1
        stats = custom.update(custom.make_batch(trajectories, advantages, masks))
        assert stats["actor/grad_norm"] > 0 and calls["loss"] == 4  # one call per micro-batch of one episode
        assert any(not torch.equal(before[n], p) for n, p in custom.model.named_parameters())
    finally:
        core.ADVANTAGES.pop("test_alternating")
        core.POLICY_LOSSES.pop("test_counted")


def test_rendered_slots_show_distinct_samples() -> None:
    """Issue 10: two rendered slots showed two rollouts of the same sample (a group shares its image)."""
    from types import SimpleNamespace

    from zoomgym.algorithms.trainer import distinct_samples

    group = [SimpleNamespace(sample_id=s) for s in ("a", "a", "b", "b", "c", "c")]
    assert [t.sample_id for t in distinct_samples(group, 2)] == ["a", "b"]
    assert distinct_samples(group, 2)[1] is group[2]


def test_runs_are_named_after_the_algorithm() -> None:
    """Issue 10: runs/<name>-<date> hid which algorithm a quickstart run trained."""
    from pathlib import Path

    from zoomgym.algorithms.config import load_config
    from zoomgym.algorithms.trainer import default_run_dir

    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    assert default_run_dir(load_config(quickstart)).startswith("runs/mgpo-quickstart-")
    assert default_run_dir(load_config(quickstart, ["algorithm.name=grpo"])).startswith("runs/grpo-quickstart-")


def test_env_clock_counts_overlapping_env_calls_once():
    """Envs reset and step a group per thread: the clock counts the wall time with any env inside."""
    import threading
    import time

    from zoomgym.algorithms.trainer import EnvClock

    clock = EnvClock()
    inside = threading.Barrier(2)

    def busy() -> None:
        with clock.timing():
            inside.wait()  # both threads are inside together
            time.sleep(0.2)

    threads = [threading.Thread(target=busy) for _ in range(2)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    assert 0.2 <= clock.seconds <= wall  # once, not 0.4
    with clock.timing():
        time.sleep(0.05)
    assert clock.seconds >= 0.25
    clock.reset()
    assert clock.seconds == 0.0
