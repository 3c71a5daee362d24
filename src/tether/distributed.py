"""Several processes on Accelerate: the few collectives a data-parallel RLHF step needs.

Everything here goes through `accelerate` (its `PartialState`, `reduce`, `gather_object`), which owns the process
group whatever launched it (`accelerate launch`, torchrun, DeepSpeed). `state` may be an `Accelerator` or a
`PartialState`; None means the current `PartialState` (create the `Accelerator` first, or pass it). With one process
every function is a cheap no-op, so the trainer calls them unconditionally.

Sizes are global: `batch_size` rollouts per step and `minibatch_size` rows per optimiser step over all processes
together. Rank r of N owns rows r*B/N .. (r+1)*B/N of the global batch and its share of every minibatch.

All functions except `check_sizes` and `rank_seed` are collectives: every process must call them, in the same
order, or the run hangs.
"""

from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env, reduce
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]
T = TypeVar("T")


def current_state(state: Any = None) -> Any:
    """`state` if given, else the process's `PartialState` (created on first use, honouring
    ACCELERATE_USE_CPU=true, which PartialState itself ignores)."""
    if state is not None:
        return state
    # Only an uninitialised PartialState reads `cpu`. Without it, processes started by torchrun on a GPU-less
    # machine join one process group yet each believes it is alone.
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def sum_all_reduce(state: Any = None) -> AllReduce:
    """The sum of a tensor over all processes, for `masked_mean/var/whiten(..., all_reduce=...)`; identity
    with one process. The tensor must live on the process's device (nccl cannot reduce CPU tensors)."""
    if current_state(state).num_processes == 1:
        return _identity
    return _sum


def _identity(x: Tensor) -> Tensor:
    return x


def _sum(x: Tensor) -> Tensor:
    return reduce(x, reduction="sum")  # all_reduce on a clone: the argument is left untouched


def reduce_metrics(metrics: dict[str, float], weight: float = 1.0, *, sums: Collection[str] = (),
                   maxes: Collection[str] = (), state: Any = None) -> dict[str, float]:
    """Combine each process's scalar metrics into the run's: sum_r w_r m_r / sum_r w_r, w_r = `weight`.

    Exact for a metric that is a mean over the unit `weight` counts (rows: weight = local batch size; tokens:
    weight = local token count); a std or a ratio of sums is not such a mean, compute it from global sums
    (`masked_var(..., all_reduce=...)`). Keys in `sums` (counts: skipped minibatches, support flips) are summed,
    keys in `maxes` (times) take the maximum. Every process must pass the same keys.
    """
    s = current_state(state)
    if s.num_processes == 1:
        return {k: float(v) for k, v in metrics.items()}
    keys = sorted(metrics)
    if any(k != keys for k in gather_object([keys])):
        raise ValueError("reduce_metrics: processes passed different metric names; every rank must log the same keys")
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=s.device)
    w = torch.tensor([float(weight)], dtype=torch.float64, device=s.device)
    summed = reduce(torch.cat([values * w, values, w]), reduction="sum")
    n = len(keys)
    weighted, plain, total_w = summed[:n] / summed[-1], summed[n:2 * n], summed[-1]
    if total_w <= 0:
        raise ValueError(f"reduce_metrics: the weights sum to {total_w.item()}; they must be positive")
    top = reduce(values, reduction="max") if maxes else values
    return {k: (plain[i] if k in sums else top[i] if k in maxes else weighted[i]).item() for i, k in enumerate(keys)}


def gather_lists(items: Sequence[T], state: Any = None) -> list[T]:
    """Every process's list, concatenated in rank order (lengths may differ), returned on every process.
    For the samples log and per-sample KLs: pickled, so keep it to small Python objects, not big tensors."""
    if current_state(state).num_processes == 1:
        return list(items)
    return gather_object(list(items))  # accelerate concatenates the per-rank lists


