from __future__ import annotations

import io
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from PIL import Image
from zoomgym.envs.data import ImageLoadError, Sample, synthetic
from zoomgym.envs.data.synthetic import COLOUR_PAIRS
from zoomgym.envs.geometry import Box
from zoomgym.envs.prompts import PromptTemplates
from zoomgym.envs.spaces import ChatSpace
from zoomgym.envs.views import ViewInfo

from tests.conftest import marker_sample
from zoomgym import envs

INFO_KEYS = {
    "turn", "max_turns", "next_turn", "frame", "box_shown", "box_original", "box_valid", "fallback", "iou",
    "visual_tokens", "answer", "correct", "action", "sample", "turn_limit_reached",
}
# The marker sample is shown at 1148x840; its red square is at about x 861-890, y 210-238 there.
GOOD_BOX = '```json\n[{"bbox_2d": [840, 190, 910, 260], "label": "square"}]\n```'


def images(chat: list[dict]) -> list[tuple[Image.Image, ViewInfo]]:
    return [(p["image"], p["view"]) for m in chat for p in m["content"] if p["type"] == "image"]


def texts(message: dict) -> str:
    return "\n".join(p["text"] for p in message["content"] if p["type"] == "text")


@pytest.mark.parametrize("env_id", sorted(envs.ENV_IDS))
def test_check_env_passes_for_every_registered_id(env_id: str, marker: Sample) -> None:
    other = marker_sample("other", size=(900, 1300), target=Box(100, 100, 160, 150), answer="D")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checker warning is a failure
        check_env(gym.make(env_id, dataset=[marker, other]).unwrapped)


@pytest.mark.parametrize("env_id", sorted(envs.ENV_IDS))
def test_make_vec_batches_chats(env_id: str, marker: Sample) -> None:
    vec = gym.make_vec(env_id, num_envs=3, vectorization_mode="sync", dataset=[marker])
    chats, infos = vec.reset(seed=0)
    assert isinstance(chats, tuple) and len(chats) == 3
    assert chats in vec.observation_space and all(c in vec.single_observation_space for c in chats)
    assert isinstance(vec.single_observation_space, ChatSpace)
    script = ["\\boxed{B}"] if env_id == "zoomgym/DirectVQA-v0" else [GOOD_BOX, "\\boxed{B}"]
    for text in script:
        chats, rewards, terminated, truncated, infos = vec.step((text,) * 3)
        assert rewards.shape == (3,) and infos["turn"].shape == (3,)
    assert terminated.all() and not truncated.any() and (rewards == 1.0).all()
    assert list(infos["answer"]) == ["B"] * 3 and infos["sample"][0] is marker
    # NEXT_STEP autoreset: the next step ignores the actions and returns new first observations.
    chats, rewards, terminated, truncated, infos = vec.step(("ignored",) * 3)
    assert (infos["turn"] == 0).all() and (rewards == 0).all() and len(chats[0]) == 2
    vec.close()


def test_reset_by_index_sample_and_rng(marker: Sample) -> None:
    other = marker_sample("other")
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[marker, other])
    assert env.reset(options={"index": 1})[1]["sample"] is other
    third = marker_sample("third")
    assert env.reset(options={"sample": third})[1]["sample"] is third
    drawn = [env.reset(seed=s)[1]["sample"].id for s in range(8)]
    assert set(drawn) == {"marker", "other"}
    assert drawn == [env.reset(seed=s)[1]["sample"].id for s in range(8)]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"index": 2}, ValueError),
        ({"index": -1}, ValueError),
        ({"index": "0"}, ValueError),
        ({"sample": "not a sample"}, TypeError),
        ({"idx": 0}, ValueError),
        ({"index": 0, "sample": None}, ValueError),
    ],
)
def test_bad_reset_options(options: dict, error: type, marker: Sample) -> None:
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[marker, marker])
    with pytest.raises(error, match="Expects"):
        env.reset(options=options)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"protocol": "zoomzoom"}, "protocol"),
        ({"max_turns": 1}, "max_turns"),
        ({"protocol": "direct", "max_turns": 2}, "max_turns"),
        ({"coord_frame": "norm100"}, "Did you mean"),
        ({"resample": "cubic"}, "resample"),
        ({"dataset": []}, "non-empty"),
        ({"view_budget": {"min_px": 1}}, "view_budget"),
        ({"prompts": {"greeting": "hi"}}, "prompt keys"),
        ({"prompts": {"ground": "{question} {choices}"}}, "placeholders"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, match: str, marker: Sample) -> None:
    kwargs = {"dataset": [marker], **kwargs}
    with pytest.raises(ValueError, match=match):
        gym.make("zoomgym/ZoomEnv-v0", **kwargs)


