"""The hf backend's group-aware decoding (`agents.backends.cascade`): each group's shared prefix stored and
read once, each row's own columns apart, the two attention parts merged by log-sum-exp.

Attention against a per-row float64 softmax over the row's prefix and own keys (decode and prefill chunks,
grouped-query heads, padding, groups of different sizes, rows without a group, rows leaving); whole
rollouts against one plain forward per episode (no cache, the model's own attention) within 1e-6 in fp32.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from zoomgym.agents.backends.base import SamplingParams
from zoomgym.agents.backends.cascade import GroupCache, GroupLayer, SharedPrefix, group_attention
from zoomgym.agents.backends.hf import HFBackend
from zoomgym.agents.rollout import run_rollouts

CACHE_TOL = 1e-6
KV_HEADS, REP, DIM = 2, 3, 8  # 6 query heads on 2 key/value heads


def random_prefix(length, generator):
    return SharedPrefix([(torch.randn(KV_HEADS, length, DIM, generator=generator, dtype=torch.float64),
                          torch.randn(KV_HEADS, length, DIM, generator=generator, dtype=torch.float64))])


def random_own(length, generator):
    return [(torch.randn(KV_HEADS, length, DIM, generator=generator, dtype=torch.float64),
             torch.randn(KV_HEADS, length, DIM, generator=generator, dtype=torch.float64))]


def reference(query, rows, new_keys, new_values, new_valid):
    """Per row and head: softmax over [its prefix | its own kept keys | the new keys up to its own, a pad
    seeing itself], in float64. ``query (B, H, Q, d)``; returns ``(B, Q, H, d)``."""
    batch, heads, queries, dim = query.shape
    out = torch.empty(batch, queries, heads, dim, dtype=torch.float64)
    for b, (prefix, own) in enumerate(rows):
        keys = [t[0][0] for t in ([prefix.layers] if prefix else []) + ([own] if own else [])]
        values = [t[0][1] for t in ([prefix.layers] if prefix else []) + ([own] if own else [])]
        for q in range(queries):
            seen = [j for j in range(queries) if j == q or (j < q and new_valid[b, j])]
            k = torch.cat([*keys, new_keys[b][:, seen]], dim=1)
            v = torch.cat([*values, new_values[b][:, seen]], dim=1)
            for h in range(heads):
                weights = torch.softmax(query[b, h, q] @ k[h // REP].T * dim**-0.5, dim=-1)
                out[b, q, h] = weights @ v[h // REP]
    return out


def attend(cache, queries, generator, new_valid):
    """One forward's attention of layer 0 over ``cache`` with random new queries, keys and values."""
    batch = len(cache.group)
    query = torch.randn(batch, KV_HEADS * REP, queries, DIM, generator=generator, dtype=torch.float64)
    keys = torch.randn(batch, KV_HEADS, queries, DIM, generator=generator, dtype=torch.float64)
    values = torch.randn(batch, KV_HEADS, queries, DIM, generator=generator, dtype=torch.float64)
    mask = cache.mask(new_valid)["full_attention"]
    all_keys, all_values = cache.layers[0].update(keys, values)
    out = mask.attend(SimpleNamespace(layer_idx=0), query, all_keys, all_values, DIM**-0.5)
    return query, keys, values, out


@pytest.mark.parametrize("queries", [1, 4])
def test_split_attention_equals_one_softmax_per_row(queries):
    """Groups of 3, 1 and 2 rows in mixed order, prefixes of different lengths, own columns padded, a row
    without a group: every row's output is its own softmax."""
    g = torch.Generator().manual_seed(0)
    a, b, c = random_prefix(5, g), random_prefix(2, g), random_prefix(7, g)
    rows = [(a, random_own(3, g)), (b, None), (a, random_own(1, g)), (c, random_own(2, g)), (a, None),
            (None, random_own(2, g)), (c, random_own(4, g))]
    new_valid = torch.ones(len(rows), queries, dtype=torch.bool)
    if queries > 1:  # left pads of a chunk (a decode step's token is always valid)
        new_valid[1, 0] = new_valid[3, :2] = False
    cache = GroupCache.for_prefill(rows, 1, torch.device("cpu"))
    assert cache.group.tolist() == [0, 1, 0, 2, 0, -1, 2] and cache.group_size == 3
    query, keys, values, out = attend(cache, queries, g, new_valid)
    assert (out - reference(query, rows, keys, values, new_valid)).abs().max() < 1e-12


