"""The batched multi-turn rollout engine: B samples x G rollouts, token-exact.

Each episode has its own env instance. Every round, all episodes still running generate their next
turn in **one** backend batch; finished episodes leave the batch. The sequence of an episode is built
from ids only:

    prefix ids (system + first user turn + ``<|im_start|>assistant\\n``, via the adapter)
    + sampled ids of turn 1                                  (loss mask 1, sampling log-probs)
    + the adapter's ids for the end of that assistant turn and the env's reply (mask 0)
    + sampled ids of turn 2 ...

The model's tokens are kept exactly as sampled (they are decoded only to hand the env its action text;
never decoded and re-encoded). A sampled ``<|im_end|>`` is a model token (mask 1); the ``<|im_end|>`` the
template appends after a stop-string or length stop is not (mask 0).

Context budget: an episode may hold at most ``context_budget`` tokens. Each turn may generate at most
``min(max_new_tokens, budget - current length)`` tokens; an env reply (with its images) is appended
whole or not at all: if it does not fit (leaving room for at least one generated token), the episode
ends there, ``truncated`` and ``context_truncated`` are set on the trajectory and
``info["context_truncated"] = True`` on its last info. A turn is never cut inside an image.

KV caches: every request carries its episode as ``cache_key``, so a backend that keeps caches (hf)
prefills a group's shared first prompt once and each later turn only from what this engine appended
(`agents.backends.base.GenerationRequest`); the sampled tokens and log-probs are those of a full prefill.

Seeds: with ``sampling.seed`` set, the draws of episode ``e`` in turn ``k`` use the seed
``SeedSequence([seed, e, k])``, so results do not depend on batch size or on which episodes are still
running; env resets use ``seed + e``. ``e`` is the episode's position in the call, or the id the caller
gives it (``episode_ids``: an evaluation that plays a dataset in batches, and resumes, numbers each
episode by its sample's place in the dataset).

Envs in threads: every round, the envs of different groups reset or step in parallel threads (their
work is mostly Pillow's decoding, rendering, cropping and resizing, which releases the GIL), those of one
group in order in one thread, so a group's first episode decodes the image its others share. Sampling,
tokenizing and the bookkeeping stay in the calling thread, so every episode is what a plain loop makes.

Unreadable images: an env raises `envs.data.ImageLoadError` from ``reset`` or ``step`` when a sample's
image fails to decode. With ``on_image_error`` set, the engine stops that sample's episodes, drops its
whole group from the result (an advantage needs the whole group) and calls ``on_image_error(error)``
once per sample, so a trainer counts it and goes on; without it, the error propagates.

Agents that act on text (the `agents.base.Agent` protocol: the scripted agents, or any other) play
through the same engine with `play_episodes`: same envs, resets, seeds, bookkeeping and `Trajectory`,
without token ids (``length == 0``), so one metrics module (`agents.metrics`) reads both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from zoomgym.agents.backends.base import Backend, Generation, GenerationRequest, SamplingParams, decode_text
from zoomgym.agents.trajectory import Trajectory
from zoomgym.envs import DEFAULT_ENV_ID
from zoomgym.envs.data import ImageLoadError
from zoomgym.envs.data.images import map_in_threads
from zoomgym.envs.spaces import message_images, message_views

EnvSpec = str | Callable[[Any], Any]
"""A registered env id (built with ``gymnasium.make(id, dataset=[sample], view_budget=..., coord_frame=...)``)
or a factory ``sample -> env``."""
ImageErrorHandler = Callable[[ImageLoadError], None]
"""Called once per sample whose image failed to decode (its group was dropped)."""


def episode_seed(seed: int, episode: int, turn: int) -> int:
    """A 63-bit seed for one episode's turn, independent of batching."""
    return int(np.random.SeedSequence([seed, episode, turn]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class _Episode:
    """Mutable state of one running episode."""

    def __init__(self, index: int, group: int, sample: Any, env: Any) -> None:
        self.index, self.group, self.sample, self.env = index, group, sample, env
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.logps: list[float] = []
        self.images: list[Any] = []
        self.grids: list[tuple[int, int, int]] = []
        self.infos: list[dict[str, Any]] = []
        self.actions: list[str] = []
        self.finish_reasons: list[str] = []
        self.n_messages = 0
        self.observation: list[dict[str, Any]] = []  # the chat so far (what a text agent acts on)
        self.reward = 0.0
        self.terminated = self.truncated = self.context_truncated = False
        self.done = False
        self.image_error: ImageLoadError | None = None

    def append(self, ids: Sequence[int], logps: Sequence[float] | None = None) -> None:
        """Appends model tokens (with their log-probs, mask 1) or template/env tokens (mask 0)."""
        self.ids += ids
        self.mask += [1 if logps is not None else 0] * len(ids)
        self.logps += list(logps) if logps is not None else [0.0] * len(ids)

    def add_images(self, messages: Sequence[Mapping[str, Any]]) -> None:
        self.images += message_images(messages)
        self.grids += [tuple(view.grid_thw) for view in message_views(messages)]

    def step(self, action: str) -> list[dict[str, Any]] | None:
        """Steps the env with one action text: the env's reply message, or None when the episode ended."""
        self.actions.append(action)
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.infos.append(info)
        self.reward = float(reward)
        if terminated or truncated:
            self.terminated, self.truncated, self.done = bool(terminated), bool(truncated), True
            return None
        # obs = messages seen so far + the assistant message (our action) + the env's reply.
        reply = obs[self.n_messages + 1 :]
        if len(reply) != 1 or reply[0].get("role") != "user":
            raise RuntimeError(f"episode {self.index}: expects the env to reply with one user message, actual: {reply!r}")
        self.observation = obs
        return reply

    def show(self, messages: Sequence[Mapping[str, Any]], observation: Sequence[Mapping[str, Any]]) -> None:
        """Records what the env showed (its images) and how long the chat now is."""
        self.add_images(messages)
        self.n_messages = len(observation)


def _make_episodes(samples: Sequence[Any], group_size: int, make_env: Callable[[Any], Any],
                   episode_ids: Sequence[int] | None) -> list[_Episode]:
    if group_size < 1:
        raise ValueError(f"Expects group_size >= 1, actual: {group_size!r}")
    n = len(samples) * group_size
    ids = list(range(n)) if episode_ids is None else [int(i) for i in episode_ids]
    if len(ids) != n or len(set(ids)) != n:
        raise ValueError(f"Expects {n} distinct episode_ids (samples x group_size), actual: {episode_ids!r}")
    return [_Episode(ids[b * group_size + g], b, sample, make_env(sample))
            for b, sample in enumerate(samples) for g in range(group_size)]


class _Groups:
    """The episodes by group: their envs reset and stepped a group per thread, and the groups a decode
    failure stopped."""

    def __init__(self, episodes: Sequence[_Episode], on_image_error: ImageErrorHandler | None) -> None:
        self.episodes, self.on_image_error = episodes, on_image_error

    def guard(self, ep: _Episode, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; with a handler, an `ImageLoadError` stops every episode of ``ep``'s group."""
        if self.on_image_error is None:
            return fn(*args)
        try:
            return fn(*args)
        except ImageLoadError as error:
            for other in self.episodes:
                if other.group == ep.group:
                    other.done = True
            ep.image_error = error
            return None

    def reset(self, seed: int | None) -> None:
        """Resets every episode's env (`_reset`), a group per thread (`_by_group_in_threads`)."""
        _by_group_in_threads(self.episodes, lambda ep: ep.group, lambda ep: ep.done or self.guard(ep, _reset, ep, seed))

    def step(self, active: Sequence[_Episode], actions: Sequence[str]) -> dict[int, Any]:
        """Steps each running episode's env with its action, a group per thread; returns the env's reply by
        episode index (None: the episode ended). An episode whose group a decode failure stopped earlier
        in the round is not stepped."""
        replies: dict[int, Any] = {}

        def step(pair: tuple[_Episode, str]) -> None:
            ep, action = pair
            if not ep.done:
                replies[ep.index] = self.guard(ep, ep.step, action)

        _by_group_in_threads(list(zip(active, actions)), lambda pair: pair[0].group, step)
        return replies

    def intact(self) -> list[_Episode]:
        """The episodes of groups without a decode failure; the handler hears of each failed group once."""
        failed = {ep.group: ep.image_error for ep in reversed(self.episodes) if ep.image_error is not None}
        for error in failed.values():
            self.on_image_error(error)  # type: ignore[misc]  (only a handler records failures)
        return [ep for ep in self.episodes if ep.group not in failed]


def _by_group_in_threads(items: Sequence[Any], group_of: Callable[[Any], int], work: Callable[[Any], Any]) -> None:
    """``work(item)`` for every item, a group per thread, in order within each group.

    An env's reset and step are mostly Pillow's work (decoding or rendering the original, resizing the
    view, cropping), which releases the GIL, so groups run in parallel; within a group the first episode
    fills the image cache that the others read. ``work`` touches only its own group's episodes, and every
    episode's result is what a plain loop gives.
    """
    by_group: dict[int, list[Any]] = {}
    for item in items:
        by_group.setdefault(group_of(item), []).append(item)
    map_in_threads(lambda members: [work(item) for item in members], list(by_group.values()))


def _reset(ep: _Episode, seed: int | None) -> list[dict[str, Any]]:
    obs, info = ep.env.reset(seed=None if seed is None else seed + ep.index, options={"sample": ep.sample})
    ep.infos.append(info)
    ep.observation = obs
    return obs


def _progress(episodes: Sequence[_Episode], progress: bool | None) -> Any:
    show = progress if progress is not None else len(episodes) >= 64
    return tqdm(total=len(episodes), desc="rollout", unit="episode", disable=not show)


def run_rollouts(
    backend: Backend,
    adapter: Any,
    samples: Sequence[Any],
    group_size: int,
    env: EnvSpec,
    sampling: SamplingParams,
    *,
    weight_version: int | None = None,
    context_budget: int | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    on_image_error: ImageErrorHandler | None = None,
    episode_ids: Sequence[int] | None = None,
) -> list[Trajectory]:
    """Plays ``len(samples) * group_size`` episodes and returns their trajectories.

    Args:
        backend: the generation engine.
        adapter: the model adapter (chat layout as ids, special ids, view budget, coordinate frame).
        samples: ``B`` dataset samples; rollouts ``g = 0..G-1`` of sample ``b`` are trajectory
            ``b * G + g`` with ``group_id = b``.
        group_size: ``G``.
        env: an env id or a factory ``sample -> env`` (the factory must use the adapter's view budget
            and coordinate frame; an id is built with them).
        sampling: per-turn sampling; empty ``stop_token_ids`` are filled with the adapter's end-of-turn ids.
        weight_version: stamped on every trajectory (default: ``backend.weight_version``).
        context_budget: most tokens an episode may hold (``None``: unlimited).
        env_kwargs: extra ``gymnasium.make`` options when ``env`` is an id.
        progress: show a tqdm bar (``None``: when there are 64 episodes or more).
        on_image_error: skip the groups of samples whose image fails to decode, calling this once per
            sample (module docstring); ``None`` lets the `ImageLoadError` propagate.
        episode_ids: the id each episode is seeded by (default its position ``b * G + g``).
    """
    if context_budget is not None and context_budget < 1:
        raise ValueError(f"Expects context_budget >= 1 or None, actual: {context_budget!r}")
    if not sampling.stop_token_ids:
        sampling = dataclasses.replace(sampling, stop_token_ids=tuple(adapter.eos_ids))
    version = backend.weight_version if weight_version is None else int(weight_version)
    make_env = _as_factory(env, env_kwargs, view_budget=adapter.view_budget(), coord_frame=adapter.coord_frame)
    episodes = _make_episodes(samples, group_size, make_env, episode_ids)
    groups = _Groups(episodes, on_image_error)
    budget = context_budget if context_budget is not None else float("inf")
    bar = _progress(episodes, progress)
    groups.reset(sampling.seed)
    for ep in episodes:
        if not ep.done:
            obs = ep.observation
            ids = list(adapter.encode_prefix(obs))
            if len(ids) >= budget:
                _end_by_context(ep)
            else:
                ep.append(ids)
                ep.show(obs, obs)
    bar.update(sum(ep.done for ep in episodes))

    turn = 0
    run = object()  # cache keys unique to this call: no later call (other weights) can meet this one's caches
    while active := [ep for ep in episodes if not ep.done]:
        requests = [
            GenerationRequest(
                prompt_ids=ep.ids,
                images=ep.images,
                max_new_tokens=int(min(sampling.max_new_tokens, budget - len(ep.ids))),
                seed=None if sampling.seed is None else episode_seed(sampling.seed, ep.index, turn),
                cache_key=(run, ep.index),
            )
            for ep in active
        ]
        generations = backend.generate(requests, sampling)
        replies = groups.step(active, [_record_turn(ep, gen, adapter) for ep, gen in zip(active, generations)])
        for ep, gen in zip(active, generations):
            if not ep.done and replies.get(ep.index) is not None:
                _append_reply(ep, replies[ep.index], gen, adapter, budget)
        bar.update(sum(ep.done for ep in active))
        turn += 1
    bar.close()
    for ep in episodes:
        ep.env.close()
    return [_trajectory(ep, adapter, version) for ep in groups.intact()]


def play_episodes(
    agent: Any,
    samples: Sequence[Any],
    group_size: int = 1,
    env: EnvSpec = DEFAULT_ENV_ID,
    *,
    seed: int | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    on_image_error: ImageErrorHandler | None = None,
    episode_ids: Sequence[int] | None = None,
) -> list[Trajectory]:
    """Plays ``len(samples) * group_size`` episodes of an agent that acts on text.

    Every round, the running episodes' chats and infos go to ``agent.act`` in one batch (the
    `agents.base.Agent` protocol); group ids, sample ids and env seeds are those of `run_rollouts`.
    The trajectories carry no token ids (``length == 0``, ``weight_version == 0``).

    Args:
        agent: anything with ``act(observations, infos) -> list[str]`` (e.g. ``agents.OracleAgent()``).
        samples: ``B`` dataset samples.
        group_size: ``G`` episodes per sample.
        env: an env id (``gymnasium.make(id, dataset=[sample], **env_kwargs)``) or a factory ``sample -> env``.
        seed: env resets use ``seed + episode index`` (None: unseeded).
        env_kwargs: ``gymnasium.make`` options when ``env`` is an id (``view_budget``, ``coord_frame``, ...).
        progress: show a tqdm bar (``None``: when there are 64 episodes or more).
        on_image_error: as in `run_rollouts`.
        episode_ids: the id each episode's env reset is seeded by (default its position ``b * G + g``).
    """
    episodes = _make_episodes(samples, group_size, _as_factory(env, env_kwargs), episode_ids)
    groups = _Groups(episodes, on_image_error)
    bar = _progress(episodes, progress)
    groups.reset(seed)
    for ep in episodes:
        if not ep.done:
            ep.show(ep.observation, ep.observation)
    bar.update(sum(ep.done for ep in episodes))
    while active := [ep for ep in episodes if not ep.done]:
        actions = agent.act([ep.observation for ep in active], [ep.infos[-1] for ep in active])
        if len(actions) != len(active):
            raise RuntimeError(f"Expects {len(active)} actions from the agent, actual: {len(actions)}")
        replies = groups.step(active, actions)
        for ep in active:
            if not ep.done and replies.get(ep.index) is not None:
                ep.show(replies[ep.index], ep.observation)
        bar.update(sum(ep.done for ep in active))
    bar.close()
    for ep in episodes:
        ep.env.close()
    return [_trajectory(ep, None, 0) for ep in groups.intact()]


def env_factory(
    env_id: str,
    env_kwargs: Mapping[str, Any] | None = None,
    *,
    view_budget: Any = None,
    coord_frame: str | None = None,
    render: bool = False,
) -> Callable[[Any], Any]:
    """``sample -> gymnasium.make(env_id, dataset=[sample], **options)``: one fresh env per episode.

    Args:
        env_id: a registered id.
        env_kwargs: ``gymnasium.make`` options (``max_turns``, ``prompts``, ``resample``, ...).
        view_budget, coord_frame: the agent's (an LMM agent's processor fixes both); ``env_kwargs`` may
            still set either. None leaves the env's default.
        render: make envs with ``render_mode="rgb_array"``.
    """
    if not isinstance(env_id, str):
        raise TypeError(f"Expects an env id, actual: {env_id!r}")
    import gymnasium

    from zoomgym import envs  # noqa: F401  (registers the zoomgym ids)

    agent_view = {"view_budget": view_budget, "coord_frame": coord_frame}
    options = {**{k: v for k, v in agent_view.items() if v is not None}, **(env_kwargs or {})}
    if render:
        options["render_mode"] = "rgb_array"

    def make(sample: Any) -> Any:
        try:
            return gymnasium.make(env_id, dataset=[sample], **options)
        except TypeError as error:
            # Gymnasium's message repeats every argument, the sample's image bytes included: keep the cause.
            cause = error.__cause__ if isinstance(error.__cause__, TypeError) else error
            raise TypeError(f"Expects options {env_id} accepts, actual: {cause} (options: {sorted(options)})") from cause

    return make


def _as_factory(env: EnvSpec, env_kwargs: Mapping[str, Any] | None, **options: Any) -> Callable[[Any], Any]:
    if callable(env):
        return env
    return env_factory(env, env_kwargs, **options)


def _record_turn(ep: _Episode, gen: Generation, adapter: Any) -> str:
    """Appends one generated turn to its episode; returns the turn's text, the env's action."""
    ep.append(gen.token_ids, gen.logprobs)
    ep.finish_reasons.append(gen.finish_reason)
    return decode_text(adapter, gen.token_ids)


def _append_reply(ep: _Episode, reply: list[dict[str, Any]], gen: Generation, adapter: Any, budget: float) -> None:
    """Appends the env's reply to the turn ``gen`` if it fits the context budget, else ends the episode.

    Tokenizing stays in one thread (a fast tokenizer's settings are shared state); only the envs run in
    threads (`_by_group_in_threads`)."""
    ended_turn = bool(gen.token_ids) and gen.token_ids[-1] == adapter.end_of_turn_id
    ids = list(adapter.encode_env_turn(reply[0], ended_turn))
    if len(ep.ids) + len(ids) >= budget:
        _end_by_context(ep)
        return
    ep.append(ids)
    ep.show(reply, ep.observation)


def _end_by_context(ep: _Episode) -> None:
    ep.truncated = ep.context_truncated = ep.done = True
    ep.reward = 0.0
    ep.infos[-1] = {**ep.infos[-1], "context_truncated": True}


def _trajectory(ep: _Episode, adapter: Any, version: int) -> Trajectory:
    """The episode as a `Trajectory`; ``adapter`` None for a text agent's episode (no token ids)."""
    input_ids = torch.tensor(ep.ids, dtype=torch.long)
    grid = torch.tensor(ep.grids, dtype=torch.long).reshape(-1, 3)
    if adapter is not None:
        adapter.check_placeholders(input_ids, grid)  # each image's pad run == its grid's tokens
    return Trajectory(
        input_ids=input_ids,
        loss_mask=torch.tensor(ep.mask, dtype=torch.long),
        sampling_logprobs=torch.tensor(ep.logps, dtype=torch.float32),
        images=list(ep.images),
        image_grid_thw=grid,
        reward=ep.reward,
        infos=ep.infos,
        actions=ep.actions,
        finish_reasons=ep.finish_reasons,
        num_turns=len(ep.actions),
        terminated=ep.terminated,
        truncated=ep.truncated,
        context_truncated=ep.context_truncated,
        weight_version=version,
        group_id=ep.group,
        sample_id=str(getattr(ep.sample, "id", "")),
        category=str(getattr(ep.sample, "category", "")),
    )