def test_two_turn_episode_observation_and_info(marker: Sample) -> None:
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[marker])
    chat, info = env.reset(seed=0)
    assert set(info) == INFO_KEYS and info["next_turn"] == "ground" and info["action"] is None
    assert [m["role"] for m in chat] == ["system", "user"]
    (image, view), = images(chat)
    assert view.kind == "original" and view.region == Box(0, 0, 1600, 1200) and image.size == view.shown_size
    assert "Options" not in texts(chat[1]) and "blue" not in texts(chat[1])  # turn 1 shows no choices
    assert f"{view.shown_size[0]} pixels wide" in texts(chat[1])

    chat, reward, terminated, truncated, info = env.step(GOOD_BOX)
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["action"] == "zoom" and info["box_valid"] and not info["fallback"]
    assert info["next_turn"] == "answer" and info["turn"] == 1
    assert info["box_original"].intersection(marker.boxes[0]) == marker.boxes[0].area  # the crop holds it
    assert 0 < info["iou"] <= 1
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert texts(chat[2]) == GOOD_BOX
    (_, first), (crop, crop_view) = images(chat)
    assert crop_view.kind == "crop" and crop_view.region == info["box_original"]
    assert info["visual_tokens"] == first.visual_tokens + crop_view.visual_tokens
    assert "(B) red" in texts(chat[3])
    # The crop is cut from the original: the red square fills its middle.
    assert crop.getpixel((crop.width // 2, crop.height // 2)) == (255, 0, 0)

    chat, reward, terminated, truncated, info = env.step("The square is red, so \\boxed{B}")
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info["answer"] == "B" and info["correct"] and info["next_turn"] is None and info["action"] == "answer"
    assert len(chat) == 5  # no user message after the end
    with pytest.raises(gym.error.ResetNeeded):
        env.step("again")


def test_fallback_shows_the_same_image_again_with_a_notice(marker: Sample) -> None:
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[marker])
    env.reset(seed=0)
    chat, reward, terminated, truncated, info = env.step("I think it is \\boxed{B}, at [0, 0, 10, 10].")
    assert info["action"] == "invalid" and info["fallback"] and not info["box_valid"]
    assert info["box_shown"] == Box(0, 0, 10, 10) and info["next_turn"] == "answer"
    assert not terminated and not truncated and reward == 0.0
    (first, first_view), (again, again_view) = images(chat)
    assert again is first and again_view == first_view
    assert "missing or invalid" in texts(chat[-1]) and "(A) blue" in texts(chat[-1])
    chat, reward, terminated, truncated, info = env.step("\\boxed{red}")
    assert reward == 1.0 and terminated and info["answer"] == "B"


def test_merged_patch_comes_from_the_view_budget(marker: Sample) -> None:
    """A merge-size-1 model (factor 14): sides are multiples of 14, and a box side must exceed 14
    shown pixels (not Qwen2.5-VL's 28)."""
    budget = {"min_pixels": 64 * 14 * 14, "max_pixels": 1024 * 14 * 14, "patch_size": 14, "merge_size": 1}
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[marker], view_budget=budget)
    chat, info = env.reset(seed=0)
    ((_, view),) = images(chat)
    assert view.shown_size == (504, 378) and view.grid_thw == (1, 27, 36)
    assert view.visual_tokens == info["visual_tokens"] == 36 * 27
    _, _, _, _, info = env.step("[100, 100, 120, 120]")
    assert info["box_valid"] and info["action"] == "zoom"
    env.reset(seed=0)
    _, _, _, _, info = env.step("[100, 100, 114, 120]")
    assert not info["box_valid"] and info["fallback"]


