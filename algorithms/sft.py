"""Supervised fine-tuning: teacher forcing on multimodal chats, the loss on assistant tokens only.

``zoomgym sft CONFIG [overrides]`` (or ``SFT(agent, cfg).learn(n)``) trains any supported model the way
RL trains it: same loading, processor and view budget, same token layout (`QwenVLAdapter.
encode_conversation` lays a chat out exactly as a rollout lays out the same turns), same M-RoPE
positions, checkpoints, TensorBoard, progress bar and exact ``--resume``; only the step differs.

One step, top to bottom (``SFT.train_step``)::

    1. draw      sft.batch_size chats from the training pool (without replacement, reshuffled every
                 epoch; the order is a function of trainer.seed and the epoch, so resume is exact)
    2. encode    each chat -> ids + mask (1 on every assistant reply and its <|im_end|>), its images
                 shown under the model's view budget (resized when a file's image is not)
    3. loss      over micro-batches of trainer.micro_batch_size chats of similar length (little padding):

        L = - sum_{i,t} m[i,t] log p(x[i,t] | x[i,<t], images) / sum_{i,t} m[i,t]          (token mean)
            + aux_weight * sum_heads CE(head(h_img), token_labels)                     (optional)
            + attention_weight * mean_i mean_{t: m[i,t]=1} -log sum_{k in attend_i} a[t-1, k]   (optional)

                 ``h_img``: the image tokens' hidden states after decoder layer sft.aux_layer; ``a``:
                 the attention weights of the first sft.attention_heads heads of the last decoder layer
                 (eager attention while training), from the position that predicts each reply token.
    4. update    grad-norm clip (trainer.grad_clip), AdamW, lr schedule; the backend gets the new weights.

The two optional terms are training-only scaffolding for a model too small to find out from the text
loss alone where an image token sits and what it shows (the toy base needs both): the token heads
are not part of the model and are never saved with it, so every checkpoint is a stock transformers
folder (`AutoModelForImageTextToText.from_pretrained` loads it with no project code).

Validation (``trainer.val_every``): greedy generation on every ``sft.val`` set, scored against each
chat's last reply: ``exact_match``; for replies with ``\\boxed{X}``, ``answer_accuracy``; for replies
that are a box, ``box_valid_ratio`` (a box inside the last image) and ``box_hit_ratio`` (a valid box
holding the reference box's centre, at most `HIT_MAX_AREA_RATIO` times its area).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from zoomgym.agents.backends.base import GenerationRequest, SamplingParams, decode_text
from zoomgym.agents.scoring import token_logprobs
from zoomgym.agents.shared_prefix import plan_prefixes
from zoomgym.agents.trajectory import Trajectory, length_sorted_batches
from zoomgym.algorithms.build import Datasets
from zoomgym.algorithms.checkpoint import load_trainer_state
from zoomgym.algorithms.config import ChatSetConfig, Config
from zoomgym.algorithms.seeds import derive_seed
from zoomgym.algorithms.trainer import Trainer
from zoomgym.envs.actions import extract_boxed, iter_box_candidates
from zoomgym.envs.geometry import Box
from zoomgym.envs.views import make_view

if TYPE_CHECKING:
    from zoomgym.envs.data.chats import ChatExample

HIT_MAX_AREA_RATIO = 4.0
"""A generated box hits its reference only if it is at most this many times the reference's area (a
box of the whole image holds every centre)."""


def load_chat_set(spec: ChatSetConfig, view_budget: Any) -> list[ChatExample]:
    """The chats of one ``sft.train`` / ``sft.val`` entry."""
    from zoomgym.envs.data.chats import load_chats, make_chats

    if spec.path is not None:
        chats = load_chats(spec.path, limit=spec.limit, **spec.options)
    else:
        chats = make_chats(spec.task, spec.n, spec.seed, view_budget, spec.options)  # type: ignore[arg-type]
    return chats[: spec.limit] if spec.limit is not None else chats


def set_label(spec: ChatSetConfig) -> str:
    """A chat set's name in the logs."""
    from pathlib import Path

    return spec.label or spec.task or Path(spec.path).stem  # type: ignore[arg-type]


