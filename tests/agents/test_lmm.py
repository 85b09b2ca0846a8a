"""LMMAgent: loading, the shared view budget and frame, act, save -> reload, weight sync, token_logprobs."""

from __future__ import annotations

import json

import gymnasium
import pytest
import torch
from zoomgym.agents.backends.base import SamplingParams
from zoomgym.agents.lmm import LMMAgent
from zoomgym.agents.weights import merged_state_dict


def test_view_budget_and_frame_come_from_the_processor(tiny_agent):
    budget = tiny_agent.view_budget
    processor = tiny_agent.processor.image_processor
    assert (budget.min_pixels, budget.max_pixels) == (16 * 28 * 28, 64 * 28 * 28)
    assert (budget.patch_size, budget.merge_size) == (processor.patch_size, processor.merge_size)
    assert tiny_agent.coord_frame == "qwen25"


def test_act_plays_an_env_built_with_the_agents_settings(tiny_agent, samples):
    env = gymnasium.make("zoomgym/ZoomEnv-v0", dataset=samples, view_budget=tiny_agent.view_budget,
                         coord_frame=tiny_agent.coord_frame)
    chat, info = env.reset(seed=0)
    tiny_agent.sampling = SamplingParams(temperature=0.0, max_new_tokens=8)
    try:
        actions = tiny_agent.act([chat, chat], [info, info])
        assert len(actions) == 2 and actions[0] == actions[1] and isinstance(actions[0], str)
        chat, reward, terminated, truncated, info = env.step(actions[0])
        assert info["turn"] == 1 and not terminated
        (answer,) = tiny_agent.act([chat], [info])
        *_, terminated, truncated, info = env.step(answer)
        assert terminated and info["turn"] == 2
    finally:
        tiny_agent.sampling = SamplingParams(temperature=0.0)


def test_save_reload_gives_identical_outputs(tiny_agent, samples, tmp_path):
    sampling = SamplingParams(temperature=1.0, seed=4, max_new_tokens=6)
    before = tiny_agent.rollout(samples[:2], 1, "zoomgym/ZoomEnv-v0", sampling)
    tiny_agent.save_pretrained(tmp_path / "copy")
    again = LMMAgent.from_pretrained(tmp_path / "copy")
    after = again.rollout(samples[:2], 1, "zoomgym/ZoomEnv-v0", sampling)
    assert [t.input_ids.tolist() for t in before] == [t.input_ids.tolist() for t in after]
    with torch.no_grad():
        logp_before, _ = tiny_agent.token_logprobs(tiny_agent.collate(before))
        logp_after, _ = again.token_logprobs(again.collate(after))
    assert torch.equal(logp_before, logp_after)


def test_sync_weights_bumps_the_version_and_the_backend_uses_the_new_weights(tiny_model_dir, samples):
    agent = LMMAgent.from_pretrained(tiny_model_dir)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = agent.rollout(samples[:1], 1, "zoomgym/DirectVQA-v0", sampling)[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "training step"
        for param in agent.model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * param.std().nan_to_num(0.02).clamp(min=0.02))
    agent.sync_weights(5)
    after = agent.rollout(samples[:1], 1, "zoomgym/DirectVQA-v0", sampling)[0]
    assert agent.weight_version == 5 == agent.backend.weight_version == after.weight_version
    assert before.weight_version == 0
    # The backend samples with the new weights (greedy tokens may survive; their log-probs do not).
    n = min(before.length, after.length)
    assert not torch.allclose(before.sampling_logprobs[:n], after.sampling_logprobs[:n], atol=1e-3)
    with pytest.raises(ValueError, match="unknown keys"):
        agent.backend.load_weights({"not.a.weight": torch.zeros(1)}, 6)


def test_token_logprobs_alignment_entropy_and_gradients(tiny_agent, samples):
    trajectories = tiny_agent.rollout(samples[:2], 1, "zoomgym/DirectVQA-v0",
                                      SamplingParams(temperature=1.0, seed=0, max_new_tokens=4))
    batch = tiny_agent.collate(trajectories)
    logp, entropy = tiny_agent.token_logprobs(batch, with_entropy=True)
    assert logp.shape == entropy.shape == batch["input_ids"].shape
    assert torch.all(logp[:, 0] == 0) and torch.all(logp[:, 1:] <= 0)
    vocab = tiny_agent.model.config.text_config.vocab_size
    assert torch.all(entropy[:, 1:] >= 0) and torch.all(entropy <= torch.log(torch.tensor(float(vocab))))
    mask = batch["loss_mask"]
    (-(logp * mask).sum() / mask.sum()).backward()
    assert tiny_agent.model.lm_head.weight.grad is not None
    tiny_agent.model.zero_grad(set_to_none=True)