def test_box_leaving_the_image_is_invalid_unless_clamped(marker: Sample) -> None:
    outside = "[1100, 800, 1200, 900]"  # the view is 1148 x 840
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[marker])
    env.reset(seed=0)
    assert env.step(outside)[4]["fallback"]
    for kwargs in ({"clamp": True}, {"box_rules": {"clamp": True}}):
        env = gym.make("zoomgym/ZoomEnv-v0", dataset=[marker], **kwargs)
        env.reset(seed=0)
        chat, _, _, _, info = env.step(outside)
        assert info["box_valid"] and info["box_shown"] == Box(1100, 800, 1148, 840)
        assert info["box_original"].x2 == 1600 and info["box_original"].y2 == 1200
        assert images(chat)[-1][1].region == info["box_original"]


def test_answer_turn_without_answer_terminates_with_zero_reward(marker: Sample) -> None:
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[marker])
    env.reset(seed=0)
    env.step(GOOD_BOX)
    _, reward, terminated, truncated, info = env.step(GOOD_BOX)
    assert (reward, terminated, truncated) == (0.0, True, False)
    assert info["action"] == "invalid" and info["answer"] is None and not info["turn_limit_reached"]


def test_multi_turn_zooms_into_crops_of_crops(marker: Sample) -> None:
    env = gym.make("zoomgym/ZoomEnvMultiTurn-v0", dataset=[marker], resample="nearest")
    _, info = env.reset(seed=0)
    assert info["max_turns"] == 4
    chat, _, _, _, info = env.step(GOOD_BOX)
    assert info["next_turn"] == "ground_or_answer"
    crop_view = images(chat)[-1][1]
    # Second box, written in the crop's pixels: the marker's position in the crop, from provenance.
    target = crop_view.from_original(Box(1190, 290, 1250, 350))
    box = [round(v) for v in target.as_tuple()]
    chat, _, terminated, _, info = env.step(f"Closer: {box}")
    assert info["action"] == "zoom" and not terminated
    second = images(chat)[-1][1]
    assert second.region.x1 >= crop_view.region.x1 and second.region.x2 <= crop_view.region.x2
    assert abs(second.region.x1 - 1190) < 1 and abs(second.region.y2 - 350) < 1
    image = images(chat)[-1][0]
    assert image.getpixel((image.width // 2, image.height // 2)) == (255, 0, 0)
    chat, reward, terminated, truncated, info = env.step("\\boxed{B}")
    assert reward == 1.0 and terminated and info["turn"] == 3


def test_multi_turn_last_turn_must_answer_or_truncates(marker: Sample) -> None:
    env = gym.make("zoomgym/ZoomEnvMultiTurn-v0", dataset=[marker], max_turns=3)
    env.reset(seed=0)
    env.step(GOOD_BOX)
    _, _, _, _, info = env.step("[10, 10, 200, 200]")
    assert info["next_turn"] == "answer"
    _, reward, terminated, truncated, info = env.step("[10, 10, 200, 200]")
    assert terminated and not truncated and reward == 0.0

    env = gym.make("zoomgym/ZoomEnvMultiTurn-v0", dataset=[marker], max_turns=3, answer_on_last_turn=False)
    env.reset(seed=0)
    env.step(GOOD_BOX)
    env.step("[10, 10, 200, 200]")
    chat, reward, terminated, truncated, info = env.step("[10, 10, 200, 200]")
    assert truncated and not terminated and reward == 0.0 and info["turn_limit_reached"]
    assert info["next_turn"] is None and chat[-1]["role"] == "assistant"


def test_direct_vqa_is_one_answer_turn_with_choices(marker: Sample) -> None:
    env = gym.make("zoomgym/DirectVQA-v0", dataset=[marker])
    chat, info = env.reset(seed=0)
    assert info["next_turn"] == "answer" and "(B) red" in texts(chat[1])
    _, reward, terminated, truncated, info = env.step(GOOD_BOX + " \\boxed{B}")
    assert (reward, terminated, truncated) == (1.0, True, False) and info["box_original"] is None


@pytest.mark.parametrize(("frame", "box"), [("norm1000", "[720, 220, 800, 310]"), ("relative", "[0.72, 0.22, 0.80, 0.31]")])
def test_other_frames_crop_the_same_area(frame: str, box: str, marker: Sample) -> None:
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[marker], coord_frame=frame)
    chat, info = env.reset(seed=0)
    assert info["frame"] == frame and "pixels wide" not in texts(chat[1])
    _, _, _, _, info = env.step(box)
    assert info["box_valid"]
    assert info["box_original"].intersection(marker.boxes[0]) == marker.boxes[0].area


def test_prompts_are_overridable_data(marker: Sample) -> None:
    prompts = {"ground": "Q: {question} Box please. {frame_rule}", "choice": "{letter}: {text}"}
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[marker], prompts=prompts)
    chat, _ = env.reset(seed=0)
    assert texts(chat[1]).startswith("Q: What colour is the square? Box please.")
    chat, *_ = env.step(GOOD_BOX)
    assert "B: red" in texts(chat[-1])
    assert PromptTemplates.from_dict({"frame_rules": {"relative": "fractions"}}).frame_rule("relative", (1, 1)) == "fractions"


