"""The few collectives a data-parallel RLHF step needs, over Accelerate; apart from how the processes were launched
and how the trained module is wrapped (that is `tether.distributed.Ranks`).

Everything here goes through `accelerate` (its `PartialState`, `reduce`, `gather`, `gather_object`), which owns
the process group whatever launched it (`accelerate launch`, torchrun, DeepSpeed). `state` may be an `Accelerator`
or a `PartialState`; None means the current `PartialState` (create the `Accelerator` first, or pass it). With one
process every function is a cheap no-op, so the trainer calls them unconditionally.

These are collectives: every process must call them, in the same order, or the run hangs.
"""

from collections.abc import Callable, Sequence
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


def gather_lists(items: Sequence[T], state: Any = None) -> list[T]:
    """Every process's list, concatenated in rank order (lengths may differ), returned on every process.
    For the samples log and per-sample KLs: pickled, so keep it to small Python objects, not big tensors."""
    if current_state(state).num_processes == 1:
        return list(items)
    return gather_object(list(items))  # accelerate concatenates the per-rank lists


class Collectives:
    """The collectives of one process group, for math and metrics: `Ranks(...).comm` in a trainer.

    accelerator: the `Accelerator` that owns the process group; None (one process, no launcher): every collective
    is the identity and nothing touches accelerate's global state."""

    def __init__(self, accelerator: Any = None) -> None:
        self.accelerator = accelerator
        self.num: int = accelerator.num_processes if accelerator else 1
        self.rank: int = accelerator.process_index if accelerator else 0
        self.is_main: bool = self.rank == 0
        self.device: torch.device | None = accelerator.device if accelerator else None
        self._all_reduce: AllReduce = sum_all_reduce(accelerator) if accelerator else _identity

    def all_reduce(self, x: Tensor) -> Tensor:
        """The sum of x over the processes (x on the process's device); x itself with one process."""
        return self._all_reduce(x)

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

    def all(self, flag: bool) -> bool:
        """True on every process when it is True on all."""
        return not self.any(not flag)

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
