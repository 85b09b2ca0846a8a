"""Supervised fine-tuning: the chat layout and mask, the loss, exact resume, stock checkpoints, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from zoomgym.algorithms.config import load_config, validate_sft
from zoomgym.envs.data import load_chats
from zoomgym.envs.data.toy_tasks import toy_grounding, toy_reading
from zoomgym.envs.views import ViewBudget

TOY_BUDGET = ViewBudget(224 * 224, 224 * 224, 28, 1)


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model with the toy base's settings (224x224 views, 8x8 tokens of 28 px)."""
    from zoomgym.agents.models import build_tiny_model
    from zoomgym.agents.models.tiny import TOY_BASE_MODEL

    return build_tiny_model(tmp_path_factory.mktemp("toy") / "model", **TOY_BASE_MODEL)


@pytest.fixture(scope="session")
def adapter(toy_model_dir: Path):
    from zoomgym.agents import LMMAgent

    return LMMAgent.from_pretrained(toy_model_dir).adapter


def write_chats(folder: Path, n: int = 4, letters: str = "ABCD") -> Path:
    """A chats jsonl with one image per chat (paths relative to the file) and a one-letter reply."""
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        colour = (40 * i % 256, 200, 90)
        Image.new("RGB", (300, 200), colour).save(folder / "imgs" / f"{i}.png")
        lines.append(json.dumps({"id": f"c{i}", "messages": [
            {"role": "user", "content": [{"type": "image", "image": f"imgs/{i}.png"}, {"type": "text", "text": "Which?"}]},
            {"role": "assistant", "content": f"\\boxed{{{letters[i % len(letters)]}}}"}]}))
    path = folder / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def sft_config(model_dir: Path, run_dir: Path, chats: Path, *overrides: str):
    return load_config(None, [
        f"model.path={model_dir}", "model.dtype=float32", "trainer.device=cpu", "trainer.seed=3",
        f"sft.train=[{{path: {chats}}}]", f"sft.val=[{{path: {chats}, label: chats}}]", "sft.batch_size=3",
        "sft.max_new_tokens=6", "trainer.micro_batch_size=2", "trainer.lr=3e-3", "trainer.weight_decay=0.0",
        "trainer.steps=4", "trainer.val_every=0", "trainer.save_every=2", "trainer.keep_checkpoints=0",
        "logging.render_every=0", "logging.progress_bar=false", f"logging.run_dir={run_dir}", *overrides])


# -- the layout ----------------------------------------------------------------------------------------


def test_conversation_layout_is_the_rollouts_and_masks_exactly_the_replies(adapter) -> None:
    image = Image.new("RGB", (224, 224), (10, 20, 30))
    user1 = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Box it."}]}
    user2 = {"role": "user", "content": [{"type": "text", "text": "Crop:"}, {"type": "image", "image": image}]}
    messages = [{"role": "system", "content": "S."}, user1, {"role": "assistant", "content": "[1, 2, 30, 40]"},
                user2, {"role": "assistant", "content": "\\boxed{C}"}]
    ids, mask = adapter.encode_conversation(messages)
    reply1 = adapter.tokenizer.encode("[1, 2, 30, 40]", add_special_tokens=False) + [adapter.im_end_id]
    reply2 = adapter.tokenizer.encode("\\boxed{C}", add_special_tokens=False) + [adapter.im_end_id]
    prefix = adapter.encode_prefix(messages[:2])
    env_turn = adapter.encode_env_turn(user2, after_generation_ended_with_eos=True)
    assert ids == prefix + reply1 + env_turn + reply2  # what a two-turn rollout holds
    assert mask == [0] * len(prefix) + [1] * len(reply1) + [0] * len(env_turn) + [1] * len(reply2)
    prompt_ids, prompt_mask = adapter.encode_conversation(messages[:4])  # ends with a user turn: a prompt
    assert prompt_ids == prefix + reply1 + env_turn and sum(prompt_mask) == len(reply1)
    with pytest.raises(ValueError, match="assistant message to be text after a user message"):
        adapter.encode_conversation([messages[0], {"role": "assistant", "content": "x"}])


