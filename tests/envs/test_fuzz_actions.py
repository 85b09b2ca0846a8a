"""Nothing the model writes may raise: >= 10,000 generated actions through the parsers and the env."""

from __future__ import annotations

import random
import time

import gymnasium as gym
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from zoomgym.envs.actions import BoxRules, check_box, extract_boxed, read_box
from zoomgym.envs.data import Sample
from zoomgym.envs.geometry import Box, region_to_original
from zoomgym.envs.rewards import match_answer
from zoomgym.envs.views import MAX_ASPECT_RATIO, ViewBudget

from tests.conftest import marker_sample
from zoomgym import envs  # noqa: F401

OPTIONS = ("blue", "red", "green", "white")
NUMBERS = [
    "0", "-1", "28", "100", "1e3", "1e308", "1e309", "-1e400", "NaN", "nan", "inf", "-inf", "Infinity",
    "9" * 400, "1" * 5000, "0.5", ".5", "5.", "+7", "--3", "1e", "0x1F", "1_000", "٣", "１２",
]
FRAGMENTS = [
    "[", "]", "{", "}", ",", ":", '"', "'", "```json\n", "```", '"bbox_2d"', '"label"', "\\boxed{", "\\boxed",
    "\\text{", "A", "b", "(C)", "red", "🙂", "\u202e", "\x00", "\ud800", "\n", " ", "null", "true",
]
NASTY = [
    "",
    "[" * 50_000 + "]" * 50_000,
    "{" * 100_000,
    "\\boxed{" * 15_000,
    "[1," * 30_000,
    "1" * 100_000,
    "[" + "1" * 100_000 + ", 2, 3, 4]",
    " " * 100_000 + "[1, 2, 3, 4",
    '[{"bbox_2d": [' + ", ".join(["1"] * 50_000) + "]}]",
    "[1.1.1.1.1, 2, 3, 4]" * 5000,
    "[NaN, NaN, NaN, NaN]",
    "[1e999, 1e999, 1e999, 1e999]",
    "[-1e308, -1e308, 1e308, 1e308]",
    "[10, 10, 1e308, 1e308] \\boxed{" + "9" * 10_000 + "}",
    "\\boxed{\\boxed{\\boxed{B}}}",
    "\\boxed{" + "}" * 1000,
    "```json\n" + '[{"bbox_2d": [1, 2, 3, 4], "label": ' * 5000,
    "\ud800\udfff\U0010ffff" * 1000,
    "\\boxed{red}" + "\x00" * 1000,
]


def random_action(rng: random.Random) -> str:
    """Text built from box-like pieces, numbers of every kind and junk."""
    pieces = []
    for _ in range(rng.randrange(1, 25)):
        roll = rng.random()
        if roll < 0.35:
            pieces.append(rng.choice(NUMBERS))
        elif roll < 0.8:
            pieces.append(rng.choice(FRAGMENTS))
        else:
            quad = ", ".join(str(rng.randrange(-200, 1400)) for _ in range(4))
            pieces.append(f'[{{"bbox_2d": [{quad}]}}]' if rng.random() < 0.5 else f"[{quad}]")
    return "".join(pieces)


def assert_defined(info: dict) -> None:
    assert info["action"] in ("zoom", "answer", "invalid")
    assert isinstance(info["box_valid"], bool) and isinstance(info["fallback"], bool)
    assert info["answer"] in (None, "A", "B", "C", "D")
    assert info["box_shown"] is None or isinstance(info["box_shown"], Box)
    assert info["box_original"] is None or isinstance(info["box_original"], Box)
    assert info["iou"] is None or 0.0 <= info["iou"] <= 1.0
    if info["box_valid"]:
        region = info["box_original"]
        assert region is not None and 0 <= region.x1 < region.x2 <= 1600 + 1e-6 and 0 <= region.y1 < region.y2 <= 1200 + 1e-6


@pytest.fixture(scope="module")
def multi_env() -> gym.Env:
    # Every turn kind: ground (turn 1), ground_or_answer (2, 3), answer (4).
    # Nearest resampling: the crops' pixels do not matter here, only that nothing raises.
    return gym.make("zoomgym/ZoomEnvMultiTurn-v0", dataset=[marker_sample()], resample="nearest").unwrapped


