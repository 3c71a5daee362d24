"""Atomic checkpoints: a checkpoint folder either exists complete or not at all.

Written as `checkpoints/.tmp-step-N/` (every file fsynced), renamed to `checkpoints/step-N/` in one
`os.rename`, the folder fsynced; only then are older checkpoints removed. A kill at any moment leaves the
previous complete checkpoint in place and at most a `.tmp-*` folder that is never read. Old checkpoints are
renamed to `.trash-*` before they are deleted, so no half-deleted checkpoint is ever listed either. A write
that fails (a full disk) removes its temporary folder and stops the run with `CheckpointWriteError`.

Nothing in a checkpoint is pickled: weights and state tensors are safetensors, the rest JSON (statefile.py).
Resuming checks every file, tensor shape and config key before any weight or state is loaded.
"""

import errno
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_model

from tether.trainers.checkpoint_checks import RESUMABLE_CHANGES, check_state, load_weights  # noqa: F401 (re-exported)
from tether.trainers.lock import hold_output_dir
from tether.trainers.statefile import LEGACY_STATE, STATE_JSON, CheckpointError, read_state, write_state

log = logging.getLogger("tether")
_NAME = re.compile(r"^step-(\d{8})$")
WEIGHTS, SHARDS = "policy.safetensors", "shards"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, ...); the previous one is intact, the partial one removed."""


def save_trained(directory: Path, policy, critic, peft, tokenizer, state_dict: dict | None = None) -> None:
    """The policy as a folder AutoModelForCausalLM loads (LoRA merged in; the adapter alone in
    DIRECTORY/adapter), and a separate critic in DIRECTORY/critic. state_dict: the trained module's whole
    weights (`Ranks.full_state_dict`, keys `policy.*`, `critic.*`) when its own parameters are shards."""
    import copy

    from tether.models.policy import state_dict_part

    def part(prefix: str) -> dict | None:
        return None if state_dict is None else state_dict_part(state_dict, prefix)

    if peft is None:
        policy.save_pretrained(directory, tokenizer, state_dict=part("policy."))
    else:
        peft.save_pretrained(directory / "adapter")
        merged = copy.deepcopy(peft).merge_and_unload()
        policy.save_pretrained(directory, tokenizer, model=merged)
    if critic is not None:
        critic.save_pretrained(directory / "critic", state_dict=part("critic."))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, policy: torch.nn.Module | None, state: dict, keep: int = 1) -> Path:
    """Write policy weights (safetensors, shared tensors handled) and `state` (optimiser, scheduler, RNGs,
    counters: tensors, numbers, strings and containers of them) as checkpoint `step`; keep the newest `keep`."""
    return commit_checkpoint(root, step, begin_checkpoint(root, step), policy, state, keep)


def temporary_folder(root: Path, step: int) -> Path:
    """Where checkpoint `step` is written before it is renamed into place."""
    return root / f".tmp-step-{step:08d}"


def begin_checkpoint(root: Path, step: int) -> Path:
    """The empty temporary folder that checkpoint `step` is written into."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def write_files(tmp: Path, policy: torch.nn.Module | None, state: dict) -> None:
    """The checkpoint's files in `tmp`, every one fsynced."""
    if policy is not None:
        save_model(policy, str(tmp / WEIGHTS))
    write_state(tmp, state)
    fsync_tree(tmp)


def fsync_tree(folder: Path) -> None:
    """Every file below `folder`, and every folder, flushed to the disk."""
    for where, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(Path(where) / name)
        _fsync(Path(where))


def commit_checkpoint(root: Path, step: int, tmp: Path, policy: torch.nn.Module | None, state: dict,
                      keep: int = 1) -> Path:
    """Add the weights (unless None: written into `tmp` already, e.g. by DeepSpeed) and `state` to `tmp`, make
    it durable, rename it to `step-N` and prune older checkpoints. A write that fails removes `tmp` and raises
    CheckpointWriteError saying how much space the checkpoint needs."""
    try:
        write_files(tmp, policy, state)
    except OSError as err:
        raise write_failed(root, step, tmp, err, _tensor_bytes(policy.state_dict() if policy is not None else {})
                           + _tensor_bytes(state)) from err
    return publish_checkpoint(root, step, tmp, keep)


