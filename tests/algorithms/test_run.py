"""`zoomgym train` end to end on what goes wrong: unreadable images, bad datasets, a run killed early."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from zoomgym.algorithms import run as run_module
from zoomgym.algorithms.config import Config, load_config
from zoomgym.algorithms.logging import read_metrics
from zoomgym.algorithms.run import run
from zoomgym.envs.data import ImageLoadError


def jsonl_dataset(folder: Path, cut: bool = True, garbage: bool = False) -> Path:
    """Two questions: ``good`` and ``cut``, whose PNG header reads but whose pixels are cut off (``garbage``:
    not even a header)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("good", "cut"):
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    if cut:
        (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:2000])
    if garbage:
        (folder / "cut.png").write_bytes(b"not an image")
    records = [{"id": name, "image": f"{name}.png", "question": "Which?", "options": ["left", "right"], "answer": "A"}
               for name in ("good", "cut")]
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_an_image_that_fails_to_decode_is_skipped_and_resume_does_not_crash(
    tiny_config: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 10: one bad image killed training, and --resume repeated the crash (same order)."""
    data = jsonl_dataset(tmp_path / "data")
    spec = f"{{name: jsonl, path: {data}}}"
    cfg = tiny_config(f"data.train={spec}", f"data.val=[{spec}]", "trainer.steps=1", "trainer.save_every=1")
    algo = run(cfg)
    assert algo.step == 1
    train = [r for r in read_metrics(algo.run_dir) if "train/reward" in r]
    assert train[0]["train/skipped_samples"] == 1.0  # B = 2 prompts: both drawn, the cut one dropped
    assert [r["val/jsonl/skipped_samples"] for r in read_metrics(algo.run_dir) if "val/jsonl/skipped_samples" in r] == [1.0, 1.0]
    assert capsys.readouterr().err.count("skipping sample 'cut'") == 1  # named once, counted each time

    resumed = run(load_config(algo.run_dir / "config.yaml", ["trainer.steps=2", f"logging.run_dir={algo.run_dir}"]),
                  resume=True)
    assert resumed.step == 2
    assert [r["train/skipped_samples"] for r in read_metrics(algo.run_dir) if "train/reward" in r] == [1.0, 1.0]


def test_datasets_are_loaded_before_the_model(tiny_config: Callable[..., Config], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data = jsonl_dataset(tmp_path / "data", garbage=True)

    def no_model(cfg: Config) -> None:
        raise AssertionError("the model was loaded before the datasets were checked")

    monkeypatch.setattr(run_module, "build_agent", no_model)
    with pytest.raises(ImageLoadError, match=r"sample 'cut'.*cut\.png"):
        run(tiny_config(f"data.train={{name: jsonl, path: {data}}}"))


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(
    tiny_config: Callable[..., Config], tmp_path: Path
) -> None:
    """Issue 10: such a folder was refused by --resume (no checkpoint) and by a fresh run (it holds a run).
    Now --resume starts it again from step 0 in the same folder; nothing it logged is deleted."""
    from zoomgym.algorithms.config import check_run_dir, save_config

    cfg = tiny_config("trainer.steps=1", "data.val=[]")
    run_dir = Path(cfg.logging.run_dir)
    (run_dir / "checkpoints" / "step_000001.tmp").mkdir(parents=True)  # killed while saving
    save_config(cfg, run_dir / "config.yaml")
    killed = '{"step": 1, "train/reward": 0.5}\n{"step": 1, "train/rew'  # ... and while logging
    (run_dir / "metrics.jsonl").write_text(killed)
    with pytest.raises(ValueError, match=r"holds a run \(continue it with --resume: .* from step 0 if it has none"):
        check_run_dir(cfg, resume=False)
    algo = run(cfg, resume=True)
    assert algo.step == 1 and (run_dir / "checkpoints" / "step_000001" / "model.safetensors").is_file()
    assert not (run_dir / "checkpoints" / "step_000001.tmp").exists()
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1] and records[0]["train/reward"] != 0.5  # the old record superseded
    assert (run_dir / "metrics.jsonl").read_text().startswith('{"step": 1, "train/reward": 0.5}\n{"purge_step": 0}\n')
