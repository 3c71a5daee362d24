"""What `--resume` checks before it loads anything: every tensor of the weights file is one of the model's, of
its shape, and none is missing; the saved config equals this run's but for the keys that may change; the
optimiser's moments have their parameters' shapes. Each refusal names the file."""

from itertools import chain
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model

from tether.trainers.statefile import CheckpointError

# Config keys that may change between a run and its resumption; any other change would make the resumed
# run a different experiment than the one its metrics.jsonl describes. compile and keep_freed_memory change
# speed and round-off only (a compiled run can go on where no C++ compiler is); output_dir changes when a run
# folder is moved (to a disk with room, say) and resumed where it now is; the trackers and the held-out evaluation
# only watch the run (its training metrics are the same with or without them).
RESUMABLE_CHANGES = {"steps", "resume", "checkpoint_every", "keep_checkpoints", "samples_every", "samples_per_step",
                     "max_faults_in_row", "device", "compile", "keep_freed_memory", "logits_chunk_rows", "output_dir", "report_to",
                     "tracker_project", "run_name", "tracker_tags", "mlflow_tracking_uri", "eval_prompts", "eval_every",
                     "eval_sampling"}


def check_weights(file: Path, module: torch.nn.Module) -> None:
    """Every tensor in `file` is one of `module`'s, of its shape, and every one of the module's is there (a tied
    weight once); read from the header, before any weight is touched."""
    if not file.is_file():
        raise CheckpointError(f"cannot resume: {file} is missing (the checkpoint is incomplete, or was written "
                              f"with sharded weights)")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    try:
        with safe_open(str(file), "pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot resume: {file} cannot be read ({err}); it is truncated or was changed") from err
    for key, shape in found.items():
        if key not in expected:
            raise CheckpointError(f"cannot resume: {file} holds {key!r}, which this model does not have; the "
                                  f"checkpoint is of another model")
        if shape != expected[key]:
            raise CheckpointError(f"cannot resume: {file} holds {key} of shape {list(shape)}, but the model's is "
                                  f"{list(expected[key])}; the checkpoint is of another model or was changed")
    ties = {}  # a tied weight is saved once, under one of its names
    for key, tensor in module.state_dict().items():
        ties.setdefault((tensor.data_ptr(), tensor.device, tuple(tensor.shape)), []).append(key)
    missing = [names[0] for names in ties.values() if not any(n in found for n in names)]
    if missing:
        raise CheckpointError(f"cannot resume: {file} lacks {len(missing)} of the model's tensors (first: "
                              f"{missing[0]}); it is truncated or of another model")


def load_weights(file: Path, module: torch.nn.Module) -> None:
    check_weights(file, module)
    try:
        load_model(module, str(file))
    except (RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"cannot resume: loading {file} failed: {err}") from err


def check_state(config, parts: dict, state: dict, where: Path) -> None:
    """The saved config equals this one but for RESUMABLE_CHANGES; the optimiser's moments have its parameters'
    shapes (torch checks only their number). `where`: the state file, for the message."""
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"cannot resume: {where} holds no config (a JSON object of the run's keys)")
    changed = sorted(k for k, v in state["config"].items()
                     if k not in RESUMABLE_CHANGES and getattr(config, k, v) != v)
    if changed:
        details = ", ".join(f"{k}: {state['config'][k]!r} -> {getattr(config, k)!r}" for k in changed)
        raise CheckpointError(f"cannot resume: the config differs from the checkpoint's in {details} ({where}). "
                              f"Only {sorted(RESUMABLE_CHANGES)} may change; use a new output_dir for a different "
                              f"run")
    if "optimizer" in parts and state.get("optimizer") is not None:
        saved = state["optimizer"]
        try:
            params = dict(zip(chain.from_iterable(g["params"] for g in saved["param_groups"]),
                              chain.from_iterable(g["params"] for g in parts["optimizer"].param_groups)))
            for pid, moments in saved["state"].items():
                for name, value in moments.items():
                    if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[pid].shape:
                        raise CheckpointError(f"cannot resume: {where}: the optimiser's {name} of parameter {pid} "
                                              f"has shape {list(value.shape)}, the parameter {list(params[pid].shape)}")
        except (KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"cannot resume: {where}: the optimiser state does not fit this optimiser "
                                  f"({type(err).__name__}: {err})") from err
