"""The ``zoomgym`` command.

::

    zoomgym train CONFIG [key.sub=value ...] [--resume RUN_DIR] [--import MODULE]
    zoomgym train --resume RUN_DIR [key.sub=value ...]      # CONFIG defaults to RUN_DIR/config.yaml
    zoomgym train --help-config                             # every config key, its default and help
    zoomgym sft CONFIG [key.sub=value ...] [--resume RUN_DIR]   # supervised fine-tuning on chats (sft.*)
    zoomgym toy-base [key.sub=value ...] [--cache DIR] [--force]  # build or reuse the CPU toy base
    zoomgym eval CONFIG [key.sub=value ...]                 # greedy validation of model.path on data.val
    zoomgym eval --agent oracle random [--n 50 --out DIR]   # scripted agents on synthetic questions
    zoomgym tiny-model OUT [--size 1m|10m|50m] [--seed S]   # the offline tiny Qwen2.5-VL
    zoomgym demo [key.sub=value ...]                        # what `make demo` runs: toy base, then MGPO

Config errors (unknown key, wrong type, missing model or dataset path) are reported before any model
is loaded, as ``zoomgym: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from zoomgym.algorithms.config import (
    RUN_CONFIG_FILE,
    Config,
    check_run_dir,
    describe,
    load_config,
    validate,
    validate_sft,
)
from zoomgym.envs import DEFAULT_ENV_ID

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def _split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """``["cfg.yaml", "a.b=1"]`` -> ("cfg.yaml", ["a.b=1"]); the config is the one item without '='."""
    paths = [item for item in items if "=" not in item]
    if len(paths) > 1:
        raise ValueError(f"Expects one CONFIG file and key=value overrides, actual: several files {paths}")
    return (paths[0] if paths else None), [item for item in items if "=" in item]


def resolve_config(items: Sequence[str], resume: str | None = None) -> Config:
    """The validated config of ``zoomgym train`` (raises ``ValueError``/``TypeError`` naming the key).

    With ``--resume RUN_DIR`` and no CONFIG the run's own resolved ``config.yaml`` is the base, and the
    run directory is always RUN_DIR.
    """
    path, overrides = _split_config_and_overrides(items)
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / RUN_CONFIG_FILE).is_file():
            raise ValueError(f"Expects --resume RUN_DIR holding {RUN_CONFIG_FILE}, actual: {resume!r} has none")
        path = path or str(run_dir / RUN_CONFIG_FILE)
        overrides = [*overrides, f"logging.run_dir={run_dir}"]
    if path is None:
        raise ValueError("Expects a CONFIG file (e.g. configs/quickstart.yaml) or --resume RUN_DIR, actual: neither")
    cfg = load_config(path, overrides)
    validate(cfg)
    return cfg


def _train(args: argparse.Namespace) -> int:
    if args.help_config:
        print("\n".join(describe()))
        return 0
    for module in args.imports:
        importlib.import_module(module)  # registers user algorithms (or chat tasks) before names are checked
    try:
        cfg = resolve_config(args.items, args.resume)
        if args.command == "sft":
            validate_sft(cfg)
        check_run_dir(cfg, resume=args.resume is not None)
    except (ValueError, TypeError) as err:
        print(f"zoomgym: error: {err}", file=sys.stderr)
        return 2
    from zoomgym.algorithms.run import run, run_sft

    algo = (run_sft if args.command == "sft" else run)(cfg, resume=args.resume is not None)
    _print_summary(algo)
    return 0


def _toy_base(args: argparse.Namespace) -> int:
    from zoomgym.algorithms.toy_base import build_toy_base, describe_report

    try:
        model_dir = build_toy_base(args.items, cache=args.cache, force=args.force)
    except (ValueError, TypeError) as err:
        print(f"zoomgym: error: {err}", file=sys.stderr)
        return 2
    print(describe_report(model_dir))
    return 0


def _print_summary(algo: object) -> None:
    run_dir = algo.run_dir  # type: ignore[attr-defined]
    print(f"\nrun directory: {run_dir}")
    print(f"TensorBoard:   tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"checkpoint:    {algo.last_checkpoint}")  # type: ignore[attr-defined]
    for phase, metrics in (("before", algo.first_validation), ("after", algo.last_validation)):  # type: ignore[attr-defined]
        if metrics:
            shown = "  ".join(f"{k.removeprefix('val/')}={v:.3f}" for k, v in sorted(metrics.items())
                              if k.endswith(("accuracy", "hit_ratio")))
            print(f"validation {phase} training: {shown}")


def _demo(args: argparse.Namespace) -> int:
    """``make demo``: build (or reuse) the toy base, train MGPO from it, say what changed."""
    from zoomgym.algorithms.toy_base import build_toy_base, describe_report

    print("zoomgym demo: the toy base (built once, then cached), then MGPO on synthetic zoom questions "
          f"({DEMO_CONFIG.name})", flush=True)
    base = build_toy_base()
    print(describe_report(base), flush=True)
    try:
        cfg = resolve_config([str(DEMO_CONFIG), f"model.path={base}", *args.items])
        check_run_dir(cfg, resume=False)
    except (ValueError, TypeError) as err:
        print(f"zoomgym: error: {err}", file=sys.stderr)
        return 2
    from zoomgym.algorithms.run import run

    algo = run(cfg)
    _print_summary(algo)
    print(_what_changed(algo.first_validation, algo.last_validation))
    return 0


def _what_changed(before: dict[str, float], after: dict[str, float]) -> str:
    """One line: held-out accuracy and target-hit rate before and after training."""
    parts = []
    for key in sorted(after):
        if key.endswith(("/accuracy", "/target_hit_ratio")) and key in before:
            parts.append(f"{key.removeprefix('val/')} {before[key]:.3f} -> {after[key]:.3f} "
                         f"({100 * (after[key] - before[key]):+.1f} points)")
    return "what changed: " + ("; ".join(parts) if parts else "no validation before and after training")


def _tiny_model(argv: Sequence[str]) -> int:
    from zoomgym.agents.models import tiny_model_main

    return tiny_model_main(list(argv))


def _eval(args: argparse.Namespace) -> int:
    """``zoomgym eval CONFIG``: greedy validation of the config's model on its ``data.val``;
    ``zoomgym eval --agent ...``: scripted agents on synthetic questions. Both through one rollout
    engine and one metrics vocabulary (`agents.evaluate`)."""
    for module in args.imports:
        importlib.import_module(module)
    if args.agent:
        if args.items:
            print("zoomgym: error: Expects either CONFIG (a model) or --agent (scripted agents), actual: both",
                  file=sys.stderr)
            return 2
        return _eval_scripted(args)
    try:
        cfg = resolve_config(args.items)
    except (ValueError, TypeError) as err:
        print(f"zoomgym: error: {err}", file=sys.stderr)
        return 2
    from zoomgym.algorithms.build import env_id_of
    from zoomgym.algorithms.run import evaluate_model

    metrics = evaluate_model(cfg)
    print(f"{cfg.model.path}: greedy, {env_id_of(cfg)}")
    for key, value in sorted(metrics.items()):
        print(f"  {key.removeprefix('val/'):<48} {value:.4f}")
    return 0


def _eval_scripted(args: argparse.Namespace) -> int:
    from zoomgym.agents.evaluate import evaluate
    from zoomgym.envs.data import synthetic
    from zoomgym.envs.data.synthetic import budget_made_for

    from zoomgym import agents

    samples = synthetic(args.n, seed=args.seed, preset=args.preset)
    budget = budget_made_for(samples[0])  # the preset's own view
    results = {}
    for name in args.agent:
        agent = agents.OracleAgent() if name == "oracle" else agents.RandomAgent(seed=args.seed)
        results[name] = evaluate(agent, samples, args.env, env_kwargs={"view_budget": budget}, seed=args.seed,
                                 out_dir=Path(args.out) / name, n_render=args.render)
    print(f"{args.env}, {args.n} synthetic samples (preset {args.preset!r}, seed {args.seed})")
    print(f"{'agent':<8} {'accuracy':>8} {'valid box':>9} {'fallback':>8} {'mean IoU':>8}")
    for name, m in results.items():
        cells = [f"{m[f'eval/{key}']:.2f}" if f"eval/{key}" in m else "-"
                 for key in ("accuracy", "valid_box_ratio", "fallback_ratio", "iou")]
        print(f"{name:<8} {cells[0]:>8} {cells[1]:>9} {cells[2]:>8} {cells[3]:>8}")
    print(f"metrics and rendered episodes under {args.out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``zoomgym`` argument parser (``tiny-model`` forwards its arguments)."""
    parser = argparse.ArgumentParser(prog="zoomgym", description="Teach multimodal models to look closer.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train with a YAML config and dotted overrides")
    train.add_argument("items", nargs="*", metavar="CONFIG | key.sub=value",
                       help="a YAML config, then overrides such as trainer.lr=2e-6 algorithm.name=grpo")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    train.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                       help="import a module first (e.g. one that registers your algorithm)")
    train.add_argument("--help-config", action="store_true", help="list every config key with default and help")

    sft = sub.add_parser("sft", help="supervised fine-tuning on chats (the config's sft section)")
    sft.add_argument("items", nargs="*", metavar="CONFIG | key.sub=value",
                     help="a YAML config (e.g. configs/toy_base.yaml), then overrides such as trainer.steps=100")
    sft.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    sft.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                     help="import a module first (e.g. one that registers your chat task)")
    sft.set_defaults(help_config=False)

    toy = sub.add_parser("toy-base", help="build (or reuse) the toy base: a tiny model that can ground and read")
    toy.add_argument("items", nargs="*", metavar="key.sub=value", help="overrides of configs/toy_base.yaml")
    toy.add_argument("--cache", default=".cache", help="folder of the cached builds (default .cache)")
    toy.add_argument("--force", action="store_true", help="rebuild even if this recipe was built before")

    demo = sub.add_parser("demo", help="build (or reuse) the toy base and train configs/quickstart.yaml from it")
    demo.add_argument("items", nargs="*", metavar="key.sub=value", help="overrides of the quickstart config")

    evaluate = sub.add_parser("eval", help="eval CONFIG [overrides]: greedy validation of model.path on data.val; "
                                           "eval --agent oracle random: scripted agents on synthetic questions")
    evaluate.add_argument("items", nargs="*", metavar="CONFIG | key.sub=value",
                          help="a YAML config (its model, env and data.val), then overrides")
    evaluate.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                          help="import a module first (e.g. one that registers your algorithm or backend)")
    scripted = evaluate.add_argument_group("scripted agents (instead of CONFIG)")
    scripted.add_argument("--agent", nargs="+", choices=["oracle", "random"], help="scripted agents to evaluate")
    scripted.add_argument("--env", default=DEFAULT_ENV_ID, help=f"env id (default {DEFAULT_ENV_ID})")
    scripted.add_argument("--n", type=int, default=50, help="synthetic samples (default 50)")
    scripted.add_argument("--seed", type=int, default=0, help="samples, env resets and the random agent")
    scripted.add_argument("--preset", default="default", help="synthetic preset (its view budget is used)")
    scripted.add_argument("--render", type=int, default=4, help="episodes rendered as PNG per agent")
    scripted.add_argument("--out", default="runs/scripted", help="where metrics.json and the PNGs go")
    sub.add_parser("tiny-model", help="build the offline tiny Qwen2.5-VL (see `zoomgym tiny-model --help`)",
                   add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zoomgym`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Forwarded commands keep their own parsers (and --help).
    if argv and argv[0] == "tiny-model":
        return _tiny_model(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "toy-base":
        return _toy_base(args)
    return _train(args)


if __name__ == "__main__":
    sys.exit(main())