def test_the_repeated_heads_path_of_cuda_equals_grouped_heads(monkeypatch):
    """CUDA repeats the key/value heads for the fused kernel (its masked GQA is unfused): the same outputs."""
    import zoomgym.agents.backends.cascade as cascade

    g = torch.Generator().manual_seed(7)
    rows = [(random_prefix(3, g), random_own(2, g)), (None, random_own(4, g))]
    new_valid = torch.tensor([[False, True, True], [True, True, True]])
    for kernel in (True, False):
        monkeypatch.setattr(cascade, "_masked_gqa_kernel", lambda device, kernel=kernel: kernel)
        cache = GroupCache.for_prefill(rows, 1, torch.device("cpu"))
        query, keys, values, out = attend(cache, 3, torch.Generator().manual_seed(8), new_valid)
        assert (out - reference(query, rows, keys, values, new_valid)).abs().max() < 1e-12


def test_other_groups_never_leak_in():
    g = torch.Generator().manual_seed(2)
    a, b = random_prefix(4, g), random_prefix(4, g)
    rows = [(a, random_own(2, g)), (b, random_own(2, g)), (a, random_own(2, g))]
    valid = torch.ones(3, 1, dtype=torch.bool)
    _, _, _, before = attend(GroupCache.for_prefill(rows, 1, torch.device("cpu")), 1,
                             torch.Generator().manual_seed(3), valid)
    b.layers[0][0].add_(1.0)
    b.layers[0][1].add_(1.0)
    _, _, _, after = attend(GroupCache.for_prefill(rows, 1, torch.device("cpu")), 1,
                            torch.Generator().manual_seed(3), valid)
    assert torch.equal(before[[0, 2]], after[[0, 2]]) and not torch.equal(before[1], after[1])


def test_promote_fork_select_and_keep():
    """A prefill of two fresh rows and one with a past: the fresh rows become prefixes shared by their forks,
    rows leave (a group with them), and what a row keeps is its prefix object and its own valid columns."""
    g = torch.Generator().manual_seed(4)
    past = random_prefix(3, g)
    rows = [(None, None), (past, random_own(2, g)), (None, None)]
    cache = GroupCache.for_prefill(rows, 1, torch.device("cpu"))
    new_valid = torch.tensor([[False, True, True], [True, True, True], [True, True, True]])
    query, keys, values, out = attend(cache, 3, g, new_valid)
    assert (out - reference(query, rows, keys, values, new_valid)).abs().max() < 1e-12
    cache.promote(torch.tensor([True, False, True]))
    cache.batch_select_indices(torch.tensor([0, 0, 1, 2, 2, 2]))  # groups of 2, 1, 3
    assert cache.group.tolist() == [1, 1, 0, 2, 2, 2] and cache.prefixes[0] is past
    fresh = cache.prefixes[1]
    assert torch.equal(fresh.layers[0][0], keys[0][:, 1:])  # row 0's two valid columns, now shared
    prefix, own = cache.kept(2)  # the row with a past: its prefix object, its 2 + 3 own columns
    assert prefix is past and torch.equal(own[0][0], torch.cat([rows[1][1][0][0], keys[1]], dim=1))
    assert cache.kept(0)[1][0][0].shape[1] == 0  # a fresh row's columns all went into its prefix

    step_rows = [(cache.prefixes[int(gr)], None) for gr in cache.group]
    cache.batch_select_indices(torch.tensor([0, 3, 5]))  # group 0 (the past) has no row left
    assert len(cache.prefixes) == 2 and cache.group.tolist() == [0, 1, 1]
    query, keys, values, out = attend(cache, 1, g, torch.ones(3, 1, dtype=torch.bool))
    expected = reference(query, [step_rows[i] for i in (0, 3, 5)], keys, values, torch.ones(3, 1, dtype=torch.bool))
    assert (out - expected).abs().max() < 1e-12


def test_capacity_doubles_instead_of_growing_per_token():
    g = torch.Generator().manual_seed(5)
    cache = GroupCache.for_prefill([(random_prefix(2, g), None)] * 2, 1, torch.device("cpu"))
    capacities = []
    for _ in range(100):
        attend(cache, 1, g, torch.ones(2, 1, dtype=torch.bool))
        capacities.append(cache.layers[0].keys.shape[2])
    assert cache.length == 100 and sorted(set(capacities)) == [64, 128]


def test_the_switch_is_undone_even_when_the_forward_raises(tiny_agent):
    config = tiny_agent.model.config.text_config
    before = config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), group_attention(tiny_agent.model):
        assert config._attn_implementation != before
        raise RuntimeError("boom")
    assert config._attn_implementation == before
    assert tiny_agent.model.config.vision_config._attn_implementation == before


