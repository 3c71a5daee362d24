"""Atomic checkpoints: a checkpoint folder either exists complete or not at all.

Written as `checkpoints/.tmp-step-N/` (every file fsynced), renamed to `checkpoints/step-N/` in one
`os.rename`, the folder fsynced; only then are older checkpoints removed. A kill at any moment leaves the
previous complete checkpoint in place and at most a `.tmp-*` folder that is never read. Old checkpoints are
renamed to `.trash-*` before they are deleted, so no half-deleted checkpoint is ever listed either.
"""

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

log = logging.getLogger("tether")
_NAME = re.compile(r"^step-(\d{8})$")
WEIGHTS, STATE, SHARDS = "policy.safetensors", "trainer_state.pt", "shards"


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


def capture_state(trainer) -> dict:
    """Everything besides the weights that the next step depends on."""
    reward_state = getattr(trainer.reward, "state_dict", None)
    return {
        "config": trainer.config.to_dict(),
        "step": trainer.step_count,
        # under DeepSpeed and FSDP the optimiser states are sharded: every process writes its own (`write_checkpoint`)
        **({"optimizer": trainer.optimizer.state_dict()} if not trainer.ranks.sharded_state else {}),
        "scheduler": trainer.scheduler.state_dict(),
        "kl_ctl": trainer.kl_ctl.state_dict(),
        "score_moments": trainer.score_moments.state_dict(),
        "reward": reward_state() if callable(reward_state) else None,
        "support_flips": trainer.support_flips,
        "faults": trainer.faults.state_dict(),
        "order": list(trainer._order),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "sample": trainer.sample_generator.get_state(), "shuffle": trainer.shuffle_generator.get_state(),
                "data": trainer.data_generator.get_state()},
    }


def restore_state(trainer, state: dict) -> None:
    changed = sorted(k for k, v in state["config"].items()
                     if k not in RESUMABLE_CHANGES and getattr(trainer.config, k, v) != v)
    if changed:
        details = ", ".join(f"{k}: {state['config'][k]!r} -> {getattr(trainer.config, k)!r}" for k in changed)
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {details}. Only "
                         f"{sorted(RESUMABLE_CHANGES)} may change; use a new output_dir for a different run")
    trainer.step_count = state["step"]
    if "optimizer" in state:  # else in DeepSpeed's shards, loaded with the weights
        trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.kl_ctl.load_state_dict(state["kl_ctl"])
    trainer.score_moments.load_state_dict(state["score_moments"])
    if state["reward"] is not None and hasattr(trainer.reward, "load_state_dict"):
        trainer.reward.load_state_dict(state["reward"])
    trainer.support_flips = state["support_flips"]
    trainer.faults.load_state_dict(state["faults"])
    trainer._order = list(state["order"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer.sample_generator.set_state(rng["sample"])
    trainer.shuffle_generator.set_state(rng["shuffle"])
    trainer.data_generator.set_state(rng["data"])


def write_checkpoint(trainer) -> Path:
    """The trainer's checkpoint at its current step. On several processes every process must call it: each
    one's random state is gathered into the checkpoint, and the main process writes it. Under DeepSpeed and FSDP
    every process also writes its shard of the weights and optimiser states into the folder's `shards/`."""
    g = trainer.ranks
    state = {**capture_state(trainer), "num_processes": g.num, "sharding": g.sharding}
    if g.num > 1:
        state["rng_per_rank"] = g.gather_lists([state["rng"]])
    root = Path(trainer.config.output_dir) / "checkpoints"
    path = root / f"step-{trainer.step_count:08d}"
    tmp = begin_checkpoint(root, trainer.step_count) if g.is_main else temporary_folder(root, trainer.step_count)
    g.wait()
    if g.sharded_state:
        g.save_shards(tmp / SHARDS)
        g.wait()
    if g.is_main:
        commit_checkpoint(root, trainer.step_count, tmp, None if g.sharded_state else trainer.trainable, state,
                          keep=trainer.config.keep_checkpoints)
    g.wait()
    return path


def maybe_resume(trainer) -> None:
    """Continue from the latest checkpoint in output_dir as `resume` says (true, auto, false); refuse a fresh run
    into a folder that holds one, and a resume with another number of processes."""
    c = trainer.config
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
    g = trainer.ranks
    state = load_checkpoint(checkpoints[-1], None)  # the trainer state: checked before any weight is touched
    if state.get("sharding", "none") != g.sharding:
        raise ValueError(f"cannot resume: {checkpoints[-1]} was written with sharding {state.get('sharding', 'none')}"
                         f" and this run has {g.sharding} (DeepSpeed stage / FSDP); its weights and optimiser "
                         f"states are laid out for the former, so resume it the way it was launched")
    if state.get("num_processes", 1) != trainer.ranks.num:
        raise ValueError(f"cannot resume: {checkpoints[-1]} was written by {state.get('num_processes', 1)} "
                         f"process(es), this run has {trainer.ranks.num}; every process's random state is in the "
                         f"checkpoint, so resume with the same number")
    if "rng_per_rank" in state:
        state["rng"] = state["rng_per_rank"][trainer.ranks.rank]
    if g.sharded_state:
        g.load_shards(checkpoints[-1] / SHARDS)
    else:
        load_model(trainer.trainable, str(checkpoints[-1] / WEIGHTS))
    restore_state(trainer, state)
    log.info("resumed from %s at step %d", checkpoints[-1], trainer.step_count)