def test_nasty_actions_in_every_turn_kind(multi_env: gym.Env) -> None:
    for action in NASTY:
        multi_env.reset(seed=0)
        for _ in range(4):
            start = time.perf_counter()
            _, reward, terminated, truncated, info = multi_env.step(action)
            assert time.perf_counter() - start < 1.0, f"slow on {action[:40]!r}..."
            assert_defined(info)
            assert reward in (0.0, 1.0)
            if terminated or truncated:
                break


def test_ten_thousand_generated_actions_never_raise(multi_env: gym.Env) -> None:
    rng = random.Random(0)
    kinds = set()
    for _ in range(10_000):
        if multi_env._done:  # direct access keeps the loop cheap; the episode state is the env's own
            multi_env.reset(seed=rng.randrange(1 << 30))
        kinds.add(multi_env._next)
        _, reward, terminated, truncated, info = multi_env.step(random_action(rng))
        assert_defined(info)
        assert reward in (0.0, 1.0) and isinstance(terminated, bool) and isinstance(truncated, bool)
    assert kinds == {"ground", "ground_or_answer", "answer"}


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=300) | st.lists(st.sampled_from(FRAGMENTS + NUMBERS), max_size=30).map("".join),
       frame=st.sampled_from(["qwen25", "norm1000", "relative"]), clamp=st.booleans())
def test_parsers_are_total(text: str, frame: str, clamp: bool) -> None:
    reading = read_box(text, frame, (1148, 840), (1.39, 1.43), BoxRules(clamp=clamp), 28)
    assert reading.box_shown is None or isinstance(reading.box_shown, Box)
    assert reading.valid == (reading.valid and reading.box_shown is not None)
    boxed = extract_boxed(text)
    assert match_answer(boxed, OPTIONS) in (None, "A", "B", "C", "D")


# ------------------------------------------------------- any valid box under any view budget

def budget_of(min_tokens: int, extra_tokens: int, merge: int) -> ViewBudget | None:
    """A budget of ``min_tokens .. min_tokens + extra_tokens`` visual tokens, or None if it holds no grid."""
    factor = 14 * merge
    try:
        return ViewBudget(min_pixels=min_tokens * factor**2, max_pixels=(min_tokens + extra_tokens) * factor**2,
                          merge_size=merge)
    except ValueError:
        return None


def assert_processor_accepts(budget: ViewBudget, shown: tuple[int, int]) -> None:
    """Sides multiples of the factor, area in budget, aspect <= 200: the processor leaves it alone."""
    w, h = shown
    assert w % budget.factor == 0 and h % budget.factor == 0 and w > 0 and h > 0
    assert budget.min_pixels <= w * h <= budget.max_pixels
    assert max(w, h) / min(w, h) <= MAX_ASPECT_RATIO
    assert budget.shown_size(w, h) == shown


def test_valid_box_under_a_tight_budget_is_answered_with_a_crop() -> None:
    # The repro: the 3000x30 image is shown at 1876x84 (aspect 22, not 100: the only in-budget
    # grid of 201 tokens is 67 x 3), so a full-width box 29 px high maps to a 3000 x 10.4 region
    # (aspect 289) in the original, which make_view used to refuse with a ValueError.
    sample = Sample("wide", Image.new("RGB", (3000, 30), "white"), "q?", ("a", "b"), "A")
    budget = {"min_pixels": 784 * 201, "max_pixels": 784 * 201}
    env = gym.make("zoomgym/ZoomEnv-v0", dataset=[sample], view_budget=budget)
    chat, _ = env.reset(seed=0)
    assert chat[1]["content"][0]["view"].shown_size == (1876, 84)
    chat, _, _, _, info = env.step('[{"bbox_2d": [0, 0, 1876, 29]}]')
    assert info["box_valid"] and info["action"] == "zoom"
    crop = chat[-1]["content"][1]["view"]
    assert crop.kind == "crop" and crop.region.width / crop.region.height > 200
    assert_processor_accepts(env.unwrapped.view_budget, crop.shown_size)


def extreme_boxes(shown: tuple[int, int], rules: BoxRules, factor: int) -> list[Box]:
    """The valid boxes of most extreme aspect in an image of ``shown`` pixels: full length one way,
    just over the minimum side (or just under the aspect limit) the other."""
    w, h = shown
    side = factor + 1e-3
    boxes = []
    for long_w, long_h in ((w, side), (side, h)):
        boxes.append(Box(0, 0, min(long_w, w), min(long_h, h)))
        # The aspect limit rather than the side limit binds when the image is long enough.
        if long_w == w and w / rules.max_aspect * 1.0001 < h:
            boxes.append(Box(0, 0, w, w / rules.max_aspect * 1.0001))
        if long_h == h and h / rules.max_aspect * 1.0001 < w:
            boxes.append(Box(0, 0, h / rules.max_aspect * 1.0001, h))
    return boxes


