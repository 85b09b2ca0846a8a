"""The `zoomgym` command: a real quickstart run and its resume through subprocesses (CleanRL-style smoke)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from zoomgym.algorithms.cli import main, resolve_config
from zoomgym.algorithms.logging import read_metrics

REPO = Path(__file__).resolve().parents[2]


def zoomgym(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("zoomgym")  # the console script of `pip install -e .`
    command = [str(script)] if script.exists() else [sys.executable, "-m", "zoomgym.algorithms.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_train_quickstart(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = zoomgym(
        "train", "configs/quickstart.yaml", "trainer.steps=1",
        f"model.path={tmp_path / 'tiny'}", f"model.build={{builder: tiny, into: {tmp_path / 'tiny'}, options: {{size: 1m}}}}",
        "model.min_pixels=12544", "model.max_pixels=12544", "env.options.check_view_budget=false",
        "data.train.options={n: 4, seed: 0, preset: cpu}",
        "data.val=[{name: synthetic, options: {n: 1, seed: 1, preset: cpu}}]",
        "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2", "rollout.group_size=2",
        "rollout.max_new_tokens=6", "logging.render_every=0", f"logging.run_dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "tiny" / "config.json").is_file()
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in result.stdout
    # Issue 10: the printed command failed where the venv is not activated; transformers' bars (loading
    # weights, writing shards) cut through the run's own.
    (tensorboard,) = [line.split(None, 1)[1].split(" --logdir")[0] for line in result.stdout.splitlines()
                      if line.startswith("TensorBoard:")]
    assert subprocess.run(f"{tensorboard} --version_tb", shell=True, cwd=REPO, capture_output=True).returncode == 0
    assert "Loading weights" not in result.stderr and "Writing model shards" not in result.stderr
    assert "validation before training:" in result.stdout and "validation after training:" in result.stdout
    assert (run_dir / "checkpoints" / "step_000001" / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 1]  # validation, step 1, validation


def test_config_errors_exit_2_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "configs/quickstart.yaml", "trainer.lrr=1e-6"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err
    assert main(["train", "--resume", "/nonexistent/run"]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert main(["train"]) == 2
    assert "CONFIG" in capsys.readouterr().err


def test_a_fresh_run_refuses_another_runs_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["train", "configs/quickstart.yaml", f"logging.run_dir={tmp_path}"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_import_finds_modules_in_the_current_folder_and_overrides_may_follow_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 10: `--import my_algos` failed from the current folder (a console script's path is its bin/), and
    an override after it was refused as an unrecognized argument."""
    (tmp_path / "zoomgym_test_user_algos.py").write_text("IMPORTED = True\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "zoomgym_test_user_algos", raising=False)
    config = str(REPO / "configs" / "quickstart.yaml")
    assert main(["train", config, "--import", "zoomgym_test_user_algos", "trainer.lrr=1e-6"]) == 2
    assert sys.modules["zoomgym_test_user_algos"].IMPORTED
    assert "Did you mean 'lr'" in capsys.readouterr().err  # the override after --import was read
    assert main(["train", config, "--import", "no_such_module_here"]) == 2
    assert "--import no_such_module_here" in capsys.readouterr().err


def test_a_command_sets_torch_threads_and_silences_transformers_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10: a thread per core on a loaded 2-core machine; transformers' bars inside the run's own."""
    import torch
    from transformers.utils import logging as transformers_logging
    from zoomgym.algorithms.cli import configure_process

    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        for cpus, expected in ((2, 1), (1, 1), (4, min(threads, 3))):
            torch.set_num_threads(threads)
            monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cpus: set(range(n)))
            configure_process()
            assert torch.get_num_threads() == expected, cpus
        assert not transformers_logging.is_progress_bar_enabled()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
        torch.set_num_threads(2)
        configure_process()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
        transformers_logging.enable_progress_bar()


def test_help_config_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "algorithm.name = mgpo" in out and "trainer.lr = " in out


def test_forwarded_commands_keep_their_help() -> None:
    for command in ("tiny-model", "eval"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0


def test_resume_uses_the_runs_own_config(tmp_path: Path) -> None:
    from zoomgym.algorithms.config import load_config, save_config

    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["trainer.steps=3", "name=mine"])
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / "config.yaml")
    resolved = resolve_config(["trainer.steps=5"], resume=str(tmp_path / "run"))
    assert (resolved.name, resolved.trainer.steps, resolved.logging.run_dir) == ("mine", 5, str(tmp_path / "run"))


def test_eval_a_model_with_the_validation_protocol(tiny_model_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "configs/quickstart.yaml", f"model.path={tiny_model_dir}",
               "model.min_pixels=12544", "model.max_pixels=12544", "env.options.check_view_budget=false", "rollout.max_new_tokens=6",
               "data.val=[{name: synthetic, options: {n: 2, seed: 1, preset: cpu}, label: heldout}]", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| eval | 2 | 0.000 |" in out and "valid box" in out
    assert json.loads((tmp_path / "heldout" / "results.json").read_text())["metrics"]["eval/episodes"] == 2


def test_eval_scripted_agents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "--agent", "oracle", "--data", "synthetic:4", "--preset", "cpu", "--trajectories", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "# zoomgym eval: oracle on synthetic:4" in out
    assert "| eval | 4 | 1.000 | 1.000 | 0.000 |" in out  # episodes, accuracy, valid box, fallback
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["eval/episodes"] == 4
    assert (tmp_path / "report.html").read_text().count('<div class="card"') == 1
    assert main(["eval", "--model", str(tmp_path), "--agent", "oracle", "--data", "synthetic:2"]) == 2
    assert "--model (a model) or --agent" in capsys.readouterr().err
