"""``zoomgym eval``: from the command line (or a config) to evaluation runs, one output folder per benchmark.

::

    zoomgym eval --model PATH --data vstar:DIR [--env ID] [--backend hf|vllm] [--limit N]
                 [--samples K --temperature T] [--counterfactual] [--out DIR]
    zoomgym eval CONFIG [key.sub=value ...] [--data SPEC] [...]   # the config's model, env, prompts, budgets
    zoomgym eval --agent oracle|random|replay:FILE --data SPEC [...]
    zoomgym eval --compare OUT_A OUT_B

``--data`` is ``NAME:VALUE`` with NAME a dataset loader (`envs.data.DATASETS`): ``vstar:DIR``,
``mme_realworld:PATH``, ``hrbench:PATH``, ``jsonl:PATH`` (VALUE is its path), or ``synthetic:N`` (N
questions, ``--preset`` and ``--seed``). Without ``--data`` a config's ``data.val`` sets are evaluated,
each in ``OUT/<set>``. Without ``--model`` or CONFIG, the model flags fill a default config, so both
forms share one protocol definition: `algorithms.build` (the agent, its backend, the env and its
options) and `agents.evaluate.evaluate` (everything else).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from zoomgym.algorithms.config import Config, DataConfig, DatasetConfig, ModelConfig, load_config, validate

SCRIPTED_AGENTS = ("oracle", "random", "replay:FILE")
DEFAULT_OUT = Path("runs") / "eval"


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``zoomgym eval``."""
    parser.add_argument("items", nargs="*", metavar="CONFIG | key.sub=value",
                        help="a YAML config (its model, env, prompts and budgets; data.val unless --data), then overrides")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module first (e.g. one that registers a dataset, env or backend)")
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--model", help="a model folder or hub id (= model.path)")
    what.add_argument("--agent", metavar="|".join(SCRIPTED_AGENTS), help="a scripted agent instead of a model")
    what.add_argument("--data", metavar="NAME:VALUE",
                      help="vstar:DIR, mme_realworld:PATH, hrbench:PATH, jsonl:PATH or synthetic:N")
    what.add_argument("--limit", type=int, help="evaluate the first N samples")
    what.add_argument("--preset", default="default", help="synthetic:N's preset (default 'default')")
    how = parser.add_argument_group("protocol (defaults: the config's, else the training defaults)")
    how.add_argument("--env", help="env id (= env.id; default the algorithm's, zoomgym/ZoomEnv-v0)")
    how.add_argument("--backend", help="generation backend (= rollout.backend): hf or vllm")
    how.add_argument("--dtype", choices=["float32", "bfloat16"], help="(= model.dtype; default float32 on CPU, "
                                                                       "bfloat16 on CUDA without a config)")
    how.add_argument("--min-pixels", type=int, help="view budget (= model.min_pixels)")
    how.add_argument("--max-pixels", type=int, help="view budget (= model.max_pixels)")
    how.add_argument("--max-new-tokens", type=int, help="per turn (= rollout.max_new_tokens)")
    how.add_argument("--max-context-tokens", type=int, help="per episode (= rollout.max_context_tokens)")
    how.add_argument("--samples", type=int, default=1, metavar="K", help="draws per question: avg@K, pass@K")
    how.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    how.add_argument("--top-p", type=float, default=1.0)
    how.add_argument("--seed", type=int, help="seeds env resets, draws, random agents, synthetic:N (= trainer.seed)")
    how.add_argument("--counterfactual", action="store_true",
                     help="also without zoom (DirectVQA-v0) and after the oracle crop: tool gain and harm")
    run = parser.add_argument_group("run")
    run.add_argument("--out", help=f"output folder, resumed when rerun (default {DEFAULT_OUT}/<model>/<data>)")
    run.add_argument("--batch-size", type=int, default=32, help="samples per rollout batch (default 32)")
    run.add_argument("--trajectories", type=int, default=24, help="trajectory cards in report.html (default 24)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--compare", nargs=2, metavar=("OUT_A", "OUT_B"),
                     help="compare two runs sample by sample (per benchmark, paired bootstrap) and exit")


