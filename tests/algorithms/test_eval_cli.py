"""`zoomgym eval` end to end: every benchmark's fixture (written to its exact schema), a real kill and resume, both
backends, the config form repeating the trainer's validation, and --compare."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from zoomgym.algorithms.cli import main

from tests.envs.test_data_loaders import (
    generic_records,
    hr_rows,
    make_vstar,
    mme_records,
    tiny_image,
    write_jsonl,
    write_tsv,
)

REPO = Path(__file__).resolve().parents[2]
CPU_VIEW = ["--min-pixels", "28224", "--max-pixels", "50176"]  # the view the `cpu` synthetic preset was made for


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def replay_file(path: Path, scripts: dict[str, list[str]]) -> str:
    write_jsonl(path, [{"sample_id": sample_id, "actions": actions} for sample_id, actions in scripts.items()])
    return f"replay:{path}"


def test_vstar_with_the_oracle_and_its_counterfactual(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_vstar(tmp_path / "vstar")
    assert main(["eval", "--agent", "oracle", "--data", f"vstar:{tmp_path / 'vstar'}", "--counterfactual",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    r = results(tmp_path / "out")
    m = r["metrics"]
    assert m["eval/accuracy"] == m["direct/accuracy"] == m["oracle_crop/accuracy"] == 1.0
    assert m["counterfactual/both_right"] == 1.0 and m["counterfactual/tool_gain"] == 0.0
    assert m["eval/crop_useful_ratio"] == 1.0 and {"eval/accuracy/direct_attributes", "eval/accuracy/relative_position"} <= set(m)
    assert r["data"]["name"] == "vstar" and r["data"]["evaluated"] == r["data"]["samples"] == 2
    assert r["model"] == {"name": "oracle"} and r["versions"]["python"] and r["versions"]["zoomgym"]
    out = capsys.readouterr().out
    assert "## Per category" in out and "| direct_attributes | 1 |" in out


def test_mme_realworld_per_task_and_l2_category(tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(mme_records()), tmp_path / "mme.parquet")
    agent = replay_file(tmp_path / "replay.jsonl", {"7": ["none", "\\boxed{B}"], "8": ["none", "\\boxed{A}"]})
    assert main(["eval", "--agent", agent, "--data", f"mme_realworld:{tmp_path / 'mme.parquet'}",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    m = results(tmp_path / "out")["metrics"]
    assert m["eval/l2_accuracy/license"] == 1.0 and m["eval/l2_accuracy/counting"] == 0.0
    assert m["eval/accuracy/Perception/Autonomous_Driving"] == 1.0 and m["eval/accuracy/Perception/Monitoring"] == 0.0
    assert m["eval/fallback_ratio"] == 1.0 and "eval/iou" not in m  # no boxes in MME-RealWorld
    assert "## Per l2-category (MME-RealWorld)" in (tmp_path / "out" / "results.md").read_text()


def test_hrbench_mean_over_rotations_and_right_in_all_four(tmp_path: Path) -> None:
    second = [{**row, "index": 200 + i, "question": "What colour is the door?"} for i, row in enumerate(hr_rows())]
    write_tsv(tmp_path / "hr_bench_4k.tsv", hr_rows() + second)
    scripts = {str(row["index"]): ["none", f"\\boxed{{{row['answer']}}}"] for row in hr_rows() + second}
    scripts["203"] = ["none", "\\boxed{" + "ABCD".replace(second[3]["answer"], "")[0] + "}"]  # one rotation wrong
    agent = replay_file(tmp_path / "replay.jsonl", scripts)
    assert main(["eval", "--agent", agent, "--data", f"hrbench:{tmp_path / 'hr_bench_4k.tsv'}", "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 0
    m = results(tmp_path / "out")["metrics"]
    assert m["eval/accuracy"] == 7 / 8 and m["eval/rotation_accuracy"] == (1 + 1 + 1 + 0.5) / 4
    assert m["eval/all_rotations_accuracy"] == 0.5
    assert "| eval | 0.875 | 0.500 |" in (tmp_path / "out" / "results.md").read_text()


def test_generic_jsonl_and_bad_input_is_reported_before_anything_plays(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data" / "images").mkdir(parents=True)
    tiny_image(7).save(tmp_path / "data" / "images" / "cat.png")
    write_jsonl(tmp_path / "data" / "set.jsonl", generic_records())
    data = f"jsonl:{tmp_path / 'data' / 'set.jsonl'}"
    assert main(["eval", "--agent", "oracle", "--data", data, "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert results(tmp_path / "out")["metrics"]["eval/accuracy"] == 1.0
    for argv, message in [
        (["--agent", "oracle", "--data", "vstr:/x"], "Did you mean 'vstar'"),
        (["--agent", "oracle", "--data", f"vstar:{tmp_path / 'absent'}"], "does not"),
        (["--agent", "oracle"], "Expects --data"),
        (["--model", str(tmp_path), "--data", data, "--samples", "4"], "--temperature > 0"),
        (["--agent", "random", "--data", data, "--out", str(tmp_path / "out")], 'model.name: "oracle" -> "random"'),
        (["--agent", replay_file(tmp_path / "r.jsonl", {"cat-17": ["x", "y"]}), "--data", data], "'set-2'"),
    ]:
        assert main(["eval", *argv, "--no-progress"]) == 2
        assert message in capsys.readouterr().err


def zoomgym_eval(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("zoomgym")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "zoomgym.algorithms.cli"]
    return [*command, "eval", *args]


def test_killed_mid_run_and_resumed_gives_the_uninterrupted_numbers(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A real SIGKILL of the process mid-run (plus a torn last line, what a kill inside a write leaves), a rerun of
    the same command, and the numbers of an uninterrupted run, with sampled draws (their seeds must not depend on
    what was already done). The counterfactual arms resume the same way (tests/agents/test_evaluate.py)."""
    # The tiny model's own 112 px view (16 visual tokens an image) keeps it quick; no model reads these answers.
    args = ["env.options.check_view_budget=false", "--model", str(tiny_model_dir), "--data", "synthetic:4", "--preset",
            "cpu", "--max-new-tokens", "6", "--samples", "2", "--temperature", "1.0", "--batch-size", "1",
            "--no-progress", "--out"]
    out = tmp_path / "killed"
    episodes = out / "episodes.jsonl"
    process = subprocess.Popen(zoomgym_eval(*args, str(out)), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not episodes.exists() or len(episodes.read_bytes().splitlines()) < 2):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(episodes.read_bytes().splitlines())
    assert 2 <= done < 8 and not (out / "results.json").exists()  # killed mid-run, before it finished
    with episodes.open("ab") as handle:
        handle.write(b'{"arm": "eval", "sample_id": "synth')
    resumed = subprocess.run(zoomgym_eval(*args, str(out)), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = [(r["arm"], r["sample_id"], r["draw"]) for r in map(json.loads, episodes.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == 4 * 2  # each episode once: none lost, none played twice
    assert main(["eval", *args, str(tmp_path / "whole")]) == 0
    assert results(out)["metrics"] == results(tmp_path / "whole")["metrics"]
    assert {"eval/pass@2", "eval/avg@2_std", "eval/generated_tokens"} <= set(results(out)["metrics"])


def test_the_vllm_backend_through_the_fake_engine(tiny_model_dir: Path, tmp_path: Path, fake_vllm) -> None:
    from zoomgym.agents.models import load_processor
    from zoomgym.envs.data import synthetic

    tokenizer = load_processor(tiny_model_dir).tokenizer
    fake_vllm.reply = [*tokenizer.encode("\\boxed{B}", add_special_tokens=False), tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert main(["eval", "--model", str(tiny_model_dir), "--backend", "vllm", "--data", "synthetic:4", "--preset", "cpu",
                 *CPU_VIEW, "--counterfactual", "--out", str(tmp_path), "--no-progress"]) == 0
    (engine,) = fake_vllm.built
    assert engine["limit_mm_per_prompt"] == {"image": 2, "video": 0} and engine["dtype"] == "float32"
    r = results(tmp_path)
    share_b = sum(s.answer == "B" for s in synthetic(4, seed=0, preset="cpu")) / 4
    m = r["metrics"]
    assert m["eval/accuracy"] == m["direct/accuracy"] == share_b and m["eval/fallback_ratio"] == 1.0
    assert m["eval/generated_tokens"] == 2 * len(fake_vllm.reply) and r["model"]["backend"] == "vllm"
    assert len(fake_vllm.prompts) == 4 * 2 + 4 + 4  # zoom 2 turns, direct 1, oracle crop 1


def test_the_config_form_repeats_the_trainers_validation(mgpo_run, tmp_path: Path) -> None:
    """`zoomgym eval CONFIG model.path=CKPT` on the trained checkpoint gives the trainer's last validation."""
    from zoomgym.algorithms.config import save_config

    algo, _ = mgpo_run
    save_config(algo.cfg, tmp_path / "config.yaml")
    checkpoint = algo.run_dir / "checkpoints" / "step_000003"
    assert main(["eval", str(tmp_path / "config.yaml"), f"model.path={checkpoint}", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    m = results(tmp_path / "out" / "synthetic")["metrics"]
    validation = {k.removeprefix("val/synthetic/"): v for k, v in algo.last_validation.items() if k.startswith("val/")}
    assert validation and all(m[f"eval/{k}"] == pytest.approx(v, abs=1e-9) for k, v in validation.items())


def test_compare_prints_deltas_intervals_and_flips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data", "synthetic:6", "--preset", "cpu", "--no-progress", "--out"]
    assert main(["eval", "--agent", "oracle", *common, str(tmp_path / "a")]) == 0
    assert main(["eval", "--agent", "random", *common, str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    b = results(tmp_path / "b")["metrics"]["eval/accuracy"]
    assert f"synthetic            eval              6   1.000 {b:>7.3f} {b - 1:>+8.3f}  [" in out
    assert "  right only in A: " in out and "  right only in B: " not in out  # the oracle is never wrong
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "nothing")]) == 2


def test_another_runs_folder_is_refused_before_the_model_loads(tiny_model_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data", "synthetic:2", "--preset", "cpu", "--no-progress", "--out", str(tmp_path)]
    assert main(["eval", "--agent", "oracle", *data]) == 0

    def no_loading(cfg):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("zoomgym.algorithms.build.build_agent", no_loading)
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_model_dir), *CPU_VIEW, *data]) == 2
    assert 'holds another' in (err := capsys.readouterr().err) and 'model.name: "oracle" -> ' in err


def test_the_config_form_needs_only_data_val_and_takes_options_and_overrides_in_any_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config whose training set is elsewhere evaluates; --import finds the current folder's modules and an
    override may follow it (issue 10's CLI rules hold for eval as for train)."""
    (tmp_path / "zoomgym_test_eval_plugin.py").write_text("IMPORTED = True\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "zoomgym_test_eval_plugin", raising=False)
    config = str(REPO / "configs" / "quickstart.yaml")
    assert main(["eval", config, "--agent", "oracle", "data.train={name: jsonl, path: /no/such/train.jsonl}",
                 "--import", "zoomgym_test_eval_plugin", "data.val=[{name: synthetic, options: {n: 2, seed: 1, "
                 "preset: cpu}}]", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert sys.modules["zoomgym_test_eval_plugin"].IMPORTED
    assert results(tmp_path / "out" / "synthetic")["metrics"]["eval/episodes"] == 2
    assert main(["eval", config, "--agent", "oracle", "--import", "no_such_module_here"]) == 2
    assert "--import no_such_module_here" in capsys.readouterr().err
