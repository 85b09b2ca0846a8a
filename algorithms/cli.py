"""The ``zoomgym`` command.

::

    zoomgym train CONFIG [key.sub=value ...] [--resume RUN_DIR] [--import MODULE]
    zoomgym train --resume RUN_DIR [key.sub=value ...]      # CONFIG defaults to RUN_DIR/config.yaml
    zoomgym train --help-config                             # every config key, its default and help
    zoomgym preflight CONFIG [key.sub=value ...] [--gpus N] [--gpu-mem GiB]   # peak memory per rank, fits?
    zoomgym sft CONFIG [key.sub=value ...] [--resume RUN_DIR]   # supervised fine-tuning on chats (sft.*)
    zoomgym toy-base [key.sub=value ...] [--cache DIR] [--force]  # build or reuse the CPU toy base
    zoomgym eval --model PATH --data vstar:DIR [--counterfactual] [--out DIR]   # a benchmark (docs/evaluation.md)
    zoomgym eval CONFIG [key.sub=value ...] [--data SPEC]   # the config's protocol, on data.val unless --data
    zoomgym eval --agent oracle|random|replay:FILE --data synthetic:50           # scripted agents, same path
    zoomgym eval --compare OUT_A OUT_B                      # two runs, sample by sample
    zoomgym export RUN_DIR/checkpoints/step_N OUT           # a plain from_pretrained folder (sharded or not)
    zoomgym tiny-model OUT [--size 1m|10m|50m] [--seed S]   # the offline tiny Qwen2.5-VL
    zoomgym demo [key.sub=value ...]                        # what `make demo` runs: toy base, then MGPO

Config errors (unknown key, wrong type, invalid YAML, missing model or dataset path) are reported before
any model is loaded, as ``zoomgym: error: ...`` with exit status 2. Options and overrides may come in any
order (``zoomgym train CONFIG --import my_algos trainer.lr=2e-6``); ``--import`` finds modules in the
current folder.

Under ``torchrun --nproc_per_node=N -m zoomgym.algorithms.cli train CONFIG`` every process is one rank of
one run (`algorithms.distributed`); only rank 0 prints the summary.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
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
from zoomgym.algorithms.evaluation import add_eval_arguments, eval_command

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def _split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """``["cfg.yaml", "a.b=1"]`` -> ("cfg.yaml", ["a.b=1"]); the config is the one item without '='."""
    paths = [item for item in items if "=" not in item]
    if len(paths) > 1:
        raise ValueError(f"Expects one CONFIG file and key=value overrides, actual: several files {paths}")
    return (paths[0] if paths else None), [item for item in items if "=" in item]


def resolve_config(items: Sequence[str], resume: str | None = None, *, check_data: bool = True) -> Config:
    """The validated config of ``zoomgym train`` (raises ``ValueError``/``TypeError`` naming the key).

    With ``--resume RUN_DIR`` and no CONFIG the run's own resolved ``config.yaml`` is the base, and the
    run directory is always RUN_DIR. ``check_data=False`` leaves the datasets unchecked (`validate`).
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
    validate(cfg, check_data=check_data)
    return cfg