# ---- whole rollouts ------------------------------------------------------------------------------------


def per_row_gap(agent, trajectories, temperature):
    """Max |sampling log-prob - the log-prob of one plain forward of the episode alone| over model tokens."""
    gap = 0.0
    for traj in trajectories:
        batch = agent.collate([traj])
        with torch.no_grad():
            logp, _ = agent.token_logprobs(batch, temperature=temperature)
        mask = batch["loss_mask"].bool()
        gap = max(gap, (logp[mask] - batch["sampling_logprobs"][mask]).abs().max().item())
    return gap


@pytest.mark.parametrize(("env_id", "env_kwargs", "group", "turns"), [
    ("zoomgym/DirectVQA-v0", {}, 3, 1),
    ("zoomgym/ZoomEnv-v0", {}, 1, 2),
    ("zoomgym/ZoomEnvMultiTurn-v0", {"max_turns": 3}, 2, 3),
])
def test_rollouts_equal_plain_forwards_per_episode(tiny_agent, samples, env_id, env_kwargs, group, turns):
    # A common stop string: rows finish at different steps (the tiny model's text is never a valid action,
    # so the zoom envs still play every turn).
    sampling = SamplingParams(temperature=0.8, seed=2, max_new_tokens=12, stop=("e",))
    played = tiny_agent.rollout(samples, group, env_id, sampling, env_kwargs=env_kwargs)
    assert {t.num_turns for t in played} == {turns}
    assert len({len(t.actions[0]) for t in played}) > 1  # first turns of different lengths
    assert per_row_gap(tiny_agent, played, 0.8) < CACHE_TOL
    assert tiny_agent.model.config.text_config._attn_implementation == "sdpa"  # the trainer's, untouched


@pytest.mark.parametrize("group", [3, 1])
def test_a_group_shares_one_prefix_in_every_turn(tiny_agent, samples, group):
    """After the last turn each episode's kept cache still reads its group's first prompt from one object
    (a group of one row keeps everything as its own)."""
    backend = HFBackend(tiny_agent.model, tiny_agent.adapter)
    played = run_rollouts(backend, tiny_agent.adapter, samples[:2], group, "zoomgym/ZoomEnvMultiTurn-v0",
                          SamplingParams(temperature=1.0, seed=5, max_new_tokens=6), env_kwargs={"max_turns": 3})
    assert {t.num_turns for t in played} == {3} and len(backend._kept) == len(played)
    prefixes = [kept.prefix for kept in backend._kept.values()]
    if group == 1:
        assert prefixes == [None, None]
        return
    assert len({id(p) for p in prefixes}) == 2 and all(prefixes.count(p) == group for p in prefixes)
    for kept in backend._kept.values():
        assert kept.prefix.length + kept.layers[0][0].shape[1] == len(kept.ids)


def test_forced_turns_equal_plain_forwards(tiny_agent, samples, scripted):
    texts = ['```json\n[{"bbox_2d": [12, 20, 150, 100], "label": "a"}]\n```', "It is \\boxed{A}"]
    played = run_rollouts(scripted(texts), tiny_agent.adapter, samples, 2, "zoomgym/ZoomEnv-v0",
                          SamplingParams(temperature=1.0))
    assert {t.num_turns for t in played} == {2}
    assert per_row_gap(tiny_agent, played, 1.0) < CACHE_TOL


def test_split_batches_sample_what_one_batch_samples(tiny_agent, samples):
    """``max_batch_size=3`` cuts groups across batches (a group's rows then have one prefix per batch):
    the same tokens, log-probs within 1e-6."""
    sampling = SamplingParams(temperature=1.0, seed=4, max_new_tokens=8)
    split = HFBackend(tiny_agent.model, tiny_agent.adapter, max_batch_size=3)
    played = {name: run_rollouts(backend, tiny_agent.adapter, samples, 2, "zoomgym/ZoomEnvMultiTurn-v0", sampling,
                                 env_kwargs={"max_turns": 3})
              for name, backend in (("whole", tiny_agent.backend), ("split", split))}
    assert [t.input_ids.tolist() for t in played["split"]] == [t.input_ids.tolist() for t in played["whole"]]
    assert max((a.sampling_logprobs - b.sampling_logprobs).abs().max().item()
               for a, b in zip(played["split"], played["whole"])) < CACHE_TOL
    assert per_row_gap(tiny_agent, played["split"], 1.0) < CACHE_TOL