def check_sizes(batch_size: int, minibatch_size: int, num_processes: int,
                gradient_accumulation_steps: int = 1, group_size: int = 1) -> tuple[int, int]:
    """The per-process (batch, minibatch) sizes for global sizes on num_processes; a clear error where the
    global sizes do not split evenly (an uneven split would weight some processes' rollouts more).

    group_size: completions per prompt (num_generations), laid out prompt by prompt; each process must hold
    whole groups, so that group baselines (GRPO, RLOO) need no communication."""
    for name, size in (("batch_size", batch_size), ("minibatch_size", minibatch_size)):
        if size % num_processes:
            raise ValueError(f"{name}={size} is global and must split evenly over {num_processes} processes; "
                             f"use a multiple of {num_processes}")
    if (batch_size // num_processes) % group_size:
        raise ValueError(f"batch_size={batch_size} over {num_processes} processes is {batch_size // num_processes} "
                         f"rollouts each, which would split a group of num_generations={group_size}; use a "
                         f"multiple of {num_processes * group_size}")
    local_mb = minibatch_size // num_processes
    if local_mb % gradient_accumulation_steps:
        raise ValueError(f"minibatch_size={minibatch_size} over {num_processes} processes is {local_mb} rows each, "
                         f"which gradient_accumulation_steps={gradient_accumulation_steps} does not divide")
    return batch_size // num_processes, local_mb


def rank_slice(batch_size: int, minibatch_size: int, state: Any = None, gradient_accumulation_steps: int = 1,
               group_size: int = 1) -> slice:
    """This process's rows of a global batch: rank r of N gets r*B/N .. (r+1)*B/N (checked by `check_sizes`)."""
    s = current_state(state)
    local, _ = check_sizes(batch_size, minibatch_size, s.num_processes, gradient_accumulation_steps, group_size)
    return slice(s.process_index * local, (s.process_index + 1) * local)


def shard(items: Sequence[T], minibatch_size: int, state: Any = None) -> Sequence[T]:
    """This process's slice of a global batch (a list, or a tensor along dim 0); len(items) is the batch size."""
    return items[rank_slice(len(items), minibatch_size, state)]


def rank_minibatches(local_batch: int, local_minibatch: int, generator: torch.Generator, rank: int,
                     num_processes: int) -> list[Tensor]:
    """This rank's share of each global minibatch, as indices into its local rows.

    Every rank draws one permutation per rank from the same generator (so generator states stay equal across
    ranks) and splits its own. Global minibatch k is the union over ranks of their k-th pieces, every rank
    holding exactly local_minibatch rows of it. With one process this is `randperm(B).split(mb)`, the
    single-process partition, draw for draw."""
    perms = [torch.randperm(local_batch, generator=generator) for _ in range(num_processes)]
    return list(perms[rank].split(local_minibatch))


def rank_seed(seed: int, rank: int) -> int:
    """Seed for a per-process random stream (sampling, dropout); rank 0 keeps `seed`, so a one-process run
    samples as before. Streams that must agree across ranks (prompt order, minibatch partition) use `seed`."""
    return seed + 1_000_003 * rank


class Ranks:
    """What a trainer needs to know about the other processes, in one place.

    One process (no launcher): every collective is the identity and nothing touches accelerate's global state.
    Launched on N > 1 processes (`accelerate launch`, torchrun): an `Accelerator` owns the process group and
    wraps the trained modules in DistributedDataParallel."""

    def __init__(self, cpu: bool) -> None:
        import os

        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator
            from accelerate.utils import DistributedType

            self.accelerator = Accelerator(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
            world = int(os.environ["WORLD_SIZE"])
            if self.accelerator.num_processes != world:
                raise ValueError(f"launched as {world} processes, but Accelerate sees "
                                 f"{self.accelerator.num_processes}; "
                                 f"on a machine without a GPU set ACCELERATE_USE_CPU=true (or device=cpu), or every "
                                 f"process would train on its own copy of the whole batch")
            kind = self.accelerator.distributed_type
            if kind not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.NO):
                raise ValueError(f"tether runs data-parallel (DDP) on several processes; distributed_type={kind.value} "
                                 f"(DeepSpeed, FSDP, ...) is not supported yet. See docs/distributed.md")
        self.num = self.accelerator.num_processes if self.accelerator else 1
        self.rank = self.accelerator.process_index if self.accelerator else 0
        self.is_main = self.rank == 0
        self.all_reduce: AllReduce = sum_all_reduce(self.accelerator) if self.accelerator else _identity

    @property
    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator else None

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP around a trained module (itself with one process); call its forward through what this returns."""
        return self.accelerator.prepare_model(module) if self.accelerator else module

    def gather(self, x: Tensor) -> Tensor:
        """Every process's (n, ...) tensor, concatenated in rank order (all n equal)."""
        if self.accelerator is None:
            return x
        from accelerate.utils import gather

        return gather(x.contiguous())

    def gather_lists(self, items: Sequence[T]) -> list[T]:
        return gather_lists(items, self.accelerator) if self.accelerator else list(items)

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on any: decisions that must be taken together."""
        if self.accelerator is None:
            return bool(flag)
        return bool(self.all_reduce(torch.tensor([float(flag)], device=self.accelerator.device)).item() > 0)

    def no_sync(self, modules: Sequence[torch.nn.Module]):
        """Skip the gradient all-reduce (for all but the last micro-batch of a minibatch)."""
        from contextlib import ExitStack

        stack = ExitStack()
        if self.accelerator is not None:
            for module in modules:
                stack.enter_context(self.accelerator.no_sync(module))
        return stack

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
