"""The rollout engine: token-exact sequences, masks, batching, seeds, budgets, version stamps."""

from __future__ import annotations

import gymnasium
import pytest
import torch
from zoomgym.agents.backends.base import SamplingParams, decode_text
from zoomgym.agents.rollout import episode_seed, run_rollouts

ZOOM = '```json\n[{"bbox_2d": [12, 20, 150, 100], "label": "key area"}]\n```'
ANSWER = "It is red, \\boxed{A}"


def masked_runs(traj):
    """The maximal runs of loss-masked ids of a trajectory, in order."""
    runs, current = [], []
    for tok, m in zip(traj.input_ids.tolist(), traj.loss_mask.tolist()):
        if m:
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_sequence_is_prefix_env_turns_and_exact_model_tokens(tiny_agent, samples, scripted):
    adapter = tiny_agent.adapter
    trajectories = run_rollouts(scripted([ZOOM, ANSWER]), adapter, samples[:2], 2, "zoomgym/ZoomEnv-v0",
                                SamplingParams())
    turn_ids = [adapter.tokenizer.encode(t, add_special_tokens=False) + [adapter.end_of_turn_id]
                for t in (ZOOM, ANSWER)]
    for traj in trajectories:
        # The mask covers exactly the model's tokens (their <|im_end|> included), nothing else.
        assert masked_runs(traj) == turn_ids
        assert traj.response_length == sum(map(len, turn_ids))
        assert torch.all(traj.sampling_logprobs[traj.loss_mask == 0] == 0)
        assert torch.all(traj.sampling_logprobs[traj.loss_mask == 1] < 0)
        # The same episode replayed by hand through the env and the adapter gives identical ids.
        env = gymnasium.make("zoomgym/ZoomEnv-v0", dataset=[samples[traj.group_id]],
                             view_budget=tiny_agent.view_budget, coord_frame=tiny_agent.coord_frame)
        chat, _ = env.reset(options={"sample": samples[traj.group_id]})
        reply = env.step(ZOOM)[0][-1]
        expected = adapter.encode_prefix(chat) + turn_ids[0] + adapter.encode_env_turn(reply, True) + turn_ids[1]
        assert traj.input_ids.tolist() == expected
        # Pitfall 1: one pad run per image, as long as its grid says.
        adapter.check_placeholders(traj.input_ids, traj.image_grid_thw)
        assert int((traj.input_ids == adapter.image_pad_id).sum()) == int(traj.image_grid_thw.prod(1).sum()) // 4
        assert traj.num_turns == 2 and traj.terminated and not traj.truncated and not traj.context_truncated
        assert traj.actions == [ZOOM, ANSWER] and traj.finish_reasons == ["eos", "eos"]
        assert traj.infos[1]["action"] == "zoom" and traj.reward == (1.0 if traj.sample_id == "s0" else 0.0)
    assert [t.group_id for t in trajectories] == [0, 0, 1, 1]
    assert [t.sample_id for t in trajectories] == ["s0", "s0", "s1", "s1"]


def test_batched_equals_one_at_a_time_under_greedy(tiny_agent, samples):
    sampling = SamplingParams(temperature=0.0, max_new_tokens=6)
    batched = tiny_agent.rollout(samples, 2, "zoomgym/ZoomEnv-v0", sampling)
    for b, sample in enumerate(samples):
        alone = tiny_agent.rollout([sample], 1, "zoomgym/ZoomEnv-v0", sampling)[0]
        for traj in batched[2 * b : 2 * b + 2]:
            assert traj.input_ids.tolist() == alone.input_ids.tolist()
            assert torch.allclose(traj.sampling_logprobs, alone.sampling_logprobs, atol=1e-5)


def test_seeded_draws_do_not_depend_on_the_batch(tiny_agent, samples):
    sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_new_tokens=6)
    small = tiny_agent.rollout(samples[:1], 2, "zoomgym/ZoomEnv-v0", sampling)
    large = tiny_agent.rollout(samples, 2, "zoomgym/ZoomEnv-v0", sampling)
    assert [t.input_ids.tolist() for t in small] == [t.input_ids.tolist() for t in large[:2]]