def test_render_draws_boxes_and_crops(marker: Sample) -> None:
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[marker], render_mode="rgb_array")
    env.reset(seed=0)
    before = env.render()
    env.step(GOOD_BOX)
    after = env.render()
    assert before.dtype == np.uint8 and before.ndim == 3 and before.shape[2] == 3
    assert after.shape[1] > before.shape[1]  # the crop column
    assert (after[..., 1] == 200).any()  # the valid box outline (green)


def test_render_tells_the_episode_in_words_under_a_legend(marker: Sample) -> None:
    """Issue 10: a rendered trajectory showed boxes only: not the question, what the model wrote, the parsed
    answer or the reward, and no legend said which colour is the truth."""
    from zoomgym.envs.render import LEGEND, MAX_ACTION_CHARS, episode_text, render_episode

    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[marker], render_mode="rgb_array")
    env.reset(seed=0)
    env.step("no box " + "x" * 2000)  # a fallback turn: a long unbroken model text is cut, and wrapped
    _, reward, *_ = env.step("It is \\boxed{B}.")
    inner = env.unwrapped
    image, view = inner._original
    bare = render_episode(image, view, inner._boxes, inner._crops, truth=marker.boxes)
    frame = env.render()
    assert frame.shape[1] == bare.shape[1] and frame.shape[0] > bare.shape[0] + 16 * 6  # text rows below
    assert (frame[bare.shape[0]:] == 0).all(axis=-1).any()  # black text on the white block
    assert [label for _, label in LEGEND] == ["ground truth", "model box (n = turn)", "invalid box"]
    whole = ViewInfo("n", Box(0, 0, 224, 224), (224, 224), 64, (1, 16, 16), "original")
    narrow = render_episode(Image.new("RGB", (224, 224), "white"), whole, [], [],
                            caption="a")  # a fallback episode: no crop column, the legend wraps
    for colour, _ in LEGEND:  # every swatch is drawn (before, the third fell off the right edge)
        assert (narrow[224:] == colour).all(axis=-1).any(), colour

    text = episode_text(marker, *inner._story).splitlines()
    assert text[0] == "sample marker: What colour is the square?"
    assert text[1] == "choices: (A) blue  (B) red  (C) green  (D) white"
    assert text[2].startswith('turn 1 model: "no box xxx') and text[2].endswith(f"({2009 - MAX_ACTION_CHARS} more characters)")
    assert text[3] == "turn 1 env: no valid box: the same image again"
    assert text[4:] == ['turn 2 model: "It is \\\\boxed{B}."', "turn 2 env: answer B",
                        f"parsed answer: B   truth: B   reward: {reward:g}"]


def test_observations_are_fresh_objects(marker: Sample) -> None:
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[marker])
    first, _ = env.reset(seed=0)
    second, *_ = env.step(GOOD_BOX)
    first[0]["content"][0]["text"] = "mutated by the caller"
    assert second[0]["content"][0]["text"] != "mutated by the caller"


def test_missing_and_corrupt_images_name_the_file_and_sample(tmp_path) -> None:
    missing = Sample("lost-1", str(tmp_path / "nowhere.jpg"), "q?", ("a", "b"), "A")
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[missing])
    with pytest.raises(ImageLoadError, match=r"lost-1.*nowhere\.jpg|nowhere\.jpg.*lost-1"):
        env.reset(seed=0)

    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), "white").save(buffer, format="JPEG")
    path = tmp_path / "broken.jpg"
    path.write_bytes(buffer.getvalue()[:300])  # a valid header, truncated data
    broken = Sample("broken-7", str(path), "q?", ("a", "b"), "A")
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[broken])
    with pytest.raises(ImageLoadError, match=r"broken-7") as error:
        env.reset(seed=0)
    assert "broken.jpg" in str(error.value)


