"""Checkpoints of `tether reward`: tensors in safetensors, everything else in JSON, nothing pickled.

`OUTPUT_DIR/checkpoints/step-N/` holds `model.safetensors` (the weights), `optimizer.safetensors` (AdamW's
moments and step counts, as `state.<param>.<name>`), `rng.safetensors` (the data-order generator and torch's
global generators, which dropout draws from) and `state.json` (the step, the epoch's data order, the
optimiser's param groups, the scheduler and the config). It is written the way `tether ppo` writes its own
(trainers/checkpoint.py, whose folder helpers it uses): into a temporary folder, every file fsynced, then
renamed into place in one step, older checkpoints removed only after that.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from tether.trainers.checkpoint import (begin_checkpoint, checkpoint_step, fsync_tree, list_checkpoints,
                                        publish_checkpoint)

FORMAT = 1
MODEL, OPTIMIZER, RNG, STATE = "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"


def optimizer_parts(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state_dict as (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of optimizer_parts: a state_dict for `Optimizer.load_state_dict`."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in rest["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def random_state(order_generator: torch.Generator) -> dict[str, torch.Tensor]:
    rng = {"order": order_generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def set_random_state(order_generator: torch.Generator, rng: dict[str, torch.Tensor]) -> None:
    order_generator.set_state(rng["order"])
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def write(root: Path, step: int, model, optimizer, scheduler, order_generator, order: list[int], config,
          keep: int) -> Path:
    """Checkpoint `step`, atomically; keep the newest `keep`."""
    tmp = begin_checkpoint(root, step)
    save_model(model, str(tmp / MODEL))
    tensors, rest = optimizer_parts(optimizer.state_dict())
    save_file(tensors, str(tmp / OPTIMIZER))
    save_file(random_state(order_generator), str(tmp / RNG))
    state = {"format": FORMAT, "step": step, "order": order, "optimizer": rest, "scheduler": scheduler.state_dict(),
             "config": config.to_dict()}
    try:
        text = json.dumps(state)
    except TypeError as error:
        raise TypeError(f"the reward checkpoint's state is not JSON ({error}): is lr_scheduler_type one whose "
                        f"state is plain numbers?") from error
    (tmp / STATE).write_text(text, encoding="utf-8")
    return _commit(root, step, tmp, keep)


def _commit(root: Path, step: int, tmp: Path, keep: int) -> Path:
    """tether ppo's last steps, for a folder whose files are all written already."""
    fsync_tree(tmp)
    return publish_checkpoint(root, step, tmp, keep)


# Keys that may change when a reward run is resumed: where it runs, how it logs and checkpoints, how big the
# eval chunks are; anything else would make the resumed run another experiment than its metrics describe.
RESUMABLE_CHANGES = {"resume", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batch_size", "device",
                     "keep_freed_memory", "report_to", "tracker_project", "run_name", "tracker_tags",
                     "mlflow_tracking_uri"}


def latest(config) -> Path | None:
    """The checkpoint to resume from as `resume` says (None: a fresh run); refuses a fresh run over checkpoints
    and resume=true without one."""
    checkpoints = list_checkpoints(Path(config.output_dir) / "checkpoints")
    if config.resume is False:
        if checkpoints:
            raise ValueError(f"output_dir {config.output_dir!r} holds checkpoints of an earlier reward run (latest: "
                             f"{checkpoints[-1].name}); pass --resume to continue it, or choose a new output_dir")
        return None
    if not checkpoints:
        if config.resume is True:
            raise ValueError(f"resume=true but {config.output_dir!r} holds no checkpoint to resume from")
        return None
    return checkpoints[-1]


def load(path: Path, config, model, optimizer, scheduler, order_generator) -> tuple[int, list[int]]:
    """Restore everything from checkpoint `path`; return (step, the current epoch's data order)."""
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    if state.get("format") != FORMAT or state.get("step") != checkpoint_step(path):
        raise ValueError(f"{path} is not a tether reward checkpoint (format {state.get('format')!r})")
    saved, now = state["config"], config.to_dict()
    changed = sorted(k for k in saved.keys() | now.keys()
                     if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {details}. Only "
                         f"{sorted(RESUMABLE_CHANGES)} may change; use a new output_dir for a different run")
    load_model(model, str(path / MODEL))
    optimizer.load_state_dict(optimizer_state(load_file(str(path / OPTIMIZER)), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    set_random_state(order_generator, load_file(str(path / RNG)))
    return state["step"], state["order"]