def shown_messages(chat: ChatExample, view_budget: Any) -> list[dict[str, Any]]:
    """The chat's messages with every image decoded and shown under ``view_budget`` (a chat task's images
    already are; a file's are resized as the env would show them)."""
    from zoomgym.envs.data.chats import chat_image

    out, index = [], 0
    for message in chat.messages:
        content = message["content"]
        if isinstance(content, str):
            out.append(message)
            continue
        parts = []
        for part in content:
            if part.get("type") == "image":
                image = chat_image(chat.id, index, part["image"])
                if image.size != view_budget.shown_size(*image.size):
                    image, _ = make_view(image, Box(0, 0, *image.size), view_budget, sample_id=chat.id, kind="original")
                part = {"type": "image", "image": image}
                index += 1
            parts.append(part)
        out.append({"role": message["role"], "content": parts})
    return out


def encode_chat(chat: ChatExample, adapter: Any, view_budget: Any) -> Trajectory:
    """A chat as a teacher-forced `Trajectory` (reward 0, sampling log-probs 0): ids, reply mask, images."""
    from zoomgym.envs.spaces import message_images

    messages = shown_messages(chat, view_budget)
    try:
        ids, mask = adapter.encode_conversation(messages)
    except ValueError as error:
        raise ValueError(f"chat {chat.id!r}: {error}") from None
    images = message_images(messages)
    grids = torch.tensor([adapter.grid_thw(image) for image in images], dtype=torch.long).reshape(-1, 3)
    tokens = [adapter.token_count(image) for image in images]
    for name, per_image in (("token_labels", [next(iter(labels.values())) for labels in chat.token_labels]),
                            ("attend", list(chat.attend))):
        if per_image and [len(v) for v in per_image] != tokens:
            raise ValueError(f"chat {chat.id!r}: expects {name} for each image with one entry per visual token "
                             f"{tokens}, actual: {[len(v) for v in per_image]}")
    return Trajectory(input_ids=torch.tensor(ids), loss_mask=torch.tensor(mask),
                      sampling_logprobs=torch.zeros(len(ids)), images=images, image_grid_thw=grids, reward=0.0,
                      sample_id=chat.id, category=chat.category)