# -- chats files -----------------------------------------------------------------------------------------


def test_chats_jsonl_paths_are_relative_and_errors_name_file_line_and_chat(tmp_path: Path) -> None:
    path = write_chats(tmp_path)
    chats = load_chats(path)
    assert [c.id for c in chats] == ["c0", "c1", "c2", "c3"] and chats[1].reply == "\\boxed{B}"
    assert chats[0].images[0] == tmp_path / "imgs" / "0.png"

    outside = tmp_path / "other.jsonl"
    outside.write_text(json.dumps({"id": "x", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "../secret.png"}]},
        {"role": "assistant", "content": "no"}]}) + "\n")
    (tmp_path.parent / "secret.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"other.jsonl' line 1.*inside the dataset folder.*'x'"):
        load_chats(outside)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl' line 1, key 'messages'.*at least one assistant"):
        load_chats(bad)
    bad.write_text('{"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "a"}]}\n')
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]"):
        load_chats(bad)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    bad.write_text(json.dumps({"id": "b", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "imgs/broken.png"}]},
        {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(Exception, match="broken.png"):
        load_chats(bad)


def test_sft_config_errors_name_the_key(tmp_path: Path) -> None:
    cfg = load_config(None, ["sft.train=[{task: toy_grounding}, {task: toy_groundng}]"])
    with pytest.raises(ValueError, match=r"sft.train\[1\].task.*Did you mean 'toy_grounding'"):
        validate_sft(cfg)
    with pytest.raises(ValueError, match=r"sft.train\[0\]': expects exactly one of task and path"):
        validate_sft(load_config(None, [f"sft.train=[{{task: toy_reading, path: {tmp_path}}}]"]))
    with pytest.raises(ValueError, match=r"sft.val\[0\].path"):
        validate_sft(load_config(None, ["sft.train=[{task: toy_reading}]", "sft.val=[{path: nowhere.jsonl}]"]))
    with pytest.raises(ValueError, match="sft.train': expects at least one chat set"):
        validate_sft(load_config(None, []))


# -- the toy tasks -----------------------------------------------------------------------------------------


def test_toy_chats_target_the_asked_checks_and_label_every_visual_token() -> None:
    for chat in toy_grounding(6, 5, TOY_BUDGET):
        x1, y1, x2, y2 = json.loads(chat.reply)
        sample_box = chat.id  # the reply is one grown token cell, inside the 224 px view
        assert 28 < x2 - x1 <= 32 and 28 < y2 - y1 <= 32 and 0 <= x1 and x2 <= 224, sample_box
        (labels,), (attend,) = chat.token_labels, chat.attend
        assert all(len(v) == 64 for v in labels.values()) and attend.sum() == 1
        row, column = divmod(int(np.flatnonzero(attend)[0]), 8)
        assert x1 <= column * 28 + 14 <= x2 and y1 <= row * 28 + 14 <= y2  # attention on the box's token
    for chat in toy_reading(8, 5, TOY_BUDGET, history_ratio=1.0):
        assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
        crop = chat.images[-1]
        pixels = np.asarray(crop, dtype=float)
        # The close-up shows the checks themselves: far from the grey they average to in the view.
        assert np.abs(pixels - 127.5).max() > 100 and chat.attend[-1].any()
        assert not any(a.any() for a in chat.attend[:-1])  # only the last reply's attention is supervised
        assert chat.token_labels[-1]["texture"].max() > 0


# -- training -----------------------------------------------------------------------------------------------


def test_sft_loss_is_the_token_mean_over_replies_and_it_falls(toy_model_dir: Path, tmp_path: Path) -> None:
    from zoomgym.agents.scoring import token_logprobs
    from zoomgym.algorithms.build import build_agent
    from zoomgym.algorithms.sft import SFT, encode_chat, teacher_forcing_step

    chats_file = write_chats(tmp_path / "data", letters="B")
    cfg = sft_config(toy_model_dir, tmp_path / "run", chats_file, "sft.batch_size=4", "trainer.lr=5e-3")
    sft = SFT(build_agent(cfg), cfg)
    examples = [encode_chat(c, sft.agent.adapter, sft.view_budget) for c in sft.train_chats]
    batch = sft.agent.collate(examples)
    with torch.no_grad():
        logp, _ = token_logprobs(sft.model, sft.agent.adapter, batch)
        expected = -logp[batch["loss_mask"] > 0].mean()
    # One chat per micro-batch: the accumulated loss is still the token mean over all of them.
    frozen = torch.optim.SGD(sft.model.parameters(), lr=0.0)
    got = teacher_forcing_step(sft.agent, examples, frozen, micro_batch_size=1, grad_clip=0.0)["sft/loss"]
    assert got == pytest.approx(float(expected), rel=1e-5)
    reply_tokens = sum(len(sft.agent.adapter.tokenizer.encode(c.reply, add_special_tokens=False)) + 1 for c in sft.train_chats)
    assert int(batch["loss_mask"].sum()) == reply_tokens
    losses = []
    for _ in range(25):
        metrics, _ = sft.train_step()
        sft.step += 1
        losses.append(metrics["sft/loss"])
    assert losses[-1] < 0.05 * losses[0], losses
    # validation generates from the prompt laid out as in training, and writes the reply learnt
    assert sft.validate()["val/chats/answer_accuracy"] == 1.0


@pytest.fixture
def toy_sft_config(toy_model_dir: Path, tmp_path: Path):
    def make(*overrides: str):
        return load_config(None, [
            f"model.path={toy_model_dir}", "model.dtype=float32", "trainer.device=cpu",
            "sft.train=[{task: toy_grounding, n: 8, seed: 1}, {task: toy_reading, n: 8, seed: 2}]",
            "sft.val=[{task: toy_grounding, n: 4, seed: 3, label: grounding}]", "sft.batch_size=4",
            "trainer.micro_batch_size=2", "trainer.steps=2", "trainer.val_every=0", "trainer.save_every=0",
            "logging.render_every=0", "logging.progress_bar=false", f"logging.run_dir={tmp_path / 'run'}", *overrides])

    return make


def test_sft_resume_is_exact_and_checkpoints_are_stock_folders(toy_sft_config, toy_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText
    from zoomgym.algorithms.run import run_sft

    # toy chats carry token labels: the token heads train, and live in the trainer state only
    extra = ("sft.aux_weight=1.0", "sft.attention_weight=1.0", "trainer.steps=4", "trainer.save_every=2")
    straight = run_sft(toy_sft_config(*extra, f"logging.run_dir={tmp_path / 'a'}"))
    run_sft(toy_sft_config(*extra, f"logging.run_dir={tmp_path / 'b'}", "trainer.steps=2"))
    resumed = run_sft(toy_sft_config(*extra, f"logging.run_dir={tmp_path / 'b'}"), resume=True)
    assert straight.token_heads is not None and resumed.step == 4
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.token_heads.state_dict().values(), resumed.token_heads.state_dict().values()):
        assert torch.equal(a, b)
    loaded = AutoModelForImageTextToText.from_pretrained(straight.last_checkpoint)
    init = AutoModelForImageTextToText.from_pretrained(toy_model_dir)
    assert set(loaded.state_dict()) == set(init.state_dict())  # nothing of the heads in the model


def test_token_heads_and_attention_loss_train_on_toy_chats(toy_sft_config) -> None:
    from zoomgym.algorithms.run import run_sft

    sft = run_sft(toy_sft_config("sft.aux_weight=1.0", "sft.attention_weight=1.0"))
    lines = [json.loads(line) for line in (sft.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "sft/loss" in line]
    assert len(steps) == 2 and all(line["sft/aux_loss"] > 0 and line["sft/attention_loss"] > 0 for line in steps)
    assert {"val/grounding/box_valid_ratio", "val/grounding/box_hit_ratio"} <= set(sft.last_validation)
    # eager attention only while training: generation runs with the model's own implementation
    assert sft.model.config.text_config._attn_implementation != "eager"


def test_score_generation_hit_needs_a_tight_valid_box() -> None:
    from zoomgym.algorithms.sft import score_generation
    from zoomgym.envs.data.chats import ChatExample

    chat = ChatExample("c", ({"role": "user", "content": "q"}, {"role": "assistant", "content": "[56, 56, 84, 84]"}))
    assert score_generation(chat, "[50, 50, 90, 90]", (224, 224))["box_hit_ratio"] == 1.0
    assert score_generation(chat, "[0, 0, 224, 224]", (224, 224)) == {"exact_match": 0.0, "box_valid_ratio": 1.0,
                                                                        "box_hit_ratio": 0.0}
    assert score_generation(chat, "[0, 0, 300, 30]", (224, 224))["box_valid_ratio"] == 0.0
    letter = ChatExample("l", ({"role": "user", "content": "q"}, {"role": "assistant", "content": "\\boxed{B}"}))
    assert score_generation(letter, "so \\boxed{B}", (224, 224)) == {"exact_match": 0.0, "answer_accuracy": 1.0}


# -- the toy base ----------------------------------------------------------------------------------------


def test_toy_base_picks_a_partly_grounded_checkpoint() -> None:
    from zoomgym.algorithms.toy_base import HIT_KEY, READING_KEY, VALID_KEY, pick_checkpoint

    def v(read: float, valid: float, hit: float) -> dict[str, float]:
        return {READING_KEY: read, VALID_KEY: valid, HIT_KEY: hit}

    history = {50: v(0.5, 0.2, 0.1), 100: v(0.95, 0.95, 0.3), 150: v(0.97, 0.99, 0.45), 200: v(0.99, 1.0, 0.7)}
    assert pick_checkpoint(history, [50, 100, 150, 200])[0] == 150  # the earliest in the wanted range
    history[150] = v(0.97, 0.99, 0.65)
    assert pick_checkpoint(history, [50, 100, 150, 200])[0] == 150  # none inside: closest to the middle
    assert pick_checkpoint({50: v(0.5, 0.2, 0.1)}, [50, 100]) == (100, pick_checkpoint({}, [50, 100])[1])


def test_toy_base_is_built_once_per_recipe_and_is_a_stock_folder(tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForImageTextToText
    from zoomgym.algorithms.cli import main

    small = ["trainer.steps=2", "trainer.val_every=1", "trainer.save_every=1",
             "sft.train=[{task: toy_grounding, n: 4, seed: 1000}, {task: toy_reading, n: 4, seed: 1001}]",
             "sft.val=[{task: toy_grounding, n: 2, seed: 2000, label: grounding}, {task: toy_reading, n: 2, seed: 2001, label: reading}]",
             "sft.batch_size=2", "logging.progress_bar=false"]
    assert main(["toy-base", *small, "--cache", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    (home,) = tmp_path.glob("toy-base-*")
    report = json.loads((home / "report.json").read_text())
    assert report["step"] in (1, 2) and "held-out" in first and str(home / "model") in first
    assert not (home / "model" / "trainer_state.pt").exists()
    assert (tmp_path / "toy-base").resolve() == home.resolve()  # the link configs/quickstart.yaml loads
    AutoModelForImageTextToText.from_pretrained(home / "model")  # no project code needed
    stamp = (home / "report.json").stat().st_mtime_ns
    assert main(["toy-base", *small, "--cache", str(tmp_path)]) == 0  # same recipe: reused, not rebuilt
    assert (home / "report.json").stat().st_mtime_ns == stamp
    assert main(["toy-base", *small, "trainer.seed=1", "--cache", str(tmp_path), ]) == 0  # another recipe
    assert len(list(tmp_path.glob("toy-base-*"))) == 2
    assert main(["toy-base", "model.path=x", "--cache", str(tmp_path)]) == 2
