"""Scale-out on ``torch.distributed``: one process per accelerator under ``torchrun``, the model sharded with
FSDP2 (``torch.distributed.fsdp.fully_shard``).

Everything a trainer needs to know about the other ranks is here, and every helper is the identity in a
single process (no ``torchrun``, no process group), so that path stays exactly what it was::

    init_from_env(cfg.distributed)           # torchrun's RANK / WORLD_SIZE / MASTER_ADDR -> process group
    model = shard_model(model, cfg.distributed)   # per decoder layer and vision block, then the root
    mine = shard_range(len(samples))         # whole prompts (groups) of this rank
    with gathered(model):                    # full weights for no-grad forwards: generation, scoring
        ...
    all_sum(x), all_max(x), gather_episodes(trajectories)

How N ranks reproduce one process on the same global batch:

- **Whole groups per rank.** Every rank draws the same B prompts and plays the contiguous share
  `shard_range` gives it, so a group never straddles ranks and advantages stay per group. Each episode is
  seeded by its position in the global batch (``episode_ids``), not in the rank's share, so a rank samples
  the very tokens a single process would (hf backend): results do not depend on the world size.
- **Global denominators.** The PPO update shuffles the global batch with the same seed on every rank and
  each rank trains the episodes of each mini-batch that it holds; the loss aggregation's count (tokens or
  sequences) is summed over ranks, and FSDP sums the gradients (divide factor 1) instead of averaging, so
  the accumulated gradient is that of one loss over the whole mini-batch.
- **Equal collectives.** A sharded forward/backward all-gathers and reduce-scatters: every rank must run
  as many. Ranks with fewer micro-batches in a mini-batch run zero-weight ones (`ppo.update`), and
  generation and scoring, whose forward counts depend on the episodes, run on gathered weights
  (`gathered`), which needs no collective per forward.
- **Metrics** are computed from every rank's episodes (`gather_episodes`) and reduced (`all_sum`), so
  every rank holds the same numbers; only rank 0 writes logs, TensorBoard and the run folder.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from zoomgym.agents.trajectory import Trajectory
    from zoomgym.algorithms.config import DistributedConfig

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What ``torchrun`` sets in every process it starts."""


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (it set ``WORLD_SIZE`` and friends)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def is_distributed() -> bool:
    """Whether a default process group is up: the trainers then shard, split and reduce."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes the run folder, logs and prints (rank 0, or the only process)."""
    return rank() == 0


def local_device(device: str) -> str:
    """A device for this rank: under torchrun ``"cuda"`` is the rank's own, ``cuda:LOCAL_RANK``; anything
    else is left as it is."""
    if launched_by_torchrun() and device == "cuda":
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def init_from_env(cfg: DistributedConfig) -> bool:
    """Start the default process group from ``torchrun``'s environment (once); no-op without torchrun.

    Args:
        cfg: the ``distributed`` config section (its ``backend``: "nccl" with CUDA, else "gloo", by default).

    Returns:
        Whether this process is one rank of a distributed run.
    """
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timedelta(minutes=cfg.timeout_minutes))
    return True


def shutdown() -> None:
    """Tear the process group down at the end of a run (no-op without one)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


# -- the work of each rank ---------------------------------------------------------------------------------


def shard_range(count: int) -> range:
    """This rank's contiguous share of ``count`` whole items (prompts, validation samples): the shares
    differ by at most one item, the first ranks taking the larger ones; ``range(count)`` in one process."""
    size, extra = divmod(count, world_size())
    start = rank() * size + min(rank(), extra)
    return range(start, start + size + (rank() < extra))


@dataclass(frozen=True)
class BatchShard:
    """Where this rank's ``count`` episodes sit in the global batch of ``total``: ``offset .. offset + count``."""

    offset: int
    count: int
    total: int

    def local(self, global_indices: Sequence[int]) -> list[int]:
        """The given global episode indices this rank holds, as its own positions, in the given order."""
        return [int(i) - self.offset for i in global_indices if self.offset <= int(i) < self.offset + self.count]


def batch_shard(count: int) -> BatchShard:
    """The global layout of a batch of which this rank holds ``count`` episodes (ranks in order)."""
    if not is_distributed():
        return BatchShard(0, count, count)
    counts = all_gather_object(count)
    return BatchShard(sum(counts[: rank()]), count, sum(counts))


# -- reductions (the identity in a single process) ---------------------------------------------------------


def _reduce(value: Any, op: Any) -> Any:
    if not is_distributed():
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.as_tensor(value, dtype=torch.float64, device=device).clone()
    dist.all_reduce(tensor, op=op)
    if isinstance(value, torch.Tensor):
        return tensor.to(device=value.device, dtype=value.dtype)
    return type(value)(tensor.item())


def all_sum(value: Any) -> Any:
    """The sum over ranks of a number or tensor, returned as the same kind (fp64 on the wire)."""
    return _reduce(value, dist.ReduceOp.SUM)


def all_max(value: Any) -> Any:
    """The maximum over ranks of a number or tensor."""
    return _reduce(value, dist.ReduceOp.MAX)


def all_min(value: Any) -> Any:
    """The minimum over ranks of a number or tensor."""
    return _reduce(value, dist.ReduceOp.MIN)


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order (``[value]`` in a single process)."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