@dataclass(frozen=True)
class EvalJob:
    """One benchmark to evaluate: its samples, where the run goes and what names the data."""

    label: str
    samples: list[Any]
    limit: int | None
    out: Path
    source: str


def config_of(args: argparse.Namespace) -> Config:
    """The config of an evaluation: CONFIG and overrides (or the defaults), then the flags on top.

    Raises:
        ValueError, TypeError: naming the key or the flag.
    """
    from zoomgym.algorithms.cli import _split_config_and_overrides

    path, overrides = _split_config_and_overrides(args.items)
    flags = {"model.path": args.model, "rollout.backend": args.backend, "env.id": args.env, "model.dtype": args.dtype,
             "model.min_pixels": args.min_pixels, "model.max_pixels": args.max_pixels,
             "rollout.max_new_tokens": args.max_new_tokens, "rollout.max_context_tokens": args.max_context_tokens,
             "trainer.seed": args.seed}
    extra = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if path is None:
        from zoomgym.algorithms.build import resolve_device

        if args.agent is None and args.model is None:
            raise ValueError("Expects --model PATH, --agent NAME or a CONFIG, actual: none")
        if args.dtype is None:
            extra.append(f"model.dtype={'bfloat16' if resolve_device('auto') == 'cuda' else 'float32'}")
        if args.data is None:
            raise ValueError("Expects --data NAME:VALUE (e.g. vstar:/data/vstar) without a CONFIG, actual: none")
    cfg = load_config(path, [*overrides, *extra])
    # Evaluation reads neither the training data nor, with --data, the validation sets: their paths need not
    # exist. The default training set stands in for the config's, so validate's dataset checks still pass.
    cfg = replace(cfg, data=replace(cfg.data, train=DataConfig().train, val=[] if args.data else cfg.data.val))
    if args.agent is not None:  # no model is loaded: the default hub id stands in, so the rest is still checked
        cfg = replace(cfg, model=replace(cfg.model, path=ModelConfig().path))
    validate(cfg)
    return cfg


def dataset_spec(text: str, seed: int, preset: str) -> DatasetConfig:
    """``--data NAME:VALUE`` as a config dataset entry.

    Raises:
        ValueError: not ``NAME:VALUE``, an unknown NAME, or a path that does not exist.
    """
    from zoomgym.envs.data import DATASETS

    from zoomgym.registry import suggest

    name, sep, value = text.partition(":")
    if not sep or not value:
        raise ValueError(f"Expects --data NAME:VALUE (vstar:DIR, hrbench:PATH, synthetic:N, ...), actual: {text!r}")
    if name not in DATASETS:
        raise ValueError(f"Expects --data NAME in {sorted(DATASETS)}, actual: {name!r}.{suggest(name, sorted(DATASETS))}")
    if name == "synthetic":
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"Expects --data synthetic:N with N a positive number of questions, actual: {text!r}")
        return DatasetConfig(name, options={"n": int(value), "seed": seed, "preset": preset}, label=name)
    if not Path(value).expanduser().exists():
        raise ValueError(f"Expects --data {name}:PATH to exist, actual: {value!r} does not")
    return DatasetConfig(name, path=str(Path(value).expanduser()), label=name)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def jobs_of(cfg: Config, args: argparse.Namespace, agent_name: str) -> list[EvalJob]:
    """The benchmarks to evaluate: ``--data``, else the config's ``data.val`` sets (loaded, checked).

    Raises:
        ValueError: naming the dataset, the file or the line.
    """
    from zoomgym.algorithms.build import load_samples

    if args.data is not None:
        specs = [dataset_spec(args.data, cfg.trainer.seed, args.preset)]
    else:
        specs = list(cfg.data.val)
        if not specs:
            raise ValueError("Expects --data or a config with data.val sets, actual: neither")
    labels: list[str] = []
    for spec in specs:
        base = spec.label or spec.name
        label, k = base, 2
        while label in labels:
            label, k = f"{base}{k}", k + 1
        labels.append(label)
    root = Path(args.out) if args.out else DEFAULT_OUT / _slug(agent_name)
    jobs = []
    for label, spec in zip(labels, specs):
        out = root if args.data is not None and args.out else root / _slug(label)
        source = args.data if args.data is not None else f"{spec.name}:{spec.path or json.dumps(spec.options)}"
        limit = args.limit if args.limit is not None else spec.limit
        if limit is not None and limit < 1:
            raise ValueError(f"Expects --limit >= 1, actual: {limit}")
        jobs.append(EvalJob(label, load_samples(replace(spec, limit=None)), limit, out, source))
    return jobs


