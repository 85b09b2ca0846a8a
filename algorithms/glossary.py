"""The metrics glossary: what every logged key means, in one place.

TensorBoard shows each entry as its scalar's description (`algorithms.logging.RunLogger`), and
ARCHITECTURE.md's glossary table is this module's `markdown_table` (``python -m
zoomgym.algorithms.glossary`` prints it; ``tests/test_docs.py`` checks the two agree). A new metric is
its code plus one `Metric` here.

Key patterns: ``*`` stands for the episode prefixes (``train``, ``val/<set>``, and ``zoomgym eval``'s arms
``eval``, ``direct``, ``oracle_crop``), ``<name>`` for one path segment.

>>> describe("val/vstar/accuracy")
'share of episodes whose final answer is correct, `sum_i c_i / N`'
>>> describe("val/vstar/accuracy/attribute").startswith("accuracy over the episodes of one sample category")
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Metric:
    """One glossary row: the keys it defines, their meaning (Markdown), and what TensorBoard shows."""

    keys: tuple[str, ...]
    meaning: str
    kind: str = "scalar"
    """"scalar", "image" or "text"."""

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """A regular expression matching exactly the keys of this row."""
        parts = []
        for key in self.keys:
            regex = re.escape(key).replace(r"\*", ".+")
            parts.append(re.sub(r"<[a-z_]+>", "[^/]+", regex))
        return re.compile("|".join(f"(?:{p})" for p in parts))


GLOSSARY: tuple[Metric, ...] = (
    Metric(("*/reward",), "mean reward, `sum_i r_i / N` (binary: = accuracy unless an episode was cut by the context budget)"),
    Metric(("*/accuracy",), "share of episodes whose final answer is correct, `sum_i c_i / N`"),
    Metric(("*/accuracy/<category>",), "accuracy over the episodes of one sample category (`attribute`, "
           "`relative_position`, ...; `none` for samples without one); only when some sample has a category"),
    Metric(("*/valid_box_ratio",), "over grounding turns (the env asked for a box): share whose box was valid; "
           "zoom envs only"),
    Metric(("*/fallback_ratio",), "over grounding turns: share where the env fell back to the original image "
           "(missing/invalid box)"),
    Metric(("*/iou",), "mean over valid boxes of the max IoU with the sample's ground-truth boxes (samples with "
           "boxes only)"),
    Metric(("*/target_hit_ratio",), "over grounding turns on samples with ground-truth boxes: share whose box is "
           "valid, contains the centre of a ground-truth box and covers at most a quarter of the image "
           "(`TARGET_MAX_AREA`); invalid boxes and fallbacks are misses. Read this, not `valid_box_ratio`, as \"the "
           "model looks at the right place\": a well-formed box on the wrong object is valid, and a box of the whole "
           "image contains every centre"),
    Metric(("*/target_hit_ratio/<category>",), "target-hit ratio over the grounding turns of one sample category (as "
           "`accuracy/<category>`)"),
    Metric(("*/crop_useful_ratio", "*/crop_useful_ratio/<category>"), "over valid boxes on samples with ground-truth "
           "boxes: share whose crop contains every ground-truth box or has IoU >= 0.5 (`USEFUL_IOU`) with one; per "
           "sample category"),
    Metric(("*/l2_accuracy/<label>",), "accuracy per MME-RealWorld `l2-category` (`sample.meta`); its task is "
           "`accuracy/<category>`"),
    Metric(("*/rotation_accuracy",), "HR-Bench: the mean over its option rotations (`meta[\"cycle_category\"]`) of "
           "each rotation's accuracy"),
    Metric(("*/all_rotations_accuracy",), "HR-Bench: share of questions answered right in every rotation of their "
           "options"),
    Metric(("*/zoom_rate",), "share of episodes with at least one valid box (the model was shown a crop)"),
    Metric(("*/accuracy_zoomed", "*/accuracy_not_zoomed"), "accuracy over the episodes with a valid box; over the "
           "rest"),
    Metric(("*/turns",), "mean model turns per episode"),
    Metric(("*/generated_tokens",), "mean model-sampled tokens per episode, `sum_t loss_mask_t` (env tokens never "
           "count; episodes with token ids only)"),
    Metric(("*/visual_tokens",), "mean visual tokens per episode, all images shown (original view + crops)"),
    Metric(("*/truncated_ratio", "*/context_truncated_ratio"), "share of episodes ended without an answer (turn or "
           "context budget); by the context budget"),
    Metric(("*/episodes",), "*eval only*: episodes the arm played (the `oracle_crop` arm plays samples with "
           "ground-truth boxes only)"),
    Metric(("*/avg@<k>", "*/avg@<k>_std"), "*eval only*, `--samples K` (K > 1): mean accuracy over the K draws of "
           "every question; the standard deviation over the K draws of each draw's accuracy"),
    Metric(("*/pass@<k>", "*/pass@<k>_se"), "*eval only*, `--samples K` (K > 1): share of questions right in at "
           "least one draw; its standard error over questions, `sqrt(p (1 - p) / n)`"),
    Metric(("counterfactual/pairs",), "*eval only*, `--counterfactual`: questions (and draws) played both in "
           "`direct` and in `eval`, paired by sample id and draw"),
    Metric(("counterfactual/tool_gain", "counterfactual/tool_harm", "counterfactual/tool_gain/<category>",
            "counterfactual/tool_harm/<category>"), "share of pairs wrong without zoom and right with it (gain), "
           "right without and wrong with (harm); per sample category"),
    Metric(("counterfactual/net_gain", "counterfactual/net_gain/<category>"), "`tool_gain - tool_harm` (= "
           "`eval/accuracy - direct/accuracy` over the pairs); per sample category"),
    Metric(("counterfactual/both_right", "counterfactual/both_wrong"), "share of pairs right (wrong) both without "
           "and with zoom"),
    Metric(("counterfactual/oracle_crop_headroom",), "`oracle_crop` accuracy minus `eval` accuracy over the "
           "questions (and draws) both played: what a perfect first box would add"),
    Metric(("*/skipped_samples",), "samples whose image failed to decode at run time: skipped with their whole "
           "group (in `zoomgym eval`, with all their draws in that arm; a resumed evaluation tries them again); the "
           "run goes on, and the log names each one once"),
    Metric(("train/weight_version",), "version of the weights after the step (= step); every trajectory of step s "
           "was sampled at version s - 1"),
    Metric(("train/lr",), "learning rate of the step's first optimizer step"),
    Metric(("train/advantage_abs_mean",), "`mean_i abs(A_i)` over the trained episodes (0 when every group's "
           "rewards are equal)"),
    Metric(("train/trained_tokens",), "mean trained tokens per episode, `sum_t m_it` (MGPO: all model turns; GRPO: "
           "the last turn; 0 for masked truncated episodes)"),
    Metric(("train/dynamic_sampling_kept_ratio",), "DAPO only: trained episodes / sampled episodes"),
    Metric(("actor/pg_loss",), "PPO-clip loss, `agg( max(-A rho, -A clip(rho, 1-clip_low, 1+clip_high)) )`, mean "
           "over mini-batches"),
    Metric(("actor/kl",), "KL loss to the reference, `agg(kl_kind(logp, ref_logp))` (only when `kl_coef > 0`)"),
    Metric(("actor/loss",), "the optimised loss, `pg_loss + kl_coef * kl - entropy_coef * agg(entropy)`"),
    Metric(("actor/entropy",), "token-mean policy entropy on trained tokens, `sum m_it H_it / sum m_it`"),
    Metric(("actor/clipfrac", "actor/clipfrac_high", "actor/clipfrac_low", "actor/clipfrac_dual"), "share of "
           "trained tokens where the clipped term is active; `_high`: `A>0, rho>1+clip_high`; `_low`: "
           "`A<0, rho<1-clip_low`; `_dual`: dual clip active"),
    Metric(("actor/approx_kl",), "`mean(rho - 1 - log rho)`: k3 estimate of KL(old policy, current policy) during "
           "the update"),
    Metric(("actor/ratio_mean", "actor/ratio_max", "actor/ratio_min"), "mean / max / min of `rho` over trained "
           "tokens"),
    Metric(("actor/is_weight_mean",), "truncated-IS only: mean of `min(exp(old_logp - sampler_logp), tis_cap)`"),
    Metric(("actor/grad_norm", "actor/grad_norm_max"), "global gradient norm before clipping, mean / max over the "
           "step's optimizer steps"),
    Metric(("rollout/logprob_gap_abs_mean", "rollout/logprob_gap_abs_max"), "mean / max over sampled tokens of "
           "`abs(trainer_logp - sampler_logp)` at the sampling weights"),
    Metric(("rollout/logprob_gap_kl",), "`mean(exp(d) - 1 - d)`, `d = trainer_logp - sampler_logp`: KL(sampler, "
           "trainer) estimate; grows with stale weights or numerics drift"),
    Metric(("time/generation_s",), "rollout wall time minus env time (backend generation, encoding, bookkeeping)"),
    Metric(("time/env_s",), "time inside env `reset`/`step` (parsing, cropping, resizing)"),
    Metric(("time/scoring_s",), "old/reference log-prob forwards"),
    Metric(("time/training_s",), "PPO epochs (forward, backward, optimizer)"),
    Metric(("time/validation_s",), "greedy validation of every held-out set (logged at validation steps)"),
    Metric(("time/weight_sync_s",), "waking the backend and pushing the updated weights into it (`sync_weights`: hf "
           "stamps the version and drops its kept KV caches; vLLM copies every tensor and resets its caches)"),
    Metric(("perf/generated_tokens_per_s",), "`sum_i generated_tokens_i / time/generation_s`"),
    Metric(("perf/train_tokens_per_s",), "`ppo_epochs * sum_i L_i / time/training_s` (whole sequences, images "
           "included)"),
    Metric(("perf/padding_ratio",), "share of the token positions the PPO update's forwards compute that are "
           "padding, `1 - sum tokens / sum positions` over every micro-batch: each micro-batch holds episodes of "
           "similar length (sorted by length within the mini-batch, a prompt's episodes together) and runs as "
           "one right-padded forward (`sum_mb n_mb max_(i in mb) L_i` positions) or, when its episodes share a "
           "prompt, as a pass over the shared prefixes and one over the rest, each right-padded "
           "(`agents/shared_prefix.py`)"),
    Metric(("perf/computed_ratio",), "token positions the PPO update's forwards compute (padding included) over "
           "those of one right-padded forward per micro-batch, `sum positions / sum_mb n_mb max_(i in mb) L_i`: "
           "below 1 by the group prompts computed once, not once per episode (1 when nothing is shared)"),
    Metric(("sft/loss",), "`zoomgym sft`: token-mean cross-entropy of the step's assistant tokens, "
           "`-sum_it m_it logp_it / sum_it m_it`"),
    Metric(("sft/aux_loss", "sft/attention_loss"), "`zoomgym sft` with `sft.aux_weight` / `sft.attention_weight` > 0: "
           "the token heads' summed cross-entropy, and `-log` of the attention mass on `ChatExample.attend` tokens; "
           "chat-weighted means over the step's micro-batches"),
    Metric(("sft/grad_norm", "sft/tokens", "sft/reply_tokens"), "`zoomgym sft`: gradient norm before clipping; "
           "tokens in the step's chats, and of them assistant tokens"),
    Metric(("time/step_s",), "`zoomgym sft`: wall time of the step (drawing and encoding chats, forward, backward, "
           "optimizer step)"),
    Metric(("val/<set>/exact_match", "val/<set>/answer_accuracy"), "`zoomgym sft`: share of greedy generations "
           "equal to the chat's last reply; for `\\boxed{X}` replies, share with the same letter"),
    Metric(("val/<set>/box_valid_ratio", "val/<set>/box_hit_ratio"), "`zoomgym sft`, for box replies: share of "
           "generations that are a box inside the last image; share whose box holds the reference box's centre and "
           "is at most `HIT_MAX_AREA_RATIO` (4) times its area"),
    Metric(("warmup/loss_first", "warmup/loss_last"), "format warm-up only (`warmup.enabled`, logged at step 0): "
           "teacher-forced token-mean cross-entropy of the scripted turns, first and last warm-up step"),
    Metric(("warmup/steps", "warmup/seconds"), "format warm-up only: optimizer steps taken and wall time"),
    Metric(("train/trajectories/<k>",), "every `logging.render_every` steps, `env.render()` of replayed episodes of "
           "distinct samples: the original with the ground-truth (blue) and model (green valid, red invalid) boxes, "
           "the crops beside it, the episode in words below", kind="image"),
    Metric(("val/<set>/samples",), "at each validation, the first `logging.render_count` episodes in words: the "
           "question, the model's text per turn and what the env made of it, the parsed answer, the truth, the "
           "reward; the same text goes to `RUN_DIR/samples.jsonl`", kind="text"),
)
"""Every key `zoomgym train` and `zoomgym eval` log, in the order of ARCHITECTURE.md's table."""


def describe(key: str) -> str | None:
    """The glossary meaning of a logged key (``val/vstar/accuracy``), or None for a key it lacks."""
    return next((metric.meaning for metric in GLOSSARY if metric.pattern.fullmatch(key)), None)


def markdown_table() -> str:
    """The glossary as ARCHITECTURE.md's Markdown table."""
    rows = ["| key | meaning |", "|---|---|"]
    for metric in GLOSSARY:
        keys = ", ".join(f"`{key}`" for key in metric.keys)
        rows.append(f"| {'' if metric.kind == 'scalar' else metric.kind + ' '}{keys} | {metric.meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
