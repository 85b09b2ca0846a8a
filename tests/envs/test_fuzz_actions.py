"""Nothing the model writes may raise: >= 10,000 generated actions through the parsers and the env."""

from __future__ import annotations

import random
import time

import gymnasium as gym
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoomgym.envs.actions import BoxRules, extract_boxed, read_box
from zoomgym.envs.geometry import Box
from zoomgym.envs.rewards import match_answer

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
