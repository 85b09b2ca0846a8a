"""ZoomEnv: multiple-choice visual questions where the model may zoom into the full-resolution image."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from zoomgym.envs.actions import BoxReading, BoxRules, extract_boxed, read_box
from zoomgym.envs.data import Sample, image_size, load_image, load_view_source
from zoomgym.envs.data.synthetic import check_view_budget
from zoomgym.envs.geometry import Box, clamp_box, get_frame
from zoomgym.envs.prompts import PromptTemplates
from zoomgym.envs.render import episode_text, render_episode
from zoomgym.envs.rewards import answer_reward, match_answer
from zoomgym.envs.spaces import ActionText, Chat, ChatSpace, Message, Part
from zoomgym.envs.views import RESAMPLING, ViewBudget, ViewInfo, make_view

PROTOCOLS = ("zoom", "direct")
DEFAULT_DATASET_SIZE = 8
TURN_KINDS = ("ground", "ground_or_answer", "answer")


class ZoomEnv(gym.Env[Chat, str]):
    r"""Answer a multiple-choice question about a high-resolution image, zooming in first.

    ## Description
    The MGPO protocol (multi-turn grounding-based policy optimisation). The model sees the whole image
    reduced to a visual-token budget and the question without its choices, and writes the box of the
    area that matters. The env cuts that box from the **full-resolution original**, resizes it to the
    same budget (small crops are enlarged) and shows it with the question and the choices; the model
    then answers with a letter in ``\boxed{}``. ``protocol="zoom"`` with ``max_turns=K > 2`` lets the
    model zoom again (each box in the frame of the image shown last, so crops of crops chain back to
    the original) or answer in turns ``2..K-1``. ``protocol="direct"`` is one answer turn on the
    whole image (the GRPO baseline).

    ## Observation
    The whole conversation so far as Hugging Face multimodal chat messages (`envs.spaces.ChatSpace`):
    ``[{"role": "system" | "user" | "assistant", "content": [{"type": "text", "text": str} |
    {"type": "image", "image": PIL.Image.Image, "view": ViewInfo}]}, ...]``. Images are already at
    their shown size (``view.shown_size``; processors must not resize them) and carry their
    provenance (`envs.views.ViewInfo`: sample id, region in original pixels, visual tokens, grid).
    ``reset`` returns the system message and the first user message; each ``step`` returns the
    previous messages, the assistant message (the action) and, unless the episode ended, the env's
    next user message. Every call returns new lists and dicts (images are shared, read-only).

    ## Action
    The model's text (`envs.spaces.ActionText`, a `gymnasium.spaces.Text`; any ``str`` is accepted
    and nothing in it can raise).
    A box is Qwen2.5-VL grounding JSON ``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]`` (fenced
    or not) or a bare ``[x1, y1, x2, y2]``, written in ``coord_frame`` relative to the image shown
    last; the first *valid* one counts (`envs.actions`). The answer is the last ``\boxed{...}``: an
    option letter or the option's text. Each turn has a kind (``info["next_turn"]``):

    - ``"ground"`` (turn 1 of the zoom protocol): a valid box zooms; anything else (no box, invalid
      box, an answer) gives the *fallback*: a notice and the same image again.
    - ``"ground_or_answer"`` (turns ``2..K-1``): a ``\boxed{}`` answers (it wins over a box), else a
      valid box zooms, else the fallback.
    - ``"answer"`` (the last turn, and DirectVQA): the text is the answer; the episode ends.

    ## Reward
    Terminal and binary: ``1.0`` iff the parsed answer is the correct letter, else ``0.0`` (also on
    every non-final step and on truncation).

    ## Episode End
    ``terminated=True`` when the model took an answer turn (an answer-kind turn, or a ``\boxed{}``
    in a ``ground_or_answer`` turn), whether or not an answer could be parsed. ``truncated=True``
    only when the turn budget runs out before an answer: with ``answer_on_last_turn=False`` the last
    turn is ``ground_or_answer`` and a model that zooms or fails there is truncated
    (``info["turn_limit_reached"] = True``, reward 0). Stepping a finished episode raises
    `gymnasium.error.ResetNeeded`.

    Vectorised (``gymnasium.make_vec(id, num_envs=N, vectorization_mode="sync")``): observations are
    a tuple of N chats, infos are arrays per key. With Gymnasium's default ``NEXT_STEP`` autoreset a
    sub-env whose episode ended is reset by the *next* ``step`` call, which ignores that env's action
    and returns its new first observation with reward 0 and ``terminated = truncated = False``.

    ## Info
    ``turn`` (model turns taken), ``max_turns``, ``next_turn`` (kind of the next turn, None when
    done), ``frame`` (``coord_frame``), ``box_shown`` (the box used, in pixels of the image shown
    before this step; when none is valid, the first well-formed one; else None), ``box_original``
    (the same in original pixels), ``box_valid``, ``fallback``, ``iou`` (max IoU of ``box_original``
    with the sample's boxes; None without either), ``visual_tokens`` (of every image shown so far),
    ``answer`` (parsed letter or None), ``correct``, ``action`` (``"zoom"``, ``"answer"``,
    ``"invalid"`` or None at reset), ``sample`` (the `Sample`: scripted agents may read its ground
    truth, LMM agents never do) and ``turn_limit_reached``.

    ## Arguments
    | argument | default | meaning |
    |---|---|---|
    | ``dataset`` | ``synthetic(8, seed=0)`` | sequence of `Sample`; ``reset`` draws with ``np_random`` |
    | ``protocol`` | ``"zoom"`` | ``"zoom"`` or ``"direct"`` |
    | ``max_turns`` | 2 | model turns per episode (1 for ``"direct"``, >= 2 for ``"zoom"``) |
    | ``coord_frame`` | ``"qwen25"`` | ``"qwen25"`` shown pixels, ``"norm1000"``, ``"relative"`` |
    | ``view_budget`` | ``ViewBudget()`` | min/max pixels, patch and merge size (or a dict of them) |
    | ``resample`` | ``"bicubic"`` | ``"bicubic"``, ``"lanczos"``, ``"bilinear"``, ``"nearest"`` |
    | ``box_rules`` | ``BoxRules()`` | validity: min side (default one merged patch), aspect, clamp |
    | ``clamp`` | None | shorthand for ``box_rules.clamp``: True clips a box leaving the image to it |
    | ``prompts`` | ``PromptTemplates()`` | the wording, or a dict of overrides |
    | ``answer_on_last_turn`` | True | the last turn must answer (False: it may zoom, then truncates) |
    | ``max_action_chars`` | 100000 | ``action_space.max_length`` (longer text is still accepted) |
    | ``render_mode`` | None | ``"rgb_array"``: the original with every box, crops beside it |
    | ``check_view_budget`` | True | refuse synthetic samples ``view_budget`` would show at another size |

    A synthetic sample (`envs.data.synthetic`) hides its answer only in the view it was made for, so
    ``reset`` raises ValueError, naming the sample and both budgets, when ``view_budget`` shows its
    canvas at another size: the view may then show the answer, and RL would learn to read it there
    instead of zooming. ``check_view_budget=False`` is for showing such a sample at other budgets on
    purpose (a leak measurement, a resolution sweep, a speed benchmark), not for learning runs.

    Registered: ``zoomgym/ZoomEnv-v0`` (zoom, 2 turns), ``zoomgym/ZoomEnvMultiTurn-v0`` (zoom, 4
    turns), ``zoomgym/DirectVQA-v0`` (direct, 1 turn); `envs.episode_spec` reads an id's budgets.
    A new protocol is a subclass overriding `turn_kind` (the kind of each turn), registered as an id.

    ## Example
    >>> import gymnasium as gym
    >>> from zoomgym import envs
    >>> from zoomgym.envs.data.sample import Sample
    >>> from PIL import Image
    >>> sample = Sample("s0", Image.new("RGB", (2800, 1400), "white"), "What colour is the dot?",
    ...                 ("red", "blue"), "A", boxes=(Box(2100, 950, 2120, 970),))
    >>> env = gym.make("zoomgym/ZoomEnv-v0", dataset=[sample])
    >>> chat, info = env.reset(seed=0)
    >>> [m["role"] for m in chat], info["next_turn"], chat[1]["content"][0]["view"].shown_size
    (['system', 'user'], 'ground', (1400, 700))
    >>> chat, reward, terminated, truncated, info = env.step('[{"bbox_2d": [1030, 470, 1090, 520]}]')
    >>> info["action"], info["box_original"], chat[-1]["content"][1]["view"].shown_size
    ('zoom', Box(x1=2060.0, y1=940.0, x2=2180.0, y2=1040.0), (504, 420))
    >>> chat, reward, terminated, truncated, info = env.step("It is red: \\boxed{A}")
    >>> reward, terminated, truncated, info["correct"]
    (1.0, True, False, True)

    ## Version History
    * v0: initial version.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 1}

    def __init__(
        self,
        dataset: Sequence[Sample] | None = None,
        *,
        protocol: str = "zoom",
        max_turns: int = 2,
        coord_frame: str = "qwen25",
        view_budget: ViewBudget | Mapping[str, int] | None = None,
        resample: str = "bicubic",
        box_rules: BoxRules | Mapping[str, Any] | None = None,
        clamp: bool | None = None,
        prompts: PromptTemplates | Mapping[str, Any] | None = None,
        answer_on_last_turn: bool = True,
        max_action_chars: int = 100_000,
        render_mode: str | None = None,
        check_view_budget: bool = True,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"Expects protocol in {PROTOCOLS}, actual: {protocol!r}")
        min_turns = 1 if protocol == "direct" else 2
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < min_turns:
            raise ValueError(f"Expects max_turns >= {min_turns} for protocol {protocol!r}, actual: {max_turns!r}")
        if protocol == "direct" and max_turns != 1:
            raise ValueError(f"Expects max_turns == 1 for protocol 'direct', actual: {max_turns!r}")
        if resample not in RESAMPLING:
            raise ValueError(f"Expects resample in {sorted(RESAMPLING)}, actual: {resample!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"Expects render_mode in {self.metadata['render_modes']} or None, actual: {render_mode!r}")
        if not isinstance(check_view_budget, bool):
            raise TypeError(f"Expects check_view_budget to be a bool, actual: {check_view_budget!r}")
        get_frame(coord_frame)  # unknown frames fail here, with a suggestion

        self.dataset: Sequence[Sample] = _default_dataset() if dataset is None else dataset
        if len(self.dataset) == 0:
            raise ValueError("Expects a non-empty dataset of Sample, actual: an empty sequence")
        self.protocol = protocol
        self.max_turns = max_turns
        self.coord_frame = coord_frame
        self.view_budget = _as(view_budget, ViewBudget, "view_budget")
        self.resample = resample
        self.box_rules = _as(box_rules, BoxRules, "box_rules")
        if clamp is not None:
            if not isinstance(clamp, bool):
                raise TypeError(f"Expects clamp to be a bool or None, actual: {clamp!r}")
            self.box_rules = dataclasses.replace(self.box_rules, clamp=clamp)
        self.prompts = prompts if isinstance(prompts, PromptTemplates) else PromptTemplates.from_dict(prompts or {})
        self.prompts.frame_rule(coord_frame, (1, 1))  # a frame without a prompt rule fails here
        self.answer_on_last_turn = answer_on_last_turn
        self.render_mode = render_mode
        self.check_view_budget = check_view_budget

        self.observation_space = ChatSpace(max_messages=2 * max_turns + 2)
        self.action_space = ActionText(max_action_chars)

        self._sample: Sample | None = None
        self._done = True

    # ------------------------------------------------------------------ gymnasium API

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Chat, dict]:
        super().reset(seed=seed)
        sample = self._choose_sample(options or {})
        if self.check_view_budget:
            check_view_budget(sample, self.view_budget)
        width, height = image_size(sample)  # ImageLoadError names the file and the sample
        shown = self.view_budget.shown_size(width, height)
        # A JPEG much larger than the view is draft-decoded: same view, a fraction of the decode.
        source = load_view_source(sample, shown)
        image, view = make_view(
            source.image, Box(0, 0, width, height), self.view_budget, sample_id=sample.id,
            kind="original", resample=self.resample, source_box=source.box,
        )
        self._sample = sample
        self._turn = 0
        self._done = False
        self._truncated = False
        self._original = (image, view)
        self._last = (image, view)
        self._visual_tokens = view.visual_tokens
        self._boxes: list[tuple[Box, bool]] = []
        self._crops: list[Any] = []
        self._next = self.turn_kind(1)
        system = self.prompts.render("direct_system" if self.protocol == "direct" else "zoom_system")
        question, choices, rule = sample.question, self.prompts.choices(sample.options), self._frame_rule(view)
        if self._next == "ground":  # the choices come with the crop, after the box
            text = self.prompts.render("ground", question=question, frame_rule=rule)
        elif self._next == "ground_or_answer":
            text = self.prompts.render("ground_or_answer", question=question, choices=choices, frame_rule=rule)
        else:
            text = self.prompts.render("direct", question=question, choices=choices)
        self._messages: Chat = [_message("system", _text(system)), _message("user", _image(image, view), _text(text))]
        info = self._info()
        self._story: tuple[list[str], list[dict], float] = ([], [info], 0.0)  # actions, infos, reward: render()'s text
        return self._observation(), info

    def step(self, action: str) -> tuple[Chat, float, bool, bool, dict]:
        if self._done or self._sample is None:
            raise gym.error.ResetNeeded("Expects reset() before step(), actual: the episode has ended or not begun")
        if not isinstance(action, str):
            raise TypeError(f"Expects the action to be the model's text (str), actual: {type(action).__name__}")
        sample, kind = self._sample, self._next
        self._turn += 1
        self._messages.append(_message("assistant", _text(action)))
        raw_answer = None if kind == "ground" else extract_boxed(action)
        answering = kind == "answer" or raw_answer is not None
        reading = BoxReading(None, False) if answering else self._read_box(action)
        box_original = self._to_original(reading.box_shown)

        letter = match_answer(raw_answer, sample.options) if answering else None
        reward = answer_reward(letter, sample.answer)
        terminated = answering
        truncated = not answering and self._turn >= self.max_turns
        if answering:
            action_kind = "answer" if raw_answer is not None else "invalid"
        else:
            action_kind = "zoom" if reading.valid else "invalid"
            if box_original is not None:
                self._boxes.append((box_original, reading.valid))
            if not truncated:
                self._show_next(box_original if reading.valid else None)
        self._done = terminated or truncated
        self._next = None if self._done else self.turn_kind(self._turn + 1)
        info = self._info(
            box_shown=reading.box_shown,
            box_original=box_original,
            box_valid=reading.valid,
            fallback=not answering and not reading.valid,
            answer=letter,
            correct=reward == 1.0,
            action=action_kind,
            turn_limit_reached=truncated,
        )
        actions, infos, _ = self._story
        self._story = ([*actions, action], [*infos, info], reward)
        return self._observation(), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """The original as shown with every predicted box (green valid, red invalid, blue truth), the
        crops to its right and the episode so far in words below (`envs.render.episode_text`), as an
        ``(H, W, 3)`` uint8 array; None unless ``render_mode`` is set."""
        if self.render_mode is None:
            gym.logger.warn("ZoomEnv.render() needs render_mode='rgb_array' at construction")
            return None
        if self._sample is None:
            raise gym.error.ResetNeeded("Expects reset() before render()")
        image, view = self._original
        return render_episode(image, view, self._boxes, self._crops, truth=self._sample.boxes,
                              caption=episode_text(self._sample, *self._story))

    # ------------------------------------------------------------------ internals

    def _choose_sample(self, options: Mapping[str, Any]) -> Sample:
        unknown = sorted(set(options) - {"index", "sample"})
        if unknown or len(options) > 1:
            raise ValueError(f"Expects reset options {{'index': i}} or {{'sample': s}}, actual keys: {sorted(options)}")
        if "sample" in options:
            sample = options["sample"]
        elif "index" in options:
            index = options["index"]
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.dataset):
                raise ValueError(f"Expects options['index'] in [0, {len(self.dataset)}), actual: {index!r}")
            sample = self.dataset[int(index)]
        else:
            sample = self.dataset[int(self.np_random.integers(len(self.dataset)))]
        if not isinstance(sample, Sample):
            raise TypeError(f"Expects a Sample, actual: {type(sample).__name__}")
        return sample

    @classmethod
    def episode_images(cls, max_turns: int) -> int:
        """Images an episode of ``max_turns`` model turns can show: the first view, plus one per env reply
        (a crop, or the fallback's image shown again), and the env replies after every turn but the last."""
        return max_turns

    def turn_kind(self, turn: int) -> str:
        """Kind of model turn number ``turn`` (1-based): ``"ground"``, ``"ground_or_answer"`` or ``"answer"``.

        The protocol's one hook: a subclass that overrides it (and is registered with Gymnasium) is a new
        protocol; the first user turn's text and every later one follow the kinds it returns.
        """
        if self.protocol == "direct":
            return "answer"
        if turn == 1:
            return "ground"
        if turn == self.max_turns and self.answer_on_last_turn:
            return "answer"
        return "ground_or_answer"

    def _read_box(self, action: str) -> BoxReading:
        _, view = self._last
        scale = (view.region.width / view.shown_size[0], view.region.height / view.shown_size[1])
        return read_box(action, self.coord_frame, view.shown_size, scale, self.box_rules, self.view_budget.factor)

    def _to_original(self, box_shown: Box | None) -> Box | None:
        """``box_shown`` (pixels of the image shown last) in original pixels; None if not representable."""
        if box_shown is None:
            return None
        _, view = self._last
        try:
            return view.to_original(box_shown)
        except ValueError:  # astronomically large written numbers overflow to inf
            return None

    def _show_next(self, region: Box | None) -> None:
        """Appends the env's next user message: the crop of ``region``, or the fallback when None."""
        sample = self._sample
        assert sample is not None
        if region is None:
            image, view = self._last
            intro = self.prompts.render("fallback_intro")
        else:
            original = load_image(sample)
            # Float rounding in the mapping may step a hair outside the image; the box was inside.
            inside = clamp_box(region, original.width, original.height)
            assert inside is not None, "a valid box maps inside the original"
            image, view = make_view(
                original, inside, self.view_budget, sample_id=sample.id, kind="crop", resample=self.resample
            )
            self._crops.append(image)
            intro = self.prompts.render("crop_intro")
        self._last = (image, view)
        self._visual_tokens += view.visual_tokens
        choices = self.prompts.choices(sample.options)
        if self.turn_kind(self._turn + 1) == "answer":
            text = self.prompts.render("answer", question=sample.question, choices=choices)
        else:
            text = self.prompts.render(
                "ground_or_answer", question=sample.question, choices=choices, frame_rule=self._frame_rule(view)
            )
        self._messages.append(_message("user", _text(intro), _image(image, view), _text(text)))

    def _frame_rule(self, view: ViewInfo) -> str:
        return self.prompts.frame_rule(self.coord_frame, view.shown_size)

    def _observation(self) -> Chat:
        # New lists and dicts on every call: callers keep observations (Gymnasium's checker tests it).
        return [{"role": m["role"], "content": [dict(p) for p in m["content"]]} for m in self._messages]

    def _info(self, **step: Any) -> dict[str, Any]:
        sample = self._sample
        assert sample is not None
        box_original = step.get("box_original")
        iou = max((box_original.iou(b) for b in sample.boxes), default=None) if box_original else None
        return {
            "turn": self._turn,
            "max_turns": self.max_turns,
            "next_turn": self._next,
            "frame": self.coord_frame,
            "box_shown": step.get("box_shown"),
            "box_original": box_original,
            "box_valid": step.get("box_valid", False),
            "fallback": step.get("fallback", False),
            "iou": iou,
            "visual_tokens": self._visual_tokens,
            "answer": step.get("answer"),
            "correct": step.get("correct", False),
            "action": step.get("action"),
            "sample": sample,
            "turn_limit_reached": step.get("turn_limit_reached", False),
        }


def _text(text: str) -> Part:
    return {"type": "text", "text": text}


def _image(image: Any, view: ViewInfo) -> Part:
    return {"type": "image", "image": image, "view": view}


def _message(role: str, *parts: Part) -> Message:
    return {"role": role, "content": list(parts)}


def _as(value: Any, cls: type, name: str) -> Any:
    """``value`` if already a ``cls``, else ``cls(**value)`` (a config dict), else the default."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        try:
            return cls(**value)
        except TypeError as error:
            raise ValueError(f"Expects {name} keys of {cls.__name__}, actual: {sorted(value)} ({error})") from None
    raise TypeError(f"Expects {name} to be a {cls.__name__} or a dict, actual: {type(value).__name__}")


@functools.lru_cache(maxsize=1)
def _default_dataset() -> tuple[Sample, ...]:
    """Eight synthetic questions made for the default view budget; generated once per process."""
    from zoomgym.envs.data import synthetic

    return tuple(synthetic(DEFAULT_DATASET_SIZE, seed=0))
