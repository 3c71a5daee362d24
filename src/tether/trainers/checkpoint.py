"""Atomic checkpoints: a checkpoint folder either exists complete or not at all.

Written as `checkpoints/.tmp-step-N/` (every file fsynced), renamed to `checkpoints/step-N/` in one
`os.rename`, the folder fsynced; only then are older checkpoints removed. A kill at any moment leaves the
previous complete checkpoint in place and at most a `.tmp-*` folder that is never read. Old checkpoints are
renamed to `.trash-*` before they are deleted, so no half-deleted checkpoint is ever listed either.
"""

import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

log = logging.getLogger("tether")
_NAME = re.compile(r"^step-(\d{8})$")
WEIGHTS, STATE, SHARDS = "policy.safetensors", "trainer_state.pt", "shards"


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
    counters: anything torch.save takes) as checkpoint `step`; keep the newest `keep` checkpoints."""
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


def commit_checkpoint(root: Path, step: int, tmp: Path, policy: torch.nn.Module | None, state: dict,
                      keep: int = 1) -> Path:
    """Add the weights (unless None: written into `tmp` already, e.g. by DeepSpeed) and `state` to `tmp`, make
    it durable, rename it to `step-N` and prune older checkpoints."""
    if policy is not None:
        save_model(policy, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    for folder, dirs, files in os.walk(tmp, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step written again (e.g. end of a run that just checkpointed)
        _remove(final)
    os.rename(tmp, final)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep]:
        _remove(old)
    return final


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
    """Load weights into `policy` in place (None: they are loaded elsewhere) and return the saved state dict."""
    if policy is not None:
        load_model(policy, str(path / WEIGHTS))
    return torch.load(path / STATE, weights_only=False)


def checkpoint_step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


# Config keys that may change between a run and its resumption; any other change would make the resumed
# run a different experiment than the one its metrics.jsonl describes. compile and keep_freed_memory change
# speed and round-off only (a compiled run can go on where no C++ compiler is).
RESUMABLE_CHANGES = {"steps", "resume", "checkpoint_every", "keep_checkpoints", "samples_every", "samples_per_step",
                     "max_faults_in_row", "device", "compile", "keep_freed_memory"}


def capture_state(config, parts: dict) -> dict:
    """Everything besides the weights that the next step depends on: each part's state_dict, by name. The
    progress part's keys sit at the top level, as in the first checkpoints tether wrote (which still resume)."""
    return {"config": config.to_dict(), "reward": None, **parts["progress"].state_dict(),  # reward: a stateless one
            **{name: part.state_dict() for name, part in parts.items() if name != "progress"}}


def restore_state(config, parts: dict, state: dict) -> None:
    changed = sorted(k for k, v in state["config"].items()
                     if k not in RESUMABLE_CHANGES and getattr(config, k, v) != v)
    if changed:
        details = ", ".join(f"{k}: {state['config'][k]!r} -> {getattr(config, k)!r}" for k in changed)
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {details}. Only "
                         f"{sorted(RESUMABLE_CHANGES)} may change; use a new output_dir for a different run")
    parts["progress"].load_state_dict(state)
    for name, part in parts.items():
        # optimizer: absent under DeepSpeed / FSDP (in the shards); reward: None when it kept no state
        if name != "progress" and state.get(name) is not None:
            part.load_state_dict(state[name])


def write_checkpoint(config, ranks, trained: torch.nn.Module, parts: dict) -> Path:
    """The checkpoint at the current step. On several processes every process must call it: each one's random
    state is gathered into the checkpoint, and the main process writes it. Under DeepSpeed and FSDP every
    process also writes its shard of the weights and optimiser states into the folder's `shards/`."""
    g, comm = ranks, ranks.comm
    step = parts["progress"].step
    state = {**capture_state(config, parts), "num_processes": comm.num, "sharding": g.sharding}
    if comm.num > 1:
        state["rng_per_rank"] = comm.gather_lists([state["rng"]])
    root = Path(config.output_dir) / "checkpoints"
    path = root / f"step-{step:08d}"
    tmp = begin_checkpoint(root, step) if comm.is_main else temporary_folder(root, step)
    comm.wait()
    if g.sharded_state:
        g.save_shards(tmp / SHARDS)
        comm.wait()
    if comm.is_main:
        commit_checkpoint(root, step, tmp, None if g.sharded_state else trained, state,
                          keep=config.keep_checkpoints)
    comm.wait()
    return path


def maybe_resume(config, ranks, trained: torch.nn.Module, parts: dict) -> None:
    """Continue from the latest checkpoint in output_dir as `resume` says (true, auto, false); refuse a fresh run
    into a folder that holds one, and a resume with another number of processes."""
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
    g, comm = ranks, ranks.comm
    state = load_checkpoint(checkpoints[-1], None)  # the trainer state: checked before any weight is touched
    if state.get("sharding", "none") != g.sharding:
        raise ValueError(f"cannot resume: {checkpoints[-1]} was written with sharding {state.get('sharding', 'none')}"
                         f" and this run has {g.sharding} (DeepSpeed stage / FSDP); its weights and optimiser "
                         f"states are laid out for the former, so resume it the way it was launched")
    if state.get("num_processes", 1) != comm.num:
        raise ValueError(f"cannot resume: {checkpoints[-1]} was written by {state.get('num_processes', 1)} "
                         f"process(es), this run has {comm.num}; every process's random state is in the "
                         f"checkpoint, so resume with the same number")
    if "rng_per_rank" in state:
        state["rng"] = state["rng_per_rank"][comm.rank]
    if g.sharded_state:
        g.load_shards(checkpoints[-1] / SHARDS)
    else:
        load_model(trained, str(checkpoints[-1] / WEIGHTS))
    restore_state(c, parts, state)
    log.info("resumed from %s at step %d", checkpoints[-1], parts["progress"].step)
