"""Group-aware speed: rollouts and whole MGPO steps, batched vs one at a time, before vs after a change.

For each tiny preset (``--sizes``) and group size G (``--groups``) with ``B = N / G`` prompts (``N = B*G``,
``--episodes``), in a fresh process per checkout and preset:

* ``one at a time``: episodes played alone (``run_rollouts`` of one sample, G = 1), each its own backend
  batch; its rate does not depend on G, so it is measured once per preset, over ``--alone`` episodes;
* ``batched``: the N episodes of B samples x G rollouts in one ``run_rollouts`` call;
* ``MGPO step``: one ``train_step`` of the MGPO trainer on B prompts x G rollouts: rollout, old/reference
  log-probs, the PPO update and the weight sync (a fresh agent per G, so every checkout starts from the
  same weights and draws the same episodes).

ZoomEnv-v0 on ``synthetic(preset="cpu")`` 672x672 canvases shown at the tiny model's default budget
(up to 256 visual tokens per image; the env's ``check_view_budget`` is off, as in `benchmarks/rollout.py`),
temperature 1 with a seed, up to ``--max-new-tokens`` per turn, fp32 on CPU.

``--before PYTHON`` measures a second checkout: a python whose ``zoomgym`` imports that checkout's code
(the child prints the file it imported, so a mix-up shows). One way, for git ref ``REF``::

    git worktree add /tmp/before REF
    python3 -m venv /tmp/before-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/before-venv/lib/python3.11/site-packages/zz-deps.pth
    /tmp/before-venv/bin/python -m pip uninstall -y setuptools   # the venv's own is too old for pyproject.toml
    /tmp/before-venv/bin/python -m pip install --no-deps --no-build-isolation -e /tmp/before

(the .pth lends it this venv's packages; its own editable install of the other checkout comes first on
``sys.path``). The benchmark's code is this file in both cases; it uses only APIs both checkouts have.

Usage::

    .venv/bin/python benchmarks/step.py --before /tmp/before-venv/bin/python
    .venv/bin/python benchmarks/step.py --sizes 1m --groups 8 --episodes 32    # this checkout only

Prints one Markdown table: seconds, episodes/s and the ratios (batched over one at a time; this checkout
over the other), with the load average before and after. On a shared machine only the ratios mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENV_ID = "zoomgym/ZoomEnv-v0"


def child_config(model_dir: Path, run_dir: Path, prompts: int, group_size: int, max_new_tokens: int) -> Any:
    """The MGPO run of one measurement: B prompts x G rollouts per step, every episode in one update."""
    from zoomgym.algorithms.config import load_config

    return load_config(None, [
        f"model.path={model_dir}",
        "model.dtype=float32",
        "algorithm.name=mgpo",
        f"data.train={{name: synthetic, options: {{n: {prompts}, seed: 0, preset: cpu}}}}",
        "data.val=[]",
        "env.options.check_view_budget=false",
        f"rollout.group_size={group_size}",
        f"rollout.max_new_tokens={max_new_tokens}",
        f"trainer.prompts_per_step={prompts}",
        f"trainer.mini_batch_prompts={prompts}",
        "trainer.micro_batch_size=8",
        "trainer.lr=1e-4",
        "trainer.device=cpu",
        "trainer.val_every=0",
        "trainer.val_before_train=false",
        "trainer.save_every=0",
        "logging.render_every=0",
        "logging.progress_bar=false",
        f"logging.run_dir={run_dir}",
    ])


def measure_child(size: str, groups: list[int], episodes: int, alone: int, max_new_tokens: int) -> dict[str, Any]:
    """One checkout's numbers for one preset (runs in the checkout's interpreter)."""
    import torch
    from zoomgym.agents.backends import hf
    from zoomgym.agents.backends.base import SamplingParams
    from zoomgym.agents.models import build_tiny_model
    from zoomgym.agents.rollout import run_rollouts
    from zoomgym.algorithms.build import build_agent
    from zoomgym.envs.data import synthetic

    from zoomgym import algorithms

    torch.manual_seed(0)
    sampling = SamplingParams(temperature=1.0, seed=0, max_new_tokens=max_new_tokens)
    env_kwargs = {"check_view_budget": False}
    result: dict[str, Any] = {"hf_module": hf.__file__, "torch_threads": torch.get_num_threads(), "groups": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny", size=size)
        data = synthetic(max(episodes // min(groups), alone), seed=0, preset="cpu")

        def agent_for(group_size: int) -> Any:
            return build_agent(child_config(model_dir, Path(tmp) / "run", episodes // group_size, group_size,
                                            max_new_tokens))

        agent = agent_for(groups[0])
        agent.rollout(data[:1], 2, ENV_ID, sampling, env_kwargs=env_kwargs, progress=False)  # warm-up
        start = time.perf_counter()
        for sample in data[:alone]:
            run_rollouts(agent.backend, agent.adapter, [sample], 1, ENV_ID, sampling, env_kwargs=env_kwargs,
                         progress=False)
        result["alone_episodes_per_s"] = alone / (time.perf_counter() - start)
        for group_size in groups:
            prompts = episodes // group_size
            agent = agent_for(group_size)
            start = time.perf_counter()
            played = agent.rollout(data[:prompts], group_size, ENV_ID, sampling, env_kwargs=env_kwargs, progress=False)
            rollout_s = time.perf_counter() - start
            cfg = child_config(model_dir, Path(tmp) / f"run-{group_size}", prompts, group_size, max_new_tokens)
            trainer = algorithms.make("mgpo", agent=agent, config=cfg)
            start = time.perf_counter()
            metrics, _ = trainer.train_step()
            step_s = time.perf_counter() - start
            trainer.close()
            result["groups"][str(group_size)] = {
                "prompts": prompts, "rollout_s": rollout_s, "episodes": len(played),
                "generated_tokens": sum(t.response_length for t in played), "step_s": step_s,
                "step_parts": {k: v for k, v in metrics.items() if k.startswith("time/")},
            }
    return result


def run_child(python: str, size: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = {"size": size, "groups": args.groups, "episodes": args.episodes, "alone": args.alone,
            "max_new_tokens": args.max_new_tokens}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([python, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())  # not a checkout: its folders must not shadow the install
    if proc.returncode != 0:
        raise RuntimeError(f"{python} ({size}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    names = list(results)  # "after" first, then "before" if measured
    head = ["model", "G", "B", "N"]
    for name in names:
        head += [f"{name}: one at a time ep/s", f"{name}: batched ep/s", f"{name}: batched x",
                 f"{name}: MGPO step s"]
    if len(names) == 2:
        head += ["rollout after/before x", "step after/before x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in args.sizes:
        for group_size in args.groups:
            key = str(group_size)
            row = [f"tiny-{size}", key, str(args.episodes // group_size), str(args.episodes)]
            for name in names:
                r = results[name][size]
                g = r["groups"][key]
                batched = g["episodes"] / g["rollout_s"]
                row += [f"{r['alone_episodes_per_s']:.2f}", f"{batched:.2f}", f"{batched / r['alone_episodes_per_s']:.1f}x",
                        f"{g['step_s']:.1f}"]
            if len(names) == 2:
                after, before = (results[n][size]["groups"][key] for n in names)
                row += [f"{before['rollout_s'] / after['rollout_s']:.1f}x", f"{before['step_s'] / after['step_s']:.1f}x"]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1m", "10m"], help="tiny presets")
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16], help="G values")
    parser.add_argument("--episodes", type=int, default=32, help="N = B*G episodes per batched rollout and step")
    parser.add_argument("--alone", type=int, default=8, help="episodes played one at a time (rate per preset)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per turn")
    parser.add_argument("--before", help="a python whose zoomgym is the checkout to compare with")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure_child(spec["size"], spec["groups"], spec["episodes"], spec["alone"],
                                       spec["max_new_tokens"])))
        return
    bad = [g for g in args.groups if g < 1 or args.episodes % g]
    if bad:
        parser.error(f"expects group sizes that divide --episodes {args.episodes}, actual: {bad}")

    load_before = os.getloadavg()
    pythons = {"after": sys.executable, **({"before": args.before} if args.before else {})}
    results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in pythons}
    for size in args.sizes:
        for name, python in pythons.items():  # alternating checkouts per preset: both see similar load
            start = time.perf_counter()
            results[name][size] = run_child(python, size, args)
            print(f"# {name} tiny-{size}: {time.perf_counter() - start:.0f} s, code from "
                  f"{results[name][size]['hf_module']}", file=sys.stderr, flush=True)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{results['after'][args.sizes[0]]['torch_threads']} torch threads, ZoomEnv-v0, "
          f"up to {args.max_new_tokens} new tokens/turn, load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    for name in pythons:
        print(f"{name}: {results[name][args.sizes[0]]['hf_module']}")
    print("\n".join(table(results, args)))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
