"""Config parsing: defaults <- YAML <- dotted overrides, strict keys and types, early path checks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from zoomgym.algorithms.config import (
    Config,
    describe,
    field_docs,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
    validate,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_layers_override_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, "trainer:\n  lr: 1e-6\n  steps: 7\nalgorithm:\n  name: grpo\n")
    cfg = load_config(path, ["trainer.lr=2e-6", "data.train.options={n: 8, seed: 3}"])
    assert cfg.trainer.lr == 2e-6  # CLI beats YAML
    assert cfg.trainer.steps == 7  # YAML beats defaults
    assert cfg.algorithm.name == "grpo"
    assert cfg.trainer.grad_clip == Config().trainer.grad_clip  # untouched default
    assert cfg.data.train.options == {"n": 8, "seed": 3}


def test_scientific_notation_in_yaml_is_a_float(tmp_path: Path) -> None:
    # Plain PyYAML reads `1e-6` as the string "1e-6"; the config loader must not.
    cfg = load_config(write(tmp_path, "trainer:\n  lr: 1e-6\n  adam_eps: 1E-8\n"))
    assert cfg.trainer.lr == 1e-6 and cfg.trainer.adam_eps == 1e-8


@pytest.mark.parametrize(
    ("override", "error", "words"),
    [
        ("trainer.lrr=1e-6", ValueError, ["trainer.lrr", "Did you mean 'lr'"]),
        ("trainr.lr=1e-6", ValueError, ["trainr", "Did you mean 'trainer'"]),
        ("trainer.lr=fast", TypeError, ["trainer.lr", "float", "'fast'"]),
        ("trainer.steps=2.5", TypeError, ["trainer.steps", "int"]),
        ("rollout.group_size=true", TypeError, ["rollout.group_size", "int"]),
        ("model.dtype=fp16", ValueError, ["model.dtype", "bfloat16"]),
        ("trainer.adam_betas=[0.9]", TypeError, ["trainer.adam_betas"]),
        ("trainer.lr", ValueError, ["key.sub=value"]),
    ],
)
def test_bad_overrides_name_the_key(override: str, error: type, words: list[str]) -> None:
    with pytest.raises(error) as info:
        load_config(None, [override])
    for word in words:
        assert word in str(info.value)


def test_bad_yaml_key_and_type_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'data\.val\[0\]\.nmae'.*Did you mean 'name'"):
        load_config(write(tmp_path, "data:\n  val:\n    - nmae: vstar\n"))
    with pytest.raises(TypeError, match=r"'logging\.tensorboard'.*bool"):
        load_config(write(tmp_path, "logging:\n  tensorboard: 'yes'\n"))
    with pytest.raises(TypeError, match="mapping"):
        load_config(write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_string_fields_keep_raw_text() -> None:
    assert parse_override("name=007") == ("name", "007")
    assert parse_override("env.id=null") == ("env.id", None)
    assert parse_override("env.options.coord_frame=norm1000") == ("env.options.coord_frame", "norm1000")
    assert parse_override("trainer.lr=2e-6") == ("trainer.lr", 2e-6)


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["trainer.adam_betas=[0.8, 0.9]", "algorithm.tis_cap=2", "name=rt"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert isinstance(again.trainer.adam_betas, tuple) and again.algorithm.tis_cap == 2.0


def test_every_field_has_help() -> None:
    import dataclasses

    def walk(cls: type) -> None:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no attribute docstring"
            if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
                walk(f.type)
            default = getattr(cls(), f.name)
            if dataclasses.is_dataclass(default):
                walk(type(default))

    walk(Config)
    lines = describe()
    assert any(line.startswith("trainer.lr = ") and "AdamW" in line for line in lines)


def tiny_model_dir(tmp_path: Path) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def test_validate_checks_paths_before_loading(tmp_path: Path) -> None:
    model = tiny_model_dir(tmp_path)
    validate(load_config(None, [f"model.path={model}"]))  # defaults plus an existing model are valid
    with pytest.raises(ValueError, match=r"'model\.path'.*does not exist"):
        validate(load_config(None, [f"model.path={tmp_path / 'nope'}"]))
    with pytest.raises(ValueError, match=r"'model\.path'.*config\.json"):
        validate(load_config(None, [f"model.path={tmp_path}"]))
    validate(load_config(None, ["model.path=Qwen/Qwen2.5-VL-7B-Instruct"]))  # hub ids resolve later
    later = tmp_path / "later"
    validate(load_config(None, [f"model.path={later}", f"model.build={{builder: tiny, into: {later}}}"]))
    with pytest.raises(ValueError, match=r"'data\.val\[0\]\.path'.*does not exist"):
        validate(load_config(None, [f"model.path={model}", f"data.val=[{{name: jsonl, path: {tmp_path}/x.jsonl}}]"]))
    with pytest.raises(ValueError, match=r"'data\.train\.name'.*Did you mean 'synthetic'"):
        validate(load_config(None, [f"model.path={model}", "data.train.name=synthetc"]))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("algorithm.name=mgppo", "algorithm.name"),
        ("algorithm.loss_agg=token_mean", "algorithm.loss_agg"),
        ("algorithm.kl_kind=k4", "algorithm.kl_kind"),
        ("env.id=zoomgym/ZoomEnv-v9", "env.id"),
        ("trainer.mini_batch_prompts=3", "trainer.mini_batch_prompts"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("trainer.steps=0", "trainer.steps"),
        ("algorithm.tis_cap=0.5", "algorithm.tis_cap"),
        ("algorithm.advantage=grp", "algorithm.advantage"),
        ("algorithm.policy_loss=ppo", "algorithm.policy_loss"),
        ("rollout.backend=vlm", "rollout.backend"),
        # Issue 10: NaN, infinity and negative values were accepted where they make no sense.
        ("trainer.lr=.nan", "trainer.lr"),
        ("trainer.lr=.inf", "trainer.lr"),
        ("rollout.temperature=.nan", "rollout.temperature"),
        ("algorithm.kl_coef=-.inf", "algorithm.kl_coef"),
        ("algorithm.kl_coef=.nan", "algorithm.kl_coef"),
        ("trainer.grad_clip=.nan", "trainer.grad_clip"),
        ("trainer.grad_clip=-1", "trainer.grad_clip"),
        ("algorithm.clip_low=.nan", "algorithm.clip_low"),
        ("algorithm.clip_low=1.5", "algorithm.clip_low"),
        ("trainer.weight_decay=-0.1", "trainer.weight_decay"),
        ("trainer.weight_decay=.inf", "trainer.weight_decay"),
        ("trainer.adam_eps=0", "trainer.adam_eps"),
        ("trainer.adam_eps=-1e-8", "trainer.adam_eps"),
        ("trainer.adam_betas=[0.9, 1.0]", "trainer.adam_betas[1]"),
        ("trainer.adam_betas=[.nan, 0.9]", "trainer.adam_betas[0]"),
        # Nested options against the loader's and the env's signatures, the device against this torch.
        ("data.train.options={n: 4, seeed: 1}", "data.train.options"),
        ("data.val=[{name: jsonl}]", "data.val[0].options"),
        ("env.options={coord_frme: qwen25}", "env.options"),
        ("env.options={clamp: maybe}", "env.options"),
        ("env.options={resample: sharp}", "env.options"),
        ("trainer.device=gpu", "trainer.device"),
        ("model.build={builder: tiny, into: x, options: {sise: 1m}}", "model.build.options"),
        ("model.build={builder: tiyn, into: x}", "model.build.builder"),
        ("distributed.timeout_minutes=0", "distributed.timeout_minutes"),
        ("distributed.backend=mpi", "distributed.backend"),
    ],
)
def test_validate_values(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(key)):
        validate(load_config(None, [f"model.path={tiny_model_dir(tmp_path)}", override]))


def test_option_errors_suggest_and_never_print_a_dataset(tmp_path: Path) -> None:
    model = tiny_model_dir(tmp_path)
    with pytest.raises(ValueError, match=r"'data\.train\.options'.*'seeed'.*Did you mean 'seed'"):
        validate(load_config(None, [f"model.path={model}", "data.train.options={n: 4, seeed: 1}"]))
    with pytest.raises(ValueError, match=r"'env\.options'.*'coord_frme'.*Did you mean 'coord_frame'"):
        validate(load_config(None, [f"model.path={model}", "env.options={coord_frme: qwen25}"]))
    # Gymnasium's own message for a bad value prints every argument, the dataset's images included.
    with pytest.raises(ValueError) as error:
        validate(load_config(None, [f"model.path={model}", "env.options={clamp: maybe}"]))
    assert "Expects clamp to be a bool" in str(error.value) and "Sample(" not in str(error.value)
    assert len(str(error.value)) < 300


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a CPU-only torch")
def test_a_cuda_device_on_a_cpu_only_torch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'trainer\.device'.*'cuda:1'.*torch .* (was built without CUDA|sees no CUDA)"):
        validate(load_config(None, [f"model.path={tiny_model_dir(tmp_path)}", "trainer.device=cuda:1"]))


def test_a_mistyped_model_path_is_never_built_into(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10: with the quickstart's tiny-model option, a typo in model.path built a random model there."""
    quickstart = REPO / "configs" / "quickstart.yaml"
    for path in (tmp_path / "run" / "checkpoints" / "step_00012", "/nonexistent/model"):
        cfg = load_config(quickstart, [f"model.path={path}"])
        with pytest.raises(ValueError, match=r"'model\.path'.*does not exist \(model\.build builds '\.cache/toy-base/model'"):
            validate(cfg)
        from zoomgym.algorithms.build import build_agent

        with pytest.raises(ValueError, match="is not a folder"):  # even unvalidated: nothing is built there
            build_agent(cfg)
        assert not Path(path).exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match=r"'model\.path'.*'runs/step_1' does not exist"):  # a folder, not a hub id
        validate(load_config(None, ["model.path=runs/step_1"]))  # relative to the current folder
    assert load_config(quickstart).model.build.into == ".cache/toy-base/model"