def test_the_most_extreme_valid_boxes_give_views_the_processor_accepts() -> None:
    # Analytic: over a grid of budgets (tight and loose) and image sizes (every aspect up to 1:400),
    # the thinnest valid box at reset's view and again in the crop it gives (crops of crops).
    rules, checked = BoxRules(), 0
    for merge in (1, 2):
        for min_tokens in (1, 64, 199, 201, 1024):
            for extra in (0, 1, 1024):
                budget = budget_of(min_tokens, extra, merge)
                if budget is None:
                    continue
                for width in (1, 29, 387, 1000, 3000, 12000):
                    for aspect in (1, 7.5, 99, 163.6, 200, 260, 400):
                        for size in ((width, width * aspect), (width * aspect, width)):
                            region = Box(0, 0, *size)
                            for _depth in range(3):
                                shown = budget.shown_size(region.width, region.height)
                                assert_processor_accepts(budget, shown)
                                scale = (region.width / shown[0], region.height / shown[1])
                                accepted = [check_box(b, shown, scale, rules, budget.factor)
                                            for b in extreme_boxes(shown, rules, budget.factor)]
                                accepted = [b for b in accepted if b is not None]
                                checked += len(accepted)
                                if not accepted:
                                    break
                                region = region_to_original(accepted[-1], region, shown)
    assert checked > 1000


# (min tokens, extra tokens, merge size): tight budgets (201 tokens hold only a 67 x 3 grid; 399 only
# 21 x 19 or 133 x 3), near-tight and loose ones. An env is built once per setting (a Text action space
# takes about 0.2 s to build); the image changes with every example.
BUDGETS = [(201, 0, 2), (399, 0, 2), (1, 0, 2), (64, 1, 1), (256, 1024, 2), (12, 2, 1)]
_ENVS: dict[tuple, gym.Env] = {}


def env_for(budget: tuple[int, int, int], frame: str, clamp: bool) -> gym.Env:
    key = (budget, frame, clamp)
    if key not in _ENVS:
        _ENVS[key] = gym.make("zoomgym/ZoomEnvMultiTurn-v0", dataset=[marker_sample()], view_budget=budget_of(*budget),
                              coord_frame=frame, clamp=clamp, resample="nearest").unwrapped
    return _ENVS[key]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.sampled_from(BUDGETS),
    width=st.integers(1, 6000),
    aspect=st.floats(1 / 300, 300),
    boxes=st.lists(st.tuples(*[st.floats(-0.1, 1.1)] * 4), min_size=3, max_size=3),
    frame=st.sampled_from(["qwen25", "norm1000", "relative"]),
    clamp=st.booleans(),
)
def test_any_box_under_any_budget_gets_an_answer(
    budget: tuple[int, int, int], width: int, aspect: float, boxes: list[tuple[float, ...]], frame: str, clamp: bool
) -> None:
    height = max(1, round(width / aspect))
    if width * height > 2_000_000:  # keep each example's image cheap
        return
    sample = Sample("s", Image.new("RGB", (width, height), "grey"), "q?", ("a", "b"), "A")
    env = env_for(budget, frame, clamp)
    chat, info = env.reset(options={"sample": sample})
    for fractions in boxes:  # each box in fractions of the image shown last
        shown = [p["view"] for m in chat for p in m["content"] if p["type"] == "image"][-1].shown_size
        assert_processor_accepts(env.view_budget, shown)
        scale = {"qwen25": shown, "norm1000": (1000, 1000), "relative": (1, 1)}[frame]
        written = [f * scale[i % 2] for i, f in enumerate(fractions)]
        chat, _, terminated, truncated, info = env.step(f"[{', '.join(repr(v) for v in written)}]")
        assert_defined_anywhere(info)
        if terminated or truncated:
            break


def assert_defined_anywhere(info: dict) -> None:
    assert info["action"] in ("zoom", "answer", "invalid")
    assert info["box_valid"] == (info["action"] == "zoom")
