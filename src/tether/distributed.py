"""Several processes on Accelerate: the few collectives a data-parallel RLHF step needs.

Everything here goes through `accelerate` (its `PartialState`, `reduce`, `gather_object`), which owns the process
group whatever launched it (`accelerate launch`, torchrun, DeepSpeed). `state` may be an `Accelerator` or a
`PartialState`; None means the current `PartialState` (create the `Accelerator` first, or pass it). With one process
every function is a cheap no-op, so the trainer calls them unconditionally.

Sizes are global: `batch_size` rollouts per step and `minibatch_size` rows per optimiser step over all processes
together. Rank r of N owns rows r*B/N .. (r+1)*B/N of the global batch and its share of every minibatch.

The functions that take a `state` (and most of `Ranks`'s methods) are collectives: every process must call them,
in the same order, or the run hangs. `Ranks`, at the end, is what a trainer holds: these collectives for its process group,
and the wrapping, optimiser step and checkpoint shards of its trained module under DDP, DeepSpeed ZeRO or FSDP 2.
"""

from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

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


def rank_minibatches(local_batch: int, local_minibatch: int, generator: torch.Generator, rank: int,
                     num_processes: int) -> list[Tensor]:
    """This rank's share of each global minibatch, as indices into its local rows.

    Every rank draws one permutation per rank from the same generator (so generator states stay equal across
    ranks) and splits its own. Global minibatch k is the union over ranks of their k-th pieces, every rank
    holding exactly local_minibatch rows of it. With one process this is `randperm(B).split(mb)`, the
    single-process partition, draw for draw."""
    perms = [torch.randperm(local_batch, generator=generator) for _ in range(num_processes)]
    return list(perms[rank].split(local_minibatch))