def test_sliding_window_models_take_the_plain_path(tiny_model_dir, tiny_agent, samples, tmp_path):
    """A model whose layers are sliding-window ones (a window longer than any episode: the same function)
    samples through a ``DynamicCache`` and keeps nothing, with the same tokens as the group path."""
    from zoomgym.agents.lmm import LMMAgent

    folder = shutil.copytree(tiny_model_dir, tmp_path / "sliding")
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    text.update(use_sliding_window=True, sliding_window=100_000, max_window_layers=0,
                layer_types=["sliding_attention"] * text["num_hidden_layers"])
    (folder / "config.json").write_text(json.dumps(config))
    sliding = LMMAgent.from_pretrained(folder)
    sampling = SamplingParams(temperature=1.0, seed=6, max_new_tokens=8)
    played = {name: run_rollouts(agent.backend, agent.adapter, samples[:2], 2, "zoomgym/ZoomEnv-v0", sampling)
              for name, agent in (("sliding", sliding), ("group", tiny_agent))}
    assert not sliding.backend._kept
    assert [t.input_ids.tolist() for t in played["sliding"]] == [t.input_ids.tolist() for t in played["group"]]
    assert max((a.sampling_logprobs - b.sampling_logprobs).abs().max().item()
               for a, b in zip(played["sliding"], played["group"])) < CACHE_TOL


def test_unkeyed_requests_are_prefilled_whole(tiny_agent, samples):
    """Without cache keys nothing is shared or kept, and the draws are the keyed ones."""
    sampling = SamplingParams(temperature=1.0, seed=8, max_new_tokens=6)
    prompts = [tiny_agent.adapter.encode_prefix([{"role": "user", "content": "Say something"}])] * 3
    from zoomgym.agents.backends.base import GenerationRequest

    requests = [GenerationRequest(p, max_new_tokens=6, seed=i, cache_key=("k", i)) for i, p in enumerate(prompts)]
    keyed = tiny_agent.backend.generate(requests, sampling)
    unkeyed = tiny_agent.backend.generate([dataclasses.replace(r, cache_key=None) for r in requests], sampling)
    assert not tiny_agent.backend._kept
    assert [g.token_ids for g in keyed] == [g.token_ids for g in unkeyed]
    assert max(abs(a - b) for x, y in zip(keyed, unkeyed) for a, b in zip(x.logprobs, y.logprobs)) < CACHE_TOL


def test_bf16_models_keep_their_dtype(tiny_model_dir, samples, monkeypatch):
    """Nothing assumes float32: a bf16 model's caches are bf16 and its log-probs stay near the trainer's
    (bf16 roundings differ between the two forwards; float32 is where they match to 1e-6)."""
    from zoomgym.agents.lmm import LMMAgent

    agent = LMMAgent.from_pretrained(tiny_model_dir, dtype="bfloat16")
    seen = []
    update = GroupLayer.update

    def record(self, key_states, value_states, *args, **kwargs):
        seen.append(key_states.dtype)
        return update(self, key_states, value_states, *args, **kwargs)

    monkeypatch.setattr(GroupLayer, "update", record)
    played = agent.rollout(samples[:2], 2, "zoomgym/ZoomEnv-v0", SamplingParams(temperature=1.0, seed=3, max_new_tokens=6))
    assert set(seen) == {torch.bfloat16} and all(t.num_turns == 2 for t in played)
    assert per_row_gap(agent, played, 1.0) < 0.03  # measured 3e-3
    assert all(kept.layers[0][0].dtype == torch.bfloat16 for kept in agent.backend._kept.values())


@pytest.mark.parametrize("queries", [1, 5])
def test_unpadded_rows_without_prefix_need_no_mask(queries):
    """A whole unpadded prompt (causal) and a decode step over valid columns run the kernel unmasked."""
    g = torch.Generator().manual_seed(9)
    rows = [(None, None), (None, None)] if queries > 1 else [(None, random_own(3, g))] * 2
    cache = GroupCache.for_prefill(rows, 1, torch.device("cpu"))
    new_valid = torch.ones(2, queries, dtype=torch.bool)
    query, keys, values, out = attend(cache, queries, g, new_valid)
    mask = GroupCache.for_prefill(rows, 1, torch.device("cpu")).mask(new_valid)["full_attention"]
    assert mask.bias is None and mask.causal == (queries > 1)
    assert (out - reference(query, rows, keys, values, new_valid)).abs().max() < 1e-12
