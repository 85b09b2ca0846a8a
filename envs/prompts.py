"""Prompt templates: the env's side of the conversation, as overridable data.

The protocol (after MGPO): turn 1 shows the image and the question *without* the choices and asks
for the key area's coordinates as JSON; the env then returns the crop (or, for a missing/invalid box,
a notice and the same image again) with the question, the choices and a request for the letter in
``\\boxed{}``. DirectVQA asks for the letter straight away.

Templates are ``str.format`` strings (literal braces doubled: ``\\boxed{{}}``). Placeholders:
``{question}``, ``{choices}`` (one `PromptTemplates.choice` line per option), ``{frame_rule}`` (how to
write a box in the env's coordinate frame: the frame's own ``prompt_rule`` unless
`PromptTemplates.frame_rules` rewords it; it may use ``{width}`` and ``{height}`` of the image shown last).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from zoomgym.envs.data.sample import LETTERS
from zoomgym.envs.geometry import FRAMES, Size


def default_frame_rules() -> dict[str, str]:
    """Each registered frame's own ``prompt_rule`` (`envs.geometry.FRAMES`), by frame name."""
    return {name: frame.prompt_rule for name, frame in FRAMES.items()}


_JSON_EXAMPLE = '```json\n[{{"bbox_2d": [x1, y1, x2, y2], "label": "key area"}}]\n```'

# Which placeholders each template may use; a template naming another one is a config error.
_PLACEHOLDERS: dict[str, frozenset[str]] = {
    "zoom_system": frozenset(),
    "ground": frozenset({"question", "frame_rule"}),
    "crop_intro": frozenset(),
    "fallback_intro": frozenset(),
    "answer": frozenset({"question", "choices"}),
    "ground_or_answer": frozenset({"question", "choices", "frame_rule"}),
    "direct_system": frozenset(),
    "direct": frozenset({"question", "choices"}),
    "choice": frozenset({"letter", "text"}),
}


@dataclass(frozen=True)
class PromptTemplates:
    """The env's wording. Override any field with `PromptTemplates.from_dict` (e.g. from a config).

    Attributes:
        zoom_system: system message of the zoom protocols.
        ground: turn 1 text after the original image (no choices): asks for the key area's box.
        crop_intro: text placed before a crop.
        fallback_intro: text placed before the image shown again when the box was missing/invalid.
        answer: text after the crop/fallback image when the next turn must answer.
        ground_or_answer: multi-turn text after the crop/fallback image when the model may answer or
            zoom again.
        direct_system: system message of DirectVQA.
        direct: DirectVQA's text after the image.
        choice: one option line.
        frame_rules: frame name -> how to write a box in that frame (default: each registered frame's
            ``prompt_rule``).
    """

    zoom_system: str = (
        "You answer multiple-choice questions about high-resolution images. You first see a reduced "
        "copy of the image, so small details may be unreadable in it. When asked for coordinates, find "
        "the image area that holds the answer and write its bounding box as JSON at the end of your "
        "reply, in this form:\n" + _JSON_EXAMPLE + "\nthen stop. That area will be cut from the "
        "full-resolution image, enlarged and shown to you. When asked for the answer, reason over all "
        "the images and give the letter of the correct option in \\boxed{{}}, for example \\boxed{{A}}."
    )
    ground: str = (
        "Question: {question}\nBefore answering, give the coordinates of the image area that is key "
        "to this question, as JSON. {frame_rule}"
    )
    crop_intro: str = "Here is the area you chose, cut from the full-resolution image and enlarged:"
    fallback_intro: str = (
        "The coordinates were missing or invalid, so nothing was cut out. Here is the same image again:"
    )
    answer: str = (
        "Question: {question}\nOptions:\n{choices}\nUsing all the images above, answer with the letter "
        "of the correct option in \\boxed{{}}."
    )
    ground_or_answer: str = (
        "Question: {question}\nOptions:\n{choices}\nIf the images so far show enough, answer with the "
        "letter of the correct option in \\boxed{{}}. Otherwise give, as JSON, the coordinates of the "
        "area of the most recent image to enlarge next. {frame_rule}"
    )
    direct_system: str = (
        "You answer multiple-choice questions about images. Give the letter of the correct option in "
        "\\boxed{{}}, for example \\boxed{{A}}."
    )
    direct: str = (
        "Question: {question}\nOptions:\n{choices}\nAnswer with the letter of the correct option in "
        "\\boxed{{}}."
    )
    choice: str = "({letter}) {text}"
    frame_rules: Mapping[str, str] = field(default_factory=default_frame_rules)

    def __post_init__(self) -> None:
        for name, allowed in _PLACEHOLDERS.items():
            _check_placeholders(f"prompts.{name}", getattr(self, name), allowed)
        for frame, rule in self.frame_rules.items():
            _check_placeholders(f"prompts.frame_rules[{frame!r}]", rule, frozenset({"width", "height"}))

    @classmethod
    def from_dict(cls, overrides: Mapping[str, Any]) -> PromptTemplates:
        """Defaults with ``overrides`` applied; ``frame_rules`` overrides merge per frame."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"Expects prompt keys in {sorted(known)}, actual unknown keys: {unknown}")
        values = dict(overrides)
        if "frame_rules" in values:
            values["frame_rules"] = {**default_frame_rules(), **values["frame_rules"]}
        return replace(cls(), **values)

    def choices(self, options: Sequence[str]) -> str:
        """The options as lines ``(A) text``."""
        return "\n".join(self.choice.format(letter=LETTERS[i], text=text) for i, text in enumerate(options))

    def frame_rule(self, frame: str, shown_size: Size) -> str:
        """How to write a box in ``frame`` for an image of ``shown_size``."""
        if frame not in self.frame_rules:
            raise ValueError(f"Expects a prompt frame rule for {frame!r}, actual frames: {sorted(self.frame_rules)}")
        return self.frame_rules[frame].format(width=shown_size[0], height=shown_size[1])

    def render(self, name: str, **values: str) -> str:
        """Template ``name`` filled with ``values``."""
        return getattr(self, name).format(**values)


def _check_placeholders(where: str, template: str, allowed: frozenset[str]) -> None:
    if not isinstance(template, str):
        raise TypeError(f"Expects {where} to be a string, actual: {type(template).__name__}")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(f"Expects {where} to be a str.format template, actual: {error}") from error
    if names - allowed:
        raise ValueError(
            f"Expects {where} to use placeholders from {sorted(allowed)}, actual: {sorted(names - allowed)}"
        )