def test_episode_ids_draw_a_cut_of_the_batch_as_the_whole_batch_draws_it(tiny_agent, samples):
    sampling = SamplingParams(temperature=1.0, seed=5, max_new_tokens=6)
    whole = tiny_agent.rollout(samples, 2, "zoomgym/DirectVQA-v0", sampling)
    cut = tiny_agent.rollout(samples[2:], 2, "zoomgym/DirectVQA-v0", sampling, episode_ids=[4, 5, 6, 7])
    assert [t.input_ids.tolist() for t in cut] == [t.input_ids.tolist() for t in whole[4:]]
    alone = tiny_agent.rollout(samples[2:], 2, "zoomgym/DirectVQA-v0", sampling)  # numbered 0..3: other draws
    assert [t.input_ids.tolist() for t in alone] != [t.input_ids.tolist() for t in whole[4:]]
    with pytest.raises(ValueError, match="4 distinct episode_ids"):
        tiny_agent.rollout(samples[2:], 2, "zoomgym/DirectVQA-v0", sampling, episode_ids=[4, 4, 5, 6])


def test_seeded_sampling_is_reproducible_and_differs_within_a_group(tiny_agent, samples):
    sampling = SamplingParams(temperature=1.0, seed=11, max_new_tokens=6)
    a = tiny_agent.rollout(samples[:2], 3, "zoomgym/DirectVQA-v0", sampling)
    b = tiny_agent.rollout(samples[:2], 3, "zoomgym/DirectVQA-v0", sampling)
    assert [t.input_ids.tolist() for t in a] == [t.input_ids.tolist() for t in b]
    assert len({tuple(t.input_ids.tolist()) for t in a[:3]}) > 1
    assert episode_seed(11, 0, 0) != episode_seed(11, 1, 0) != episode_seed(11, 0, 1)


def test_stop_string_keeps_stopping_token_and_template_end_is_not_sampled(tiny_agent, samples):
    probe = tiny_agent.rollout(samples[:1], 1, "zoomgym/ZoomEnv-v0",
                               SamplingParams(temperature=0.0, max_new_tokens=6, stop_after_block=None))[0]
    first_turn = masked_runs(probe)[0]
    text = decode_text(tiny_agent.adapter, first_turn)
    assert len(text) >= 4
    stop = text[2:4]  # a stop string that ends inside the greedy turn
    traj = tiny_agent.rollout(samples[:1], 1, "zoomgym/ZoomEnv-v0",
                              SamplingParams(temperature=0.0, max_new_tokens=6, stop=(stop,)))[0]
    turn = masked_runs(traj)[0]
    assert turn == first_turn[: len(turn)] and stop in decode_text(tiny_agent.adapter, turn)
    assert stop not in decode_text(tiny_agent.adapter, turn[:-1])
    assert traj.finish_reasons[0] == "stop"
    ids, mask = traj.input_ids.tolist(), traj.loss_mask.tolist()
    end = mask.index(1) + len(turn)  # first position after the sampled turn
    # The template closes the turn: <|im_end|> appended with mask 0.
    assert ids[end] == tiny_agent.adapter.end_of_turn_id and mask[end] == 0


def test_context_budget_drops_the_whole_env_turn(tiny_agent, samples):
    sampling = SamplingParams(temperature=0.0, max_new_tokens=4)
    free = tiny_agent.rollout(samples[:1], 1, "zoomgym/ZoomEnv-v0", sampling)[0]
    prefix = free.loss_mask.tolist().index(1)
    budget = prefix + 4 + 10  # room for turn 1, not for the env's reply with its image
    traj = tiny_agent.rollout(samples[:1], 1, "zoomgym/ZoomEnv-v0", sampling, context_budget=budget)[0]
    assert traj.context_truncated and traj.truncated and not traj.terminated and traj.reward == 0.0
    assert traj.num_turns == 1 and traj.infos[-1]["context_truncated"] is True
    assert traj.length == prefix + traj.response_length <= budget
    assert len(traj.images) == 1  # the crop never entered the sequence
    tiny_agent.adapter.check_placeholders(traj.input_ids, traj.image_grid_thw)
    # A budget below the first prompt: no turn at all, still a well-formed trajectory.
    none = tiny_agent.rollout(samples[:1], 1, "zoomgym/ZoomEnv-v0", sampling, context_budget=prefix)[0]
    assert none.num_turns == 0 and none.context_truncated and none.response_length == 0


