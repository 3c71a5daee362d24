"""Several processes on Accelerate: the launch, and the wrapping of the trained module (how the global batch splits
over the processes is `tether.partition`).

`Ranks`, at the end, is what a trainer holds: the process group's collectives (`ranks.comm`, a
`tether.collectives.Collectives`), and the wrapping, optimiser step and checkpoint shards of its trained module under
DDP, DeepSpeed ZeRO or FSDP 2. Most of its methods are collectives too: every process must call them, in the same
order, or the run hangs.
"""

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch
from accelerate.utils import parse_flag_from_env
from torch import Tensor

from tether.collectives import Collectives


def clip_if_needed(params: list[Tensor], max_norm: float) -> Tensor:
    """The gradients' global norm, scaling them down to max_norm only when it is exceeded (0: never).
    torch's clip_grad_norm_ multiplies every gradient by 1 even when nothing is clipped. Gradients may be
    sharded DTensors (FSDP 2): their norm is then reduced over the processes."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    total = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if max_norm > 0 and total > max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return total


class Ranks:
    """What a trainer needs to know about the other processes, in one place.

    One process (no launcher): every collective (`comm`) is the identity and nothing touches accelerate's global
    state.
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
        self.comm = Collectives(self.accelerator)

    @property
    def num(self) -> int:
        return self.comm.num

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def is_main(self) -> bool:
        return self.comm.is_main

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

    def no_sync(self, module: torch.nn.Module, skip: bool):
        """With skip: no DDP gradient all-reduce in this backward (all but the last micro-batch of a minibatch).
        DeepSpeed's engine is told by `backward(loss, last)` instead; FSDP reduce-scatters after every
        micro-batch, so that the gradients stay sharded (its no_sync would keep whole unsharded gradients)."""
        if skip and self.accelerator is not None and self.engine is None and not self.fsdp:
            return self.accelerator.no_sync(module)
        return nullcontext()