@dataclass
class EpisodeRecord:
    """What the episode metrics and the validation samples read of a trajectory (`agents.metrics.Episode`),
    without its token tensors and images: cheap to send to the other ranks."""

    infos: list[dict[str, Any]]
    reward: float
    category: str
    sample_id: str
    num_turns: int
    truncated: bool
    context_truncated: bool
    length: int
    response_length: int
    actions: list[str] = field(default_factory=list)


def gather_episodes(trajectories: Sequence[Trajectory]) -> Sequence[Any]:
    """Every rank's episodes in global order (rank 0's first), as `EpisodeRecord`; in a single process the
    trajectories themselves."""
    if not is_distributed():
        return trajectories
    mine = [EpisodeRecord(list(t.infos), t.reward, t.category, t.sample_id, t.num_turns, t.truncated,
                          t.context_truncated, t.length, t.response_length, list(t.actions)) for t in trajectories]
    return [record for share in all_gather_object(mine) for record in share]


# -- FSDP2 -------------------------------------------------------------------------------------------------


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules sharded (and all-gathered) one at a time: those of the model's own ``_no_split_modules``
    classes (Qwen2.5-VL: each decoder layer and each vision block), innermost first."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"Expects a transformers model naming its layers in _no_split_modules, actual: "
                         f"{type(model).__name__} names none")
    return [module for module in model.modules() if type(module).__name__ in names]


def shard_model(model: torch.nn.Module, cfg: DistributedConfig) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP2 over all ranks: each `shard_units` module, then the root.

    The weights are first broadcast from rank 0, so every rank shards the same model whatever it did before
    (a warm-up on each rank, GPU non-determinism). Gradients are summed over ranks, not averaged: the loss
    of each rank is its share of the global loss (module docstring).

    Args:
        model: the module to shard (the policy, or a frozen reference); its parameters' dtype is the dtype
            of the sharded master weights (``model.dtype=float32`` with mixed precision).
        cfg: the ``distributed`` section: ``mixed_precision`` (bf16 compute, fp32 gradient reduction),
            ``cpu_offload`` (parameters, gradients and optimizer state in CPU memory).

    Returns:
        ``model`` itself (now an ``FSDPModule``).
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    if not is_distributed():
        raise RuntimeError("Expects a process group to shard over (torchrun), actual: none; call init_from_env first")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    options: dict[str, Any] = {}
    if cfg.mixed_precision:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for unit in shard_units(model):
        fully_shard(unit, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum over ranks
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    # FSDP makes the first module to run forward its root. The hf backend runs the vision tower on its own
    # before the model's forward (each distinct image once, agents/models/unique_images.py), which would
    # make a vision block the root: initialise from the real root now.
    model._get_fsdp_state()._lazy_init()
    setattr(model, _FORWARD_METHOD, types.MethodType(_call, model))
    register_fsdp_forward_method(model, _FORWARD_METHOD)
    return model


_FORWARD_METHOD = "zoomgym_call_as_forward"
"""The method `shard_model` registers with FSDP as a forward of the root (`call_as_forward`)."""


def _call(self: torch.nn.Module, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def call_as_forward(model: torch.nn.Module, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run as a forward of ``model`` when it is sharded (a plain call otherwise).

    For code that calls a model's submodules directly instead of ``model(...)``: the scorer runs
    ``model.model`` and then ``model.lm_head`` row by row (`agents.scoring`), which FSDP alone would not
    see as a forward of the root, whose own weights (embeddings, head, final norm, the vision patch
    embedding and merger) would then be neither gathered before nor their gradients reduced after."""
    method = getattr(model, _FORWARD_METHOD, None)
    return method(fn, *args, **kwargs) if method is not None else fn(*args, **kwargs)


def _fsdp_modules(model: torch.nn.Module | None) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [] if model is None else [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(*models: torch.nn.Module | None) -> Iterator[None]:
    """Hold the full weights of sharded ``models`` on every rank inside the block (no-op for others).

    For no-grad forwards whose number differs between ranks (generation: episodes end at different turns
    and tokens; scoring: ranks hold different numbers of episodes): with the weights all-gathered once
    and kept, a forward needs no collective. Costs one full copy of each model's weights per rank while
    inside.
    """
    units = [unit for model in models for unit in _fsdp_modules(model)]
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        roots = {id(model) for model in models if model is not None}
        for unit in units:
            unit.reshard()
            # fully_shard's default: the root keeps its (small) weights after forward, the layers reshard.
            unit.set_reshard_after_forward(id(unit) not in roots, recurse=False)


def full_norm(value: torch.Tensor) -> float:
    """A gradient norm as a number, from a sharded (DTensor) norm too."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def mean_over_ranks(values: torch.Tensor) -> float:
    """The mean of every rank's ``values`` together (``float(values.mean())`` in a single process)."""
    if not is_distributed():
        return float(values.mean())
    return all_sum(float(values.sum())) / max(all_sum(values.numel()), 1)


def from_main(value: Any) -> Any:
    """Rank 0's picklable ``value`` on every rank (``value`` itself in a single process): one answer to a
    question whose answer may differ per rank (a run folder named after the clock)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole ``model``'s state dict in CPU memory: from a sharded model every rank joins, and rank 0
    gets it (the others an empty dict); in a single process a detached copy."""
    if not _fsdp_modules(model):
        return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