def test_chat_space_contains_sample_and_batching() -> None:
    from gymnasium.vector.utils import batch_space, concatenate, create_empty_array

    space = ChatSpace(max_messages=6, seed=1)
    chats = [space.sample() for _ in range(20)]
    assert all(c in space for c in chats) and any(len(c) > 1 for c in chats)
    good = chats[-1]
    image_part = {"type": "image", "image": Image.new("RGB", (28, 28)),
                  "view": ViewInfo("s", Box(0, 0, 56, 56), (56, 56), 4, (1, 4, 4), "original")}
    bad = [
        "not a list",
        [{"role": "robot", "content": []}],
        [{"role": "user", "content": [{"type": "text", "text": 3}]}],
        [{"role": "user", "content": [image_part]}],  # image not at its view's shown size
        [{"role": "user", "content": []}] * 7,  # too many messages
    ]
    assert not any(b in space for b in bad)
    batched = batch_space(space, 3)
    assert len(batched) == 3 and all(s == space for s in batched)
    assert concatenate(space, [good, good], None) == (good, good)
    assert create_empty_array(space, 2) == ([], [])


def test_async_make_vec_says_what_to_pass_and_works_with_it(marker: Sample) -> None:
    with pytest.raises(ValueError, match=r"vector_kwargs=\{'shared_memory': False\}"):
        gym.make_vec("zoomgym/ZoomEnv-v0", num_envs=2, vectorization_mode="async", dataset=[marker])
    vec = gym.make_vec("zoomgym/ZoomEnv-v0", num_envs=2, vectorization_mode="async",
                       vector_kwargs={"shared_memory": False}, dataset=[marker])
    try:
        chats, infos = vec.reset(seed=0)
        assert isinstance(chats, tuple) and len(chats) == 2 and all(c in vec.single_observation_space for c in chats)
        for text in (GOOD_BOX, "\\boxed{B}"):
            chats, rewards, terminated, truncated, infos = vec.step((text, text))
        assert terminated.all() and (rewards == 1.0).all() and list(infos["answer"]) == ["B", "B"]
        assert len(images(chats[0])) == 2  # the view and the crop came back through the pipes
    finally:
        vec.close()


def test_an_image_failing_mid_episode_raises_an_image_load_error_naming_the_sample(tmp_path) -> None:
    # What a trainer catches to skip a sample: reset drafted the view, then the file went bad before
    # the crop's full decode.
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1800), "white").save(path, quality=90)
    sample = Sample("gone-bad", str(path), "q?", ("a", "b"), "A")
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[sample])
    env.reset(seed=0)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(ImageLoadError, match=r"sample 'gone-bad'.*big\.jpg") as error:
        env.step('[{"bbox_2d": [100, 100, 400, 400]}]')
    assert error.value.sample_id == "gone-bad"


# The `cpu` synthetic preset is made for a 168*168 .. 224*224 view budget: its 672 px canvas is shown
# at 224 px. 4x that budget (the tiny model's default) shows it at 448 px.
CPU_BUDGET = {"min_pixels": 168 * 168, "max_pixels": 224 * 224}
FOUR_TIMES = {"min_pixels": 4 * 168 * 168, "max_pixels": 4 * 224 * 224}