def test_missing_folders_and_uncached_hub_ids_fail_clearly_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="Expects a model folder or a hub id, actual: /no/such/folder"):
        LMMAgent.from_pretrained("/no/such/folder")
    with pytest.raises(OSError, match="zoomgym-test/not-cached.*could not be loaded"):
        LMMAgent.from_pretrained("zoomgym-test/not-cached")


def test_token_logprobs_scores_with_another_model(tiny_agent, tiny_model_dir, samples):
    reference = LMMAgent.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        reference.model.lm_head.weight.mul_(1.5)  # tied: the embeddings change too
    trajectories = tiny_agent.rollout(samples[:2], 1, "zoomgym/DirectVQA-v0",
                                      SamplingParams(temperature=0.0, max_new_tokens=4))
    batch = tiny_agent.collate(trajectories)
    with torch.no_grad():
        own, _ = tiny_agent.token_logprobs(batch)
        ref, _ = tiny_agent.token_logprobs(batch, model=reference.model)
        expected, _ = reference.token_logprobs(batch)
    assert torch.equal(ref, expected) and not torch.allclose(own, ref, atol=1e-3)


def test_merged_state_dict_merges_lora_adapters(tiny_model_dir, samples):
    peft = pytest.importorskip("peft")
    agent = LMMAgent.from_pretrained(tiny_model_dir)
    base_keys = set(agent.model.state_dict())
    peft.get_peft_model(agent.model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at 0: give the adapters an effect
        for name, param in agent.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    merged = merged_state_dict(agent.model)
    assert set(merged) == base_keys
    assert any("lora_A" in k for k in agent.model.state_dict())  # the training model is left as it was
    plain = LMMAgent.from_pretrained(tiny_model_dir)
    plain.model.load_state_dict(merged, strict=True)
    trajectories = agent.rollout(samples[:2], 1, "zoomgym/DirectVQA-v0",
                                 SamplingParams(temperature=0.0, max_new_tokens=4))
    batch = agent.collate(trajectories)
    with torch.no_grad():
        with_adapters, _ = agent.token_logprobs(batch)
        merged_logp, _ = plain.token_logprobs(batch)
        base_logp, _ = LMMAgent.from_pretrained(tiny_model_dir).token_logprobs(batch)
    finite = with_adapters.isfinite()  # image pads are banned ids: -inf under every model
    assert torch.equal(finite, merged_logp.isfinite())
    assert (with_adapters - merged_logp)[finite].abs().max() < 1e-4
    assert (with_adapters - base_logp)[finite].abs().max() > 1e-2
    # The hf backend shares the training model: a sync only stamps the version.
    agent.sync_weights(3)
    assert agent.backend.weight_version == 3 == agent.weight_version


def test_evaluate_plays_the_lmm_agent_token_exact_with_its_own_view(tiny_agent, samples, tmp_path):
    from zoomgym.agents.evaluate import evaluate

    sampling = SamplingParams(temperature=0.0, max_new_tokens=6)
    metrics = evaluate(tiny_agent, samples[:2], "zoomgym/ZoomEnv-v0", sampling=sampling, out_dir=tmp_path,
                       n_trajectories=1)
    assert metrics["eval/episodes"] == 2 and metrics["eval/turns"] == 2.0
    assert 0 < metrics["eval/generated_tokens"] <= 12  # token ids recorded: at most 6 per turn
    assert "eval/valid_box_ratio" in metrics and (tmp_path / "report.html").read_text().count('<div class="card"') == 1
    protocol = json.loads((tmp_path / "results.json").read_text())["protocol"]["eval"]
    assert protocol["view_budget"]["max_pixels"] == tiny_agent.view_budget.max_pixels == 64 * 28 * 28
    assert protocol["sampling"]["temperature"] == 0.0 and protocol["sampling"]["max_new_tokens"] == 6