def publish_checkpoint(root: Path, step: int, tmp: Path, keep: int) -> Path:
    """Rename the complete, durable folder `tmp` to `step-N` (the one name a resume trusts), make the rename
    durable, and only then remove all but the newest `keep` checkpoints."""
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step written again (e.g. end of a run that just checkpointed)
        _remove(final)
    os.rename(tmp, final)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep]:
        _remove(old)
    return final


def write_failed(root: Path, step: int, tmp: Path, err: OSError, in_memory: int) -> CheckpointWriteError:
    """Remove the partial checkpoint `tmp`; the error that stops the run, with the space it needs."""
    written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else 0
    shutil.rmtree(tmp, ignore_errors=True)
    need, free = max(written, in_memory), shutil.disk_usage(root).free
    previous = list_checkpoints(root)
    kept = (f"the previous checkpoint {previous[-1]} is complete: `--resume` continues from it" if previous
            else "no earlier checkpoint exists")
    what = ("no space left on the device" if err.errno in (errno.ENOSPC, errno.EDQUOT)
            else f"{type(err).__name__}: {err.strerror or err}")
    return CheckpointWriteError(
        f"stopped at step {step}: could not write checkpoint {root / f'step-{step:08d}'} ({what}). It needs about "
        f"{_mb(need)} and {_mb(free)} is free on that disk (older checkpoints are removed only after a new one is "
        f"complete, so keep_checkpoints + 1 must fit). The partial checkpoint was removed; {kept}.")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _tensor_bytes(value) -> int:
    """Bytes of every tensor in a nested state (what the checkpoint's safetensors files hold)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint so that a kill at any moment never leaves a half-deleted `step-N` behind: first one
    rename out of the listed names, then the slow part."""
    trash = checkpoint.with_name(f".trash-{checkpoint.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name)


def load_checkpoint(path: Path, policy: torch.nn.Module | None) -> dict:
    """Load weights into `policy` in place (None: they are loaded elsewhere) after checking them, and return the
    saved state dict. CheckpointError naming the file for anything missing, truncated or of the wrong shape."""
    state = read_state(path)
    if policy is not None:
        load_weights(path / WEIGHTS, policy)
    return state


def checkpoint_step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def capture_state(config, parts: dict) -> dict:
    """Everything besides the weights that the next step depends on: each part's state_dict, by name. The
    progress part's keys sit at the top level, as in the first checkpoints tether wrote (which still resume)."""
    return {"config": config.to_dict(), "reward": None, **parts["progress"].state_dict(),  # reward: a stateless one
            **{name: part.state_dict() for name, part in parts.items() if name != "progress"}}


def restore_state(config, parts: dict, state: dict, where: Path = Path("the checkpoint")) -> None:
    check_state(config, parts, state, where)
    _load_part("progress", parts["progress"], state, where)
    for name, part in parts.items():
        # optimizer: absent under DeepSpeed / FSDP (in the shards); reward: None when it kept no state
        if name != "progress" and state.get(name) is not None:
            _load_part(name, part, state[name], where)


def _load_part(name: str, part, state, where: Path) -> None:
    try:
        part.load_state_dict(state)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        raise CheckpointError(f"cannot resume: {where} holds a {name} state this trainer cannot load "
                              f"({type(err).__name__}: {err})") from err


def write_checkpoint(config, ranks, trained: torch.nn.Module, parts: dict) -> Path:
    """The checkpoint at the current step. On several processes every process must call it: each one's random
    state is gathered into the checkpoint, and the main process writes it. Under DeepSpeed and FSDP every
    process also writes its shard of the weights and optimiser states into the folder's `shards/`. A write that
    fails on any process raises CheckpointWriteError on every process."""
    with hold_output_dir(config.output_dir, ranks.comm.is_main):  # the step API writes without train()'s lock
        return _write_checkpoint(config, ranks, trained, parts)


def _write_checkpoint(config, ranks, trained: torch.nn.Module, parts: dict) -> Path:
    g, comm = ranks, ranks.comm
    step = parts["progress"].step
    state = {**capture_state(config, parts), "num_processes": comm.num, "sharding": g.sharding}
    if comm.num > 1:
        state["rng_per_rank"] = comm.gather_lists([state["rng"]])
    root = Path(config.output_dir) / "checkpoints"
    path = root / f"step-{step:08d}"
    tmp = begin_checkpoint(root, step) if comm.is_main else temporary_folder(root, step)
    comm.wait()
    failure = None
    if g.sharded_state:
        try:
            g.save_shards(tmp / SHARDS)
        except OSError as err:
            failure = err
        if comm.any(failure is not None):
            why = failure or OSError("another process could not write its shard")
            error = write_failed(root, step, tmp, why, 0) if comm.is_main else None
            raise error or CheckpointWriteError(f"stopped at step {step}: a process could not write its shard of "
                                                f"checkpoint {path} (the main process says why)")
    if comm.is_main:
        try:
            commit_checkpoint(root, step, tmp, None if g.sharded_state else trained, state,
                              keep=config.keep_checkpoints)
        except CheckpointWriteError as err:
            failure = err
    if comm.any(failure is not None):  # every process stops together, none waits for the others forever
        raise failure or CheckpointWriteError(f"stopped at step {step}: the main process could not write "
                                              f"checkpoint {path}; its error says why")
    return path


def maybe_resume(config, ranks, trained: torch.nn.Module, parts: dict) -> None:
    """Continue from the latest checkpoint in output_dir as `resume` says (true, auto, false); refuse a fresh run
    into a folder that holds one, and a resume with another number of processes. Every file is checked before
    any weight or state is loaded."""
    c = config
    checkpoints = list_checkpoints(Path(c.output_dir) / "checkpoints")
    if c.resume is False:
        if checkpoints:
            raise ValueError(f"output_dir {c.output_dir!r} holds checkpoints of an earlier run (latest: "
                             f"{checkpoints[-1].name}); pass --resume to continue it, or choose a new output_dir")
        return
    if not checkpoints:
        if c.resume is True:
            raise ValueError(f"resume=true but {c.output_dir!r} holds no checkpoint to resume from")
        return
    g, comm, latest = ranks, ranks.comm, checkpoints[-1]
    state = read_state(latest)  # the trainer state: checked before any weight is touched
    if state.get("sharding", "none") != g.sharding:
        raise ValueError(f"cannot resume: {latest} was written with sharding {state.get('sharding', 'none')}"
                         f" and this run has {g.sharding} (DeepSpeed stage / FSDP); its weights and optimiser "
                         f"states are laid out for the former, so resume it the way it was launched")
    if state.get("num_processes", 1) != comm.num:
        raise ValueError(f"cannot resume: {latest} was written by {state.get('num_processes', 1)} "
                         f"process(es), this run has {comm.num}; every process's random state is in the "
                         f"checkpoint, so resume with the same number")
    if "rng_per_rank" in state:
        state["rng"] = state["rng_per_rank"][comm.rank]
    where = latest / (STATE_JSON if (latest / STATE_JSON).exists() else LEGACY_STATE)
    check_state(c, parts, state, where)
    if g.sharded_state:
        g.load_shards(latest / SHARDS)
    else:
        load_weights(latest / WEIGHTS, trained)
    restore_state(c, parts, state, where)
    log.info("resumed from %s at step %d", latest, parts["progress"].step)