@pytest.mark.parametrize("env_id", sorted(envs.ENV_IDS))
def test_a_synthetic_sample_under_another_view_budget_is_refused_naming_both(env_id: str) -> None:
    (sample,) = synthetic(1, seed=0, preset="cpu")
    env = gym.make(env_id, dataset=[sample], view_budget=FOUR_TIMES)
    with pytest.raises(ValueError, match=r"sample 'synthetic-0-00000'.* at 224x224 px") as error:
        env.reset(seed=0)
    message = str(error.value)
    assert "ViewBudget(min_pixels=28224, max_pixels=50176, patch_size=14, merge_size=2)" in message  # made for
    assert "ViewBudget(min_pixels=112896, max_pixels=200704, patch_size=14, merge_size=2)" in message  # the env's
    assert "shows it at 448x448 px" in message and "check_view_budget=False" in message

    chat, _ = gym.make(env_id, dataset=[sample], view_budget=CPU_BUDGET).reset(seed=0)
    assert images(chat)[0][1].shown_size == (224, 224)
    # Another budget that shows the canvas at the same size shows the same pixels: accepted.
    same_view = gym.make(env_id, dataset=[sample], view_budget={"min_pixels": 16 * 28 * 28, "max_pixels": 64 * 28 * 28})
    assert images(same_view.reset(seed=0)[0])[0][1].shown_size == (224, 224)
    # Other samples are not synthetic: no budget to keep.
    gym.make(env_id, dataset=[marker_sample()], view_budget=FOUR_TIMES).reset(seed=0)

    opted_out = gym.make(env_id, dataset=[sample], view_budget=FOUR_TIMES, check_view_budget=False)
    assert images(opted_out.reset(seed=0)[0])[0][1].shown_size == (448, 448)
    with pytest.raises(TypeError, match="check_view_budget to be a bool"):
        gym.make(env_id, dataset=[sample], check_view_budget="no")


def test_the_view_of_the_target_hides_its_colours_only_under_the_budget_it_was_made_for() -> None:
    """Mean |difference| between the viewed targets of the 4 colour pairs: ~0.01 grey levels under the
    preset's budget, 28 to 56 under 4x that budget (the view then shows 42 levels of colour away from grey)."""
    samples = synthetic(4, seed=0, preset="cpu", categories=("attribute",), option_order="fixed")
    assert {s.answer_text() for s in samples} == set(COLOUR_PAIRS)

    def targets(budget: dict) -> list[np.ndarray]:
        env = gym.make("zoomgym/DirectVQA-v0", dataset=samples, view_budget=budget, check_view_budget=False)
        viewed = []
        for index, sample in enumerate(samples):
            (image, view), = images(env.reset(options={"index": index})[0])
            box = view.from_original(sample.boxes[0])
            viewed.append(np.asarray(image, float)[int(box.y1):int(box.y2), int(box.x1):int(box.x2)])
        return viewed

    def differences(viewed: list[np.ndarray]) -> list[float]:
        return [np.abs(a - b).mean() for i, a in enumerate(viewed) for b in viewed[i + 1:]]

    made_for, larger = targets(CPU_BUDGET), targets(FOUR_TIMES)
    assert max(differences(made_for)) < 0.1  # measured 0.01
    assert max(np.abs(v - 127.5).mean() for v in made_for) < 1.0  # grey: measured 0.51 (the corners)
    assert min(differences(larger)) > 20  # measured 27.9: every pair of answers looks different
    assert min(np.abs(v - 127.5).mean() for v in larger) > 30  # measured 41.9 levels of colour
@pytest.mark.parametrize(("env_id", "make_kwargs"), [(i, {}) for i in sorted(envs.ENV_IDS)] + [
    ("zoomgym/ZoomEnvMultiTurn-v0", {"max_turns": 3})])
def test_episode_spec_is_what_an_episode_can_show(env_id: str, make_kwargs: dict, marker: Sample) -> None:
    """The turn and image budgets come from Gymnasium's registry (and the make options), nowhere else."""
    spec = envs.episode_spec(env_id, make_kwargs)
    env = gym.make(env_id, dataset=[marker], **make_kwargs)
    assert spec.max_turns == env.unwrapped.max_turns and spec.protocol == env.unwrapped.protocol
    chat, info = env.reset(seed=0)
    done = False
    while not done:  # never answer before the last turn: every reply shows an image (a fallback here)
        chat, _, terminated, truncated, info = env.step("no box" if info["next_turn"] != "answer" else "\\boxed{B}")
        done = terminated or truncated
    shown = [p for m in chat for p in m["content"] if p["type"] == "image"]
    assert len(shown) == spec.max_images == info["turn"]


def test_episode_spec_refuses_other_envs() -> None:
    with pytest.raises(ValueError, match="entry point"):
        envs.episode_spec("CartPole-v1")
    with pytest.raises(gym.error.NameNotFound):
        envs.episode_spec("zoomgym/ZomEnv-v0")