def import_modules(names: Sequence[str]) -> None:
    """``--import``: import each module, the current folder first on the search path (a console script's
    own path is its bin/ folder); raises ``ValueError`` naming a module that fails to import."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f"Expects --import {name} to name a module in the current folder or installed, "
                             f"actual: {error}") from error


def _train(args: argparse.Namespace) -> int:
    if args.help_config:
        print("\n".join(describe()))
        return 0
    try:
        import_modules(args.imports)  # registers user algorithms before the name is checked
        cfg = resolve_config(args.items, args.resume)
        if args.command == "sft":
            validate_sft(cfg)
        check_run_dir(cfg, resume=args.resume is not None)
    except (ValueError, TypeError) as err:
        print(f"zoomgym: error: {err}", file=sys.stderr)
        return 2
    if not args.skip_preflight:
        from zoomgym.algorithms.preflight import train_gate

        may_start, message = train_gate(cfg)
        if not may_start or os.environ.get("RANK", "0") == "0":  # under torchrun: once per run, not per rank
            print(message, file=sys.stdout if may_start else sys.stderr, flush=True)
        if not may_start:
            return 2
    from zoomgym.algorithms import distributed
    from zoomgym.algorithms.run import run, run_sft

    algo = None
    try:
        algo = (run_sft if args.command == "sft" else run)(cfg, resume=args.resume is not None)
        main = distributed.is_main()
    finally:
        if algo is not None:
            algo.agent.close()  # first: a vLLM engine under torchrun joined the process group
        distributed.shutdown()
    if main:
        _print_summary(algo)
    return 0


def _export(args: argparse.Namespace) -> int:
    from zoomgym.algorithms.checkpoint import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except ValueError as err:
        print(f"zoomgym: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out} (AutoModelForImageTextToText.from_pretrained and the processor load it)")
    return 0


def _preflight(args: argparse.Namespace) -> int:
    """``zoomgym preflight``: the estimate of a config's peak memory per rank; exit 0 if it fits, 1 if not."""
    import json

    from zoomgym.algorithms.preflight import as_dict, describe, preflight

    try:
        cfg = resolve_config(args.items, check_data=False)  # planning needs no data on this machine
        result = preflight(cfg, world_size=args.gpus, gpu_mem_gib=args.gpu_mem, prompt_tokens=args.prompt_tokens)
    except (ValueError, TypeError) as err:
        print(f"zoomgym: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(as_dict(result)) if args.json else describe(result))
    return 0 if result.fits else 1


def _print_summary(algo: object) -> None:
    run_dir = algo.run_dir  # type: ignore[attr-defined]
    print(f"\nrun directory: {run_dir}")
    print(f"TensorBoard:   {tensorboard_command()} --logdir {run_dir / 'tensorboard'}")
    print(f"checkpoint:    {algo.last_checkpoint}")  # type: ignore[attr-defined]
    for phase, metrics in (("before", algo.first_validation), ("after", algo.last_validation)):  # type: ignore[attr-defined]
        if metrics:
            shown = "  ".join(f"{k.removeprefix('val/')}={v:.3f}" for k, v in sorted(metrics.items())
                              if k.endswith(("accuracy", "hit_ratio")))
            print(f"validation {phase} training: {shown}")


def tensorboard_command() -> str:
    """``tensorboard`` as this shell can run it: the name when it is on PATH, else the executable next to
    this Python (``.venv/bin/tensorboard`` after ``make demo`` with no venv activated)."""
    beside = Path(sys.executable).with_name("tensorboard")
    if shutil.which("tensorboard") == str(beside) or not beside.exists():
        return "tensorboard"
    return os.path.relpath(beside) if beside.resolve().is_relative_to(Path.cwd().resolve()) else str(beside)


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
    print(what_changed(algo.first_validation, algo.last_validation))
    return 0


def what_changed(before: dict[str, float], after: dict[str, float]) -> str:
    """One line: held-out accuracy and target-hit rate before and after training."""
    parts = []
    for key in sorted(after):
        if key.endswith(("/accuracy", "/target_hit_ratio")) and key in before:
            parts.append(f"{key.removeprefix('val/')} {before[key]:.3f} -> {after[key]:.3f} "
                         f"({100 * (after[key] - before[key]):+.1f} points)")
    return "what changed: " + ("; ".join(parts) if parts else "no validation before and after training")


def _toy_base(args: argparse.Namespace) -> int:
    from zoomgym.algorithms.toy_base import build_toy_base, describe_report

    try:
        model_dir = build_toy_base(args.items, cache=args.cache, force=args.force)
    except (ValueError, TypeError) as err:
        print(f"zoomgym: error: {err}", file=sys.stderr)
        return 2
    print(describe_report(model_dir))
    return 0


def _tiny_model(argv: Sequence[str]) -> int:
    from zoomgym.agents.models import tiny_model_main

    return tiny_model_main(list(argv))


def _add_run_arguments(parser: argparse.ArgumentParser, items_help: str, import_example: str) -> None:
    """CONFIG and overrides, ``--resume`` and ``--import``: the arguments of every command that trains."""
    parser.add_argument("items", nargs="*", metavar="CONFIG | key.sub=value", help=items_help)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help=f"import a module first {import_example}")