def test_yaml_aliases_are_refused(tmp_path: Path) -> None:
    """Issue 10: 497 bytes of nested anchors loaded in 0.01 s, then took save_config 251 s and 3.7 GB."""
    lines = ["data:", "  train:", "    options:", "      l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = write(tmp_path, "\n".join(lines) + "\n")
    assert bomb.stat().st_size < 600
    with pytest.raises(ValueError, match=r"cfg\.yaml': expects valid YAML without aliases, actual: alias \*l0 .* at line 5, column 16"):
        load_config(bomb)
    with pytest.raises(ValueError, match=r"without aliases.*actual: alias \*a"):
        load_config(None, ["data.train.options={a: &a [1], b: *a}"])


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cfg\.yaml': expects valid YAML without aliases, actual: .* at line 4"):
        load_config(write(tmp_path, "trainer:\n  lr: 1\n  steps: [3\n"))
    with pytest.raises(ValueError, match=r"override 'trainer\.adam_betas=\[0\.9': expects a YAML value without aliases after '='"):
        load_config(None, ["trainer.adam_betas=[0.9"])


def test_an_override_replaces_the_whole_value() -> None:
    quickstart = REPO / "configs" / "quickstart.yaml"
    assert load_config(quickstart).env.options["prompts"]
    assert load_config(quickstart, ["env.options={}"]).env.options == {}  # cleared, not merged
    assert load_config(quickstart, ["data.train={name: jsonl, path: x.jsonl}"]).data.train.options == {}
    assert load_config(quickstart, ["env.options.clamp=true"]).env.options["prompts"]  # one key: the rest stay


def test_save_config_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill while the resolved config is rewritten (every --resume rewrites it) keeps the previous file."""
    path = tmp_path / "config.yaml"
    save_config(load_config(None, ["name=before"]), path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(yaml, "safe_dump", killed)
    with pytest.raises(KeyboardInterrupt):
        save_config(load_config(None, ["name=after"]), path)
    monkeypatch.undo()
    assert load_config(path).name == "before"


def test_run_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    from zoomgym.algorithms.config import check_run_dir

    (tmp_path / "notes.txt").write_text("mine")
    for run_dir in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        with pytest.raises(ValueError, match=r"'logging\.run_dir'.*notes\.txt' is a file"):
            check_run_dir(load_config(None, [f"logging.run_dir={run_dir}"]), resume=False)
    check_run_dir(load_config(None, [f"logging.run_dir={tmp_path / 'new' / 'run'}"]), resume=False)


def test_config_error_exits_before_model_load(tmp_path: Path) -> None:
    # A subprocess that would need minutes to load a model must fail at once, naming the key,
    # and never import transformers.
    code = (
        "import sys; from zoomgym.algorithms.cli import main; rc = main(sys.argv[1:]); "
        "assert 'transformers' not in sys.modules, 'transformers was imported'; sys.exit(rc)"
    )
    # The others must fail on their own key even in a fresh clone where the quickstart's model folder
    # does not exist yet.
    for overrides, words in [
        (["trainer.lrr=1"], "Did you mean 'lr'"),
        (["trainer.lr=abc"], "trainer.lr"),
        ([f"model.path={tmp_path / 'absent'}"], "model.path"),
        (["data.val=[{name: jsonl, path: missing.jsonl}]"], "data.val[0].path"),
    ]:
        result = subprocess.run(
            [sys.executable, "-c", code, "train", str(REPO / "configs" / "quickstart.yaml"), *overrides],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert "zoomgym: error:" in result.stderr and words in result.stderr


def test_paper_configs_differ_only_where_the_algorithms_differ() -> None:
    mgpo = to_dict(from_dict(yaml.safe_load((REPO / "configs" / "mgpo_qwen2_5_vl_7b.yaml").read_text())))
    grpo = to_dict(from_dict(yaml.safe_load((REPO / "configs" / "grpo_qwen2_5_vl_7b.yaml").read_text())))

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(mgpo), flat(grpo)
    assert {k for k in a if a[k] != b[k]} == {"name", "algorithm.name"}
    assert (a["algorithm.name"], b["algorithm.name"]) == ("mgpo", "grpo")
    # The paper's setup (docs/training.md).
    assert a["trainer.lr"] == 1e-6 and a["trainer.lr_schedule"] == "constant"
    assert (a["trainer.prompts_per_step"], a["rollout.group_size"], a["trainer.mini_batch_prompts"]) == (512, 8, 128)
    assert (a["algorithm.kl_coef"], a["algorithm.kl_kind"], a["algorithm.entropy_coef"]) == (0.01, "low_var_kl", 0.001)
    assert (a["algorithm.clip_low"], a["algorithm.clip_high"], a["trainer.grad_clip"]) == (0.2, 0.2, 1.0)
    assert (a["model.min_pixels"], a["model.max_pixels"]) == (256 * 28 * 28, 1280 * 28 * 28)
    assert (a["rollout.backend"], a["rollout.temperature"], a["rollout.top_p"]) == ("vllm", 1.0, 1.0)
    assert a["rollout.max_new_tokens"] == 8192 and a["model.dtype"] == "bfloat16"
    assert (a["rollout.vllm.tensor_parallel_size"], a["rollout.vllm.gpu_memory_utilization"]) == (2, 0.6)
    assert (a["algorithm.ppo_epochs"], a["algorithm.loss_agg"], a["trainer.weight_decay"]) == (1, "token-mean", 0.01)
    # two turns: the algorithm's own env (mgpo: ground then answer; grpo: answer) and no turn override
    assert a["env.id"] is None and a["env.max_turns"] is None
    assert a["data.train.name"] == "mme_realworld"
    assert [d["name"] for d in a["data.val"]] == ["vstar", "mme_realworld"]  # V* and MME-RealWorld-Lite
    assert all(not a[k] for k in ("algorithm.dynamic_sampling", "algorithm.mask_truncated", "algorithm.tis_cap",
                                  "algorithm.clip_ratio_c", "model.lora.enabled"))  # every option beyond the paper off


def test_include_merges_mapping_by_mapping(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "paper.yaml").write_text(
        "name: paper\ntrainer: {lr: 1.0e-6, steps: 100}\ndata:\n  val: [{name: synthetic}, {name: synthetic}]\n")
    (tmp_path / "variant.yaml").write_text(
        "include: base/paper.yaml\nname: variant\ntrainer: {steps: 5}\ndata: {val: [{name: synthetic, limit: 2}]}\n")
    cfg = load_config(tmp_path / "variant.yaml", ["trainer.seed=3"])
    assert (cfg.name, cfg.trainer.lr, cfg.trainer.steps, cfg.trainer.seed) == ("variant", 1e-6, 5, 3)
    assert [d.limit for d in cfg.data.val] == [2]  # a list replaces the included list
    save_config(cfg, tmp_path / "resolved.yaml")  # the resolved config stands alone
    assert "include" not in (tmp_path / "resolved.yaml").read_text() and load_config(tmp_path / "resolved.yaml") == cfg


def test_include_errors_name_the_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ValueError, match=r"expects includes without a cycle, actual: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("include: missing.yaml\n")
    with pytest.raises(ValueError, match=r"missing\.yaml' does not exist \(included by .*c\.yaml'\)"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("include: [a.yaml]\n")
    with pytest.raises(ValueError, match="'include' to be a file name"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("include: f.yaml\n")
    (tmp_path / "f.yaml").write_text("trainer: {lrr: 1}\n")
    with pytest.raises(ValueError, match="Did you mean 'lr'"):
        load_config(tmp_path / "e.yaml")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["algorithm.dynamic_sampling=true"], "algorithm.dynamic_sampling"),
        (["rollout.backend=vllm", "rollout.vllm.tensor_parallel_size=2"], "rollout.vllm.tensor_parallel_size"),
        (["trainer.prompts_per_step=2", "trainer.mini_batch_prompts=1"], "trainer.prompts_per_step"),
        pytest.param(["distributed.cpu_offload=true"], "distributed.cpu_offload",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="offloading needs CUDA only")),
    ],
)
def test_under_torchrun_what_the_sharded_trainer_lacks_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str], key: str
) -> None:
    """torchrun's variables make these an error naming the key; without them the same config is fine."""
    cfg = load_config(None, [f"model.path={tiny_model_dir(tmp_path)}", "trainer.device=cpu", *overrides])
    validate(cfg)
    for name, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(key)):
        validate(cfg)
