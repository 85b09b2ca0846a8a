"""`agents.evaluate`: records that score like their episodes, resumable runs, the counterfactual arms with gains known
by construction, the refusal of another run's folder, the report page (parsed, and rendered in headless Chromium),
and the sample-by-sample comparison of two runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from zoomgym.agents import OracleAgent, RandomAgent, ReplayAgent
from zoomgym.agents.evaluate import EpisodeAgents, EpisodeLog, EpisodeRecord, evaluate
from zoomgym.agents.evaluate.compare import compare_runs, paired_bootstrap
from zoomgym.agents.evaluate.runner import OracleCropEnv, arms_for
from zoomgym.agents.metrics import covers_truth, episode_metrics
from zoomgym.agents.rollout import env_factory, play_episodes
from zoomgym.agents.scripted import answer_text, format_box
from zoomgym.envs.geometry import Box
from zoomgym.envs.spaces import last_view
from zoomgym.envs.views import ViewBudget

from tests.conftest import marker_sample

BUDGET = ViewBudget(min_pixels=256 * 28 * 28, max_pixels=512 * 28 * 28)


class ReadingAgent:
    """Reads the answer only from a crop that holds the target, so its gains and harms are known by construction.

    Ground turn: the oracle's box when ``sample.meta["good_box"]``, else a box in the top-left quarter (the
    target is top-right). Answer turn: the right letter after a crop holding the target, "B" after any other
    crop (misled by it), "A" when no crop was shown (DirectVQA, fallback).
    """

    calls = 0

    def act(self, observations, infos):
        ReadingAgent.calls += len(observations)
        return [self._act(chat, info) for chat, info in zip(observations, infos)]

    def _act(self, chat, info):
        sample, view = info["sample"], last_view(chat)
        if info["next_turn"] == "ground":
            if sample.meta["good_box"]:
                return OracleAgent().act([chat], [info])[0]
            w, h = view.shown_size
            return format_box(Box(0, 0, w / 4, h / 4), info["frame"], view.shown_size)
        if view.kind != "crop":
            return answer_text("A")
        return answer_text(sample.answer if covers_truth(view.region, sample.boxes) else "B")


# (answer, good box, category) -> outcome without / with zoom
PATTERN = [("A", True, "x"), ("A", False, "x"), ("C", True, "x"),  # both right, harm, gain
           ("C", False, "y"), ("C", True, "y"), ("A", True, "y")]  # both wrong, gain, both right


def reading_samples():
    import dataclasses

    return [dataclasses.replace(marker_sample(f"s{i}", answer=answer), category=category, meta={"good_box": good})
            for i, (answer, good, category) in enumerate(PATTERN)]


def test_counterfactual_numbers_of_an_agent_whose_gains_are_known_by_construction(tmp_path):
    m = evaluate(ReadingAgent(), reading_samples(), view_budget=BUDGET, counterfactual=True, out_dir=tmp_path)
    assert m["direct/accuracy"] == 0.5 and m["eval/accuracy"] == pytest.approx(4 / 6)
    assert m["counterfactual/pairs"] == 6
    assert m["counterfactual/tool_gain"] == pytest.approx(2 / 6) and m["counterfactual/tool_harm"] == pytest.approx(1 / 6)
    assert m["counterfactual/net_gain"] == pytest.approx(1 / 6) == m["eval/accuracy"] - m["direct/accuracy"]
    assert m["counterfactual/both_right"] == pytest.approx(2 / 6) and m["counterfactual/both_wrong"] == pytest.approx(1 / 6)
    assert m["counterfactual/tool_gain/x"] == m["counterfactual/tool_harm/x"] == pytest.approx(1 / 3)
    assert m["counterfactual/net_gain/x"] == 0 and m["counterfactual/net_gain/y"] == pytest.approx(1 / 3)
    assert m["eval/crop_useful_ratio"] == pytest.approx(4 / 6) and m["eval/crop_useful_ratio/y"] == pytest.approx(2 / 3)
    # The oracle crop holds the target: the agent reads every answer; the headroom is what the bad boxes cost.
    assert m["oracle_crop/accuracy"] == 1.0 and m["oracle_crop/turns"] == 1.0
    assert m["counterfactual/oracle_crop_headroom"] == pytest.approx(1 - 4 / 6)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metrics"] == m and set(results["protocol"]) == {"direct", "eval", "oracle_crop"}
    assert results["protocol"]["direct"]["env_id"] == "zoomgym/DirectVQA-v0"
    assert results["protocol"]["oracle_crop"]["oracle_crop"] and results["protocol"]["eval"]["view_budget"]["max_pixels"] \
        == BUDGET.max_pixels
    assert "Question: {question}" in results["protocol"]["eval"]["prompts"]["answer"]  # the wording, stated
    page = (tmp_path / "report.html").read_text()
    assert {o: page.count(f'data-outcome="{o}"') for o in ("gain", "harm", "both_right", "both_wrong")} == {
        "gain": 2, "harm": 1, "both_right": 2, "both_wrong": 1}
    assert "| 6 | 0.333 | 0.167 | +0.167 | 0.333 | 0.167 | +0.333 |" in (tmp_path / "results.md").read_text()


def test_samples_without_boxes_skip_the_oracle_arm_and_a_direct_env_refuses_the_counterfactual():
    import dataclasses

    samples = reading_samples()
    samples[0] = dataclasses.replace(samples[0], id="plain", boxes=())
    m = evaluate(ReadingAgent(), samples, view_budget=BUDGET, counterfactual=True)
    assert m["oracle_crop/episodes"] == 5 and m["eval/episodes"] == 6
    with pytest.raises(ValueError, match="zoom env for --counterfactual.*DirectVQA"):
        arms_for("zoomgym/DirectVQA-v0", counterfactual=True)


def test_the_oracle_crop_env_hands_the_agent_the_answer_turn_with_the_truth_in_view():
    sample = marker_sample()
    env = OracleCropEnv(env_factory("zoomgym/ZoomEnv-v0", view_budget=BUDGET)(sample))
    chat, info = env.reset(options={"sample": sample})
    assert info["next_turn"] == "answer" and info["turn"] == 1 and info["box_valid"]
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert last_view(chat).kind == "crop" and covers_truth(last_view(chat).region, sample.boxes)


def played(agent, samples, view=BUDGET):
    return play_episodes(agent, samples, 1, env_factory("zoomgym/ZoomEnv-v0", view_budget=view))


def test_records_read_back_score_exactly_like_their_trajectories(synthetic_cpu, synthetic_budget):
    trajectories = played(OracleAgent(), synthetic_cpu[:3], synthetic_budget) + played(
        ReplayAgent(["no box", "\\boxed{A}"]), synthetic_cpu[3:5], synthetic_budget) + played(
        ReplayAgent(['[{"bbox_2d": [0, 0, 60, 60]}]', "\\boxed{B}"]), synthetic_cpu[5:], synthetic_budget)
    by_id = {s.id: s for s in synthetic_cpu}
    lines = [json.dumps(EpisodeRecord.of(t, "eval", i, 0).to_json()) for i, t in enumerate(trajectories)]
    records = [EpisodeRecord.from_json(json.loads(line), by_id[json.loads(line)["sample_id"]]) for line in lines]
    assert episode_metrics(records, "eval") == episode_metrics(trajectories, "eval")
    assert "eval/crop_useful_ratio" in episode_metrics(records, "eval")  # boxes survive the round trip
    assert records[0].infos[1]["box_original"] == trajectories[0].infos[1]["box_original"]


def test_the_episode_log_drops_a_torn_last_line_and_names_a_corrupt_one(tmp_path):
    log = EpisodeLog(tmp_path / "episodes.jsonl")
    (record,) = [EpisodeRecord.of(t, "eval", 0, 0) for t in played(OracleAgent(), [marker_sample()])]
    log.append([record])
    whole = log.path.read_bytes()
    log.path.write_bytes(whole + whole[:40])  # a kill in the middle of the next write
    assert len(log.read()) == 1 and log.path.read_bytes() != whole  # reading leaves the file as it is
    assert len(log.open()) == 1 and log.path.read_bytes() == whole  # opening to append cuts the torn tail
    log.path.write_bytes(whole[:40] + b"\n" + whole)
    with pytest.raises(ValueError, match=r"episodes\.jsonl' line 1: expects one JSON record"):
        log.read()


def test_a_rerun_plays_only_what_is_missing_and_gives_the_uninterrupted_numbers(tmp_path):
    samples = reading_samples()
    whole = evaluate(ReadingAgent(), samples, view_budget=BUDGET, counterfactual=True, out_dir=tmp_path / "whole",
                     batch_size=2)
    cut = tmp_path / "cut"
    evaluate(ReadingAgent(), samples, view_budget=BUDGET, counterfactual=True, out_dir=cut, batch_size=2)
    lines = (cut / "episodes.jsonl").read_bytes().splitlines(keepends=True)
    (cut / "episodes.jsonl").write_bytes(b"".join(lines[:7]) + lines[7][:25])  # 7 scored, one torn
    ReadingAgent.calls = 0
    resumed = evaluate(ReadingAgent(), samples, view_budget=BUDGET, counterfactual=True, out_dir=cut, batch_size=4)
    assert resumed == whole
    # Lines: 6 direct, 6 zoom, 6 oracle crop. Left after the cut: 5 zoom episodes of 2 turns, 6 oracle crops of 1.
    assert ReadingAgent.calls == 5 * 2 + 6
    again = evaluate(ReadingAgent(), samples, view_budget=BUDGET, counterfactual=True, out_dir=cut)
    assert again == whole and ReadingAgent.calls == 16 and len((cut / "episodes.jsonl").read_text().splitlines()) == 18


def test_draws_are_seeded_per_sample_whatever_the_batching(synthetic_cpu, synthetic_budget):
    agents = EpisodeAgents(lambda sample, index, draw, arm: RandomAgent(seed=index * 10 + draw))
    one = evaluate(agents, synthetic_cpu, view_budget=synthetic_budget, draws=3, batch_size=1)
    many = evaluate(agents, synthetic_cpu, view_budget=synthetic_budget, draws=3, batch_size=8)
    assert one == many and one["eval/episodes"] == 24 and {"eval/pass@3", "eval/avg@3_std"} <= set(one)
    assert evaluate(agents, synthetic_cpu[:4], view_budget=synthetic_budget, draws=3) != one  # other samples, other draws


def test_another_model_data_or_protocol_in_the_folder_is_refused(tmp_path):
    samples = reading_samples()
    evaluate(ReadingAgent(), samples, view_budget=BUDGET, out_dir=tmp_path, model={"name": "a"})
    with pytest.raises(ValueError, match=r"holds another.*model\.name: \"a\" -> \"b\""):
        evaluate(ReadingAgent(), samples, view_budget=BUDGET, out_dir=tmp_path, model={"name": "b"})
    with pytest.raises(ValueError, match=r"holds another.*data\.sha256"):
        evaluate(ReadingAgent(), samples[:5], view_budget=BUDGET, out_dir=tmp_path, model={"name": "a"})
    with pytest.raises(ValueError, match=r"holds another.*protocol\.eval\.prompts\.answer"):
        evaluate(ReadingAgent(), samples, env_kwargs={"prompts": {"answer": "{question} {choices}"}}, view_budget=BUDGET,
                 out_dir=tmp_path, model={"name": "a"})
    with pytest.raises(ValueError, match=r"holds another.*view_budget\.max_pixels"):
        evaluate(ReadingAgent(), samples, view_budget=ViewBudget(), out_dir=tmp_path, model={"name": "a"})
    # The same run may gain its counterfactual arms, and evaluate fewer samples of the same data.
    m = evaluate(ReadingAgent(), samples, view_budget=BUDGET, out_dir=tmp_path, model={"name": "a"},
                 counterfactual=True, limit=3)
    assert m["eval/episodes"] == m["direct/episodes"] == 3
    (tmp_path.parent / "other").mkdir()
    (tmp_path.parent / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files but no run.json"):
        evaluate(ReadingAgent(), samples, view_budget=BUDGET, out_dir=tmp_path.parent / "other")


def test_the_report_is_one_offline_page_of_tables_images_and_filterable_cards(tmp_path):
    evaluate(ReadingAgent(), reading_samples(), view_budget=BUDGET, counterfactual=True, out_dir=tmp_path,
             n_trajectories=4)
    page = (tmp_path / "report.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/jpeg;base64,") for s in sources)  # nothing to fetch
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert page.count('<div class="card"') == 4  # one of each outcome first
    assert {re.search(r'data-outcome="(\w+)"', c).group(1) for c in page.split('<div class="card"')[1:]} == {
        "gain", "harm", "both_right", "both_wrong"}
    assert page.count("<table>") == 3 and "without zoom" in page and "after the oracle crop" in page
    assert '<option value="x">' in page and '<option value="harm">' in page


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_report_renders_in_headless_chromium_with_its_images_tables_and_filters(tmp_path):
    evaluate(ReadingAgent(), reading_samples(), view_budget=BUDGET, counterfactual=True, out_dir=tmp_path)
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=3000"]
    url = (tmp_path / "report.html").as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url + "#outcome=harm"], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    body = re.search(r'<body data-images="(\d+)" data-images-decoded="(\d+)"', dom)
    assert body and int(body.group(1)) == int(body.group(2)) == 6 + 6  # all decoded: 6 originals with boxes, 6 crops
    assert dom.count("<table>") == 3 and "1 of 6 shown" in dom
    cards = re.findall(r'<div class="card" [^>]*data-outcome="(\w+)"([^>]*)>', dom)
    assert [(outcome, "hidden" in rest) for outcome, rest in cards if outcome == "harm"] == [("harm", False)]
    assert all("hidden" in rest for outcome, rest in cards if outcome != "harm")
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1200,900", f"--screenshot={shot}", url], capture_output=True, timeout=120,
                   check=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (900, 1200) and pixels.std() > 10  # a page was drawn, not a blank


def test_compare_pairs_questions_gives_a_bootstrap_interval_and_lists_the_flips(tmp_path):
    samples = reading_samples()
    evaluate(ReadingAgent(), samples, view_budget=BUDGET, out_dir=tmp_path / "a" / "markers")
    evaluate(OracleAgent(), samples, view_budget=BUDGET, out_dir=tmp_path / "b" / "markers")
    (comparison,), warnings = compare_runs(tmp_path / "a", tmp_path / "b", n_boot=2000)
    assert warnings == []
    assert (comparison.benchmark, comparison.arm, comparison.questions) == ("markers", "eval", 6)
    assert comparison.accuracy_a == pytest.approx(4 / 6) and comparison.accuracy_b == 1.0
    assert comparison.right_in_b_only == ("s1", "s3") and comparison.right_in_a_only == ()  # the bad boxes
    assert comparison.ci[0] <= comparison.delta <= comparison.ci[1] and comparison.ci[1] <= 1.0
    assert paired_bootstrap([1.0] * 5) == (1.0, 1.0) and paired_bootstrap([0.0, 0.0]) == (0.0, 0.0)
    low, high = paired_bootstrap(np.r_[np.ones(50), np.zeros(50)], n_boot=4000)
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02) and high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    evaluate(ReadingAgent(), samples, view_budget=BUDGET, out_dir=tmp_path / "c",
             env_kwargs={"prompts": {"answer": "{question}\n{choices}"}})
    _, warnings = compare_runs(tmp_path / "a" / "markers", tmp_path / "c")
    assert len(warnings) == 1 and "protocols differ" in warnings[0] and "prompts.answer" in warnings[0]


def test_fingerprints_see_content_changes_and_sample_large_files(tmp_path, monkeypatch):
    from zoomgym.agents.evaluate import identity

    monkeypatch.setattr(identity, "FULL_HASH_BYTES", 64)  # files over 64 bytes are "large": 4 blocks of 8
    monkeypatch.setattr(identity, "SAMPLED_BLOCKS", 4)
    monkeypatch.setattr(identity, "BLOCK_BYTES", 8)
    model = tmp_path / "model"
    model.mkdir()
    weights, config = model / "model.safetensors", model / "config.json"
    weights.write_bytes(bytes(200))
    config.write_text("{}")
    first = identity.model_fingerprint(str(model))
    (model / "trainer_state.pt").write_bytes(b"optimizer")  # training state is not the model
    assert identity.model_fingerprint(str(model)) == first
    config.write_text('{"a": 1}')  # a small file counts whole
    assert identity.model_fingerprint(str(model)) != first
    config.write_text("{}")
    weights.write_bytes(bytes(199) + b"x")  # in the last sampled block
    assert identity.model_fingerprint(str(model)) != first
    weights.write_bytes(bytes(100) + b"x" + bytes(99))  # between sampled blocks: a large file is sampled
    assert identity.model_fingerprint(str(model)) == first
    assert identity.model_fingerprint("Qwen/Qwen2.5-VL-7B-Instruct") == {"hub_id": "Qwen/Qwen2.5-VL-7B-Instruct"}

    import dataclasses

    samples = []
    for i in range(2):
        sample = marker_sample(f"m{i}")
        sample.image.save(tmp_path / f"{i}.png")
        samples.append(dataclasses.replace(sample, image=str(tmp_path / f"{i}.png")))
    base = identity.data_fingerprint(samples)
    assert identity.data_fingerprint(samples[::-1]) != base  # the order is part of the data
    assert identity.data_fingerprint([dataclasses.replace(samples[0], answer="D"), samples[1]]) != base
    marker_sample(size=(800, 600)).image.save(tmp_path / "1.png")  # another picture under the same name
    assert identity.data_fingerprint(samples) != base


def test_the_report_shows_model_and_data_text_as_text(tmp_path):
    import dataclasses

    evil = "<img src=x onerror=alert(1)>"
    sample = dataclasses.replace(marker_sample("<b>id</b>"), question=f"What is {evil}?", category=evil)
    evaluate(ReplayAgent([f"{evil} no box </pre><script>alert(2)</script>", "\\boxed{B}"]), [sample],
             view_budget=BUDGET, out_dir=tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "<img src=x" not in page and "<script>alert" not in page and "<b>id</b>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and page.count("<script>") == 1  # the page's own filters


def test_a_sample_whose_image_fails_to_decode_is_skipped_counted_and_named_once(tmp_path, capsys):
    """A corrupt image mid-benchmark stopped the whole evaluation; now its episodes are skipped in every arm."""
    import dataclasses

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    good = reading_samples()[:3]
    broken = dataclasses.replace(good[0], id="broken", image=str(tmp_path / "broken.png"))
    samples = [good[0], broken, *good[1:]]
    agents = EpisodeAgents(lambda sample, index, draw, arm: ReadingAgent())
    for agent in (ReadingAgent(), agents):  # one agent for every episode, or one per episode
        out = tmp_path / type(agent).__name__
        metrics = evaluate(agent, samples, view_budget=BUDGET, counterfactual=True, out_dir=out, draws=2)
        clean = evaluate(agent, good, view_budget=BUDGET, counterfactual=True, draws=2)
        for arm in ("direct", "eval", "oracle_crop"):
            assert metrics[f"{arm}/skipped_samples"] == 1.0 and clean[f"{arm}/skipped_samples"] == 0.0
            assert metrics[f"{arm}/episodes"] == 6.0 and metrics[f"{arm}/accuracy"] == clean[f"{arm}/accuracy"]
        assert "broken" not in (out / "episodes.jsonl").read_text()
        assert capsys.readouterr().err.count("skipping sample 'broken'") == 1  # named once, not per arm or draw
