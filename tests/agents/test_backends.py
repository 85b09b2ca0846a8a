"""Backends: the shared stop/log-prob contract, the hf sampler, and the vLLM adapter against fake engine
outputs shaped like vLLM's ``RequestOutput``/``CompletionOutput``/``Logprob`` (the real engine: GPU tests)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from zoomgym.agents.backends.base import GenerationRequest, SamplingParams, finish, stop_reached
from zoomgym.agents.backends.hf import sample_next
from zoomgym.agents.backends.vllm import (
    BANNED_LOGIT_BIAS,
    VLLMBackend,
    collapse_image_pads,
    generation_from_output,
    limit_mm_per_prompt,
    sampling_kwargs,
)
from zoomgym.agents.scoring import next_token_logprobs

# A toy "tokenizer": id i decodes to CHARS[i]; 9 is an end-of-turn id that decodes to nothing.
CHARS = ["`", "j", "s", "o", "n", "[", "1", "]", "\n", ""]


def decode(ids):
    return "".join(CHARS[i] for i in ids)


JSON_BLOCK = [0, 0, 0, 1, 2, 3, 4, 8, 5, 6, 7, 8, 0, 0, 0]  # ```json\n[1]\n```


def test_sampling_params_validate():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_new_tokens": 0},
                {"stop_after_block": ("```",)}):
        with pytest.raises(ValueError, match="Expects"):
            SamplingParams(**bad)
    assert SamplingParams(temperature=0).logprob_temperature == 1.0
    assert SamplingParams(temperature=0.5).logprob_temperature == 0.5


def test_stop_after_block_needs_the_closing_fence_after_the_opening_one():
    sampling = SamplingParams()
    assert not stop_reached("```json\n[1]\n", sampling)
    assert not stop_reached("``` and ```json", sampling)
    assert stop_reached("x ```json\n[1]\n```", sampling)
    assert stop_reached("a STOP b", SamplingParams(stop=("STOP",), stop_after_block=None))


def test_finish_cuts_at_the_first_stop_and_keeps_the_token_whole():
    sampling = SamplingParams(stop_token_ids=(9,))
    ids = JSON_BLOCK + [6, 6, 9]
    gen = finish(ids, [-float(i) for i in range(len(ids))], sampling, decode)
    assert gen.token_ids == JSON_BLOCK and gen.finish_reason == "stop"  # the third backtick closes the fence
    assert gen.logprobs == [-float(i) for i in range(len(JSON_BLOCK))]
    eos = finish([6, 9, 6], [-1.0, -2.0, -3.0], sampling, decode)
    assert eos.token_ids == [6, 9] and eos.finish_reason == "eos"
    length = finish([6, 6], [-1.0, -2.0], sampling, decode)
    assert length.token_ids == [6, 6] and length.finish_reason == "length"


def test_next_token_logprobs_definition_and_banned_ids():
    logits = torch.randn(3, 10)
    logp = next_token_logprobs(logits, 0.5, banned=(2, 7))
    expected = logits.clone()
    expected[:, [2, 7]] = float("-inf")
    assert torch.allclose(logp, torch.log_softmax(expected / 0.5, -1))
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3))


def test_sample_next_greedy_top_p_and_seeds():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 2)
    logp = next_token_logprobs(logits, 1.0)
    assert sample_next(logp, SamplingParams(temperature=0), [None, None]).tolist() == [1, 1]
    # top_p below the top token's mass leaves only the top token.
    tiny_p = SamplingParams(temperature=1.0, top_p=0.1)
    assert sample_next(logp, tiny_p, [None, None]).tolist() == [1, 1]

    def draws(seed):
        gens = [torch.Generator().manual_seed(seed) for _ in range(2)]
        return [sample_next(logp, SamplingParams(), gens).tolist() for _ in range(20)]

    assert draws(5) == draws(5) and draws(5) != draws(6)
    # Each row draws what torch.multinomial draws from its generator alone (seeded draws must not
    # depend on the batch, nor change from the loop of multinomials this replaced).
    wide = torch.log_softmax(torch.randn(6, 300, generator=torch.Generator().manual_seed(1)), dim=-1)
    batched = sample_next(wide, SamplingParams(), [torch.Generator().manual_seed(s) for s in range(6)])
    for seed, token in enumerate(batched.tolist()):
        assert token == torch.multinomial(wide[seed].exp(), 1, generator=torch.Generator().manual_seed(seed)).item()
    # top_p = 0.9 of [0.03, 0.64, 0.09, 0.24]: tokens 1, 3, 2 are kept (mass before 2 is 0.88 < 0.9).
    gens = [torch.Generator().manual_seed(0)] * 2
    seen = {t for _ in range(200) for t in sample_next(logp, SamplingParams(top_p=0.9), gens).tolist()}
    assert seen == {1, 2, 3}


def test_limit_mm_per_prompt_follows_the_image_budget():
    assert limit_mm_per_prompt(2) == {"image": 2, "video": 0}
    assert limit_mm_per_prompt(1) == {"image": 1, "video": 0}
    with pytest.raises(ValueError, match="max_images"):
        limit_mm_per_prompt(0)


def test_collapse_image_pads_checks_every_run():
    ids = [1, 50, 7, 7, 7, 51, 2, 50, 7, 7, 51]
    assert collapse_image_pads(ids, 7, [3, 2]) == [1, 50, 7, 51, 2, 50, 7, 51]
    with pytest.raises(ValueError, match="image pad runs"):
        collapse_image_pads(ids, 7, [3, 3])


# ---- fakes shaped like vLLM's outputs ----------------------------------------------------------------


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeLLM:
    """Records calls; returns one fixed continuation per prompt: ```json ... ``` then two more tokens."""

    def __init__(self):
        self.calls = []
        # vLLM's LLMEngine: the only method the backend calls on it
        self.llm_engine = SimpleNamespace(reset_encoder_cache=lambda: self.calls.append(("reset_encoder_cache",)))

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(("generate", prompts, params))
        ids = JSON_BLOCK + [6, 9]
        outs = []
        for _ in prompts:
            logprobs = [{tok: Logprob(-0.1 * (t + 1), 1, CHARS[tok])} for t, tok in enumerate(ids)]
            completion = SimpleNamespace(token_ids=tuple(ids), logprobs=logprobs, finish_reason="stop",
                                         stop_reason=9, text=decode(ids))
            outs.append(SimpleNamespace(request_id="0", outputs=[completion]))
        return outs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("collective_rpc", method, args, kwargs))
        assert method == "reload_weights" and kwargs["is_checkpoint_format"]  # the worker's in-place reload
        self.calls.append(("load_weights", [n for n, _ in kwargs["weights_iterator"]]))
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))


class FakeAdapter:
    image_pad_id, video_pad_id, vision_start_id, vision_end_id, min_pixels, max_pixels = 7, 8, 50, 51, 16, 64
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: decode(ids))

    @staticmethod
    def token_count(image):
        return image.size[0] * image.size[1] // 784


def test_vllm_requests_and_results():
    from PIL import Image

    llm = FakeLLM()
    backend = VLLMBackend(llm, FakeAdapter(), sampling_params_cls=FakeSamplingParams)
    image = Image.new("RGB", (56, 28))
    request = GenerationRequest([1, 50, 7, 7, 51, 2], [image], max_new_tokens=32, seed=123)
    sampling = SamplingParams(temperature=0.7, stop=("END",), stop_token_ids=(9,))
    (gen,) = backend.generate([request], sampling)
    _, prompts, params = llm.calls[0]
    assert prompts == [{"prompt_token_ids": [1, 50, 7, 51, 2], "multi_modal_data": {"image": [image]}}]
    kwargs = params[0].kwargs
    assert kwargs == sampling_kwargs(sampling, request, (7, 8, 50, 51))
    assert kwargs["logprobs"] == 0 and kwargs["seed"] == 123 and kwargs["max_tokens"] == 32
    assert kwargs["stop"] == ["END"] and kwargs["stop_token_ids"] == [9] and kwargs["temperature"] == 0.7
    assert kwargs["logit_bias"] == {i: BANNED_LOGIT_BIAS for i in (7, 8, 50, 51)}
    # The engine ran past the JSON block; the result is cut at the closing fence (token kept whole).
    assert gen.token_ids == JSON_BLOCK and gen.finish_reason == "stop"
    assert gen.logprobs == pytest.approx([-0.1 * (t + 1) for t in range(len(JSON_BLOCK))])
    with pytest.raises(ValueError, match="forced_ids"):
        backend.generate([GenerationRequest([1], forced_ids=[2])], sampling)


def test_vllm_result_without_logprobs_is_an_error():
    completion = SimpleNamespace(token_ids=(1,), logprobs=None)
    with pytest.raises(RuntimeError, match="log-probs"):
        generation_from_output(SimpleNamespace(outputs=[completion]), SamplingParams(), decode)


def test_vllm_weight_sync_sleep_and_wake():
    llm = FakeLLM()
    backend = VLLMBackend(llm, FakeAdapter(), sampling_params_cls=FakeSamplingParams)
    backend.sleep()
    with pytest.raises(RuntimeError, match="sleeping"):
        backend.generate([GenerationRequest([1])], SamplingParams())
    backend.load_weights({"lm_head.weight": torch.zeros(2, 2)}, version=3)
    names = [c[0] for c in llm.calls]
    # The reload is followed by both cache resets (an image seen before must be encoded again).
    assert names == ["sleep", "wake_up", "collective_rpc", "load_weights", "reset_encoder_cache",
                     "reset_prefix_cache", "wake_up"]
    assert llm.calls[1] == ("wake_up", ["weights"]) and llm.calls[-1] == ("wake_up", ["kv_cache"])
    assert llm.calls[3] == ("load_weights", ["lm_head.weight"])
    assert backend.weight_version == 3 and not backend.sleeping


def test_importing_backends_imports_neither_torch_nor_vllm():
    code = ("import sys, zoomgym.agents, zoomgym.agents.backends, zoomgym.agents.backends.vllm; "
            "print('torch' in sys.modules, 'vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_hf_backend_stops_and_caps(tiny_agent):
    adapter = tiny_agent.adapter
    prompt = adapter.encode_prefix([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
    sampling = SamplingParams(temperature=0.0, max_new_tokens=5, stop_token_ids=adapter.eos_ids)
    (free,) = tiny_agent.backend.generate([GenerationRequest(prompt, max_new_tokens=5)], sampling)
    assert len(free.token_ids) <= 5 and len(free.logprobs) == len(free.token_ids)
    (capped,) = tiny_agent.backend.generate([GenerationRequest(prompt, max_new_tokens=2)], sampling)
    assert capped.token_ids == free.token_ids[:2]
    assert capped.finish_reason in ("length", "eos")
    forced = [5, 6, adapter.end_of_turn_id]
    (scored,) = tiny_agent.backend.generate([GenerationRequest(prompt, forced_ids=forced)], sampling)
    assert scored.token_ids == forced and scored.finish_reason == "eos"


@pytest.mark.vllm
@pytest.mark.gpu
def test_vllm_engine_matches_hf_greedy(tiny_model_dir):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from zoomgym.agents.lmm import LMMAgent

    hf = LMMAgent.from_pretrained(tiny_model_dir, device="cuda")
    vl = LMMAgent.from_pretrained(tiny_model_dir, backend="vllm", max_images=1, dtype="float32",
                                  gpu_memory_utilization=0.2, enforce_eager=True)
    chat = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    assert vl.act([chat], [{}]) == hf.act([chat], [{}])
    vl.sync_weights(1)
    assert vl.backend.weight_version == 1


def test_stop_watcher_matches_whole_turn_decoding_and_decodes_only_a_tail():
    import random

    from zoomgym.agents.backends.base import StopWatcher
    from zoomgym.agents.models import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    lengths = []

    def decode_ids(ids):
        lengths.append(len(ids))
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    # Multi-byte characters split over several byte-level tokens, skipped special tokens, fences.
    pieces = ["```json\n", "[1, 2]", "\n```", "é", "中文", "😀", " ok", "``", "`", "STOP"]
    pool = [i for p in pieces for i in tokenizer.encode(p, add_special_tokens=False)]
    pool += [tokenizer.convert_tokens_to_ids(t) for t in ("<|box_start|>", "<|object_ref_end|>")]
    rng = random.Random(0)
    rules = [SamplingParams(), SamplingParams(stop=("STOP", "中"), stop_after_block=None),
             SamplingParams(stop=("😀",))]
    for trial in range(60):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        sampling = rules[trial % len(rules)]
        expected = next((k for k in range(1, len(ids) + 1) if stop_reached(decode_ids(ids[:k]), sampling)), None)
        lengths.clear()
        watcher = StopWatcher(sampling, decode_ids)
        got = next((k for k, tok in enumerate(ids, 1) if watcher.add(tok)), None)
        assert got == expected, (ids, sampling)
        # Each token decodes a short window (the characters still open), never the whole turn.
        assert max(lengths) <= 12 or max(lengths) < len(ids) // 3
        full = decode_ids(watcher.ids)
        assert watcher.text == full or full.endswith("\ufffd")


def test_hf_backend_never_emits_placeholder_or_vision_ids(tiny_model_dir):
    """Even a model whose logits favour the placeholders by 1e4 cannot sample them."""
    from zoomgym.agents.backends.base import placeholder_ids
    from zoomgym.agents.lmm import LMMAgent

    agent = LMMAgent.from_pretrained(tiny_model_dir)
    adapter = agent.adapter
    banned = placeholder_ids(adapter)
    assert set(banned) >= {adapter.image_pad_id, adapter.video_pad_id, adapter.vision_start_id,
                           adapter.vision_end_id}

    def favour_banned(module, args, logits):
        return logits.index_add(-1, torch.tensor(banned), torch.full((*logits.shape[:-1], len(banned)), 1e4))

    agent.model.lm_head.register_forward_hook(favour_banned)
    prompt = adapter.encode_prefix([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
    for sampling in (SamplingParams(temperature=0.0, max_new_tokens=12),
                     SamplingParams(temperature=1.5, seed=0, max_new_tokens=12)):
        gens = agent.backend.generate([GenerationRequest(prompt, max_new_tokens=12, seed=s) for s in range(4)],
                                      sampling)
        assert all(tok not in banned for g in gens for tok in g.token_ids)
        assert all(torch.isfinite(torch.tensor(g.logprobs)).all() for g in gens)


def test_vllm_engine_gets_the_requested_dtype_and_the_default_envs_image_budget(tiny_model_dir, fake_vllm):
    """Issue 9, bug 2: dtype="float32" was consumed by LMMAgent and the engine defaulted to bfloat16."""
    from zoomgym.agents.backends.vllm import VLLMBackend
    from zoomgym.agents.lmm import LMMAgent

    agent = LMMAgent.from_pretrained(tiny_model_dir, backend="vllm", dtype="float32")
    (engine,) = fake_vllm.built
    assert engine["dtype"] == "float32" and engine["model"] == str(tiny_model_dir)
    assert engine["limit_mm_per_prompt"] == {"image": 2, "video": 0}  # zoomgym/ZoomEnv-v0: view + crop
    assert engine["enable_prefix_caching"] is True  # a group's shared image and prompt are computed once
    assert isinstance(agent.backend, VLLMBackend) and not agent.backend.shares_model
    assert not agent.backend.can_sleep and not agent.backend.logprobs_match_trainer
    LMMAgent.from_pretrained(tiny_model_dir, backend="vllm", dtype=torch.bfloat16, max_images=4,
                             enable_sleep_mode=True)
    assert fake_vllm.built[-1]["dtype"] == "bfloat16" and fake_vllm.built[-1]["limit_mm_per_prompt"]["image"] == 4


def test_backends_are_chosen_by_registry_name(tiny_model_dir):
    from zoomgym.agents.backends import BACKENDS
    from zoomgym.agents.backends.hf import HFBackend
    from zoomgym.agents.lmm import LMMAgent

    assert sorted(BACKENDS) == ["hf", "vllm"] and BACKENDS["hf"] is HFBackend
    agent = LMMAgent.from_pretrained(tiny_model_dir, backend="hf", max_batch_size=3)
    assert isinstance(agent.backend, HFBackend) and agent.backend.max_batch_size == 3
    assert agent.backend.shares_model and agent.backend.logprobs_match_trainer and agent.backend.model is agent.model
    with pytest.raises(ValueError, match=r"rollout backend name in \['hf', 'vllm'\].*Did you mean 'vllm'"):
        LMMAgent.from_pretrained(tiny_model_dir, backend="vlm")


def test_vllm_engine_per_rank_under_torchrun_and_engine_options(tiny_model_dir, fake_vllm, monkeypatch):
    """Under a process group started by torchrun each rank gets its own engine (vLLM's external launcher);
    a single process, or an earlier engine's own group without torchrun's variables, gets a plain engine."""
    import torch.distributed as dist
    from zoomgym.agents.backends.vllm import EXTERNAL_LAUNCHER_VARIABLES, engine_placement
    from zoomgym.agents.lmm import LMMAgent

    options = {"enforce_eager": True, "kv_cache_memory_bytes": 2**20}
    LMMAgent.from_pretrained(tiny_model_dir, backend="vllm", dtype="float32", engine_options=options)
    assert "distributed_executor_backend" not in fake_vllm.built[-1]
    assert {k: fake_vllm.built[-1][k] for k in options} == options
    with pytest.raises(ValueError, match=r"other than the arguments the backend sets, actual: \['seed'\]"):
        LMMAgent.from_pretrained(tiny_model_dir, backend="vllm", dtype="float32", engine_options={"seed": 3})

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    assert engine_placement(1) == {}  # a process group, but not torchrun's
    for name in EXTERNAL_LAUNCHER_VARIABLES:
        monkeypatch.setenv(name, "0")
    LMMAgent.from_pretrained(tiny_model_dir, backend="vllm", dtype="float32", engine_dtype="bfloat16")
    built = fake_vllm.built[-1]
    assert built["distributed_executor_backend"] == "external_launcher" and built["dtype"] == "bfloat16"
    assert "data_parallel_size" not in built  # vLLM's own DP would make every generate call a collective
    with pytest.raises(ValueError, match="tensor_parallel_size 1 under torch.distributed"):
        engine_placement(2)


def test_vllm_weights_stream_whole_tensors_one_at_a_time():
    """`load_weights` hands the engine a lazy stream: a sharded tensor is gathered when the engine reads it."""
    gathered: list[str] = []

    class Shard:  # stands in for FSDP2's DTensor
        def __init__(self, name, whole):
            self.name, self.whole = name, whole

        def full_tensor(self):
            gathered.append(self.name)
            return self.whole

    read: list[tuple[str, list[str]]] = []

    class StreamingLLM(FakeLLM):
        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            for name, tensor in kwargs["weights_iterator"]:
                read.append((name, list(gathered)))  # what had been gathered when this tensor arrived
                assert isinstance(tensor, torch.Tensor) and not tensor.requires_grad
            return [None]

    backend = VLLMBackend(StreamingLLM(), FakeAdapter(), sampling_params_cls=FakeSamplingParams)
    weights = {"a": Shard("a", torch.ones(2, requires_grad=True)), "b": torch.zeros(3), "c": Shard("c", torch.ones(1))}
    assert gathered == []
    backend.load_weights(weights, version=1)
    assert read == [("a", ["a"]), ("b", ["a"]), ("c", ["a", "c"])]