def build_parser() -> argparse.ArgumentParser:
    """The ``zoomgym`` argument parser (``tiny-model`` forwards its arguments)."""
    parser = argparse.ArgumentParser(prog="zoomgym", description="Teach multimodal models to look closer.")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # type: ignore[attr-defined]  (each command's own parser, filled below, for main)

    train = sub.add_parser("train", help="train with a YAML config and dotted overrides")
    _add_run_arguments(train, "a YAML config, then overrides such as trainer.lr=2e-6 algorithm.name=grpo",
                       "(e.g. one that registers your algorithm)")
    train.add_argument("--help-config", action="store_true", help="list every config key with default and help")
    train.add_argument("--skip-preflight", action="store_true",
                       help="start even if the memory estimate says a GPU run cannot fit (zoomgym preflight)")

    from zoomgym.algorithms.preflight import DEFAULT_PROMPT_TOKENS

    pre = sub.add_parser("preflight", help="estimate a config's peak memory per rank and whether it fits "
                                           "(reads config.json only)")
    pre.add_argument("items", nargs="*", metavar="CONFIG | key.sub=value", help="a YAML config, then overrides")
    pre.add_argument("--gpus", type=int, default=1, help="ranks of the run (FSDP shards over them; default 1)")
    pre.add_argument("--gpu-mem", type=float, default=None, metavar="GiB",
                     help="memory of one GPU (default: the configured device's, or host RAM on CPU)")
    pre.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                     help=f"prompt tokens per turn of the worst-case episode (default {DEFAULT_PROMPT_TOKENS})")
    pre.add_argument("--json", action="store_true", help="print the estimate as JSON")

    sft = sub.add_parser("sft", help="supervised fine-tuning on chats (the config's sft section)")
    _add_run_arguments(sft, "a YAML config (e.g. configs/toy_base.yaml), then overrides such as trainer.steps=100",
                       "(e.g. one that registers your chat task)")
    sft.set_defaults(help_config=False, skip_preflight=True)  # the estimate models RL steps, not SFT's

    toy = sub.add_parser("toy-base", help="build (or reuse) the toy base: a tiny model that can ground and read")
    toy.add_argument("items", nargs="*", metavar="key.sub=value", help="overrides of configs/toy_base.yaml")
    toy.add_argument("--cache", default=".cache", help="folder of the cached builds (default .cache)")
    toy.add_argument("--force", action="store_true", help="rebuild even if this recipe was built before")

    demo = sub.add_parser("demo", help="build (or reuse) the toy base and train configs/quickstart.yaml from it")
    demo.add_argument("items", nargs="*", metavar="key.sub=value", help="overrides of the quickstart config")

    evaluate = sub.add_parser("eval", help="evaluate a model (or a scripted agent) on a benchmark with a stated "
                                           "protocol: resumable, counterfactual zoom analysis, HTML report; --compare")
    add_eval_arguments(evaluate)
    export = sub.add_parser("export", help="write a plain from_pretrained folder (model and processor) from a "
                                           "checkpoint, sharded (torchrun) or not")
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="RUN_DIR/checkpoints/step_N")
    export.add_argument("out", metavar="OUT", help="a new or empty folder")
    sub.add_parser("tiny-model", help="build the offline tiny Qwen2.5-VL (see `zoomgym tiny-model --help`)",
                   add_help=False)
    return parser


def configure_process() -> None:
    """Process-wide settings of a ``zoomgym`` command (library callers keep their own).

    torch's CPU threads: ``OMP_NUM_THREADS`` when set, else one less than the CPUs this process may run
    on, at least one. torch's default, a thread per core, gained nothing on the 2-core development
    machine while the other core was busy: the demo took 88 s wall and 125 s CPU with 2 threads, 84 s
    and 80 s with 1.

    transformers' progress bars (loading weights and the like) are turned off: the command prints its own
    (a checkpoint's shards are written without one in any case, `algorithms.checkpoint`).
    """
    import torch
    from transformers.utils import logging as transformers_logging

    if "OMP_NUM_THREADS" not in os.environ:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, min(torch.get_num_threads(), cpus - 1)))
    transformers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zoomgym`` console script."""
    command_line = argv is None  # this process is the command (console script, python -m), not a caller
    argv = list(sys.argv[1:] if argv is None else argv)
    # Forwarded commands keep their own parsers (and --help).
    if argv and argv[0] == "tiny-model":
        return _tiny_model(argv[1:])
    parser = build_parser()
    commands = parser.commands  # type: ignore[attr-defined]
    if argv and argv[0] in commands:
        # A subcommand's own parser, intermixed: overrides may follow options (`--import m a.b=1`).
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = parser.parse_args(argv)
    if command_line:
        configure_process()
    if args.command == "demo":
        return _demo(args)
    if args.command == "eval":
        return eval_command(args)
    if args.command == "toy-base":
        return _toy_base(args)
    if args.command == "preflight":
        return _preflight(args)
    if args.command == "export":
        return _export(args)
    return _train(args)


if __name__ == "__main__":
    sys.exit(main())