def test_weight_version_is_stamped(tiny_agent, samples):
    sampling = SamplingParams(temperature=0.0, max_new_tokens=2)
    default = tiny_agent.rollout(samples[:1], 2, "zoomgym/DirectVQA-v0", sampling)
    assert {t.weight_version for t in default} == {tiny_agent.backend.weight_version}
    stamped = tiny_agent.rollout(samples[:1], 2, "zoomgym/DirectVQA-v0", sampling, weight_version=7)
    assert {t.weight_version for t in stamped} == {7}


def test_env_factory_and_progress_bar(tiny_agent, samples, capsys):
    def make(sample):
        return gymnasium.make("zoomgym/DirectVQA-v0", dataset=[sample], view_budget=tiny_agent.view_budget,
                              coord_frame=tiny_agent.coord_frame)

    sampling = SamplingParams(temperature=0.0, max_new_tokens=2)
    trajectories = tiny_agent.rollout(samples[:2], 1, make, sampling, progress=True)
    assert [t.num_turns for t in trajectories] == [1, 1]
    assert "rollout" in capsys.readouterr().err


class _FailingStep:
    """An env whose ``step`` fails to decode the crop of sample ``bad`` (the file went bad mid-episode)."""

    def __init__(self, env):
        self.env = env

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, action):
        from zoomgym.envs.data import ImageLoadError

        if self.env.unwrapped._sample.id == "bad":
            raise ImageLoadError("sample 'bad': 'bad.jpg' is corrupt or truncated", "bad", "bad.jpg")
        return self.env.step(action)


def test_an_image_failing_to_decode_drops_its_group_and_is_reported_once(tiny_agent, samples, scripted, tmp_path):
    """Issue 10: one bad image killed training (and --resume repeated the crash); now its group is skipped."""
    import pytest
    from zoomgym.agents.rollout import env_factory
    from zoomgym.envs.data import ImageLoadError, Sample

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    broken = Sample("broken", str(tmp_path / "broken.png"), "q?", ("a", "b"), "A")
    batch = [samples[0], broken, samples[1]]
    with pytest.raises(ImageLoadError, match="sample 'broken'"):  # without a handler: as before
        run_rollouts(scripted([ZOOM, ANSWER]), tiny_agent.adapter, batch, 2, "zoomgym/ZoomEnv-v0", SamplingParams())
    errors = []
    trajectories = run_rollouts(scripted([ZOOM, ANSWER]), tiny_agent.adapter, batch, 2, "zoomgym/ZoomEnv-v0",
                                SamplingParams(), on_image_error=errors.append)
    assert [(t.sample_id, t.group_id) for t in trajectories] == [("s0", 0), ("s0", 0), ("s1", 2), ("s1", 2)]
    assert [e.sample_id for e in errors] == ["broken"]
    assert all(t.num_turns == 2 and t.terminated for t in trajectories)  # the others played to the end

    # A crop that fails mid-episode, in env.step: the same.
    bad = Sample("bad", samples[2].image, "q?", ("a", "b"), "A")
    make = env_factory("zoomgym/ZoomEnv-v0", view_budget=tiny_agent.view_budget, coord_frame=tiny_agent.coord_frame)
    errors.clear()
    trajectories = tiny_agent.rollout([bad, samples[0]], 2, lambda s: _FailingStep(make(s)), SamplingParams(
        temperature=0.0, max_new_tokens=4), on_image_error=errors.append)
    assert [t.sample_id for t in trajectories] == ["s0", "s0"] and [e.sample_id for e in errors] == ["bad"]


