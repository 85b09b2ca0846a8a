"""The memory pre-flight: parameter counts against real models, the usual arithmetic for 7B, the verdicts
on the shipped configs, and the estimate against a measured training step of the tiny model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from zoomgym.algorithms import preflight as pf
from zoomgym.algorithms.cli import main
from zoomgym.algorithms.config import Config, load_config, validate

from zoomgym import algorithms

REPO = Path(__file__).resolve().parents[2]
QWEN25_7B = pf.KNOWN_ARCHITECTURES["Qwen/Qwen2.5-VL-7B-Instruct"]


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_parameter_counts_equal_the_built_models(arch: str, tmp_path: Path) -> None:
    """P from config.json alone equals the loaded model's parameters; P_a the trainer's LoRA parameters."""
    pytest.importorskip("peft")
    from transformers import AutoModelForImageTextToText
    from zoomgym.agents.models import build_tiny_model
    from zoomgym.algorithms.config import LoraConfig, ModelConfig
    from zoomgym.algorithms.trainer import prepare_model

    folder = build_tiny_model(tmp_path / arch, size="1m", arch=arch)
    architecture = pf.read_architecture(str(folder))
    assert architecture.kind == arch and str(folder) in architecture.source
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert architecture.params() == sum(p.numel() for p in model.parameters())
    targets = ["q_proj", "v_proj", "down_proj"]
    prepare_model(model, ModelConfig(lora=LoraConfig(enabled=True, rank=4, target_modules=targets)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert architecture.lora_params(4, targets) == trainable


def test_7b_matches_the_usual_arithmetic() -> None:
    """bf16 weights and gradients, fp32 master weights and AdamW: 16 bytes/param, over N ranks with FSDP."""
    p = QWEN25_7B.params()
    assert 8.28e9 < p < 8.30e9  # Qwen2.5-VL-7B-Instruct: 8.29B parameters
    assert "built-in table" in pf.read_architecture("Qwen/Qwen2.5-VL-7B-Instruct").source
    for n in (1, 8):
        state = pf.training_state(QWEN25_7B, pf.Layout(world_size=n, shard=n > 1, mixed_precision=True))
        per_param = {k: v for k, v in state.items() if k != "FSDP all-gathered units"}
        assert sum(per_param.values()) == pytest.approx(16 * p / n, abs=4)
    single = pf.training_state(QWEN25_7B, pf.Layout(dtype_bytes=2))  # one process: AdamW in bf16
    assert sum(single.values()) == 8 * p
    lora = pf.training_state(QWEN25_7B, pf.Layout(dtype_bytes=2, lora_rank=16, reference_copy=True,
                                                  lora_targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj")))
    adapters = 16 * 28 * (9 * 3584 + 2 * 512 + 3 * 18944)  # rank * layers * sum(in + out)
    assert lora == {"weights": 2 * p, "adapters (weights, gradients, AdamW; float32)": 16 * adapters}


def shipped(name: str, tmp_path: Path, *overrides: str) -> Config:
    """A shipped config with its data pointed at empty stand-ins, validated."""
    cfg = load_config(REPO / "configs" / name, overrides)
    for i, spec in enumerate([cfg.data.train, *cfg.data.val]):
        if spec.path is not None:
            spec.path = str(tmp_path / f"data{i}")
            Path(spec.path).mkdir(exist_ok=True)
    validate(cfg)
    return cfg


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_validates(name: str, tmp_path: Path, tiny_model_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from zoomgym.algorithms.config import validate_sft

    monkeypatch.chdir(tmp_path)  # the quickstart's model is built on first use, relative to the working folder
    # The toy base's SFT starts from a folder `zoomgym toy-base` makes first: a tiny model stands in.
    cfg = shipped(name, tmp_path, *([f"model.path={tiny_model_dir}"] if name == "toy_base.yaml" else []))
    if cfg.sft.train:
        validate_sft(cfg)


def test_the_7b_variants_state_only_what_differs_from_the_paper() -> None:
    from zoomgym.algorithms.config import to_dict

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    paper = flat(to_dict(load_config(REPO / "configs" / "mgpo_qwen2_5_vl_7b.yaml")))
    for name, expected in (
        ("mgpo_qwen2_5_vl_7b_8gpu.yaml", {"name", "model.dtype", "rollout.vllm.tensor_parallel_size",
                                          "rollout.vllm.engine_dtype", "rollout.max_context_tokens",
                                          "trainer.micro_batch_size"}),
        ("mgpo_qwen2_5_vl_7b_1gpu_lora.yaml", {"name", "rollout.max_context_tokens", "trainer.micro_batch_size",
                                               "model.lora.enabled", "rollout.vllm.tensor_parallel_size"}),
    ):
        variant = flat(to_dict(load_config(REPO / "configs" / name)))
        assert {k for k in paper if paper[k] != variant[k]} == expected, name


def test_verdicts_on_the_7b_configs(tmp_path: Path) -> None:
    eight = shipped("mgpo_qwen2_5_vl_7b_8gpu.yaml", tmp_path)
    fsdp = pf.preflight(eight, world_size=8, gpu_mem_gib=80)
    assert fsdp.fits and fsdp.layout.shard and fsdp.layout.mixed_precision, pf.describe(fsdp)
    one = pf.preflight(eight, world_size=1, gpu_mem_gib=80)  # plain full fine-tuning of 7B on one GPU
    assert not one.fits and any(k.startswith("model.lora.enabled=true") for k in pf.knobs(one))
    lora = pf.preflight(shipped("mgpo_qwen2_5_vl_7b_1gpu_lora.yaml", tmp_path), world_size=1, gpu_mem_gib=80)
    assert lora.fits and lora.layout.lora_rank == 16, pf.describe(lora)
    # The paper's config without the context bound: a 19.5K-token worst case needs more than a GPU per episode.
    paper = pf.preflight(shipped("mgpo_qwen2_5_vl_7b.yaml", tmp_path), world_size=8, gpu_mem_gib=80)
    assert paper.workload.tokens_per_episode == 2 * (pf.DEFAULT_PROMPT_TOKENS + 8192) + 2 * (1280 + 2)
    assert not paper.fits and any(k.startswith("trainer.micro_batch_size=1") for k in pf.knobs(paper))


def test_preflight_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(REPO / "configs" / "mgpo_qwen2_5_vl_7b_8gpu.yaml")
    assert main(["preflight", config, "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "FSDP over 8 ranks" in out and ": fits" in out and "built-in table (Qwen2.5-VL-7B" in out
    assert main(["preflight", config, "--gpu-mem", "80"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["preflight", config, "model.path=/nonexistent/model"]) == 2
    assert "model.path" in capsys.readouterr().err


def test_train_refuses_a_gpu_run_that_cannot_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pf, "device_capacity", lambda cfg, gib: (80 * pf.GIB, "cuda"))
    config = REPO / "configs" / "mgpo_qwen2_5_vl_7b_8gpu.yaml"
    data = [f"data.train.path={tmp_path}", "data.val=[]", f"logging.run_dir={tmp_path / 'run'}"]
    assert main(["train", str(config), *data]) == 2
    err = capsys.readouterr().err
    assert "does NOT fit" in err and "model.lora.enabled=true" in err and "--skip-preflight" in err
    assert not (tmp_path / "run").exists()


def test_a_cpu_run_is_never_refused(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config("trainer.micro_batch_size=64")
    may_start, message = pf.train_gate(cfg)
    assert may_start and "not enforced" in message
    assert pf.preflight(cfg, gpu_mem_gib=1e-3).fits is False  # the same config on a tiny GPU is refused


@pytest.mark.parametrize("options", [
    ("trainer.micro_batch_size=2",),
    ("trainer.micro_batch_size=1", "model.gradient_checkpointing=true"),
    ("trainer.micro_batch_size=4", "rollout.max_new_tokens=32"),
    ("trainer.micro_batch_size=2", "model.lora.enabled=true", "model.lora.rank=8"),
], ids=["micro-2", "micro-1-checkpointing", "micro-4-long-turns", "lora"])
def test_estimate_within_30_percent_of_a_measured_step(tiny_config: Callable[..., Config],
                                                       options: tuple[str, ...]) -> None:
    """The tiny model's second MGPO step (AdamW states exist, gradients kept from the first), measured
    through torch's CPU allocator (`preflight.measure_peak`), against the estimate of its config.

    Measured with whole rows (``trainer.share_prompts=false``): the estimate is of the worst case, in
    which no two episodes of a micro-batch share their prompt; sharing only computes less."""
    from zoomgym.algorithms.build import build_agent

    cfg = tiny_config("algorithm.name=mgpo", "trainer.mini_batch_prompts=2", "trainer.val_before_train=false",
                      "data.val=[]", "trainer.share_prompts=false", *options)
    algo = algorithms.make("mgpo", agent=build_agent(cfg), config=cfg)
    _, first = algo.train_step()
    algo.step += 1
    (_, trajectories), measured = pf.measure_peak(algo.train_step, "cpu", pf.trainer_tensors(algo))
    prompt = pf.observed_prompt_tokens(first + trajectories, pf.read_architecture(cfg.model.path))
    result = pf.preflight(cfg, prompt_tokens=prompt)
    assert result.workload.tokens_per_episode >= max(t.length for t in trajectories)
    assert measured == pytest.approx(result.peak, rel=0.3), f"measured {measured} bytes\n{pf.describe(result)}"
    resident = pf.storage_bytes(pf.trainer_tensors(algo))  # the state terms, exactly but AdamW's step counters
    state = sum(v for k, v in result.update.items() if k in ("weights", "gradients", "AdamW states", "reference model",
                                                             "adapters (weights, gradients, AdamW; float32)"))
    assert resident == pytest.approx(state, rel=1e-3)
    assert measured > 1.2 * resident  # the step's own tensors are measured, not only what was resident


def test_measure_peak_on_cpu_sees_a_temporary() -> None:
    def work() -> float:
        big = torch.ones(1_000_000)  # 4 MB, freed before the function returns
        return float(big.sum())

    result, peak = pf.measure_peak(work, "cpu", [torch.zeros(250_000)])
    assert result == 1e6 and 5_000_000 <= peak < 5_100_000