def _seed_of(seed: int, index: int, draw: int) -> int:
    return int(np.random.SeedSequence([seed, index, draw]).generate_state(1)[0])


def read_replay(path: str) -> dict[tuple[str | None, str, int | None], list[str]]:
    """``replay:FILE``: jsonl lines ``{"sample_id", "actions": [...], "arm"?, "draw"?}`` (an
    ``episodes.jsonl`` of another run replays it), by ``(arm, sample_id, draw)`` (None where absent).

    Raises:
        ValueError: naming the file and line.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"Expects --agent replay:FILE to name a jsonl file, actual: {path!r} is not a file")
    scripts: dict[tuple[str | None, str, int | None], list[str]] = {}
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path!r} line {number}: expects a JSON object, actual: {error}") from None
        actions = record.get("actions") if isinstance(record, dict) else None
        if not isinstance(record, dict) or "sample_id" not in record or not isinstance(actions, list) or not actions \
                or not all(isinstance(a, str) for a in actions):
            raise ValueError(f"{path!r} line {number}: expects sample_id and a non-empty list of actions, actual: "
                             f"{line[:80]!r}")
        scripts.setdefault((record.get("arm"), str(record["sample_id"]), record.get("draw")), actions)
    return scripts


def replay_script(scripts: Mapping[tuple[str | None, str, int | None], list[str]], arm: str, sample_id: str,
                  draw: int) -> list[str] | None:
    """The script of one episode: for its arm and draw, else its arm, else its draw, else its sample."""
    for key in ((arm, sample_id, draw), (arm, sample_id, None), (None, sample_id, draw), (None, sample_id, None)):
        if key in scripts:
            return scripts[key]
    return None


class ReplayAgents:
    """``replay:FILE``: each episode replays its script (`replay_script`) with a `ReplayAgent`."""

    def __init__(self, path: str) -> None:
        self.path, self.scripts = path, read_replay(path)

    def script(self, arm: str, sample_id: str, draw: int) -> list[str]:
        script = replay_script(self.scripts, arm, sample_id, draw)
        if script is None:
            raise ValueError(f"Expects {self.path!r} to hold actions for sample {sample_id!r} (arm {arm!r}, draw "
                             f"{draw}), actual: none")
        return script

    def agents(self) -> Any:
        from zoomgym.agents.evaluate import EpisodeAgents
        from zoomgym.agents.scripted import ReplayAgent

        return EpisodeAgents(lambda sample, index, draw, arm: ReplayAgent(self.script(arm, sample.id, draw)))


def scripted_agent(name: str, seed: int) -> tuple[Any, dict[str, Any]]:
    """``--agent NAME``: the agent and what identifies it in a run.

    Raises:
        ValueError: an unknown name or a bad replay file.
    """
    from zoomgym.agents.evaluate import EpisodeAgents
    from zoomgym.agents.scripted import OracleAgent, RandomAgent

    if name == "oracle":
        return OracleAgent(), {"name": "oracle"}
    if name == "random":
        return EpisodeAgents(lambda sample, index, draw, arm: RandomAgent(seed=_seed_of(seed, index, draw))), \
            {"name": "random"}
    if name.startswith("replay:"):
        replay = ReplayAgents(name.removeprefix("replay:"))
        digest = hashlib.sha256(Path(replay.path).read_bytes()).hexdigest()
        return replay, {"name": f"replay-{Path(replay.path).stem}", "sha256": digest}
    raise ValueError(f"Expects --agent in {list(SCRIPTED_AGENTS)}, actual: {name!r}")


def check_replay(agent: Any, job: EvalJob, arms: Sequence[Any], draws: int) -> None:
    """A replay agent holds a script for every episode the job will play (checked before anything plays)."""
    if isinstance(agent, ReplayAgents):
        for sample in job.samples[: job.limit]:
            for arm in arms:
                for draw in range(draws):
                    if arm.plays(sample):
                        agent.script(arm.name, sample.id, draw)


def scripted_view_budget(cfg: Config, samples: Sequence[Any]) -> Any:
    """A scripted agent's view: the config's pixel budget when set, else what synthetic samples were made
    for, else the env's default (MGPO's 256..1280 visual tokens)."""
    from zoomgym.envs.data.synthetic import budget_made_for
    from zoomgym.envs.views import ViewBudget

    made_for = budget_made_for(samples[0])
    base = made_for or ViewBudget()
    return replace(base, min_pixels=cfg.model.min_pixels or base.min_pixels,
                   max_pixels=cfg.model.max_pixels or base.max_pixels)


def eval_command(args: argparse.Namespace) -> int:
    """``zoomgym eval``: every benchmark's run, then its tables and where its outputs are."""
    import sys

    from zoomgym.algorithms.cli import import_modules

    try:
        import_modules(args.imports)  # registers user datasets, envs or backends before their names are checked
        if args.compare:
            return _compare(args.compare)
        if args.agent is not None and args.model is not None:
            raise ValueError("Expects --model (a model) or --agent (a scripted agent), actual: both")
        if args.samples < 1 or args.batch_size < 1 or args.trajectories < 0:
            raise ValueError(f"Expects --samples >= 1, --batch-size >= 1, --trajectories >= 0, actual: {args.samples}, "
                             f"{args.batch_size}, {args.trajectories}")
        if args.samples > 1 and args.temperature == 0 and args.agent is None:
            raise ValueError(f"Expects --temperature > 0 to draw --samples {args.samples} per question, actual: 0 (greedy)")
        cfg = config_of(args)
        name = args.agent.split(":", 1)[0] if args.agent else Path(cfg.model.path).name or cfg.model.path
        jobs = jobs_of(cfg, args, name)
        agent, identity = scripted_agent(args.agent, cfg.trainer.seed) if args.agent else (None, None)
        from zoomgym.agents.evaluate import arms_for, check_resumable
        from zoomgym.algorithms.build import env_id_of, env_kwargs
        from zoomgym.algorithms.run import model_identity

        arms = arms_for(env_id_of(cfg), env_kwargs(cfg), args.counterfactual)
        for job in jobs:
            check_replay(agent, job, arms, args.samples)
            check_resumable(job.out, identity or model_identity(cfg), job.samples, {"name": job.label})
    except (ValueError, TypeError) as err:
        print(f"zoomgym: error: {err}", file=sys.stderr)
        return 2
    from zoomgym.agents.evaluate import EPISODES_FILE, REPORT_FILE, RESULTS_FILE, RESULTS_MD
    from zoomgym.algorithms.build import build_agent
    from zoomgym.algorithms.run import evaluate_model

    if agent is None:
        agent = build_agent(cfg)
    elif isinstance(agent, ReplayAgents):
        agent = agent.agents()
    for job in jobs:
        try:
            evaluate_model(cfg, job.samples, agent=agent, agent_identity=identity, out_dir=job.out, limit=job.limit,
                           data={"name": job.label, "source": job.source}, counterfactual=args.counterfactual,
                           draws=args.samples, temperature=args.temperature, top_p=args.top_p,
                           batch_size=args.batch_size, n_trajectories=args.trajectories, progress=not args.no_progress)
        except ValueError as err:  # bad input found as the run starts (another run in --out, a view budget a
            print(f"zoomgym: error: {err}", file=sys.stderr)  # synthetic sample was not made for); saved work stays
            return 2
        print((job.out / RESULTS_MD).read_text())
        print(f"outputs in {job.out}/: {RESULTS_FILE}, {RESULTS_MD}, {REPORT_FILE}, {EPISODES_FILE}\n")
    return 0


def _compare(outs: Sequence[str]) -> int:
    import sys

    from zoomgym.agents.evaluate.compare import compare_runs, format_comparison

    try:
        comparisons, warnings = compare_runs(*outs)
    except (ValueError, OSError) as err:
        print(f"zoomgym: error: {err}", file=sys.stderr)
        return 2
    print(format_comparison(comparisons, warnings, {"a": outs[0], "b": outs[1]}))
    return 0