def test_text_agents_skip_unreadable_images_too(tmp_path, samples):
    from zoomgym.agents.rollout import play_episodes
    from zoomgym.agents.scripted import OracleAgent
    from zoomgym.envs.data import Sample

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)
    broken = Sample("broken", str(tmp_path / "broken.jpg"), "q?", ("a", "b"), "A")
    errors = []
    trajectories = play_episodes(OracleAgent(), [broken, samples[3]], 2, "zoomgym/ZoomEnv-v0",
                                 on_image_error=errors.append)
    assert [t.sample_id for t in trajectories] == ["s3", "s3"] and [e.sample_id for e in errors] == ["broken"]


def test_an_env_option_error_never_prints_the_dataset(samples):
    import io

    import pytest
    from PIL import Image
    from zoomgym.agents.rollout import env_factory
    from zoomgym.envs.data import Sample

    encoded = io.BytesIO()
    Image.new("RGB", (400, 400), "red").save(encoded, "PNG")
    heavy = Sample("heavy", encoded.getvalue() * 40, "q?", ("a", "b"), "A")
    with pytest.raises(TypeError) as error:
        env_factory("zoomgym/ZoomEnv-v0", {"clamp": "maybe"})(heavy)
    assert "Expects clamp to be a bool" in str(error.value) and len(str(error.value)) < 300


class _ThreadRecorder:
    """Records which thread ran each reset and step (episode seed order within a thread)."""

    def __init__(self, env, log):
        self.env, self.log = env, log

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self, **kwargs):
        import threading

        self.log.append(("reset", kwargs["options"]["sample"].id, kwargs.get("seed"), threading.get_ident()))
        return self.env.reset(**kwargs)

    def step(self, action):
        import threading

        self.log.append(("step", self.env.unwrapped._sample.id, None, threading.get_ident()))
        return self.env.step(action)


def test_envs_run_a_group_per_thread_and_the_episodes_are_those_of_a_plain_loop(tiny_agent, samples, monkeypatch):
    """Resets and steps run in a pool of threads, a group's in order in one thread;
    the trajectories equal those of the same rollout with every env in the calling thread."""
    import os
    import threading

    from zoomgym.agents import rollout
    from zoomgym.agents.rollout import env_factory

    make = env_factory("zoomgym/ZoomEnv-v0", view_budget=tiny_agent.view_budget, coord_frame=tiny_agent.coord_frame)
    sampling = SamplingParams(temperature=1.0, seed=3, max_new_tokens=6)

    def play(log):
        return tiny_agent.rollout(samples, 3, lambda s: _ThreadRecorder(make(s), log), sampling)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)  # 4 workers anywhere
    threaded_log: list = []
    threaded = play(threaded_log)
    monkeypatch.setattr(rollout, "map_in_threads", lambda function, items: [function(item) for item in items])
    plain_log: list = []
    plain = play(plain_log)

    assert [t.input_ids.tolist() for t in threaded] == [t.input_ids.tolist() for t in plain]
    assert all(torch.equal(a.sampling_logprobs, b.sampling_logprobs) and a.reward == b.reward and a.infos == b.infos
               for a, b in zip(threaded, plain))
    assert {ident for *_, ident in plain_log} == {threading.get_ident()}
    resets = [entry for entry in threaded_log if entry[0] == "reset"]
    thread_of = {}
    for _, sample_id, _, ident in resets:
        thread_of.setdefault(sample_id, set()).add(ident)
    assert all(len(idents) == 1 for idents in thread_of.values())  # a group's resets in one thread
    assert threading.get_ident() not in set().union(*thread_of.values())  # in the pool's threads
    for sample_id in thread_of:  # in order within the group: its seeds ascend
        seeds = [seed for _, sid, seed, _ in resets if sid == sample_id]
        assert seeds == sorted(seeds) and len(seeds) == 3
    assert any(entry[0] == "step" and entry[3] != threading.get_ident() for entry in threaded_log)