class TokenHeads(torch.nn.Module):
    """Training-only linear classifiers over image-token hidden states, one per token-label name."""

    def __init__(self, hidden_size: int, classes: Mapping[str, int]) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden_size, n) for name, n in sorted(classes.items())})

    def loss(self, hidden: torch.Tensor, labels: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum over heads of the mean cross-entropy; ``hidden`` ``(T, H)``, labels ``(T,)`` per head."""
        return sum(torch.nn.functional.cross_entropy(head(hidden), labels[name]) for name, head in self.heads.items())


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The language model's decoder layers of a Qwen-VL ``...ForConditionalGeneration``."""
    return model.model.language_model.layers  # type: ignore[union-attr, return-value]


def _reply_box(text: str) -> tuple[float, ...] | None:
    return next(iter_box_candidates(text), None)


def reply_loss(logp: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The teacher-forcing loss: token-mean negative log-likelihood of the masked tokens,
    ``-sum_it m_it logp_it / sum_it m_it`` (SFT's replies, the format warm-up's scripted turns).

    Image-pad positions score ``-inf`` (placeholders are banned from the distribution), so the masked
    log-probs are selected, not multiplied.
    """
    mask = loss_mask.to(logp.device) > 0
    return -torch.where(mask, logp, 0.0).sum() / mask.sum()


ScaffoldLosses = Callable[[Sequence[int], dict[str, Any], torch.Tensor], dict[str, torch.Tensor]]
"""``(indices of the micro-batch's examples, its collated batch, its token log-probs) -> {name: loss}``:
extra training terms computed from the same forward (SFT's token heads and attention loss)."""


def teacher_forcing_step(agent: Any, examples: Sequence[Trajectory], optimizer: torch.optim.Optimizer, *,
                         micro_batch_size: int, grad_clip: float, scaffold: ScaffoldLosses | None = None,
                         scaffold_weights: Mapping[str, float] | None = None, share_prompts: bool = True) -> dict[str, float]:
    """One optimizer step of teacher forcing on ``examples``: the one training step of every supervised
    run (``zoomgym sft``, the format warm-up).

    The examples are cut into micro-batches of ``micro_batch_size`` of similar length (little padding),
    each one forward that computes a prefix its rows share once (``share_prompts``, `agents.shared_prefix`;
    not with a ``scaffold``, which reads whole rows' hidden states); gradients accumulate so the step minimises,
    whatever the cut,

        reply_loss over all examples (token mean)  +  sum_k w_k * mean over examples of scaffold term k

    then the global gradient norm is clipped to ``grad_clip`` (0: no clip) and ``optimizer`` steps. The
    caller owns ``model.train()``/``eval()``, the lr schedule and the weight sync.

    Returns:
        ``sft/loss`` (the reply loss), each scaffold term's mean, ``sft/grad_norm``, ``sft/reply_tokens``
        and ``sft/tokens``.
    """
    weights = dict(scaffold_weights or {})
    total_tokens = sum(e.response_length for e in examples)
    sums = {"sft/loss": 0.0, **dict.fromkeys(weights, 0.0)}
    optimizer.zero_grad(set_to_none=True)
    for part in length_sorted_batches([e.length for e in examples], micro_batch_size):
        batch = agent.collate([examples[i] for i in part])
        # A scaffold reads the forward's hidden states and attention weights of whole rows (hooks on the
        # layers): only without one may rows that share a prefix run it once (agents.shared_prefix).
        plan = plan_prefixes(batch, agent.adapter.image_pad_id, share=share_prompts and scaffold is None)
        logp, _ = token_logprobs(agent.model, agent.adapter, batch, plan=plan)
        # Token mean over the whole step for the reply loss, example mean for the scaffold terms.
        text_share = sum(examples[i].response_length for i in part) / total_tokens
        loss = text_share * reply_loss(logp, batch["loss_mask"])
        sums["sft/loss"] += float(loss.detach())
        for name, value in (scaffold(part, batch, logp) if scaffold else {}).items():
            share = len(part) / len(examples)
            loss = loss + weights[name] * share * value
            sums[name] += share * float(value.detach())
        loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    metrics = {key: value for key, value in sums.items() if key == "sft/loss" or value}
    metrics.update({"sft/grad_norm": float(grad_norm), "sft/reply_tokens": float(total_tokens),
                    "sft/tokens": float(sum(e.length for e in examples))})
    return metrics


def score_generation(chat: ChatExample, generated: str, shown_size: tuple[int, int]) -> dict[str, float]:
    """The validation scores of one generation against the chat's last reply (module docstring)."""
    reference = chat.reply
    scores = {"exact_match": float(generated.strip() == reference.strip())}
    letter = extract_boxed(reference)
    if letter is not None:
        scores["answer_accuracy"] = float(extract_boxed(generated) == letter)
    ref_box = _reply_box(reference)
    if ref_box is not None and letter is None:
        box = _reply_box(generated)
        w, h = shown_size
        valid = box is not None and 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
        scores["box_valid_ratio"] = float(valid)
        hit = False
        if valid:
            cx, cy = (ref_box[0] + ref_box[2]) / 2, (ref_box[1] + ref_box[3]) / 2
            area = (box[2] - box[0]) * (box[3] - box[1])  # type: ignore[index]
            ref_area = (ref_box[2] - ref_box[0]) * (ref_box[3] - ref_box[1])
            hit = box[0] <= cx <= box[2] and box[1] <= cy <= box[3] and area <= HIT_MAX_AREA_RATIO * ref_area  # type: ignore[index]
        scores["box_hit_ratio"] = float(hit)
    return scores


class SFT(Trainer):
    """Supervised fine-tuning on chats (module docstring).

    Args:
        agent: an ``agents.LMMAgent`` (its model is trained in place).
        config: the run config; its ``sft`` section names the chats.

    Attributes:
        train_chats: the training pool; ``val_sets``: label -> held-out chats.
        token_heads: the training-only token heads (None with ``sft.aux_weight = 0``).

    Example:
        ``SFT(agent, cfg).learn(cfg.trainer.steps)``
    """

    renders_episodes: ClassVar[bool] = False
    progress_metrics: ClassVar[dict[str, str]] = {"loss": "sft/loss"}

    def __init__(self, agent: Any, config: Config, env_id: str | None = None) -> None:
        s = config.sft
        self.view_budget = agent.view_budget
        self.train_chats = [chat for spec in s.train for chat in load_chat_set(spec, self.view_budget)]
        if not self.train_chats:
            raise ValueError(f"Expects training chats, actual: none from {s.train}")
        classes = self._label_classes(s.train) if s.aux_weight > 0 else {}
        self.token_heads = (TokenHeads(agent.model.config.text_config.hidden_size, classes).to(agent.model.device)
                            if classes else None)
        if s.aux_weight > 0 and self.token_heads is None:
            raise ValueError("config key 'sft.aux_weight': expects chats with token labels (a task that writes them, "
                             "e.g. toy_grounding), actual: the training sets have none")
        labels = [set_label(spec) for spec in s.val]
        if len(set(labels)) != len(labels):
            raise ValueError(f"config key 'sft.val': expects distinct labels, actual: {labels}")
        val = {label: load_chat_set(spec, self.view_budget) for label, spec in zip(labels, s.val)}
        # No samples: SFT trains on `train_chats`; its validation sets are chats.
        super().__init__(agent, config, env_id, datasets=Datasets([], val))
        self._captured: dict[str, torch.Tensor] = {}
        layers = decoder_layers(self.model)
        if s.aux_weight > 0:
            layers[s.aux_layer].register_forward_hook(self._capture("hidden"))
        if s.attention_weight > 0:
            layers[-1].self_attn.register_forward_hook(self._capture("attention", index=1))

    # -- data ------------------------------------------------------------------------------------------

    def _label_classes(self, specs: Sequence[ChatSetConfig]) -> dict[str, int]:
        from zoomgym.envs.data.chats import TOKEN_LABEL_CLASSES

        classes: dict[str, int] = {}
        for spec in specs:
            for name, n in TOKEN_LABEL_CLASSES.get(spec.task or "", {}).items():
                classes[name] = max(classes.get(name, 0), n)
        return classes

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        """The token heads' parameters, trained by the same optimizer (and saved in its state)."""
        return list(self.token_heads.parameters()) if self.token_heads is not None else []

    def draw(self, count: int) -> list[ChatExample]:
        """The next ``count`` training chats: epoch ``e`` is a permutation seeded by (trainer.seed, e)."""
        pool, out = len(self.train_chats), []
        while len(out) < count:
            epoch, offset = divmod(self.prompts_drawn, pool)
            order = np.random.default_rng(derive_seed(self.cfg.trainer.seed, epoch, 2)).permutation(pool)
            take = min(count - len(out), pool - offset)
            out += [self.train_chats[i] for i in order[offset: offset + take]]
            self.prompts_drawn += take
        return out

    # -- one step ---------------------------------------------------------------------------------------

    def _capture(self, key: str, index: int = 0) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            self._captured[key] = output[index] if isinstance(output, tuple) else output
        return hook

    def train_step(self) -> tuple[dict[str, float], list[Trajectory]]:
        """One optimizer step on ``sft.batch_size`` chats (module docstring)."""
        s = self.cfg.sft
        start = time.perf_counter()
        chats = self.draw(s.batch_size)
        examples = [encode_chat(chat, self.agent.adapter, self.view_budget) for chat in chats]
        attention = self._use_eager_attention(s.attention_weight > 0)
        self.model.train()
        try:
            metrics = teacher_forcing_step(
                self.agent, examples, self.optimizer, micro_batch_size=self.cfg.trainer.micro_batch_size,
                grad_clip=self.cfg.trainer.grad_clip,
                scaffold=(lambda part, batch, logp: self._scaffold_losses([chats[i] for i in part], batch, logp))
                if self.token_heads is not None or s.attention_weight > 0 else None,
                share_prompts=self.cfg.trainer.share_prompts,
                scaffold_weights={"sft/aux_loss": s.aux_weight, "sft/attention_loss": s.attention_weight})
        finally:
            self._use_eager_attention(attention)
            self._captured.clear()
        self.scheduler.step()
        self.model.eval()
        self.agent.sync_weights(self.step + 1)
        metrics["time/step_s"] = time.perf_counter() - start
        return metrics, examples

    def _use_eager_attention(self, eager: bool | str) -> str:
        """Switch the language model to eager attention (``True``) or back to a saved name; returns the
        name in use before (attention weights exist only in eager attention)."""
        text_config = self.model.config.text_config
        before = text_config._attn_implementation
        wanted = "eager" if eager is True else before if eager is False else eager
        if wanted != before:
            self.model.set_attn_implementation({"text_config": wanted})
        return before

    def _scaffold_losses(self, chats: Sequence[ChatExample], batch: dict[str, Any],
                         logp: torch.Tensor) -> dict[str, torch.Tensor]:
        """The optional token-head and attention terms of one micro-batch (module docstring), from the
        hidden states and attention weights its forward left in ``self._captured``."""
        s = self.cfg.sft
        out = {}
        mask = batch["loss_mask"].to(logp.device)
        image_tokens = batch["input_ids"].to(logp.device) == self.agent.adapter.image_pad_id
        if self.token_heads is not None and all(chat.token_labels for chat in chats):
            labels = {name: torch.cat([torch.as_tensor(per_image[name]) for chat in chats for per_image in chat.token_labels])
                      for name in self.token_heads.heads}
            out["sft/aux_loss"] = self.token_heads.loss(self._captured["hidden"][image_tokens],
                                                        {k: v.to(logp.device) for k, v in labels.items()})
        if s.attention_weight > 0 and "attention" in self._captured:
            out.update(self._attention_loss(chats, self._captured["attention"], image_tokens, mask))
        return out

    def _attention_loss(self, chats: Sequence[ChatExample], weights: torch.Tensor, image_tokens: torch.Tensor,
                        mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean over chats with ``attend`` targets of -log(attention mass on them) (module docstring)."""
        terms = []
        for i, chat in enumerate(chats):
            if not chat.attend or not any(a.any() for a in chat.attend):
                continue
            keys = torch.nonzero(image_tokens[i]).flatten()[torch.as_tensor(np.concatenate(chat.attend))]
            queries = torch.nonzero(mask[i, 1:] > 0).flatten()  # the positions that predict reply tokens
            mass = weights[i, : self.cfg.sft.attention_heads][:, queries][:, :, keys].sum(-1)
            terms.append(-torch.log(mass + 1e-6).mean())
        return {"sft/attention_loss": torch.stack(terms).mean()} if terms else {}

    # -- validation ------------------------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Greedy generations on every validation set, scored against each chat's last reply."""
        from zoomgym.envs.spaces import message_images

        start = time.perf_counter()
        metrics: dict[str, float] = {}
        adapter = self.agent.adapter
        sampling = SamplingParams(temperature=0.0, max_new_tokens=self.cfg.sft.max_new_tokens,
                                  stop_token_ids=tuple(adapter.eos_ids), seed=0)
        self.model.eval()
        for label, chats in self.val_sets.items():
            requests, sizes = [], []
            for chat in chats:
                prompt = shown_messages(chat, self.view_budget)[: len(chat.prompt())]
                images = message_images(prompt)
                prompt_ids, _ = adapter.encode_conversation(prompt)
                requests.append(GenerationRequest(prompt_ids, images, self.cfg.sft.max_new_tokens))
                sizes.append(images[-1].size if images else (0, 0))
            with torch.no_grad():
                generations = self.agent.backend.generate(requests, sampling)
            scores: dict[str, list[float]] = {}
            for chat, generation, size in zip(chats, generations, sizes):
                for key, value in score_generation(chat, decode_text(adapter, generation.token_ids), size).items():
                    scores.setdefault(key, []).append(value)
            metrics.update({f"val/{label}/{key}": float(np.mean(values)) for key, values in scores.items()})
        metrics["time/validation_s"] = time.perf_counter() - start
        self.logger.log(self.step, metrics)
        if self.step == 0 or not self.first_validation:
            self.first_validation = metrics
        self.last_validation = metrics
        self._validated_step = self.step
        return metrics

    # -- checkpoints -----------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """The base's state plus the token heads' weights (they are not part of the saved model)."""
        state = super().trainer_state()
        if self.token_heads is not None:
            state["token_heads"] = self.token_heads.state_dict()
        return state

    def load_checkpoint(self, checkpoint: Any) -> None:
        """The base's resume, plus the token heads."""
        super().load_checkpoint(checkpoint)
        if self.token_heads is not None:
            self.token_heads.load_state_dict(load_trainer_state(checkpoint)["token_heads"])
