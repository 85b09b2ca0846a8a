"""The action space: a `gymnasium.spaces.Text` that every env gets at no cost (one env per episode)."""

from __future__ import annotations

import copy
import pickle
import time

import gymnasium as gym
from gymnasium.spaces import Text
from gymnasium.vector.utils import batch_space
from zoomgym.envs.data import Sample
from zoomgym.envs.spaces import ActionText, action_charset

from zoomgym import envs  # noqa: F401  (registers the ids)


def test_action_text_is_the_text_space_it_replaces() -> None:
    space = ActionText(64, seed=3)
    plain = Text(64, min_length=0, charset=action_charset())
    assert space == plain and plain == space and space.characters == plain.characters
    assert space.sample() in space and space.sample() in plain
    assert "" in space and "x" * 65 not in space and "\x00" not in space
    plain.seed(5)
    space.seed(5)
    assert [space.sample() for _ in range(3)] == [plain.sample() for _ in range(3)]


def test_instances_share_the_character_tables_and_own_their_generators() -> None:
    a, b = ActionText(100_000), ActionText(100_000)
    assert a.character_list is b.character_list
    a.seed(0)
    b.seed(0)
    a.sample()
    assert b.np_random.bit_generator.state != a.np_random.bit_generator.state  # sampling a left b alone

    deep = copy.deepcopy(a)
    assert deep == a and deep.character_list is a.character_list and deep.np_random is not a.np_random
    assert deep.sample() == a.sample()  # same generator state, copied

    raw = pickle.dumps(a)
    assert len(raw) < 2_000  # the tables stay behind (a plain Text pickles to about 2 MB)
    restored = pickle.loads(raw)
    assert restored == a and restored.sample() == a.sample()

    batched = batch_space(a, 3)
    assert len(batched) == 3 and all(s == a and s.character_list is a.character_list for s in batched)


def test_building_an_env_costs_next_to_nothing(marker: Sample) -> None:
    gym.make("zoomgym/ZoomEnv-v0", dataset=[marker])  # the tables, once per process
    start = time.perf_counter()
    made = [gym.make(env_id, dataset=[marker]) for _ in range(10) for env_id in sorted(envs.ENV_IDS)]
    seconds = time.perf_counter() - start
    # About 1 ms each on 2 loaded cores; a plain Text over the charset costs about 0.2 s per env.
    assert seconds < 1.5, f"30 envs took {seconds:.2f} s"
    assert len({id(env.unwrapped.action_space) for env in made}) == len(made)