def clip_if_needed(params: list[Tensor], max_norm: float) -> Tensor:
    """The gradients' global norm, scaling them down to max_norm only when it is exceeded (0: never).
    torch's clip_grad_norm_ multiplies every gradient by 1 even when nothing is clipped. Gradients may be
    sharded DTensors (FSDP 2): their norm is then reduced over the processes."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    total = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if max_norm > 0 and total > max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return total


def rank_seed(seed: int, rank: int) -> int:
    """Seed for a per-process random stream (sampling, dropout); rank 0 keeps `seed`, so a one-process run
    samples as before. Streams that must agree across ranks (prompt order, minibatch partition) use `seed`."""
    return seed + 1_000_003 * rank


class Ranks:
    """What a trainer needs to know about the other processes, in one place.

    One process (no launcher): every collective is the identity and nothing touches accelerate's global state.
    Launched on N > 1 processes (`accelerate launch`, torchrun): an `Accelerator` owns the process group and
    wraps the trained module: DistributedDataParallel, a DeepSpeed ZeRO engine (stage 1, 2 or 3), or FSDP 2.

    The optimiser step goes through here too (`backward`, `step`, `discard`, on what `prepare` was given): DeepSpeed keeps the gradients in
    its own shards, clips them itself and takes the step inside its engine."""

    def __init__(self, cpu: bool) -> None:
        import os

        self.accelerator = None
        self.engine = None  # the DeepSpeed engine, once `prepare` made it
        self.zero_stage = 0  # 0: no DeepSpeed
        self.fsdp = False
        self._module: torch.nn.Module | None = None  # what `prepare` was given, and the optimiser
        self._optimizer: torch.optim.Optimizer | None = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self._start(cpu)
        self.num = self.accelerator.num_processes if self.accelerator else 1
        self.rank = self.accelerator.process_index if self.accelerator else 0
        self.is_main = self.rank == 0
        self.all_reduce: AllReduce = sum_all_reduce(self.accelerator) if self.accelerator else _identity

    def _start(self, cpu: bool) -> None:
        import os

        from accelerate import Accelerator
        from accelerate.utils import DistributedType, InitProcessGroupKwargs

        deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
        fsdp = parse_flag_from_env("ACCELERATE_USE_FSDP")
        if fsdp and os.environ.get("FSDP_VERSION", "1") != "2":  # Accelerate's default is FSDP 1
            raise ValueError(f"fsdp_version={os.environ.get('FSDP_VERSION', '1')}: tether runs FSDP 2 only; set "
                             f"fsdp_version: 2 in the Accelerate config")
        handlers = []
        if deepspeed and not torch.cuda.is_available():
            # Accelerate pairs DeepSpeed with a GPU backend only; on CPU it runs on gloo (DeepSpeed's CPU fallback).
            handlers = [InitProcessGroupKwargs(backend="gloo")]
        self.accelerator = Accelerator(cpu=(cpu or parse_flag_from_env("ACCELERATE_USE_CPU")) and not deepspeed,
                                       kwargs_handlers=handlers)
        world = int(os.environ["WORLD_SIZE"])
        if self.accelerator.num_processes != world:
            raise ValueError(f"launched as {world} processes, but Accelerate sees {self.accelerator.num_processes}; "
                             f"on a machine without a GPU set ACCELERATE_USE_CPU=true (or device=cpu), or every "
                             f"process would train on its own copy of the whole batch")
        kind = self.accelerator.distributed_type
        if deepspeed and kind != DistributedType.DEEPSPEED:
            raise ValueError(f"the launch asks for DeepSpeed but Accelerate set up {kind.value}: is deepspeed "
                             f"installed? (ACCELERATE_USE_CPU=true also turns DeepSpeed off; leave it unset)")
        if fsdp and kind == DistributedType.MULTI_CPU:
            # Accelerate sets FSDP up on GPU process groups only; FSDP 2 itself runs on gloo, so on a CPU launch
            # tether turns on the plugin the launch asked for (read from the same environment).
            from accelerate.utils import FullyShardedDataParallelPlugin

            self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
            self.accelerator.state.distributed_type = kind = DistributedType.FSDP
        if kind not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.NO,
                        DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise ValueError(f"tether runs on several processes with DDP, DeepSpeed ZeRO or FSDP 2; distributed_type="
                             f"{kind.value} is not supported. See docs/distributed.md")
        if kind in (DistributedType.DEEPSPEED, DistributedType.FSDP) and self.accelerator.mixed_precision != "no":
            raise ValueError(f"{kind.value} with mixed_precision={self.accelerator.mixed_precision} would keep the "
                             f"weights (or their gathered copies) in half precision; tether keeps fp32 weights and "
                             f"autocasts the forward passes. Launch with --mixed_precision no and set precision: bf16 "
                             f"in the config")
        if kind == DistributedType.DEEPSPEED:
            self._check_deepspeed(self.accelerator.state.deepspeed_plugin)
        self.fsdp = kind == DistributedType.FSDP

    def _check_deepspeed(self, plugin) -> None:
        self.zero_stage = int(plugin.zero_stage)
        if self.zero_stage == 0:  # Accelerate wraps nothing then: every process would train on its own
            raise ValueError("DeepSpeed zero_stage: 0 has no gradient averaging under Accelerate; use stage 1, 2 or "
                             "3, or plain DDP (examples/accelerate/ddp_multi_gpu.yaml)")
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        offloaded = [k for k in ("offload_optimizer", "offload_param")
                     if str((zero.get(k) or {}).get("device", "none")).lower() not in ("none", "auto")]
        if offloaded:  # DeepSpeed would swap in its own CPU optimiser, which tether's schedule does not drive
            raise ValueError(f"DeepSpeed {' and '.join(offloaded)} is not supported yet; set the offload devices "
                             f"to none")

    @property
    def sharding(self) -> str:
        """How weights and optimiser states are laid out over the processes (recorded in checkpoints)."""
        return f"deepspeed-zero{self.zero_stage}" if self.zero_stage else "fsdp2" if self.fsdp else "none"

    @property
    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator else None

    @property
    def sharded(self) -> bool:
        """Parameters split over the processes (ZeRO-3, FSDP): every forward pass gathers them, so all processes
        must run the same forward passes, generation steps included."""
        return self.zero_stage == 3 or self.fsdp

    @property
    def sharded_state(self) -> bool:
        """Weights or optimiser states split over the processes (DeepSpeed, FSDP): every process writes its
        shard of a checkpoint (`save_shards`)."""
        return self.engine is not None or self.fsdp

    @contextmanager
    def whole_models(self):
        """Models loaded inside are whole on every process. Under ZeRO-3 transformers would otherwise load them
        sharded (through Accelerate's DeepSpeed settings), and only the trained module's engine can run those;
        under FSDP with cpu_ram_efficient_loading, empty on all but the main process."""
        if self.fsdp:
            with mock.patch.dict("os.environ", {"FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}):
                yield
        elif self.sharded:
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            try:
                yield
            finally:
                self.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()
        else:
            yield

    def prepare(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, minibatch_size: int,
                gradient_accumulation_steps: int, max_grad_norm: float,
                forward_methods: Sequence[str] = ()) -> torch.nn.Module:
        """The trained module wrapped for N processes (itself with one): call its forward through what this
        returns. Under DeepSpeed the engine also takes over `optimizer` (its states sharded over the processes);
        its batch sizes, accumulation and clipping are set from tether's config, whatever the launch config says.
        forward_methods: `module`'s methods that run its parts directly (sampling); FSDP gathers its root unit
        around each call, as around a forward pass."""
        self._module, self._optimizer = module, optimizer
        if self.accelerator is None:
            return module
        if self.fsdp:  # FSDP 2 shards in place and points the optimiser at the sharded parameters
            from accelerate.utils import DistributedType
            from torch.distributed.fsdp import register_fsdp_forward_method

            # Accelerate's AcceleratorState() re-reads the process group's type (MULTI_CPU on a CPU) each time it
            # is built; say FSDP again where it matters, at prepare.
            self.accelerator.state.distributed_type = DistributedType.FSDP
            wrapped = self.accelerator.prepare(module, optimizer)[0]
            for name in forward_methods:
                register_fsdp_forward_method(wrapped, name)
            return wrapped
        if not self.zero_stage:
            return self.accelerator.prepare_model(module)
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        config.update(train_batch_size=minibatch_size, gradient_accumulation_steps=gradient_accumulation_steps,
                      train_micro_batch_size_per_gpu=minibatch_size // self.num // gradient_accumulation_steps,
                      # inf: never clip, but still compute the norm (DeepSpeed skips a step whose norm is not finite)
                      gradient_clipping=max_grad_norm if max_grad_norm > 0 else float("inf"))
        config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
        self.engine, _ = self.accelerator.prepare(module, optimizer)
        return self.engine

    def backward(self, loss: Tensor, last: bool) -> None:
        """Accumulate a micro-batch's gradients; `last`: the minibatch's final micro-batch."""
        if self.engine is None:
            loss.backward()
            return
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)  # tether weights each micro-batch's loss itself

    def step(self, clip_groups: list[list[Tensor]], max_norm: float) -> list[Tensor] | None:
        """After the last micro-batch's backward: clip, then step unless a gradient norm is not finite (then the
        gradients are dropped). -> the norms before clipping (one per clip group; under DeepSpeed a single norm
        over every group, which it clips together), None when the step was skipped."""
        if self.engine is None:  # FSDP's gradients are sharded DTensors: clip_if_needed takes those too
            norms = [clip_if_needed(group, max_norm) for group in clip_groups]
            if not all(torch.isfinite(n) for n in norms):  # clipping leaves nan/inf as they are
                self._optimizer.zero_grad(set_to_none=True)
                return None
            self._optimizer.step()
            return norms
        self.engine.step()  # DeepSpeed skips the step, clearing every shard, when the norm is not finite
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)
        return [norm] if torch.isfinite(norm) else None

    def discard(self, loss: Tensor) -> None:
        """Drop the gradients accumulated in this minibatch without a step (`loss`: the current micro-batch's,
        not yet backpropagated). Its backward still runs, so that DDP's and FSDP's per-step bookkeeping (which
        expects one backward per forward) completes; then the gradients are zeroed. DeepSpeed holds them in its
        own shards: a backward of the nan-poisoned loss makes its overflow check skip the step and clear every
        shard, on every process."""
        if self.engine is None:
            loss.backward()
            self._optimizer.zero_grad(set_to_none=True)
            return
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.backward(loss * float("nan"), scale_wrt_gas=False)
        self.engine.step()

    def full_state_dict(self, module: torch.nn.Module) -> dict[str, Tensor] | None:
        """When `module`'s parameters are sharded (ZeRO-3, FSDP): its whole weights on the main process, gathered
        one parameter at a time into CPU memory, and an empty dict on the others. Else None: read the module
        itself. A collective."""
        if not self.sharded:
            return None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.accelerator.get_state_dict(self.engine) or {}  # stage3_gather_16bit_weights_on_model_save

    def save_shards(self, directory: Path) -> None:
        """Every process writes its shard of the weights and optimiser states under `directory`: DeepSpeed's own
        checkpoint, or an FSDP distributed checkpoint (torch.distributed.checkpoint)."""
        if self.engine is not None:
            self.engine.save_checkpoint(str(directory), tag="engine", save_latest=False)
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self._module, self._optimizer)
        dcp.save({"model": model, "optimizer": optim}, checkpoint_id=str(directory))

    def load_shards(self, directory: Path) -> None:
        if not directory.is_dir():
            raise ValueError(f"no sharded weights in {directory}: was the checkpoint written by another setup?")
        if self.engine is not None:
            loaded, _ = self.engine.load_checkpoint(str(directory), tag="engine", load_lr_scheduler_states=False)
            if loaded is None:
                raise ValueError(f"DeepSpeed found no checkpoint to load in {directory}")
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model, optim = get_state_dict(self._module, self._optimizer)
        state = {"model": model, "optimizer": optim}
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self._module, self._optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

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

    def no_sync(self, module: torch.nn.Module, skip: bool):
        """With skip: no DDP gradient all-reduce in this backward (all but the last micro-batch of a minibatch).
        DeepSpeed's engine is told by `backward(loss, last)` instead; FSDP reduce-scatters after every
        micro-batch, so that the gradients stay sharded (its no_sync would keep whole unsharded gradients)."""
        if skip and self.accelerator is not None and self.engine is None and not self.fsdp:
            return self.accelerator.no_sync(module)
        return nullcontext()

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
